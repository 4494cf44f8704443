"""The 2-D convolution's forms against an independent NumPy convolution, and the dispatch's choices."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.kernels.conv2d import api, conv2d, conv2d_reference, conv2d_width_blocked, resolve_impl
from badnet_jax.kernels.native import CONV2D_DIRECT as TARGET
from badnet_jax.kernels.conv2d.width_blocked import block_geometry, blocked_kernel
from tests.kernels.numpy_conv import CASES, case_id, numpy_conv




@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("block", [1, 2, 3, 4, 8])
def test_width_blocked_equals_numpy_on_integers(case, block):
    # Integer pixels and weights: every float32 partial sum is an exact integer, so any summation order gives
    # the true convolution bit for bit.
    h, w, c, f, kh, kw, strides, padding, dilation = case
    rng = np.random.default_rng(block * 100 + h * w)
    x = rng.integers(0, 256, (3, h, w, c))
    k = rng.integers(-8, 9, (kh, kw, c, f))
    want = numpy_conv(x, k, strides, padding, dilation)
    got = np.asarray(conv2d_width_blocked(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), block,
                                          strides, padding, dilation))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want.astype(np.float32))
    ref = np.asarray(conv2d_reference(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), strides, padding,
                                      dilation))
    np.testing.assert_array_equal(ref, want.astype(np.float32))


@pytest.mark.parametrize("block", [2, 4])
def test_width_blocked_float_error_is_rounding(block):
    # Real-valued inputs: within a few float32 roundings of the float64 convolution, relative to sum |x k|.
    rng = np.random.default_rng(block)
    x = rng.integers(0, 256, (4, 55, 47, 3)).astype(np.float64)
    k = rng.normal(0, 0.05, (4, 4, 3, 20))
    want = numpy_conv(x, k)
    scale = numpy_conv(np.abs(x), np.abs(k))
    got = np.asarray(conv2d_width_blocked(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), block),
                     np.float64)
    assert np.max(np.abs(got - want) / scale) < 48 * 2.0 ** -24


def test_blocked_kernel_places_every_entry_once():
    k = jnp.arange(2 * 3 * 2 * 5, dtype=jnp.float32).reshape(2, 3, 2, 5) + 1
    for block, stride, dil in ((4, 1, 1), (2, 2, 1), (3, 1, 2)):
        kb = np.asarray(blocked_kernel(k, block, stride, dil))
        # Each output column of a block holds the whole kernel once, zeros elsewhere.
        per_col = kb.reshape(2, -1, 2, block, 5)
        for b in range(block):
            nonzero = np.sort(per_col[:, :, :, b, :][per_col[:, :, :, b, :] != 0])
            np.testing.assert_array_equal(nonzero, np.sort(np.asarray(k).ravel()))


def test_block_geometry():
    assert block_geometry(47, 4, 4) == (44, 11, 2)  # conv_1: 11 blocks of 4, each reads 2 input blocks
    assert block_geometry(47, 4, 1) == (44, 44, 4)
    assert block_geometry(34, 3, 2, stride=2) == (16, 8, 2)


def test_resolve_impl_explicit_choices():
    assert resolve_impl((4, 4, 3, 20), impl="reference") == "reference"
    assert resolve_impl((4, 4, 3, 20), impl=1) == "reference"
    assert resolve_impl((4, 4, 3, 20), impl=4) == 4
    assert resolve_impl((3, 3, 40, 60), impl=2) == 2
    assert resolve_impl((3, 3, 40, 64), impl="direct") == "direct"
    with pytest.raises(ValueError, match="float32"):
        resolve_impl((4, 4, 3, 20), impl="direct", dtype=jnp.float64)
    with pytest.raises(ValueError, match="impl"):
        resolve_impl((4, 4, 3, 20), impl="fast")
    with pytest.raises(ValueError, match="impl"):
        resolve_impl((4, 4, 3, 20), impl=0)


@pytest.mark.parametrize("kernel_shape,want", [
    # The narrow cases measured (api's docstring): the rule picks the form that was fastest.
    ((4, 4, 3, 20), 4),  # DeepID's conv_1
    ((3, 3, 3, 16), 2),
    ((3, 3, 3, 32), 2),
    ((5, 5, 3, 6), 4),
    ((3, 3, 1, 32), 2),
    # XLA's own where it ran fastest: 64 or more output channels, 4 or more input channels.
    ((3, 3, 3, 64), "reference"),
    ((3, 3, 3, 128), "reference"),
    ((5, 5, 3, 64), "reference"),
    ((4, 4, 4, 20), "reference"),
    ((3, 3, 20, 40), "reference"),
])
def test_auto_rule_on_a_cpu_without_the_native_kernel(kernel_shape, want):
    assert resolve_impl(kernel_shape, platform="cpu", lanes=None) == want


@pytest.mark.parametrize("kernel_shape,lanes,want", [
    # Few input channels into fewer than 64: direct, whatever its lanes fill.
    ((4, 4, 3, 20), 16, "direct"),  # DeepID's conv_1
    ((3, 3, 3, 16), 16, "direct"),
    ((3, 3, 1, 32), 8, "direct"),
    # A remainder of the vectors, at least 3/4 of them filled: direct (DeepID's conv_2 and conv_3 on AVX-512).
    ((3, 3, 20, 40), 16, "direct"),
    ((3, 3, 40, 60), 16, "direct"),
    ((3, 3, 40, 60), 8, "direct"),
    ((3, 3, 16, 24), 16, "direct"),  # 24 of 32 lanes: the edge
    # Input and output channels both at most 16, whatever the lanes: direct (XLA's narrow matrix product).
    ((3, 3, 16, 16), 16, "direct"),  # a ResNet's 16-channel stage
    ((1, 1, 16, 16), 16, "direct"),
    ((3, 3, 8, 8), 16, "direct"),
    ((3, 3, 8, 8), 8, "direct"),
    ((3, 3, 17, 16), 16, "reference"),  # two input vectors
    ((3, 3, 32, 16), 16, "reference"),
    ((3, 3, 16, 16), 8, "direct"),  # two vectors each with 8 lanes
    ((3, 3, 16, 8), 8, "direct"),
    ((3, 3, 17, 8), 8, "reference"),
    ((3, 3, 8, 17), 8, "reference"),  # 17 of 24 lanes: below 3/4
    # XLA's own: whole vectors (it ran as fast or faster), or too many idle lanes.
    ((3, 3, 40, 40), 8, "reference"),
    ((3, 3, 16, 64), 16, "reference"),
    ((3, 3, 3, 64), 16, "reference"),
    ((3, 3, 40, 20), 16, "reference"),  # 20 of 32 lanes
    ((3, 3, 16, 23), 16, "reference"),  # 23 of 32
    ((3, 3, 40, 20), 8, "direct"),  # 20 of 24
])
def test_auto_rule_on_a_cpu_with_the_native_kernel(kernel_shape, lanes, want):
    assert resolve_impl(kernel_shape, platform="cpu", lanes=lanes) == want


@pytest.mark.parametrize("kernel_shape,want", [
    # A stage with a max pool into at most 64 channels: direct (its fused pool), whatever else the rule says.
    ((3, 3, 16, 64), "direct"),
    ((3, 3, 40, 20), "direct"),
    ((3, 3, 64, 32), "direct"),
    ((3, 3, 16, 80), "reference"),
    ((3, 3, 64, 128), "reference"),
    ((3, 3, 40, 60), "direct"),  # a remainder: direct with or without the pool
])
def test_auto_rule_for_a_pooled_stage(kernel_shape, want):
    assert resolve_impl(kernel_shape, platform="cpu", lanes=16, pooled=True) == want
    assert resolve_impl(kernel_shape, platform="cpu", lanes=None, pooled=True) == "reference"  # no kernel built
    assert resolve_impl(kernel_shape, platform="cpu", lanes=16, pooled=True, dtype=jnp.float64) == "reference"


def test_conv2d_passes_the_pool_to_the_rule(monkeypatch):
    # What conv2d asks the rule: whether its epilogue pools (a window of 1 x 1 is no pool).
    seen = []
    real = api.resolve_impl
    monkeypatch.setattr(api, "resolve_impl", lambda *a, **k: seen.append(k["pooled"]) or real(*a, **k))
    x, k = jnp.ones((1, 8, 8, 16), jnp.float32), jnp.ones((3, 3, 16, 64), jnp.float32)
    for pool in (None, (1, 1), (2, 2)):
        conv2d(x, k, relu=True, pool=pool)
    assert seen == [False, False, True]


def test_direct_is_float32s():
    # The settling's float64 network never runs the float32 kernel.
    assert resolve_impl((4, 4, 3, 20), platform="cpu", dtype=jnp.float64, lanes=16) == 4
    assert resolve_impl((3, 3, 40, 60), platform="cpu", dtype=jnp.float64, lanes=16) == "reference"


def test_auto_rule_elsewhere_is_xla():
    for platform in ("cuda", "rocm", "tpu"):
        assert resolve_impl((4, 4, 3, 20), platform=platform, lanes=16) == "reference"


def test_conv2d_inside_jit_and_vmap_matches_reference():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(0, 256, (2, 4, 23, 19, 3)), jnp.float32)
    k = jnp.asarray(rng.integers(-4, 5, (3, 3, 3, 6)), jnp.float32)
    want = jax.vmap(lambda xx: conv2d_reference(xx, k))(x)
    for impl in ("auto", 2, 4):
        got = jax.jit(jax.vmap(lambda xx, impl=impl: conv2d(xx, k, impl=impl)))(x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_width_blocked_lowers_for_cuda():
    # The blocked form itself lowers for a GPU (impl=4 asks for it explicitly).
    x = jax.ShapeDtypeStruct((8, 55, 47, 3), jnp.float32)
    k = jax.ShapeDtypeStruct((4, 4, 3, 20), jnp.float32)
    exported = jax.export.export(jax.jit(lambda a, b: conv2d_width_blocked(a, b, 4)), platforms=["cuda"])(x, k)
    assert exported.out_avals[0].shape == (8, 52, 44, 20)


def _conv_inputs_channels(exported) -> list[int]:
    # The input channel count of every convolution in the exported module.
    text = exported.mlir_module()
    return [int(m) for m in re.findall(r"stablehlo.convolution.*?tensor<\d+x\d+x\d+x(\d+)xf32>", text)]


def test_auto_is_decided_by_the_platform_lowered_for(monkeypatch):
    # A program exported for a GPU on this CPU host holds XLA's convolution (3 input channels); for a CPU the
    # native kernel's call where it is built, else the width-blocked convolution (B = 4: 12 channels).
    x = jax.ShapeDtypeStruct((8, 55, 47, 3), jnp.float32)
    k = jax.ShapeDtypeStruct((4, 4, 3, 20), jnp.float32)
    fn = jax.jit(lambda a, b: conv2d(a, b))
    cuda = jax.export.export(fn, platforms=["cuda"])(x, k)
    assert _conv_inputs_channels(cuda) == [3] and TARGET not in cuda.mlir_module()
    if api.native_lanes() is not None:
        cpu = jax.export.export(fn, platforms=["cpu"],
                                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TARGET)])(x, k)
        assert TARGET in cpu.mlir_module() and _conv_inputs_channels(cpu) == []
    monkeypatch.setattr(api, "native_lanes", lambda: None)
    fn = jax.jit(lambda a, b: conv2d(a, b))
    assert _conv_inputs_channels(jax.export.export(fn, platforms=["cpu"])(x, k)) == [12]


def test_shapes_the_blocked_form_cannot_take_fall_back_to_xla():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 9, (2, 9, 10, 3))
    k = rng.integers(-3, 4, (3, 3, 3, 8))
    for padding in (((0, 0), (-1, 2)), ((1, 1), (-2, -1))):  # negative padding crops
        got = conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), padding=padding, impl=4)
        want = conv2d_reference(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), padding=padding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    wide = jnp.asarray(rng.integers(-3, 4, (3, 3, 3, 8)), jnp.float32)
    narrow = jnp.asarray(x[:, :, :2], jnp.float32)  # kernel wider than the image: no output column
    assert conv2d(narrow, wide, impl=4).shape == conv2d_reference(narrow, wide).shape == (2, 7, 0, 8)


@pytest.mark.parametrize("block", [1, 2, 4])
def test_bias_is_added_to_every_output(block):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2, 13, 11, 3))
    k = rng.integers(-4, 5, (3, 3, 3, 5))
    b = rng.integers(-9, 10, (5,))
    want = numpy_conv(x, k, padding="SAME") + b
    got = conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), padding="SAME", impl=block,
                 bias=jnp.asarray(b, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    auto = conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), padding="SAME",
                  bias=jnp.asarray(b, jnp.float32))
    np.testing.assert_array_equal(np.asarray(auto), want.astype(np.float32))
