"""The reference 2-D convolution: XLA's own, NHWC input, HWIO kernel (Keras' and Flax's layouts)."""

from __future__ import annotations

from typing import Any, Sequence, Union

import jax

Padding = Union[str, Sequence[tuple[int, int]]]


def conv2d_reference(x_NxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int] = (1, 1),
                     padding: Padding = "VALID", dilation: Sequence[int] = (1, 1),
                     precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
    """``lax.conv_general_dilated`` on NHWC images and an HWIO kernel; traceable.

    Args:
        x_NxHxWxC: images.
        kernel_HxWxIxO: the kernel (kh, kw, C, F).
        strides: (sh, sw) window strides.
        padding: ``"VALID"``, ``"SAME"`` or ((top, bottom), (left, right)).
        dilation: (dh, dw) kernel dilation.
        precision: the matmul precision (``HIGHEST``: float32 on accelerators too).

    Returns:
        (N, Ho, Wo, F) outputs, no bias.
    """
    return jax.lax.conv_general_dilated(x_NxHxWxC, kernel_HxWxIxO, tuple(strides), padding,
                                        rhs_dilation=tuple(dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
