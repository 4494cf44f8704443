"""badnet_jax.bench.run: the kernel timings, the rankings' work model, and a run whose peak measurements disagree
flagged as noisy. The benchmark run end to end (through ``badnet-bench``) is in tests/commands/test_bench.py."""

from __future__ import annotations

import numpy as np
import pytest

from badnet_jax import bench
from badnet_jax.bench import run as bench_run
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref


def test_kernel_timings_reports_each_block_size_and_its_agreement():
    out = bench.kernel_timings(masks=2, images=24, num_classes=37, block_ns=(8, 16), repeats=1)
    assert set(out) >= {"reference", "pallas_block_n8", "pallas_block_n16"}
    for name in ("reference", "pallas_block_n8", "pallas_block_n16"):
        assert out[name]["s"] > 0 and out[name]["agree"] == 1.0  # interpret mode on CPU equals the reference


def test_rankings_work_names_the_tail_rate_at_which_r_orders_take_twice_one():
    """At the reported rate ratio q (tail FLOPs run q times faster than the trunk's), R orders take exactly 2x one."""
    from badnet_jax.sweep import PLAIN, SweepOptions, plan_sweep

    feats = np.maximum(np.random.default_rng(0).normal(size=(40, 5, 4, 60)), 0).astype(np.float32)
    feats[:, :, :, :20] = 0  # 20 dead channels
    orders = np.stack([np.random.default_rng(s).permutation(60) for s in range(5)])
    plan = plan_sweep(SweepOptions(chunk=8), [], DeepID(1283))
    work = bench_run._rankings_work([feats], orders, plan, numpy_ref.TRUNK_FLOPS, numpy_ref.TAIL_FLOPS[1283])
    per_order = work["tail_evaluations_per_order"]
    assert per_order == 40 * 41  # every image: the 40 alive channels' steps and the all-pruned one
    trunk, tail = 40 * numpy_ref.TRUNK_FLOPS, per_order * numpy_ref.TAIL_FLOPS[1283]
    q = work["tail_rate_vs_trunk_for_2x"]
    assert abs((trunk + 5 * tail / q) / (trunk + tail / q) - 2) < 1e-12
    assert abs(work["flop_ratio"] - (trunk + 5 * tail) / (trunk + tail)) < 1e-12
    assert work["tail_evaluations_shared"] < 5 * per_order  # the unpruned and all-pruned steps at least
    plain = bench_run._rankings_work([feats], orders, plan_sweep(PLAIN, [], DeepID(1283)), numpy_ref.TRUNK_FLOPS,
                                 numpy_ref.TAIL_FLOPS[1283])
    assert plain["tail_evaluations_per_order"] == 40 * 61


@pytest.mark.parametrize("peaks,noisy", [((100.0, 150.0), True), ((150.0, 100.0), True), ((100.0, 110.0), False)])
def test_a_run_whose_peak_measurements_disagree_says_it_is_noisy(peaks, noisy, monkeypatch):
    """The peak is measured before and after the layers; the highest one is the peak every share is of, and
    measurements more than 15% apart flag the run in its JSON, its summary and its table."""
    from badnet_jax.attack.gap_demo import gap_model

    measured = iter(peaks)
    monkeypatch.setattr(bench_run, "matmul_peak_gflops", lambda: next(measured))
    config = bench.BenchConfig(layers_only=True, layer_images=8, repeats=1)
    out = bench.run_benchmark(config, model=gap_model())
    assert out["matmul_peak_gflops_each"] == list(peaks) and out["matmul_peak_gflops"] == max(peaks)
    for r in out["layers"]:
        assert abs(r["peak_share"] - r["gflops"] / max(peaks)) < 1e-12
    if noisy:
        assert out["noisy"].startswith("the matmul peak measured 100 to 150 GFLOP/s in this run (50% apart")
        assert out["summary"].endswith(f"[NOISY: {out['noisy']}]")
        assert bench.format_layers(out).splitlines()[1] == f"NOISY: {out['noisy']}"
    else:
        assert out["noisy"] is None and "NOISY" not in out["summary"] and "NOISY" not in bench.format_layers(out)


def test_a_full_run_measures_the_peak_a_third_time_after_the_sweeps(monkeypatch):
    from badnet_jax.attack.gap_demo import gap_model

    measured = iter((100.0, 101.0, 160.0))  # steady through the layers, faster by the end
    monkeypatch.setattr(bench_run, "matmul_peak_gflops", lambda: next(measured))
    config = bench.BenchConfig(n_clean=16, n_bd=8, layer_images=8, repeats=1, per_step_steps=1)
    out = bench.run_benchmark(config, model=gap_model())
    assert out["matmul_peak_gflops_each"] == [100.0, 101.0, 160.0] and out["matmul_peak_gflops"] == 160.0
    for r in out["layers"]:
        assert abs(r["peak_share"] - r["gflops"] / 160.0) < 1e-12
    assert out["noisy"].startswith("the matmul peak measured 100 to 160 GFLOP/s") and "NOISY" in out["summary"]
