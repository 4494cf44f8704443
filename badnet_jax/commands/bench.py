"""Benchmark the pruning curve: per-layer rates, plain forward, plain and fast sweeps, the per-step loop (the lab's
algorithm), for the lab's DeepID or any model ``load_model`` reads.

    badnet-bench                                  # a random DeepID on random tensors of lab shape
    badnet-bench --model bd_weights.h5 --clean_valid valid.h5 --bd_valid bd_valid.h5
    badnet-bench --model resnet.h5 --input_scale 255 --layers_only
    badnet-bench --example gapnet                 # the embedded GAP-head example on its own data
    badnet-bench --impl pallas --out benchmark_gpu.json
    badnet-bench --model B.h5 --clean_valid v.h5 --bd_valid bv.h5 --grid "impl=reference,pallas;batch_steps=8,16"
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import flags

from badnet_jax import load_lab_h5

from badnet_jax.commands import cli, processes
from badnet_jax.bench import (LAYER_IMAGES, BenchConfig, format_grid, format_layers, kernel_timings, parse_grid,
                              run_benchmark)
from badnet_jax.defense.inputs import EXAMPLES
from badnet_jax.errors import ConfigError, arg, reading
from badnet_jax.io.keras_file import recorded_input_scale
from badnet_jax.io.atomic import atomic_write_text
from badnet_jax.io.model_file import load_model
from badnet_jax.defense.scale import CHOICES, choose_input_scale
from badnet_jax.model import INPUT_HWC, LAB_NUM_CLASSES
from badnet_jax.sweep import SweepOptions

N_CLEAN = flags.DEFINE_integer("n_clean", 11547, "Random clean images (ignored with --clean_valid).")
N_BD = flags.DEFINE_integer("n_bd", 11547, "Random poisoned images (ignored with --bd_valid).")
CLASSES = flags.DEFINE_integer("num_classes", LAB_NUM_CLASSES, "Classes of the random model (ignored with --model).")
CHUNK = flags.DEFINE_integer("chunk", None, "Images per chunk (default 256 on CPU, 4096 on GPU/TPU).")
ORDERS_PER_CALL = flags.DEFINE_integer("orders_per_call", 1, "With --rank_by: orders vmapped together (needs "
                                       "batched steps; see SweepOptions.orders_per_call).")
BATCH_STEPS = flags.DEFINE_integer("batch_steps", None, "Distinct steps per head call (0: one per call inside the "
                                   "scan; default 0 on a CPU and an NVIDIA GPU, 8 there with --orders_per_call > 1 "
                                   "and on a TPU or ROCm GPU; see SweepOptions).")
DEVICES = flags.DEFINE_integer("devices", 0, "Devices the sweeps and the layers shard the images over (0 = all; "
                               "on a CPU one device per core, as badnet-prune runs).")
BUDGET = flags.DEFINE_float("memory_budget", None, "GiB the sweep may use (default: half the device's memory).")
IMPL = flags.DEFINE_enum("impl", "auto", ["auto", "reference", "pallas"], "Masked-head implementation.")
PER_STEP = flags.DEFINE_integer("per_step_steps", None, "Steps of the per-step loop to time (scaled to the model's "
                                "steps, e.g. 61 for the lab's DeepID; default: all).")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the median is reported.")
MODEL = flags.DEFINE_string("model", None, "Keras model file (the lab's DeepID or any CNN load_model reads; default: "
                             "a random DeepID).")
LAYER = flags.DEFINE_string("layer", None, "With --model: the pruned layer (default: the model's own).")
EXAMPLE = flags.DEFINE_enum("example", None, list(EXAMPLES), "Benchmark an embedded example on its own data "
                            "instead of files: deepid (the demo DeepID) or gapnet (the 32x32 GAP-head CNN).")
LAYER_IMGS = flags.DEFINE_integer("layer_images", LAYER_IMAGES, "Images each layer is timed on (the first clean "
                                  "images, repeated where there are fewer).")
LAYERS_ONLY = flags.DEFINE_bool("layers_only", False, "Time the layers only (no forward, sweeps or per-step loop).")
SCALE = flags.DEFINE_enum("input_scale", "auto", list(CHOICES),
                          "The model's input scale: raw (the lab's B), 255 (the 2020 BadNets), auto = measured on "
                          "--clean_valid's labels, else what a badnet-jax file records, else raw.")
CLEAN_VALID = flags.DEFINE_string("clean_valid", None, "Lab h5 of clean images (default: random).")
BD_VALID = flags.DEFINE_string("bd_valid", None, "Lab h5 of poisoned images (default: random).")
SCALING = flags.DEFINE_string("scaling", "", "Device counts for a sharded fast sweep, e.g. 1,2,4 (with "
                              "XLA_FLAGS=--xla_force_host_platform_device_count=4 on a CPU).")
ABLATION = flags.DEFINE_bool("ablation", False, "Also time each shortcut on its own.")
KERNEL_BLOCK_N = flags.DEFINE_string("kernel_block_n", "", "Also time the masked-head kernel alone at these block_n "
                                      "(e.g. 16,32,64; one head call of 8 masks x 4096 images; for a GPU/TPU: on a "
                                      "CPU the kernel is interpreted, ~20 s per call).")
RANK_BY = flags.DEFINE_list("rank_by", [], "Also time the sweep with these rankings at once, e.g. "
                            "activation,clp,l1,random,anp (see badnet-prune --rank_by).")
RANDOM_ORDERS = flags.DEFINE_integer("random_orders", 1, "R of the 'random' ranking in --rank_by.", lower_bound=1)
GRID = flags.DEFINE_string("grid", "", "Time only the fast sweep, once per combination of these options' values, "
                           "e.g. 'impl=reference,pallas;batch_steps=8,16,32;chunk=4096,8192' (also orders_per_call, "
                           "with --rank_by): the options a machine runs fastest, chosen by measurement.")
OUT = flags.DEFINE_string("out", "benchmark.json", "JSON output path.")

# Config fields and arguments -> these flags, so errors name what the user typed.
FLAG_OF = {"n_clean": N_CLEAN.name, "n_bd": N_BD.name, "repeats": REPEATS.name, "per_step_steps": PER_STEP.name,
           "ablation": ABLATION.name, "rankings": RANK_BY.name, "scaling": SCALING.name,
           "layers_only": LAYERS_ONLY.name, "input_scale": SCALE.name, "model": MODEL.name, "layer": LAYER.name,
           "example": EXAMPLE.name, "layer_images": LAYER_IMGS.name, "chunk": CHUNK.name,
           "batch_steps": BATCH_STEPS.name, "impl": IMPL.name, "orders_per_call": ORDERS_PER_CALL.name,
           "rank_by": RANK_BY.name, "random_orders": RANDOM_ORDERS.name, "clean_valid": CLEAN_VALID.name,
           "bd_valid": BD_VALID.name, "grid": GRID.name, "memory_budget": BUDGET.name, "devices": DEVICES.name}


def main(argv: list[str]) -> int:
    cli.setup_logging()

    def bench() -> int:
        cli.refuse_extra_args(argv)
        processes.use_cpu_cores()  # the CPU's cores as devices, as badnet-prune shards its images (--devices 0)
        if EXAMPLE.value and (MODEL.value or CLEAN_VALID.value or BD_VALID.value):
            given = next(f for f in (MODEL, CLEAN_VALID, BD_VALID) if f.value)
            raise ConfigError(f"{arg('example', EXAMPLE.value)} benchmarks an embedded example on its own data; "
                              f"leave out {arg(given.name)}", field="example")
        if LAYER.value and not (MODEL.value or EXAMPLE.value):
            raise ConfigError(f"{arg('layer', LAYER.value)} needs {arg('model')} or {arg('example')}: the random "
                              "DeepID is pruned at pool_3", field="layer")
        config = BenchConfig(n_clean=N_CLEAN.value, n_bd=N_BD.value, num_classes=CLASSES.value,
                             sweep=SweepOptions(impl=IMPL.value, batch_steps=BATCH_STEPS.value, chunk=CHUNK.value,
                                                orders_per_call=ORDERS_PER_CALL.value, devices=DEVICES.value,
                                                memory_budget=cli.memory_budget_bytes(BUDGET.value)),
                             per_step_steps=PER_STEP.value, repeats=REPEATS.value,
                             scaling=cli.parse_ints("scaling", SCALING.value), ablation=ABLATION.value,
                             rankings=tuple(RANK_BY.value), random_orders=RANDOM_ORDERS.value,
                             layer_images=LAYER_IMGS.value, layers_only=LAYERS_ONLY.value,
                             grid=parse_grid(GRID.value) if GRID.value else ())
        block_ns = cli.parse_ints("kernel_block_n", KERNEL_BLOCK_N.value)
        if any(b < 1 for b in block_ns):
            raise ConfigError(f"--kernel_block_n {KERNEL_BLOCK_N.value}: block sizes must be at least 1")
        if block_ns and GRID.value:
            raise ConfigError("--kernel_block_n is not timed with --grid (the fast sweep alone); leave one of them out")
        model, params, scale, path = None, None, "raw", MODEL.value
        clean, x_bd = (None, None), None
        if EXAMPLE.value:
            path = EXAMPLES[EXAMPLE.value][0]
            data, _ = EXAMPLES[EXAMPLE.value][1]()
            clean, x_bd = data["clean_valid"], data["bd_valid"][0]
        if path:
            with reading("model", path):  # an error names the flag as well as the file
                recorded = recorded_input_scale(path)
                model, params = load_model(path, recorded or "raw", LAYER.value)
        hwc = model.input_hwc if model is not None else INPUT_HWC
        if CLEAN_VALID.value:
            with reading("clean_valid", CLEAN_VALID.value):
                clean = load_lab_h5(CLEAN_VALID.value, keep_uint8=True, hwc=hwc)
        if BD_VALID.value:
            with reading("bd_valid", BD_VALID.value):
                x_bd = load_lab_h5(BD_VALID.value, keep_uint8=True, hwc=hwc)[0]
        if model is not None:
            scale = model.input_scale
            if SCALE.value != "auto" or clean[0] is not None or recorded is not None:
                scale = choose_input_scale(model, params, SCALE.value, recorded, *clean, source=str(path)).scale
        elif SCALE.value != "auto":
            scale = SCALE.value
        result = run_benchmark(dataclasses.replace(config, input_scale=scale), params, clean[0], x_bd, clean[1],
                               model=model)
        if block_ns:
            result["kernel"] = kernel_timings(block_ns=block_ns)
        result["command"] = " ".join(sys.argv)
        atomic_write_text(OUT.value, json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"badnet-bench on {result['machine']} (jax {result['jax']}, {result['backend']})")
        for key in sorted(result):
            value = result[key]
            if not isinstance(value, (dict, list)) and value is not None and key != "summary":
                print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")
        print(format_grid(result["grid"]) if "grid" in result else format_layers(result))
        print(result["summary"])
        return 0

    return cli.run(bench, flags=FLAG_OF)
