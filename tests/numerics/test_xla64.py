"""badnet_jax.numerics.xla64: the float64 calls' sizes, the weights held on the device, and the rows run
through a jitted function in padded calls, against the same function called on all rows at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.numerics import xla64


@pytest.mark.parametrize("platform", ["cpu", "gpu", "cuda", "rocm"])
@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 63, 64, 65, 100, 129, 1000, 1024, 1025, 5000])
def test_call_sizes_cover_the_rows_with_the_least_padding_the_sizes_allow(n, platform):
    sizes = xla64.CALL_SIZES["cpu" if platform == "cpu" else "gpu"]
    calls = xla64.call_sizes(n, platform)
    assert set(calls) <= set(sizes)
    assert sum(calls) >= n
    assert all(c == max(sizes) for c in calls[:-1])  # only the last call may be smaller
    last_rows = n - max(sizes) * (len(calls) - 1)
    assert 0 < last_rows <= calls[-1]
    assert not [s for s in sizes if last_rows <= s < calls[-1]]  # no smaller size would hold the rest
    assert xla64.call_sizes(0, platform) == []


def test_a_gpu_settles_a_few_hundred_rows_in_few_calls_a_cpu_in_small_ones():
    assert xla64.call_sizes(200, "gpu") == [256]
    assert xla64.call_sizes(94, "cuda") == [128]
    assert xla64.call_sizes(1100, "gpu") == [256, 256, 256, 256, 128]
    assert xla64.call_sizes(300, "cpu") == [64, 64, 64, 64, 64]
    assert xla64.call_sizes(40, "cpu") == [64]
    assert xla64.call_sizes(20, "cpu") == [32]


@pytest.fixture
def as_on_an_accelerator(monkeypatch):
    """JAX arrays count as held on an accelerator (where a NumPy array cannot share their memory)."""
    monkeypatch.setattr(xla64, "_held_safely", lambda a: isinstance(a, jax.Array))


def test_the_same_accelerator_weights_are_put_on_the_device_once(as_on_an_accelerator):
    params = {"a": {"w": jnp.arange(6.0).reshape(2, 3)}, "b": {"w": jnp.ones(4)}}
    device = xla64.float64_device()
    with jax.enable_x64(True):
        first = xla64.params64(params, device)
        assert first["a"]["w"].dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(first["a"]["w"]), np.arange(6.0).reshape(2, 3))
        assert xla64.params64(dict(params), device) is first  # the same arrays in a new dict: held
        other = {"a": {"w": jnp.arange(6.0).reshape(2, 3)}, "b": params["b"]}  # equal values, a new array
        assert xla64.params64(other, device) is not first
        renamed = {"a": params["a"], "c": params["b"]}  # the same arrays in another structure
        assert set(xla64.params64(renamed, device)) == {"a", "c"}


def test_the_host_copy_is_held_once_and_read_only(as_on_an_accelerator):
    params = {"w": jnp.arange(3.0)}
    first = xla64.params64(params)
    assert isinstance(first["w"], np.ndarray) and first["w"].dtype == np.float64
    assert xla64.params64({"w": params["w"]}) is first
    with pytest.raises(ValueError, match="read-only"):
        first["w"][0] = 1.0
    device = xla64.float64_device()
    with jax.enable_x64(True):
        assert xla64.params64(params, device) is not first  # each place holds its own
        assert xla64.params64(params) is first


@pytest.mark.parametrize("device", [None, "float64 device"])
def test_weights_that_can_change_in_place_are_converted_every_time(device):
    """NumPy weights, and a CPU JAX array (``device_put`` may share a NumPy array's memory there): what the
    float64 weights hold is what the weights hold now."""
    place = None if device is None else xla64.float64_device()
    # float32 as the weights are, 64-byte aligned: device_put does not copy such an array on a CPU
    raw = np.zeros(32, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    buf = raw[start:start + 16]
    buf[:] = np.arange(16)
    for params in ({"w": buf}, {"w": jax.device_put(buf)}):
        with jax.enable_x64(True):
            before = np.asarray(xla64.params64(params, place)["w"])
            buf[:] = 7.0
            after = np.asarray(xla64.params64(params, place)["w"])
        np.testing.assert_array_equal(before, np.arange(16.0))
        np.testing.assert_array_equal(after, np.asarray(params["w"], np.float64))
        buf[:] = np.arange(16)


def test_weights_on_an_accelerator_are_held_on_device():
    """On a GPU, the loaded weights' float64 copy is made once (device_check runs this)."""
    if jax.default_backend() == "cpu":
        pytest.skip("needs an accelerator")
    params = {"w": jnp.arange(3.0)}
    device = xla64.float64_device()
    with jax.enable_x64(True):
        assert xla64.params64(params, device) is xla64.params64({"w": params["w"]}, device)


@pytest.mark.parametrize("n", [1, 31, 33, 64, 65, 200])
def test_run64_equals_one_float64_call_on_all_rows(n):
    """Rows in padded calls give the rows of one call on all of them, in float64 (a value float32 would round);
    images go to the device as uint8 and are divided there by the divisor."""
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, (n, 3, 2)).astype(np.uint8)
    m = rng.standard_normal((n, 2))
    params = {"w": jnp.asarray(rng.standard_normal((2, 4)), jnp.float32), "eps": np.float64(1e-12)}
    dtypes = []

    def fn(p, x, m, d):
        dtypes.append((x.dtype, m.dtype, d.dtype))
        return ((x.astype(jnp.float64) / d).sum(axis=1) * m) @ p["w"] + p["eps"]

    out = xla64.run64(jax.jit(fn), params, [x, m], divisor=255.0)
    w = np.asarray(params["w"], np.float64)
    want = ((x.astype(np.float64) / 255.0).sum(axis=1) * m) @ w + 1e-12
    assert out.dtype == np.float64 and out.shape == (n, 4)
    np.testing.assert_allclose(out, want, rtol=1e-14, atol=1e-15)
    assert set(dtypes) == {(np.dtype(np.uint8), np.dtype(np.float64), np.dtype(np.float64))}
    rows = jax.jit(lambda p, a, b: a.sum(axis=1) * b)  # without a divisor every array is float64
    np.testing.assert_array_equal(xla64.run64(rows, params, [x, m]), x.astype(np.float64).sum(axis=1) * m)
    with pytest.raises(ValueError, match="at least one row"):
        xla64.run64(rows, params, [x[:0], m[:0]])


