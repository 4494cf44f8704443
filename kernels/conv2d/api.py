"""Dispatch for the 2-D convolution: XLA's reference, or the width-blocked form where XLA's is weak.

``impl``: ``"auto"`` (the default), ``"reference"``, or an int block size B for :func:`conv2d_width_blocked`.

``"auto"`` is a fixed rule (so the same model computes the same bits in every run), decided per platform when
the program is lowered (``lax.platform_dependent``: a program exported for a GPU on a CPU host holds XLA's
convolution). On a CPU, an input of fewer than :data:`FEW_CHANNELS` channels into fewer than
:data:`WIDE_OUTPUT` output channels runs width-blocked with the B in (2, 4) of the lower modelled cost
``reach * B / kw * WIDE_OUTPUT / min(B * F, WIDE_OUTPUT)`` (the multiply-adds per useful one, over XLA's
efficiency on B * F output channels, taken as proportional up to WIDE_OUTPUT; ties to B = 2); everything else,
and every other platform, runs XLA's convolution. The model reproduces which form was faster in every narrow
case measured on 64 images on a 2-core Xeon (ms, XLA's / B=2 / B=4; docs/benchmarks.md): 55x47x3 -> 20 4x4
(DeepID's conv_1) 45.1 / 5.7 / 4.4; 32x32x3 -> 16 3x3 'same' 3.2 / 0.66 / 0.90; -> 32 4.1 / 1.0 / 1.7; -> 6
5x5 3.5 / 1.6 / 0.87; 28x28x1 -> 32 3x3 0.45 / 0.41 / 0.64. XLA's own was the fastest at 64 and 128 output
channels (3x3: 1.5 / 1.9 / 3.6 and 2.9 / 3.5 / 7.0) and with 4 input channels (55x47x4 -> 20 4x4, 1024
images: 158 / 115 / 114 GFLOP/s).

Every form computes the same products; only the order of the sums differs (what the near-tie bounds and the
float64 settling are there for).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

from badnet_jax.kernels.conv2d.reference import Padding, conv2d_reference
from badnet_jax.kernels.conv2d.width_blocked import block_geometry, conv2d_width_blocked, explicit_pads

Impl = Union[str, int]
FEW_CHANNELS = 4  # inputs with fewer channels (every RGB first layer) are XLA:CPU's weak case
WIDE_OUTPUT = 64  # output channels from which XLA:CPU's own convolution runs well


def _cost(block: int, kw: int, f: int, stride: int, dilation: int) -> Fraction:
    reach = ((block - 1) * stride + (kw - 1) * dilation) // (block * stride) + 1
    return Fraction(reach * block * stride, kw) * Fraction(WIDE_OUTPUT, min(block * f, WIDE_OUTPUT))


def resolve_block(kernel_shape: Sequence[int], strides: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
                  impl: Impl = "auto", platform: Optional[str] = None) -> int:
    """The block size ``impl`` means for a convolution with this (kh, kw, C, F) kernel (1: XLA's own).

    Args:
        kernel_shape: the kernel's (kh, kw, C, F).
        strides, dilation: the convolution's (the width's enter the cost model).
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
    _, kw, c, f = (int(d) for d in kernel_shape)
    if (platform or jax.default_backend()) != "cpu" or c >= FEW_CHANNELS or f >= WIDE_OUTPUT:
        return 1
    return min((2, 4), key=lambda b: (_cost(b, kw, f, int(strides[1]), int(dilation[1])), b))


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
        impl: ``"auto"`` (chosen per platform at lowering), ``"reference"`` or a block size.
        bias: (F,) added to every output (None: none); given here, it is added where it is cheapest.

    Returns:
        (N, Ho, Wo, F) outputs.
    """
    strides, dilation = tuple(strides), tuple(dilation)

    def reference(x, k, b):
        out = conv2d_reference(x, k, strides, padding, dilation, precision)
        return out if b is None else out + b.astype(out.dtype)[None, None, None, :]

    def blocked(block):
        return lambda x, k, b: conv2d_width_blocked(x, k, block, strides, padding, dilation, precision, b)

    block = resolve_block(kernel_HxWxIxO.shape, strides, dilation, impl, platform="cpu" if impl == "auto" else None)
    kw = kernel_HxWxIxO.shape[1]
    pads = explicit_pads(x_NxHxWxC.shape[2], kw, strides[1], dilation[1], padding, axis=1)
    if block > 1 and (min(pads) < 0 or block_geometry(x_NxHxWxC.shape[2] + sum(pads), kw, block, strides[1],
                                                       dilation[1])[0] <= 0):
        block = 1  # negative padding or no output column: the blocked layout has nothing to gain
    if block == 1:
        return reference(x_NxHxWxC, kernel_HxWxIxO, bias)
    if impl != "auto":
        return blocked(block)(x_NxHxWxC, kernel_HxWxIxO, bias)
    # The rule is a CPU's: lowered for any other platform, the program holds XLA's own convolution.
    return jax.lax.platform_dependent(x_NxHxWxC, kernel_HxWxIxO, bias, cpu=blocked(block), default=reference)
