"""Dispatch for the 2-D convolution: XLA's reference, or the width-blocked form where XLA's is weak.

``impl``: ``"auto"`` (the default), ``"reference"``, or an int block size B for :func:`conv2d_width_blocked`.

``"auto"`` is a fixed rule, so the same model computes the same bits in every run: on a CPU, an input of fewer
than :data:`FEW_CHANNELS` channels into fewer than :data:`WIDE_OUTPUT` output channels runs width-blocked with
the smallest B in (2, 4) that gives the blocked convolution at least :data:`WIDE_OUTPUT` output channels (4
when none does); everything else, and every accelerator, runs XLA's convolution. Measured on 64 images on a
2-core Xeon (ms, XLA's / B=2 / B=4; docs/benchmarks.md): 55x47x3 -> 20 4x4 (DeepID's conv_1) 45.1 / 5.7 /
4.4; 32x32x3 -> 16 3x3 'same' 3.2 / 0.66 / 0.90; -> 32: 4.1 / 1.0 / 1.7; -> 6 5x5: 3.5 / 1.6 / 0.87; but -> 64
3x3 1.5 / 1.9 / 3.6 and -> 128 2.9 / 3.5 / 7.0, where XLA's own is the fastest; 4 input channels ran at
XLA's matmul rate in its own convolution.

Every form computes the same products; only the order of the sums differs (what the near-tie bounds and the
float64 settling are there for).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

from badnet_jax.kernels.conv2d.reference import Padding, conv2d_reference
from badnet_jax.kernels.conv2d.width_blocked import conv2d_width_blocked

Impl = Union[str, int]
FEW_CHANNELS = 4  # inputs with fewer channels (every RGB first layer) are XLA:CPU's weak case
WIDE_OUTPUT = 64  # output channels from which XLA:CPU's own convolution runs well


def resolve_block(in_channels: int, out_channels: int, impl: Impl = "auto", platform: str | None = None) -> int:
    """The block size ``impl`` means for a convolution of ``in_channels`` -> ``out_channels`` (1: XLA's own).

    Args:
        in_channels, out_channels: the kernel's C and F.
        impl: ``"auto"`` (the rule in the module docstring), ``"reference"`` or a block size >= 1.
        platform: the platform it runs on (None: the default backend's).

    Raises:
        ValueError: an ``impl`` other than ``"auto"``, ``"reference"`` or a positive int.
    """
    if impl == "reference":
        return 1
    if isinstance(impl, (int, np.integer)) and not isinstance(impl, bool) and impl >= 1:
        return int(impl)
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'reference' or a positive block size, got {impl!r}")
    if (platform or jax.default_backend()) != "cpu" or in_channels >= FEW_CHANNELS or out_channels >= WIDE_OUTPUT:
        return 1
    return 2 if 2 * out_channels >= WIDE_OUTPUT else 4


def conv2d(x_NxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = "VALID", dilation: Sequence[int] = (1, 1),
           precision: Any = jax.lax.Precision.HIGHEST, impl: Impl = "auto",
           bias: Optional[jax.Array] = None) -> jax.Array:
    """An NHWC x HWIO convolution in the form :func:`resolve_block` picks; traceable.

    Args:
        x_NxHxWxC: images.
        kernel_HxWxIxO: the kernel (kh, kw, C, F), same dtype as the images.
        strides, padding, dilation, precision: as ``lax.conv_general_dilated`` (padding ``"VALID"``, ``"SAME"``
            or explicit ((top, bottom), (left, right))).
        impl: ``"auto"``, ``"reference"`` or a block size.
        bias: (F,) added to every output (None: none); given here, it is added where it is cheapest.

    Returns:
        (N, Ho, Wo, F) outputs.
    """
    block = resolve_block(kernel_HxWxIxO.shape[2], kernel_HxWxIxO.shape[3], impl)
    if block > 1:
        return conv2d_width_blocked(x_NxHxWxC, kernel_HxWxIxO, block, strides, padding, dilation, precision, bias)
    out = conv2d_reference(x_NxHxWxC, kernel_HxWxIxO, strides, padding, dilation, precision)
    return out if bias is None else out + bias.astype(out.dtype)[None, None, None, :]