@pytest.mark.parametrize("divisor", [255.0, 3.0, 1.0])
def test_divided_rounds_every_pixel_value_as_numpy_does(divisor):
    """Every uint8 value over the divisor, jitted in float64, bit for bit NumPy's correctly rounded quotient."""
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    with jax.enable_x64(True):
        got = jax.jit(lambda x, d: xla64.divided(x.astype(jnp.float64), d))(x, np.float64(divisor))
        assert got.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.float64) / divisor)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 19, 33])
def test_sum64_sums_every_image_once_in_blocks_and_calls(n, monkeypatch):
    """Blocks of 4 images, calls of 2 blocks: every image counted once (padding not at all, though a zero image
    gives a value), in float64, whatever the count; the images reach the function in their own dtype."""
    monkeypatch.setattr(xla64, "SUM_BLOCK", 4)
    monkeypatch.setattr(xla64, "SUM_CALL_BLOCKS", 2)
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    params = {"b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    shapes = []

    def fn(p, xs, ws, d):
        shapes.append((xs.shape, xs.dtype, ws.shape))  # at trace time: one entry per compiled shape
        per_image = xla64.divided(xs.astype(jnp.float64), d) + p["b"][None, None, :] + 1e-12  # a zero image: not 0
        return jnp.sum(jnp.where(ws[..., None] > 0, per_image, 0.0), axis=(0, 1))

    got = xla64.sum64(jax.jit(fn), params, x, 255.0)
    want = (x.astype(np.float64) / 255.0 + np.asarray(params["b"], np.float64) + 1e-12).sum(axis=0)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-14)
    full, last = min(n, 8), n % 8 or 8  # images in the first call and in the last
    shape = lambda k: (-(-k // 4), 4) if k >= 4 else (1, k)  # fewer than a block: one block of just those
    want_shapes = {((*shape(k), 3), np.dtype(np.uint8), shape(k)) for k in (full, last)}
    assert set(shapes) == want_shapes
    with pytest.raises(ValueError, match="at least one image"):
        xla64.sum64(jax.jit(fn), params, x[:0], 255.0)


def test_a_large_cnn_sums_fewer_images_per_block():
    """The block holds at most SUM_BLOCK_BYTES of float64 activations, and at least one image."""
    assert xla64.sum_block(0) == xla64.sum_block(1000) == xla64.SUM_BLOCK
    assert xla64.sum_block(xla64.SUM_BLOCK_BYTES // 3) == 3
    assert xla64.sum_block(10 * xla64.SUM_BLOCK_BYTES) == 1
    big = 2 * 4 * 3 * 2 * 224 * 224 * 64  # two 224x224x64 float32 tensors (x3 slack), doubled for float64
    assert xla64.sum_block(big) * big <= xla64.SUM_BLOCK_BYTES
    shapes = []

    def fn(p, xs, ws, d):
        shapes.append(xs.shape)
        return jnp.sum(xs.astype(jnp.float64) * ws, axis=(0, 1))

    x = np.arange(7, dtype=np.uint8)
    got = xla64.sum64(jax.jit(fn), {}, x, 1.0, bytes_per_image64=xla64.SUM_BLOCK_BYTES // 3)
    assert got == 21.0 and shapes == [(3, 3)]  # blocks of 3 images: 7 images in 3 blocks, one call
