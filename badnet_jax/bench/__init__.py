"""Throughput benchmark of the pruning curve, for any model: per-layer rates against the machine's matmul peak,
the plain forward, the sweep variants and a per-step loop (``badnet-bench``, ``scripts/benchmark.py``).

* ``machine``: what the run ran on, the float32 matmul peak, whether the run was too noisy to trust;
* ``layers``: FLOPs per image from the layer stages, each stage timed alone, the per-layer table;
* ``grid``: the fast sweep timed for every combination of a few options, to choose them by measurement;
* ``run``: :func:`run_benchmark` of a :class:`BenchConfig`, and the masked-head kernels' timings.
"""

from badnet_jax.bench.grid import GRID_FIELDS, format_grid, grid_options, parse_grid, plan_label, time_grid
from badnet_jax.bench.layers import (CONTRIB_FLOPS, LAYER_IMAGES, STEPS, TRUNK_FLOPS, format_layers, head_flops,
                                     layer_timings, model_flops, tail_flops)
from badnet_jax.bench.machine import NOISY_PEAK_SPREAD, cpu_model, machine_name, matmul_peak_gflops, noise_note
from badnet_jax.bench.run import BenchConfig, kernel_timings, run_benchmark

__all__ = [
    "BenchConfig", "CONTRIB_FLOPS", "GRID_FIELDS", "LAYER_IMAGES", "NOISY_PEAK_SPREAD", "STEPS", "TRUNK_FLOPS",
    "cpu_model", "format_grid", "format_layers", "grid_options", "head_flops", "kernel_timings", "layer_timings",
    "machine_name", "matmul_peak_gflops", "model_flops", "noise_note", "parse_grid", "plan_label", "run_benchmark",
    "tail_flops", "time_grid",
]
