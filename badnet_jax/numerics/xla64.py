"""Float64 forwards by XLA on the local device: which device, the weights held there, the calls' sizes.

The settling of near-ties (``badnet_jax.numerics.settling``, ``PrunableModel.features64`` / ``argmax64``)
runs a model's own jitted functions under ``jax.enable_x64`` on a few dozen to a few thousand rows. Every
such call goes through :func:`run64`, so the choices below are made once for every model:

- the device: the local device, except a TPU (no float64), where the host CPU runs them;
- the weights: converted to float64 and put on that device once per weights (:func:`params64`, which also
  holds the host's float64 copy for the NumPy network), not once per call, where they are JAX arrays on an
  accelerator (NumPy weights, and a CPU JAX array that shares a NumPy array's memory, could change in place);
- the images: sent in their own dtype (uint8) and divided on the device as NumPy divides them (:func:`divided`);
- the calls' sizes (:func:`call_sizes`): the rows go in calls of a few padded sizes, so that any count of rows
  compiles one of a few shapes. A CPU pays per row and less per row in small calls; a GPU pays per call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Rows per float64 call by platform, ascending: while more rows are left than the largest size, calls of the
# largest; the rest in one call of the smallest size that holds it, padded with zeros. Each size is one compiled
# shape (on a GPU a float64 compile takes about half a second). Measured with DeepID's float64 trunk: on a CPU
# (Zen 5, two cores) 0.35 ms an image in calls of 8, 0.29 in calls of 32 or 64, 0.41 in calls of 128 (the
# activations leave the cache); on an H200 a call of 32 images takes 0.50 ms and one of 256 1.78 ms, so there
# the few dozen to few hundred flagged images of a set go in one call (at most 256 rows: a large CNN's float64
# activations are held for the whole call).
CALL_SIZES = {"cpu": (32, 64), "gpu": (32, 128, 256)}
# A float64 sum over a whole set (the activation ranking's channel means): blocks of SUM_BLOCK images, mapped
# inside one call of SUM_CALL_BLOCKS blocks, so that only the sums leave the device and every call has one shape.
# On a 2-core Intel Xeon (AVX-512), a 32x32 CNN with batch norms (convolutions of 32 to 128 channels, 4096
# images): 2.95 s in blocks of 256, 3.8 s of 128, 5.5-6.5 s of 32 or 64, and 7.7 s as the features of calls of
# 64 summed on the host (docs/benchmarks.md, "The ranking's float64 means in blocks").
# A large CNN takes fewer images per block: its float64 trunk holds at most SUM_BLOCK_BYTES of activations at once
# by the model's own estimate (``trunk_bytes_per_image``, doubled; 256 of the 32x32 CNN's images take 0.4 GB).
SUM_BLOCK = 256
SUM_BLOCK_BYTES = 1 << 29
SUM_CALL_BLOCKS = 16


def sum_block(bytes_per_image64: int) -> int:
    """Images per block of :func:`sum64` for a trunk whose float64 activations take ``bytes_per_image64`` per
    image: SUM_BLOCK, or fewer (at least one) where those would take more than SUM_BLOCK_BYTES."""
    return max(1, min(SUM_BLOCK, SUM_BLOCK_BYTES // max(1, int(bytes_per_image64))))

# The float64 weights last made, per place (None: the host, as NumPy arrays; else a device):
# place -> (the float32 leaves they were made from, float64 weights). A run settles one model's predictions many
# times; holding the leaves keeps their ids from being reused while they are compared (and the last weights
# alive until others replace them).
_held: dict[Any, tuple[tuple[Any, ...], Any]] = {}


def float64_device() -> jax.Device:
    """The device that runs float64: the first local device, or the host CPU where that is a TPU."""
    device = jax.local_devices()[0]
    return device if device.platform in ("cpu", "gpu", "cuda", "rocm") else jax.local_devices(backend="cpu")[0]


def sizes_on(platform: str) -> tuple[int, ...]:
    """The call sizes of ``platform`` (``CALL_SIZES``; any platform other than ``cpu`` as a GPU)."""
    return CALL_SIZES["cpu" if platform == "cpu" else "gpu"]


def call_sizes(n: int, platform: str) -> list[int]:
    """The padded size of each call that runs ``n`` rows on ``platform``."""
    sizes = sizes_on(platform)
    out = []
    while n > sizes[-1]:
        out.append(sizes[-1])
        n -= sizes[-1]
    if n > 0:
        out.append(next(s for s in sizes if s >= n))
    return out


def _held_safely(leaf: Any) -> bool:
    """Whether a weight cannot change behind its identity: a JAX array on an accelerator."""
    return isinstance(leaf, jax.Array) and all(d.platform != "cpu" for d in leaf.devices())


def params64(params: Any, device: Optional[jax.Device] = None) -> Any:
    """``params`` in float64: NumPy arrays on the host (``device`` None) or JAX arrays on ``device`` (then call
    it inside ``jax.enable_x64(True)``: outside, JAX would store float32).

    The same weights held on an accelerator (JAX arrays there) are converted once per place. Anything else is
    converted at every call: NumPy weights may have changed in place, and so may a CPU JAX array, which can
    share its memory with a NumPy array (``jax.device_put`` does not copy there).
    """
    leaves = tuple(jax.tree.leaves(params))
    immutable = all(map(_held_safely, leaves))
    if immutable and device in _held:
        held_leaves, held = _held[device]
        if len(held_leaves) == len(leaves) and all(a is b for a, b in zip(held_leaves, leaves)) and (
                jax.tree.structure(held) == jax.tree.structure(params)):
            return held
    p = jax.tree.map(lambda a: np.array(a, np.float64), params)
    if device is not None:
        p = jax.device_put(p, device)
    if immutable:
        if device is None:  # handed out again: nobody may change the held copy in place
            jax.tree.map(lambda a: a.setflags(write=False), p)
        _held[device] = (leaves, p)
    return p


def divided(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """``x / divisor`` element by element, correctly rounded as NumPy's division is.

    XLA's CPU backend rewrites a division by a broadcast scalar into a multiplication by its reciprocal, one
    rounding more (x / 255 then differs from NumPy's in the last bit for 24 of the 256 pixel values). The
    broadcast divisor behind an optimization barrier keeps the division a division on every backend.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(divisor.astype(x.dtype), x.shape))


