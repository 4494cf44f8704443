"""Pure-JAX reference of the masked head's tail + argmax (and top-2 gap): always available, the default on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from badnet_jax.numerics.ties import HIGHEST, output_scale, output_top2


def head_top2_reference(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array,
                        wout: jax.Array, bout: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """argmax, top-2 gap and output scale of ``logits = relu(relu(c4_pre) @ w2 + b2 + fc1_pre) @ wout + bout``.

    Args:
        fc1_pre: (..., 160) fc_1 pre-activations (bias included).
        c4_pre: (..., 960) flattened conv_4 pre-activations (bias included).
        w2, b2: fc_2 kernel (960, 160) and bias (160,).
        wout, bout: output kernel (160, C) and bias (C,).

    Returns:
        (...) int32 class indices (first index on ties, like ``jnp.argmax``); (...) float32 gap between the two
        largest logits (0 on an exact tie); (...) float32 output scale S, the magnitude the float32 error of the
        logits is measured against (``badnet_jax.numerics.ties``: :func:`top2_gap`, :func:`output_scale`).
    """
    lead = (1,) * (fc1_pre.ndim - 1)  # explicit broadcasting: the project runs with rank promotion off
    hidden = jax.nn.relu(jnp.dot(jax.nn.relu(c4_pre), w2, precision=HIGHEST) + b2.reshape(*lead, -1) + fc1_pre)
    arg, gap = output_top2(hidden, wout, bout)
    return arg, gap, output_scale(hidden, wout, bout)


def head_argmax_reference(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array,
                          wout: jax.Array, bout: jax.Array) -> jax.Array:
    """The argmax of :func:`head_top2_reference` alone (under jit the gap and scale are never computed)."""
    return head_top2_reference(fc1_pre, c4_pre, w2, b2, wout, bout)[0]
