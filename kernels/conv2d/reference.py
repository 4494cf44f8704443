"""The reference 2-D convolution: XLA's own, NHWC input, HWIO kernel (Keras' and Flax's layouts); the epilogue a
convolution may carry (a max pool, a ReLU), in JAX."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp

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


def epilogue(y_NxHxWxF: jax.Array, relu: bool = False, pool: Optional[tuple[int, int]] = None) -> jax.Array:
    """A convolution's epilogue in JAX (the direct kernel fuses the same): the max over ``pool`` windows (stride =
    window, VALID; None: none), then ``max(., 0)`` if ``relu``. Both only compare, so this equals a ReLU then
    the pool bit for bit."""
    if pool is not None and tuple(pool) != (1, 1):
        window = (1, *pool, 1)
        y_NxHxWxF = jax.lax.reduce_window(y_NxHxWxF, -jnp.inf, jax.lax.max, window, window, "VALID")
    return jnp.maximum(y_NxHxWxF, jnp.zeros((), y_NxHxWxF.dtype)) if relu else y_NxHxWxF
