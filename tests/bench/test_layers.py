"""badnet_jax.bench.layers: FLOP counts against a count by hand, the per-layer timings of any model with their
share of the peak, and the blocks a layer is timed in."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import bench
from badnet_jax.bench import layers as bench_layers
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref
from tests.cli import run_python


def test_flop_counts_match_the_architecture():
    # Expected values: DeepID's layer shapes counted by hand (tests/numpy_ref.py), not bench's own formulas.
    assert bench.TRUNK_FLOPS == numpy_ref.TRUNK_FLOPS == 14_760_960
    assert bench.tail_flops(1283) == numpy_ref.TAIL_FLOPS[1283] == 717_760
    assert abs(bench.tail_flops(1283) - 0.72e6) < 0.01e6  # 0.72 MFLOP per image and mask on the lab's B
    assert bench.tail_flops(200) == numpy_ref.TAIL_FLOPS[200]  # the demo's class count, not the lab's
    assert bench.head_flops(200) == numpy_ref.HEAD_FLOPS[200]
    assert bench.head_flops(1283) == numpy_ref.HEAD_FLOPS[1283]


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


@pytest.mark.parametrize("block", [1, 4, 12])
def test_layer_blocks_that_tile_the_input_sum_the_layer_over_every_image_once(block):
    """The per-layer timing's blocks, split up front when they tile the input, cover every image once: the sum
    equals the layer's sum over all images."""
    x = np.random.default_rng(0).standard_normal((12, 3, 2)).astype(np.float32)
    fn = lambda c: jnp.tanh(c) * 3.0
    got = jax.jit(lambda a: bench_layers.summed_in_blocks(fn, a, block))(x)
    np.testing.assert_allclose(float(got), float(np.tanh(x.astype(np.float64)).sum() * 3.0), rtol=1e-5)


def test_layer_timings_shard_the_images_over_the_devices_as_the_sweep_does():
    """Over two CPU devices (a second process: the device count is fixed when JAX starts), every stage's blocks
    sum the same as on one device, the compiled program takes its images split between the two, and the images
    are cut to a multiple of the devices."""
    code = """if True:
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from badnet_jax import bench
        from badnet_jax.bench.layers import summed_call
        from badnet_jax.sweep.run import data_mesh
        from badnet_jax.attack.gap_demo import gap_model
        model = gap_model()
        params = model.init_params(0)
        x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3)).astype(np.uint8)
        rows = bench.layer_timings(model, params, x, repeats=1, trunk_block=3, devices=2)
        assert {(r["images"], r["devices"]) for r in rows} == {(6, 2)}, rows
        fn = lambda p, v: model.features(p, v)
        v = jnp.asarray(x[:6], jnp.float32)
        mesh = data_mesh(2)
        sharded = jax.device_put(v, NamedSharding(mesh, P("data")))
        compiled = summed_call(fn, 3, mesh).lower(params, sharded).compile()
        assert len(compiled.input_shardings[0][1].device_set) == 2
        print(float(compiled(params, sharded)), float(summed_call(fn, 3)(params, v)))
    """
    proc = run_python(code, env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = map(float, proc.stdout.split())
    from badnet_jax.attack.gap_demo import gap_model

    model = gap_model()
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3)).astype(np.uint8)
    feats = model.features(model.init_params(0), jnp.asarray(x[:6], jnp.float32))  # all six at once, here
    want = float(np.asarray(feats, np.float64).sum())
    np.testing.assert_allclose([two, one], [want, want], rtol=1e-5)
