"""Pure-JAX reference of the dense ops: what the native kernels compute, in XLA's summation order."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from badnet_jax.numerics.ties import HIGHEST, output_scale, output_top2


def dense_reference(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array, add_MxN: Optional[jax.Array] = None,
                    relu_in: bool = False, relu_out: bool = False) -> jax.Array:
    """``act(act_in(x) @ w + b + add)`` for rows of leading axes ``...``: (..., K) -> (..., N).

    ``act_in`` / ``act``: ``max(., 0)`` where ``relu_in`` / ``relu_out``, else the identity; ``add``: (..., N)
    or None.
    """
    lead = (1,) * (x_MxK.ndim - 1)  # explicit broadcasting: the project runs with rank promotion off
    y = jnp.dot(jax.nn.relu(x_MxK) if relu_in else x_MxK, w_KxN, precision=HIGHEST) + b_N.reshape(*lead, -1)
    if add_MxN is not None:
        y = y + add_MxN
    return jax.nn.relu(y) if relu_out else y


def dense_top2_reference(x_MxK: jax.Array, w_KxN: jax.Array,
                         b_N: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The output layer's argmax, top-2 gap and output scale for inputs (..., K) (``badnet_jax.numerics.ties``:
    :func:`~badnet_jax.numerics.ties.output_top2`, :func:`~badnet_jax.numerics.ties.output_scale`)."""
    arg, gap = output_top2(x_MxK, w_KxN, b_N)
    return arg, gap, output_scale(x_MxK, w_KxN, b_N)


__all__ = ["dense_reference", "dense_top2_reference"]
