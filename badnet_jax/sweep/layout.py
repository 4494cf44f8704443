"""Which sets share the sweep's loops: the sets laid out as blocks of the one call's image arguments.

XLA compiles every loop of the program on its own, so each set given its own trunk and head loops costs its compile
again: the lab-scale run's four sets took 2.4-3.2 s to lower and compile on two CPU devices of a 2-core Zen 3, and
1.8-2.2 s joined as two blocks. Every image's predictions are its own (the chunking and the grouping are exact
whatever images share a chunk), so the sets that rank nothing are joined along the image axis, one block per image
dtype, and go through one trunk loop and one head loop; the host splits each block's predictions back by set. The
ranking set is a block of its own: the orders are known only after its trunk has run.

:func:`blocks` decides the layout, once, from names, sizes and dtypes; :func:`join` makes a block's images
(or a device's rows of them), :func:`shape` their shape to compile for, and :func:`split` takes a block's
outputs apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Block:
    """Sets swept as one: their names and image counts, in the order their rows are joined."""

    names: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def size(self) -> int:
        """Images in the block."""
        return sum(self.rows)

    @property
    def label(self) -> str:
        """The block's name in progress lines: its sets' names."""
        return " + ".join(map(str, self.names))

    def bounds(self) -> list[tuple[str, int, int]]:
        """(name, first row, end row) of each set in the block."""
        ends = np.cumsum(self.rows, dtype=np.int64)
        return [(n, int(e) - r, int(e)) for n, r, e in zip(self.names, self.rows, ends)]


def blocks(sets: Mapping[str, Any], rank_on: Optional[str]) -> tuple[Block, ...]:
    """The blocks the sweep runs: the ranking set alone first (if any), then the other sets, one block per
    image dtype on the device in the order the dtypes first appear, each block's sets in the order given.

    Args:
        sets: name -> images or their shapes (anything with ``.shape`` and ``.dtype``).
        rank_on: the ranking set's name, or None (every set is only evaluated).
    """
    out = [Block((rank_on,), (int(sets[rank_on].shape[0]),))] if rank_on is not None else []
    by_dtype: dict[np.dtype, list[str]] = {}
    for name, x in sets.items():
        if name != rank_on:
            by_dtype.setdefault(_device_dtype(x.dtype), []).append(name)
    out += [Block(tuple(names), tuple(int(sets[n].shape[0]) for n in names)) for names in by_dtype.values()]
    return tuple(out)


def padded_rows(block: Block, multiple: int = 1) -> int:
    """The block's image count rounded up to a multiple of ``multiple`` (the devices it is sharded over)."""
    return -(-block.size // multiple) * multiple


def shape(block: Block, sets: Mapping[str, Any], multiple: int = 1) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the block's images padded to a multiple of ``multiple`` rows."""
    first = sets[block.names[0]]
    return jax.ShapeDtypeStruct((padded_rows(block, multiple), *first.shape[1:]), _device_dtype(first.dtype))


def join(block: Block, sets: Mapping[str, Any], start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Rows ``start:stop`` of the block's images (its sets one after the other, zeros past the last image), as
    a new host array aligned to 64 bytes: a CPU device takes such an array as its buffer without copying it
    (``jax.device_put``, ``jax.make_array_from_callback``), so joining costs the one copy that moving the
    sets to the device made anyway. ``stop`` None: the block's last image.
    """
    stop = block.size if stop is None else stop
    first = sets[block.names[0]]
    out = _aligned_empty((stop - start, *first.shape[1:]), _device_dtype(first.dtype))
    for name, begin, end in block.bounds():
        lo, hi = max(begin, start), min(end, stop)
        if lo < hi:
            out[lo - start:hi - start] = np.asarray(sets[name][lo - begin:hi - begin])  # only these rows moved
    out[max(block.size - start, 0):] = 0  # the padding rows in this range
    return out


def _device_dtype(dtype) -> np.dtype:
    """The dtype a set has on the device (without 64-bit mode, JAX stores float64 images as float32): sets
    that differ only on the host share a block."""
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _aligned_empty(shape_: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    size = int(np.prod(shape_)) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + size].view(dtype).reshape(shape_)


def split(block: Block, out: Any, rows_axis: int = -1) -> dict[str, Any]:
    """A block's host outputs (arrays or a tuple of them, the image axis ``rows_axis``) by set name, each a
    contiguous array of its own; rows past the block's images (padding) are dropped."""
    def part(a, start, end):
        index = [slice(None)] * np.ndim(a)
        index[rows_axis] = slice(start, end)
        return np.ascontiguousarray(a[tuple(index)])
    return {name: jax.tree.map(lambda a: part(a, start, end), out) for name, start, end in block.bounds()}
