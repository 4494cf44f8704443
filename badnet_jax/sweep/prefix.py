"""The prefix sweep's bookkeeping of dead channels: which steps share their inputs, and images grouped so.

The shortcuts' sums over an order (``pre(k) = b + sum_{j >= k} F_{order[j]}``, by a reverse scan or a
cumulative sum) live in ``badnet_jax.models.affine``, below the sweep and the near-tie bound that measures
their rounding. A channel that is zero on every image of a chunk contributes exactly nothing, so a step that
only (un)prunes such a channel has the same inputs as its neighbour and reuses its predictions:
:func:`step_aliases` names, for each step, the first step with the same inputs, and :func:`alive_groups` orders
a chunk's images so that look-alike images share their dead channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from badnet_jax.models.affine import alive_channels


def alive_groups(feats_NxHxWxC: jax.Array) -> jax.Array:
    """(N,) int32 permutation that puts images with the same alive channels next to each other.

    Dedupe is decided per chunk (a step is skipped when its channel is dead on *every* image of the chunk),
    so chunks of look-alike images skip more steps. Images are sorted by their alive-channel bit pattern,
    the channels alive on the fewest images being the most significant bits (they split off small groups
    first); ties keep the input order, so the permutation is deterministic.
    """
    n = feats_NxHxWxC.shape[0]
    alive_NxC = jnp.max(jnp.abs(feats_NxHxWxC), axis=(1, 2)) > 0
    rarest_first = jnp.argsort(jnp.sum(alive_NxC, axis=0), stable=True)
    bits_NxC = alive_NxC[:, rarest_first].astype(jnp.int32)
    # C bits do not fit one int32 key: 30-bit keys, compared lexicographically by lax.sort.
    weights = jnp.left_shift(1, jnp.arange(29, -1, -1, dtype=jnp.int32))
    keys = []
    for i in range(0, bits_NxC.shape[1], 30):
        block = bits_NxC[:, i:i + 30]
        keys.append(jnp.sum(block * weights[None, :block.shape[1]], axis=1))
    return jax.lax.sort((*keys, jnp.arange(n, dtype=jnp.int32)), num_keys=len(keys), is_stable=True)[-1]


def step_aliases(feats_NxHxWxC: jax.Array, order: jax.Array) -> jax.Array:
    """(C + 1,) int32: for each step k, the first step whose effective mask on these images equals step k's.

    Step k prunes ``order[k-1]`` on top of step k-1; when that channel is zero on every image given, the
    two steps see identical inputs.
    """
    changes = jnp.concatenate([jnp.ones((1,), bool), alive_channels(feats_NxHxWxC)[order]])  # step k differs from k-1?
    steps = jnp.arange(order.shape[0] + 1, dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(changes, steps, 0), axis=0)
