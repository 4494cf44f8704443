"""badnet_jax.bench: FLOP counts against a count by hand, the per-layer timings of any model, the machine's
name, the kernel timings, and the rankings' work model.

The benchmark run end to end (through ``badnet-bench``) is in tests/commands/test_bench.py.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    work = bench._rankings_work([feats], orders, plan, numpy_ref.TRUNK_FLOPS, numpy_ref.TAIL_FLOPS[1283])
    per_order = work["tail_evaluations_per_order"]
    assert per_order == 40 * 41  # every image: the 40 alive channels' steps and the all-pruned one
    trunk, tail = 40 * numpy_ref.TRUNK_FLOPS, per_order * numpy_ref.TAIL_FLOPS[1283]
    q = work["tail_rate_vs_trunk_for_2x"]
    assert abs((trunk + 5 * tail / q) / (trunk + tail / q) - 2) < 1e-12
    assert abs(work["flop_ratio"] - (trunk + 5 * tail) / (trunk + tail)) < 1e-12
    assert work["tail_evaluations_shared"] < 5 * per_order  # the unpruned and all-pruned steps at least
    plain = bench._rankings_work([feats], orders, plan_sweep(PLAIN, [], DeepID(1283)), numpy_ref.TRUNK_FLOPS,
                                 numpy_ref.TAIL_FLOPS[1283])
    assert plain["tail_evaluations_per_order"] == 40 * 61


def test_deepid_layer_flops_are_the_layer_shapes_counted_by_hand():
    # 2 x multiply-adds: a conv's kernel (kh * kw * cin * cout) at each output position, a dense layer's kernel.
    want = {"conv_1": 2 * 52 * 44 * 4 * 4 * 3 * 20, "conv_2": 2 * 24 * 20 * 3 * 3 * 20 * 40,
            "conv_3": 2 * 10 * 8 * 3 * 3 * 40 * 60, "fc_1": 2 * 1200 * 160, "conv_4": 2 * 4 * 3 * 2 * 2 * 60 * 80,
            "fc_2": 2 * 960 * 160, "output": 2 * 160 * 1283}
    stages = DeepID(1283).layer_stages()
    assert {s.name: s.flops for s in stages} == want
    assert [s.part for s in stages] == ["trunk"] * 3 + ["affine"] * 2 + ["tail"] * 2
    flops = bench.model_flops(DeepID(1283))
    assert flops == {"trunk": numpy_ref.TRUNK_FLOPS, "channel_contributions": numpy_ref.CONTRIBUTION_FLOPS,
                     "tail_after_prefix_sums": numpy_ref.TAIL_FLOPS[1283], "masked_head": numpy_ref.HEAD_FLOPS[1283]}


def test_layer_timings_time_every_stage_then_the_trunk_and_head_and_their_share_of_the_peak():
    from badnet_jax.attack.gap_demo import gap_model

    model = gap_model()
    params = model.init_params(0)
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    rows = bench.layer_timings(model, params, x, repeats=1, peak_gflops=100.0)
    assert [(r["name"], r["part"]) for r in rows] == [("conv_1", "trunk"), ("conv_2", "trunk"), ("conv_3", "trunk"),
                                                      ("output", "tail"), ("trunk", "trunk"), ("head", "head")]
    # 3x3 'same' convolutions, 16, 32, 32 channels, the second of stride 2: kernel x output positions, by hand.
    conv = [2 * 32 * 32 * 9 * 3 * 16, 2 * 16 * 16 * 9 * 16 * 32, 2 * 16 * 16 * 9 * 32 * 32]
    assert [r["flops_per_image"] for r in rows] == [*conv, 2 * 32 * 10, sum(conv), 2 * 32 * 10]
    for r in rows:
        assert r["images"] == 6 and r["s"] > 0 and r["flops_from"] == "layer shapes"
        assert abs(r["gflops"] - 6 * r["flops_per_image"] / r["s"] / 1e9) < 1e-9 * r["gflops"]
        assert abs(r["peak_share"] - r["gflops"] / 100.0) < 1e-12


def test_a_model_without_layer_counts_gets_xla_counts_said_to_be_xla():
    from tests.models.test_flax_model import _model

    model, params = _model()
    x = np.random.default_rng(0).integers(0, 256, (4, *model.input_hwc)).astype(np.uint8)
    rows = bench.layer_timings(model, params, x, repeats=1)
    assert [r["name"] for r in rows] == ["trunk", "head"]  # nothing inside a Flax module is known
    for r in rows:
        assert r["flops_from"] == "XLA cost analysis" and r["peak_share"] is None
    # XLA counts every op, and a 'same' convolution's taps inside the image only: 3x3, 3 -> 8 channels on 16x16
    # (46 taps in bounds per axis: 16 x 3 less one at each edge), then 8 -> 12 at stride 2 to 8x8 (padded after
    # only: 23 per axis), by hand; the relus and biases add a little.
    convs = 2 * 46 * 46 * 3 * 8 + 2 * 23 * 23 * 8 * 12
    assert convs <= rows[0]["flops_per_image"] < 1.1 * convs
    assert bench.model_flops(model)["trunk"] is None


def test_the_machine_is_named_by_its_cpu_model_on_a_cpu(monkeypatch):
    import subprocess

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout if shutil.which("lscpu") \
        else ""
    named = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name:")]
    if named:
        assert bench.cpu_model() == " ".join(named[0].split())
    assert bench.cpu_model()
    assert bench.machine_name() == bench.cpu_model()  # the tests run on the CPU backend


@pytest.mark.parametrize("block", [1, 4, 12])
def test_layer_blocks_that_tile_the_input_sum_the_layer_over_every_image_once(block):
    """The per-layer timing's blocks, split up front when they tile the input, cover every image once: the sum
    equals the layer's sum over all images."""
    x = np.random.default_rng(0).standard_normal((12, 3, 2)).astype(np.float32)
    fn = lambda c: jnp.tanh(c) * 3.0
    got = jax.jit(lambda a: bench._summed_in_blocks(fn, a, block))(x)
    np.testing.assert_allclose(float(got), float(np.tanh(x.astype(np.float64)).sum() * 3.0), rtol=1e-5)


@pytest.mark.parametrize("peaks,noisy", [((100.0, 150.0), True), ((150.0, 100.0), True), ((100.0, 110.0), False)])
def test_a_run_whose_peak_measurements_disagree_says_it_is_noisy(peaks, noisy, monkeypatch):
    """The peak is measured before and after the layers; the highest one is the peak every share is of, and
    measurements more than 15% apart flag the run in its JSON, its summary and its table."""
    from badnet_jax.attack.gap_demo import gap_model

    measured = iter(peaks)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda: next(measured))
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
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda: next(measured))
    config = bench.BenchConfig(n_clean=16, n_bd=8, layer_images=8, repeats=1, per_step_steps=1)
    out = bench.run_benchmark(config, model=gap_model())
    assert out["matmul_peak_gflops_each"] == [100.0, 101.0, 160.0] and out["matmul_peak_gflops"] == 160.0
    for r in out["layers"]:
        assert abs(r["peak_share"] - r["gflops"] / 160.0) < 1e-12
    assert out["noisy"].startswith("the matmul peak measured 100 to 160 GFLOP/s") and "NOISY" in out["summary"]
