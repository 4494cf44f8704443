"""badnet_jax.bench: FLOP counts against a count by hand, the kernel timings, and the rankings' work model.

The benchmark run end to end (through ``badnet-bench``) is in tests/commands/test_bench.py.
"""

from __future__ import annotations

import numpy as np

from badnet_jax import bench
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref


def test_flop_counts_match_the_architecture():
    # Expected values: DeepID's layer shapes counted by hand (tests/numpy_ref.py), not bench's own formulas.
    assert bench.TRUNK_FLOPS == numpy_ref.TRUNK_FLOPS == 14_760_960
    assert bench.tail_flops(1283) == numpy_ref.TAIL_FLOPS[1283] == 717_760
    assert abs(bench.tail_flops(1283) - 0.72e6) < 0.01e6  # 0.72 MFLOP per image and mask on the lab's B
    assert bench.tail_flops(200) == numpy_ref.TAIL_FLOPS[200]  # the demo's class count, not the lab's
    assert bench.head_flops(200) == numpy_ref.HEAD_FLOPS[200]
    assert bench.head_flops(1283) == numpy_ref.HEAD_FLOPS[1283]


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
    work = bench._rankings_work([feats], orders, plan, 1283)
    per_order = work["tail_evaluations_per_order"]
    assert per_order == 40 * 41  # every image: the 40 alive channels' steps and the all-pruned one
    trunk, tail = 40 * numpy_ref.TRUNK_FLOPS, per_order * numpy_ref.TAIL_FLOPS[1283]
    q = work["tail_rate_vs_trunk_for_2x"]
    assert abs((trunk + 5 * tail / q) / (trunk + tail / q) - 2) < 1e-12
    assert abs(work["flop_ratio"] - (trunk + 5 * tail) / (trunk + tail)) < 1e-12
    assert work["tail_evaluations_shared"] < 5 * per_order  # the unpruned and all-pruned steps at least
    plain = bench._rankings_work([feats], orders, plan_sweep(PLAIN, [], DeepID(1283)), 1283)
    assert plain["tail_evaluations_per_order"] == 40 * 61
