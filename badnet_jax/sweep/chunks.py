"""The chunking rule of the sweep, once: where each block of images starts, and mapping a function over blocks.

Blocks of ``chunk`` rows are sliced in place (no padded copy of a set is made); the last block is clamped
to end at the last row, so it overlaps the one before. Those rows are computed again, identically: every
row is independent and dedupe is exact per block. :func:`chunk_starts` (host) and :func:`map_chunks`
(traced) share this rule, so the benchmark's work count is the work the sweep does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np


def chunk_starts(n: int, chunk: int) -> np.ndarray:
    """(blocks,) int32 first row of each block of ``chunk`` rows over ``n`` rows (the last block clamped)."""
    if n == 0:
        return np.zeros((0,), np.int32)
    chunk = max(1, min(chunk, n))
    return np.minimum(np.arange(-(-n // chunk)) * chunk, n - chunk).astype(np.int32)


def map_chunks(fn: Callable[[jax.Array], Any], x: jax.Array, chunk: int, rows_axis: int,
               on_chunk: Optional[Callable[[jax.Array, int], None]] = None) -> Any:
    """``fn`` over ``chunk``-row blocks of ``x``; its outputs (an array or a tuple of arrays) put together
    along ``rows_axis`` (traceable). ``on_chunk(i, blocks)`` is traced at the start of each block (progress:
    ``badnet_jax.sweep.progress.chunk_hook``); it must not touch the data."""
    n = x.shape[0]
    chunk = max(1, min(chunk, n))
    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((chunk, *x.shape[1:]), x.dtype))

    def full(s):
        shape = list(s.shape)
        shape[rows_axis] = n
        return jnp.zeros(shape, s.dtype)

    out = jax.tree.map(full, out_shape)
    starts = chunk_starts(n, chunk)
    if not len(starts):
        return out

    def body(i, out):
        if on_chunk is not None:
            on_chunk(i, len(starts))
        start = jnp.asarray(starts)[i]
        y = fn(jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0))
        return jax.tree.map(lambda o, v: jax.lax.dynamic_update_slice_in_dim(o, v, start, axis=rows_axis), out, y)

    return jax.lax.fori_loop(0, len(starts), body, out)
