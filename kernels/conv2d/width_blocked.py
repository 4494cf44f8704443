"""A 2-D convolution computed with blocks of output columns folded into the channel axis.

For a block of B output columns, every output column reads input columns at offsets ``b * sw + dx * dw``
(b < B, dx < kw) from the block's first input column ``j * B * sw``. Reshaping the input's width into blocks
of S = B * sw columns (a free reshape: NHWC is row-major) turns the convolution into another one over blocks:
input channels S * C, output channels B * F, kernel width ``nblk`` = the blocks one output block reads, stride
1 along the width. Its kernel holds the original one's entries at the offsets each output column reads and
zeros elsewhere, so the result is the same sum of the same products, in another order, plus exact zeros
(``x * 0 = 0`` for finite x). The extra multiply-adds (``nblk * S / kw`` times the original's) buy a
convolution that XLA's CPU backend runs fast where the original, with few input channels, is not.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from badnet_jax.kernels.conv2d.reference import Padding, conv2d_reference


def block_geometry(width: int, kw: int, block: int, stride: int = 1, dilation: int = 1) -> tuple[int, int, int]:
    """(output width, output blocks, input blocks one output block reads) of a width-blocked convolution
    over an (already padded) input ``width`` columns wide."""
    span = (kw - 1) * dilation + 1
    out_w = (width - span) // stride + 1
    n_blocks = -(-out_w // block)
    s = block * stride
    reach = ((block - 1) * stride + (kw - 1) * dilation) // s + 1
    return out_w, n_blocks, reach


def blocked_kernel(kernel_HxWxIxO: jax.Array, block: int, stride: int = 1, dilation: int = 1) -> jax.Array:
    """The (kh, reach, S * C, B * F) kernel of the width-blocked convolution; traceable (a kernel inside jit)."""
    kh, kw, c, f = kernel_HxWxIxO.shape
    s = block * stride
    reach = ((block - 1) * stride + (kw - 1) * dilation) // s + 1
    full = jnp.zeros((kh, reach * s, c, block, f), kernel_HxWxIxO.dtype)
    for b in range(block):  # output column b of a block reads input offsets b * stride + dx * dilation
        first = b * stride
        full = full.at[:, first:first + (kw - 1) * dilation + 1:dilation, :, b, :].set(kernel_HxWxIxO)
    return full.reshape(kh, reach, s * c, block * f)


def explicit_pads(size: int, k: int, stride: int, dilation: int, padding: Padding, axis: int) -> tuple[int, int]:
    """(before, after) padding of one spatial axis (``axis`` 0: height, 1: width) of ``size``."""
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads((size,), ((k - 1) * dilation + 1,), (stride,), padding)[0])
    return tuple(padding[axis])


def conv2d_width_blocked(x_NxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, block: int,
                         strides: Sequence[int] = (1, 1), padding: Padding = "VALID",
                         dilation: Sequence[int] = (1, 1),
                         precision: Any = jax.lax.Precision.HIGHEST, bias: Optional[jax.Array] = None) -> jax.Array:
    """The convolution :func:`conv2d_reference` computes, with ``block`` output columns per block; traceable.

    Args:
        x_NxHxWxC: images.
        kernel_HxWxIxO: the kernel (kh, kw, C, F).
        block: output columns per block (B >= 1; 1 is the reference's layout with an exact-zero-free kernel).
        strides, padding, dilation, precision: as :func:`conv2d_reference`.
        bias: (F,) added to every output (None: none).

    Returns:
        (N, Ho, Wo, F), equal to the reference (plus bias) up to float rounding (the sums run in another order).
    """
    n, h, w, c = x_NxHxWxC.shape
    kh, kw, _, f = kernel_HxWxIxO.shape
    (sh, sw), (dh, dw) = tuple(strides), tuple(dilation)
    pad_h = explicit_pads(h, kh, sh, dh, padding, 0)
    pad_l, pad_r = explicit_pads(w, kw, sw, dw, padding, 1)
    width = w + pad_l + pad_r
    out_w, n_blocks, reach = block_geometry(width, kw, block, sw, dw)
    s = block * sw
    need = (n_blocks + reach - 1) * s  # the columns the last block reads, rounded up to whole blocks
    # Zero columns, like the convolution's own padding; columns past the last block's reach are never read.
    extra = need - width
    x = jnp.pad(x_NxHxWxC, ((0, 0), (0, 0), (pad_l, pad_r + max(extra, 0)), (0, 0)))[:, :, :need]
    y = jax.lax.conv_general_dilated(
        x.reshape(n, h, need // s, s * c), blocked_kernel(kernel_HxWxIxO, block, sw, dw), (sh, 1),
        (pad_h, (0, 0)), rhs_dilation=(dh, 1), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    if bias is not None:
        # Added in the blocked layout: on XLA:CPU a bias added after the reshape, when it is an argument and
        # not a constant, is not fused and costs a pass over the output (DeepID's conv_1 stage 1.7x slower).
        y = y + jnp.tile(bias.astype(y.dtype), block)[None, None, None, :]
    y = y.reshape(n, y.shape[1], n_blocks * block, f)
    return y if n_blocks * block == out_w else y[:, :, :out_w]


__all__ = ["block_geometry", "blocked_kernel", "explicit_pads", "conv2d_reference", "conv2d_width_blocked"]
