"""The native direct convolution against the independent NumPy convolution, and its transformations (its
build: test_native.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.kernels.conv2d import conv2d, conv2d_direct, conv2d_reference
from badnet_jax.kernels.native import native_library
from badnet_jax.kernels.conv2d.reference import epilogue
from tests.kernels.numpy_conv import CASES, case_id, numpy_conv, numpy_epilogue

pytestmark = pytest.mark.skipif(native_library() is None and not os.environ.get("CI"),
                                reason="no C++ compiler here: the native kernel cannot be built")

DIRECT_CASES = [  # the shared cases, DeepID's other convolutions, and a row wider than any register tile
    CASES[0],
    (26, 22, 20, 40, 3, 3, (1, 1), "VALID", (1, 1)),  # conv_2
    (12, 10, 40, 60, 3, 3, (1, 1), "VALID", (1, 1)),  # conv_3
    (5, 4, 60, 80, 2, 2, (1, 1), "VALID", (1, 1)),  # conv_4
    *CASES[1:],
    (4, 61, 2, 7, 2, 3, (1, 1), "VALID", (1, 1)),
]


def _integers(case, n=3, seed=0):
    h, w, c, f, kh, kw = case[:6]
    rng = np.random.default_rng(seed + h * w * f)
    return rng.integers(0, 256, (n, h, w, c)), rng.integers(-8, 9, (kh, kw, c, f)), rng.integers(-50, 51, (f,))


@pytest.mark.parametrize("case", DIRECT_CASES, ids=case_id)
def test_direct_equals_numpy_on_integers(case):
    # Integer pixels and weights: every float32 partial sum is an exact integer, so any summation order gives
    # the true convolution bit for bit.
    _, _, _, _, _, _, strides, padding, dilation = case
    x, k, b = _integers(case)
    want = numpy_conv(x, k, strides, padding, dilation) + b
    got = np.asarray(jax.jit(lambda a, kk, bb: conv2d_direct(a, kk, strides, padding, dilation, bb))(
        jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("f", [1, 7, 8, 9, 15, 16, 17, 24, 31, 33, 48, 64, 65, 80, 129])
@pytest.mark.parametrize("w", [1, 2, 5, 11, 23, 30])
def test_every_channel_count_and_row_width(f, w):
    # Output channels on both sides of every vector boundary (8 and 16 lanes), rows narrower and wider than
    # the register tiles (their widths 1 .. 24).
    rng = np.random.default_rng(f * 100 + w)
    x = rng.integers(-9, 10, (2, 4, w + 2, 3))
    k = rng.integers(-9, 10, (3, 3, 3, f))
    b = rng.integers(-9, 10, (f,))
    want = numpy_conv(x, k) + b
    got = conv2d_direct(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), bias=jnp.asarray(b, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    # The fused epilogue over the same rows: its scratch holds whole vectors per pixel.
    got = conv2d_direct(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), bias=jnp.asarray(b, jnp.float32),
                        relu=True, pool=(2, 2))
    np.testing.assert_array_equal(np.asarray(got), numpy_epilogue(want, True, (2, 2)).astype(np.float32))


@pytest.mark.parametrize("case", [c for c in DIRECT_CASES if c[6][1] == 1], ids=case_id)
def test_the_columns_form_equals_numpy_on_integers(case):
    _, _, _, _, _, _, strides, padding, dilation = case
    x, k, b = _integers(case)
    want = numpy_conv(x, k, strides, padding, dilation) + b
    got = conv2d_direct(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), strides, padding, dilation,
                        jnp.asarray(b, jnp.float32), form="columns")
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


@pytest.mark.parametrize("w", [15, 16, 17, 33, 47, 48, 65, 80])
@pytest.mark.parametrize("f", [1, 5, 9, 20, 25])
def test_both_forms_compute_the_same_bits(w, f):
    # Real-valued inputs, so the summation order shows: both forms add each output's terms in one order. Rows
    # of 1 to 5 column vectors (the columns form's tiles take 1 to 4 with 16 lanes, 1 to 3 with 8, then the rest), channel counts around
    # its tiles of 6 to 24 channels, and every epilogue shape, NaN and infinities included.
    rng = np.random.default_rng(w * 100 + f)
    x = rng.standard_normal((2, 7, w + 3, 3)).astype(np.float32)
    x[0, 2, 5, 1], x[1, 4, -1, 0], x[1, 0, 3, 2] = np.nan, np.inf, -np.inf
    k = rng.standard_normal((3, 4, 3, f)).astype(np.float32)
    b = rng.standard_normal((f,)).astype(np.float32)
    for relu, pool in ((False, None), (True, None), (True, (2, 2)), (False, (2, 2)), (True, (3, 2)), (False, (1, 3))):
        outs = [np.asarray(conv2d_direct(jnp.asarray(x), jnp.asarray(k), bias=jnp.asarray(b), relu=relu, pool=pool,
                                         form=form)) for form in ("channels", "columns", "auto")]
        for got in outs[1:]:
            np.testing.assert_array_equal(got.view(np.uint32), outs[0].view(np.uint32), err_msg=f"{relu} {pool}")
    dilated = [np.asarray(conv2d_direct(jnp.asarray(x), jnp.asarray(k), dilation=(2, 2), bias=jnp.asarray(b),
                                        form=form)) for form in ("channels", "columns")]
    np.testing.assert_array_equal(dilated[1].view(np.uint32), dilated[0].view(np.uint32))


def test_both_forms_keep_a_negative_zero_bias():
    # Zero terms on a -0.0 bias: the output is the bias itself, -0.0, in either form (without a ReLU to hide it).
    x, k = jnp.zeros((1, 4, 20, 1), jnp.float32), -jnp.ones((1, 1, 1, 2), jnp.float32)
    for form in ("channels", "columns", "auto"):
        got = np.asarray(conv2d_direct(x, k, bias=jnp.array([-0.0, 0.0], jnp.float32), form=form))
        assert np.signbit(got[..., 0]).all() and not np.signbit(got[..., 1]).any(), form


def test_float_error_is_rounding():
    # Real-valued inputs: within 48 float32 roundings (the terms of a sum) of the float64 convolution, relative
    # to sum |x k| + |b|.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 55, 47, 3)).astype(np.float64)
    k = rng.normal(0, 0.05, (4, 4, 3, 20))
    b = rng.normal(0, 1, (20,))
    want = numpy_conv(x, k) + b
    scale = numpy_conv(np.abs(x), np.abs(k)) + np.abs(b)
    got = np.asarray(conv2d_direct(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32),
                                   bias=jnp.asarray(b, jnp.float32)), np.float64)
    assert np.max(np.abs(got - want) / scale) < 48 * 2.0 ** -24


def test_an_image_gets_the_same_bits_in_any_batch():
    # The sums run in a fixed order per output, whichever thread computes which rows.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(0, 50, (37, 20, 19, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 0.1, (4, 4, 3, 20)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 1, (20,)), jnp.float32)
    whole = np.asarray(conv2d_direct(x, k, bias=b))
    for i in (0, 17, 36):
        np.testing.assert_array_equal(np.asarray(conv2d_direct(x[i:i + 1], k, bias=b))[0], whole[i])


def test_vmap_over_images_and_over_kernels():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(0, 256, (3, 2, 9, 8, 3)), jnp.float32)
    k = jnp.asarray(rng.integers(-4, 5, (3, 3, 3, 17)), jnp.float32)
    ks = jnp.asarray(rng.integers(-4, 5, (3, 3, 3, 3, 17)), jnp.float32)
    b = jnp.asarray(rng.integers(-4, 5, (17,)), jnp.float32)
    want = np.stack([numpy_conv(np.asarray(xi), np.asarray(k)) + np.asarray(b) for xi in x])
    got = jax.jit(jax.vmap(lambda xi: conv2d_direct(xi, k, bias=b)))(x)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    want = np.stack([numpy_conv(np.asarray(xi), np.asarray(ki)) + np.asarray(b) for xi, ki in zip(x, ks)])
    got = jax.vmap(lambda xi, ki: conv2d_direct(xi, ki, bias=b))(x, ks)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


def test_gradients_are_the_convolutions():
    # Differentiated through XLA's convolution: the same gradients as the reference's.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(0, 1, (2, 9, 8, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 1, (3, 3, 3, 17)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 1, (17,)), jnp.float32)

    def loss(fn):
        return lambda xx, kk, bb: jnp.sum(jnp.tanh(fn(xx, kk, bb)))

    got = jax.grad(loss(lambda xx, kk, bb: conv2d_direct(xx, kk, (1, 2), "SAME", bias=bb)), (0, 1, 2))(x, k, b)
    want = jax.grad(loss(lambda xx, kk, bb: conv2d_reference(xx, kk, (1, 2), "SAME") + bb[None, None, None, :]), (0, 1, 2))(x, k, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_empty_batch_and_no_output():
    k = jnp.ones((3, 3, 3, 5), jnp.float32)
    assert conv2d_direct(jnp.ones((0, 9, 9, 3), jnp.float32), k).shape == (0, 7, 7, 5)
    assert conv2d_direct(jnp.ones((2, 9, 2, 3), jnp.float32), k).shape == (2, 7, 0, 5)
    assert conv2d_direct(jnp.ones((2, 9, 9, 3), jnp.float32), k, pool=(8, 8)).shape == (2, 0, 0, 5)
    for form in ("channels", "columns"):  # no output channels
        got = conv2d_direct(jnp.ones((2, 9, 20, 3), jnp.float32), jnp.ones((3, 3, 3, 0), jnp.float32), form=form)
        assert got.shape == (2, 7, 18, 0)
    for batch in ((0, 2), (3, 0)):  # vmap over an empty axis, or of empty batches
        got = jax.vmap(lambda a: conv2d(a, k, relu=True, pool=(2, 2)))(jnp.ones((*batch, 9, 9, 3), jnp.float32))
        assert got.shape == (*batch, 3, 3, 5)


@pytest.mark.parametrize("args,match", [
    (dict(bias=jnp.zeros(4)), "bias must be \\(5,\\)"),
    (dict(kernel_HxWxIxO=jnp.ones((3, 3, 2, 5))), "does not fit images of 3 channels"),
    (dict(kernel_HxWxIxO=jnp.ones((0, 3, 3, 5))), "does not fit"),
    (dict(pool=(0, 2)), "pool must be two integers >= 1"),
    (dict(strides=(0, 1)), "strides must be"),
    (dict(form="rows"), "form must be one of"),
    (dict(form="columns", strides=(1, 2)), "'columns' with a column stride of 1"),
])
def test_bad_arguments_are_refused_when_traced_naming_the_argument(args, match):
    call = dict(x_NxHxWxC=jnp.ones((2, 9, 9, 3), jnp.float32), kernel_HxWxIxO=jnp.ones((3, 3, 3, 5)))
    with pytest.raises(ValueError, match=match):
        conv2d_direct(**{**call, **args})
    with jax.enable_x64(True), pytest.raises(ValueError, match="computes float32, got float64 images"):
        conv2d_direct(jnp.ones((2, 9, 9, 3), jnp.float64), jnp.ones((3, 3, 3, 5), jnp.float64))


def test_inside_shard_map_the_output_varies_like_the_images():
    # shard_map's default check: the custom call's result is marked varying over the mesh axis as the images
    # are, so "auto" (a platform_dependent between the kernel and XLA's form) type-checks.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = jax.sharding.PartitionSpec("data")
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.integers(0, 256, (4, 13, 11, 3)), jnp.float32)
    k = jnp.asarray(rng.integers(-8, 9, (3, 3, 3, 20)), jnp.float32)
    want = numpy_epilogue(numpy_conv(np.asarray(x), np.asarray(k)), True, (2, 2)).astype(np.float32)
    for impl in ("auto", "direct"):
        fn = jax.jit(jax.shard_map(lambda a: conv2d(a, k, impl=impl, relu=True, pool=(2, 2)), mesh=mesh,
                                   in_specs=spec, out_specs=spec))
        np.testing.assert_array_equal(np.asarray(fn(x)), want)


def test_inside_shard_map_a_per_device_kernel_makes_the_output_vary():
    # A kernel that differs per device gives outputs that differ per device: one replicated output is refused,
    # as for XLA's convolution, not answered with one device's.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    P = jax.sharding.PartitionSpec
    x = jnp.ones((1, 6, 6, 3), jnp.float32)
    k = jnp.ones((3, 3, 3, 20), jnp.float32)
    for impl in ("reference", "direct"):
        fn = jax.shard_map(lambda a, kk: conv2d(a, kk, impl=impl), mesh=mesh, in_specs=(P(), P("d")), out_specs=P())
        with pytest.raises(ValueError, match="out_specs"):
            jax.jit(fn)(x, k)


def test_auto_runs_direct_where_the_rule_says():
    # DeepID's conv_1 under "auto" on this CPU: the native kernel's bits, not the width-blocked form's.
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(0, 50, (4, 55, 47, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 0.1, (4, 4, 3, 20)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 1, (20,)), jnp.float32)
    auto = np.asarray(jax.jit(lambda a: conv2d(a, k, bias=b))(x))
    np.testing.assert_array_equal(auto, np.asarray(conv2d_direct(x, k, bias=b)))


@pytest.mark.parametrize("impl", ["auto", "reference", 2, 4, "direct"])
@pytest.mark.parametrize("relu,pool", [(True, (2, 2)), (False, (2, 2)), (True, None), (True, (3, 2)),
                                       (True, (1, 4))])
def test_the_epilogue_is_the_pool_then_the_relu_in_every_form(impl, relu, pool):
    # Integer data: every form's convolution is exact, so every epilogue must give the NumPy values bit for bit,
    # the windows that do not fit dropped (VALID), odd output sizes included (11 x 9 -> 5 x 4 with 2 x 2).
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (3, 13, 11, 3))
    k = rng.integers(-8, 9, (3, 3, 3, 20))
    b = rng.integers(-900, 901, (20,))
    want = numpy_epilogue(numpy_conv(x, k) + b, relu, pool)
    got = conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), impl=impl,
                 bias=jnp.asarray(b, jnp.float32), relu=relu, pool=pool)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


def test_the_fused_epilogue_keeps_the_convolutions_bits_and_shows_nans():
    # Real-valued data: the fused stage equals the kernel's own convolution followed by the JAX epilogue bit
    # for bit (the same sums). A NaN pixel shows in every window it touches (XLA's reduce_window may drop a
    # NaN; the pipeline never has one: pixels and weights are checked finite on reading).
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(0, 50, (4, 55, 47, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 0.1, (4, 4, 3, 20)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 1, (20,)), jnp.float32)
    fused = np.asarray(conv2d_direct(x, k, bias=b, relu=True, pool=(2, 2)))
    np.testing.assert_array_equal(fused, np.asarray(epilogue(conv2d_direct(x, k, bias=b), True, (2, 2))))
    nan = np.asarray(conv2d_direct(x.at[1, 10, 10, 0].set(jnp.nan), k, bias=b, relu=True, pool=(2, 2)))
    touched = np.zeros(nan.shape[1:3], bool)
    touched[(10 - 3) // 2:10 // 2 + 1, (10 - 3) // 2:10 // 2 + 1] = True  # conv rows/cols 7..10 -> windows 3..5
    assert np.isnan(nan[1][touched]).all() and not np.isnan(nan[1][~touched]).any()
    np.testing.assert_array_equal(nan[[0, 2, 3]], fused[[0, 2, 3]])


def test_the_fused_epilogues_gradient_is_the_three_ops():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(0, 1, (2, 11, 10, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 1, (3, 3, 3, 17)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 1, (17,)), jnp.float32)
    fused = jax.grad(lambda kk: jnp.sum(jnp.tanh(conv2d_direct(x, kk, bias=b, relu=True, pool=(2, 2)))))(k)
    three = jax.grad(lambda kk: jnp.sum(jnp.tanh(epilogue(conv2d_reference(x, kk) + b[None, None, None, :],
                                                          True, (2, 2)))))(k)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(three), rtol=1e-5, atol=1e-5)
