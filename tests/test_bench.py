"""The benchmark's helpers: analytic FLOP counts and the stand-in lab data writer."""

from __future__ import annotations

import numpy as np

from badnet_jax import load_lab_h5, load_trigger, poison
from badnet_jax import bench
from badnet_jax.attack.synthetic import write_standin_lab_data
from tests.conftest import ASSETS, asset


def test_flop_counts_match_the_architecture():
    # conv_1: 52x44 outputs x 20 filters x 4x4x3 taps, 2 FLOPs per multiply-add; and so on.
    assert bench.TRUNK_FLOPS == 2 * (52 * 44 * 20 * 48 + 24 * 20 * 40 * 180 + 10 * 8 * 60 * 360)
    assert bench.tail_flops(1283) == 2 * (960 * 160 + 160 * 1283)  # 0.72 MFLOP, the budget figure
    assert abs(bench.tail_flops(1283) - 0.72e6) < 0.01e6
    assert bench.tail_flops(200) == 2 * (960 * 160 + 160 * 200)  # the demo's class count, not the lab's
    assert bench.head_flops(200) == 2 * (1200 * 160 + 4 * 3 * 80 * 2 * 2 * 60) + bench.tail_flops(200)


def test_standin_data_is_lab_layout_and_poisoned_with_the_real_trigger(tmp_path):
    asset("faces/lab3/valid_subset.h5")
    written = write_standin_lab_data(str(ASSETS), str(tmp_path), scale=2, base_sizes=(20, 10))
    assert written == {"valid": 40, "test": 20}
    trigger = load_trigger(asset("triggers/sun_glass_trigger.png"))
    for name, n in (("valid", 40), ("test", 20)):
        x, y = load_lab_h5(tmp_path / f"data/cl/{name}.h5", num_classes=1283)
        xb, yb = load_lab_h5(tmp_path / f"data/bd/bd_{name}.h5")
        assert x.shape == (n, 55, 47, 3) and (yb == 0).all()
        np.testing.assert_array_equal(xb, poison(x, trigger))


def test_kernel_timings_reports_each_block_size_and_its_agreement():
    out = bench.kernel_timings(masks=2, images=24, num_classes=37, block_ns=(8, 16), repeats=1)
    assert set(out) >= {"reference", "pallas_block_n8", "pallas_block_n16"}
    for name in ("reference", "pallas_block_n8", "pallas_block_n16"):
        assert out[name]["s"] > 0 and out[name]["agree"] == 1.0  # interpret mode on CPU equals the reference


def test_benchmark_cli_measures_the_input_scale_and_prints_a_summary(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--model",
                           str(asset("models/hackml2020/sunglasses_bd_weights.h5")), "--clean_valid",
                           str(asset("faces/lab3/valid_subset.h5")), "--n_bd", "8", "--per_step_steps", "1",
                           "--repeats", "1", "--rank_by", "activation,l1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Input scale 255 (measured on 47 clean images" in proc.stderr
    result = json.loads(out.read_text())
    assert result["num_classes"] == 1283 and result["n_clean"] == 47 and result["n_bd"] == 8
    ranked = result["rankings"]
    assert ranked["orders"] == 2 and ranked["vs_one"] > 0
    # Two orders' FLOPs against one: the trunk once (55 images), the tail once per order (CPU: no batch rounding,
    # so each order's evaluations are the sweep's count), less the steps the two orders share.
    e, trunk = ranked["tail_evaluations_per_order"], 55 * bench.TRUNK_FLOPS
    assert e == round(result["head_evaluations_per_image"] * 55) and e < ranked["tail_evaluations_shared"] < 2 * e
    one = trunk + e * bench.tail_flops(1283)
    assert abs(ranked["flop_ratio"] - (trunk + 2 * e * bench.tail_flops(1283)) / one) < 1e-12
    assert 1 < ranked["flop_ratio_shared"] < ranked["flop_ratio"] < 2
    assert ranked["tail_rate_vs_trunk_for_2x"] == 0  # two orders are within 2x of one at any rates
    assert proc.stdout.strip().splitlines()[-1].startswith("fast sweep ") and "% of the measured matmul peak" in proc.stdout
    flops = result["flops_per_image"]
    assert flops["tail_after_prefix_sums"] == bench.tail_flops(1283)


def test_rankings_work_names_the_tail_rate_at_which_r_orders_take_twice_one():
    """At the reported rate ratio q (tail FLOPs run q times faster than the trunk's), R orders take exactly 2x one."""
    from badnet_jax.sweep import PLAIN, SweepOptions, plan_sweep

    feats = np.maximum(np.random.default_rng(0).normal(size=(40, 5, 4, 60)), 0).astype(np.float32)
    feats[:, :, :, :20] = 0  # 20 dead channels
    orders = np.stack([np.random.default_rng(s).permutation(60) for s in range(5)])
    plan = plan_sweep(SweepOptions(chunk=8), [], 1283)
    work = bench._rankings_work([feats], orders, plan, 1283)
    per_order = work["tail_evaluations_per_order"]
    assert per_order == 40 * 41  # every image: the 40 alive channels' steps and the all-pruned one
    trunk, tail = 40 * bench.TRUNK_FLOPS, per_order * bench.tail_flops(1283)
    q = work["tail_rate_vs_trunk_for_2x"]
    assert abs((trunk + 5 * tail / q) / (trunk + tail / q) - 2) < 1e-12
    assert abs(work["flop_ratio"] - (trunk + 5 * tail) / (trunk + tail)) < 1e-12
    assert work["tail_evaluations_shared"] < 5 * per_order  # the unpruned and all-pruned steps at least
    plain = bench._rankings_work([feats], orders, plan_sweep(PLAIN, [], 1283), 1283)
    assert plain["tail_evaluations_per_order"] == 40 * 61