def _padded(part: np.ndarray, rows: int) -> np.ndarray:
    """``part`` with zero rows after it up to ``rows`` rows, in its dtype."""
    out = np.zeros((rows, *part.shape[1:]), part.dtype)
    out[:len(part)] = part
    return out


def run64(fn: Callable[..., Any], params: Any, rows: Sequence[np.ndarray], divisor: Optional[float] = None
          ) -> np.ndarray:
    """``fn(params64, *batch)`` over the rows in float64 on :func:`float64_device`, concatenated.

    Args:
        fn: a jitted function of (float64 weights, one batch of each of ``rows``[, the divisor]) -> one output
            row per row.
        params: the model's weights (any float dtype).
        rows: one or more arrays with the same number of rows (at least one row), converted to float64.
        divisor: for images: the first array goes to the device in its own dtype (a uint8 image is an eighth
            of its float64), and ``fn`` gets this divisor as a float64 argument after the batch, to convert
            and divide on the device (with :func:`divided`, rounded as NumPy rounds).

    Returns:
        The outputs of the rows, as a NumPy array (the leading axis as long as ``rows``').
    """
    n = len(rows[0])
    if not n:
        raise ValueError("run64 needs at least one row")
    device = float64_device()
    outs, start = [], 0
    with jax.enable_x64(True):
        p = params64(params, device)
        extra = () if divisor is None else (jax.device_put(np.float64(divisor), device),)
        for size in call_sizes(n, device.platform):
            batch = []
            for i, a in enumerate(rows):
                part = np.asarray(a[start:start + size])
                if i or divisor is None:
                    part = part.astype(np.float64, copy=False)
                batch.append(jax.device_put(_padded(part, size), device))
            take = min(size, n - start)
            outs.append(np.asarray(fn(p, *batch, *extra))[:take])
            start += take
    return np.concatenate(outs)


def _sum_calls(n: int, bytes_per_image64: int) -> list[tuple[int, int, int]]:
    """(first image, blocks, images per block) of each call of :func:`sum64` over ``n`` images: calls of
    SUM_CALL_BLOCKS blocks, the last as many as the images left need, or one block of just those where fewer than
    a block are left (two shapes at most)."""
    block = sum_block(bytes_per_image64)
    per_call = block * SUM_CALL_BLOCKS
    calls = []
    for start in range(0, n, per_call):
        part = min(per_call, n - start)
        size = min(block, part)
        calls.append((start, -(-part // size), size))
    return calls


def sum64(fn: Callable[..., Any], params: Any, images: np.ndarray, divisor: float,
          bytes_per_image64: int = 0) -> np.ndarray:
    """The sum over ``images`` of a per-image float64 quantity, on :func:`float64_device`.

    Args:
        fn: a jitted function of (float64 weights, images (blocks, block, ...) in their own dtype, weights
            (blocks, block) of 1.0 for an image and 0.0 for padding, the divisor) -> the sum over the images of
            weight 1 (padding, zero images, must be left out by selection, not by a product with 0: their values
            may be NaN). The calls' shapes: ``_sum_calls``.
        params: the model's weights (any float dtype).
        images: (N, ...) images (at least one), sent in their own dtype.
        divisor: what the images are divided by on the device (with :func:`divided`).
        bytes_per_image64: the float64 activations ``fn`` holds per image, for the block's size
            (:func:`sum_block`; 0: SUM_BLOCK). The model's own estimate: the bound is as good as it is.

    Returns:
        The sum, a NumPy float64 array: the calls' sums added in call order.
    """
    n = len(images)
    if not n:
        raise ValueError("sum64 needs at least one image")
    device = float64_device()
    total = None
    with jax.enable_x64(True):
        p = params64(params, device)
        d = jax.device_put(np.float64(divisor), device)
        for start, blocks, size in _sum_calls(n, bytes_per_image64):
            part = np.asarray(images[start:start + blocks * size])
            padded = _padded(part, blocks * size)
            weights = _padded(np.ones(len(part)), blocks * size)
            out = np.asarray(fn(p, jax.device_put(padded.reshape(blocks, size, *part.shape[1:]), device),
                                jax.device_put(weights.reshape(blocks, size), device), d), np.float64)
            total = out if total is None else total + out
    return total


def compile_sum64(fn: Callable[..., Any], params: Any, images: jax.ShapeDtypeStruct,
                  bytes_per_image64: int = 0) -> None:
    """Compile ``fn`` for every call :func:`sum64` makes over images of this shape and dtype, without running
    it: the programs land in JAX's cache, where the later :func:`sum64` finds them (the arguments placed on
    :func:`float64_device` as :func:`sum64` places them, so that the cache keys match)."""
    n = int(images.shape[0])
    if not n:
        return
    on = jax.sharding.SingleDeviceSharding(float64_device())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=on)
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: spec(np.shape(a), jnp.float64), params)
        for blocks, size in sorted({(b, s) for _, b, s in _sum_calls(n, bytes_per_image64)}):
            fn.lower(p, spec((blocks, size, *images.shape[1:]), images.dtype), spec((blocks, size), jnp.float64),
                     spec((), jnp.float64)).compile()
