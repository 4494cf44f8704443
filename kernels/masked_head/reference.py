"""Pure-JAX reference of the masked head's tail + argmax: always available, the default on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def head_argmax_reference(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array,
                          wout: jax.Array, bout: jax.Array) -> jax.Array:
    """argmax over classes of ``relu(relu(c4_pre) @ w2 + b2 + fc1_pre) @ wout + bout``.

    Args:
        fc1_pre: (..., 160) fc_1 pre-activations (bias included).
        c4_pre: (..., 960) flattened conv_4 pre-activations (bias included).
        w2, b2: fc_2 kernel (960, 160) and bias (160,).
        wout, bout: output kernel (160, C) and bias (C,).

    Returns:
        (...) int32 class indices (first index on ties, like ``jnp.argmax``).
    """
    lead = (1,) * (fc1_pre.ndim - 1)  # explicit broadcasting: the project runs with rank promotion off
    hidden = jnp.dot(jax.nn.relu(c4_pre), w2, precision=HIGHEST) + b2.reshape(*lead, -1) + fc1_pre
    logits = jnp.dot(jax.nn.relu(hidden), wout, precision=HIGHEST) + bout.reshape(*lead, -1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
