"""Exact shortcuts for the pruning curve: the head's first operations are affine in the channel mask.

A model's pre-activations (``PrunableModel.preactivation_bias`` / ``channel_contribution``; the lab's DeepID:
fc_1 and conv_4's) are a constant plus one contribution per kept channel, so with per-channel contributions
``F_c`` of each image the network with the first k channels of ``order`` pruned has

    pre(k) = b + sum_{j >= k} F_{order[j]}

i.e. suffix sums over the order: all C + 1 steps cost one pass over the channels instead of C + 1 head
passes. Only the rest of the head (``tail_top2``) runs per step.

The suffix sums are carried through a reverse scan over the steps (:func:`reverse_steps`): each step adds
one channel's contribution. Where the rest of the head is cheap (a model whose logits are affine in the mask:
``conv -> global pooling -> dense``), a scan's per-step overhead is most of the cost, and
:func:`cumulative_preactivations` builds every step at once instead: all C contributions in one vectorised
call and one reverse cumulative sum (``badnet_jax.models.affine``, beside the masks of every step). A channel that is zero on every image of a chunk contributes exactly nothing,
so a step that only (un)prunes such a channel has the same inputs as its neighbour and reuses its
predictions; :func:`step_aliases` states the same relation for the forward direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from badnet_jax.models.protocol import Params, PrunableModel


def alive_channels(feats_NxHxWxC: jax.Array) -> jax.Array:
    """(C,) bool: channels that are non-zero on at least one of these images."""
    return jnp.max(jnp.abs(feats_NxHxWxC), axis=(0, 1, 2)) > 0


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


def reverse_steps(model: PrunableModel, params: Params, feats_NxHxWxC: jax.Array, order: jax.Array, step_fn,
                  skip_dead: bool = False):
    """Walk the steps k = C .. 0, carrying the model's pre-activations (a pytree) as running suffix sums.

    Step C keeps no channel (pre-activations = ``model.preactivation_bias``); going from step k+1 to step k adds
    channel ``order[k]``'s contribution. ``step_fn(k, pre) -> out`` is evaluated at each step; the outputs are
    returned in step order (C + 1, ...).

    With ``skip_dead``, a step whose added channel is zero on every image given costs nothing: its
    contribution is exactly 0, so its pre-activations and hence its output equal the previous step's,
    which are reused (``lax.cond``, real control flow on every backend).
    """
    n = feats_NxHxWxC.shape[0]
    # Behind a barrier: a bias that is a constant of the program (a model without weights in it, a Flax module's
    # masked features) would have XLA fold the whole head on it into a constant at compile time (seconds).
    bias = jax.lax.optimization_barrier(model.preactivation_bias(params))
    pre = jax.tree.map(lambda b: jnp.broadcast_to(b[None], (n, *b.shape)), bias)
    last = step_fn(jnp.int32(order.shape[0]), pre)
    alive = alive_channels(feats_NxHxWxC)
    contribute = model.contributor(params)  # prepared here, not at each (conditional) step

    def advance(k, pre, prev):
        del prev
        pre = jax.tree.map(jnp.add, pre, contribute(feats_NxHxWxC, order[k]))
        return pre, step_fn(k, pre)

    def body(carry, k):
        if skip_dead:
            carry = jax.lax.cond(alive[order[k]], advance, lambda k, *carry: carry, k, *carry)
        else:
            carry = advance(k, *carry)
        return carry, carry[1]

    ks = jnp.arange(order.shape[0] - 1, -1, -1, dtype=jnp.int32)
    _, outs = jax.lax.scan(body, (pre, last), ks)
    return jax.tree.map(lambda o, l: jnp.concatenate([o[::-1], l[None]], axis=0), outs, last)


def step_preactivations(model: PrunableModel, params: Params, feats_NxHxWxC: jax.Array, order: jax.Array,
                        skip_dead: bool = False):
    """The pre-activations at every step k (a pytree of (C + 1, N, ...) arrays), biases included.

    ``skip_dead`` copies the previous step's values instead of adding a dead channel's (zero) contribution.
    """
    return reverse_steps(model, params, feats_NxHxWxC, order, lambda k, pre: pre, skip_dead=skip_dead)


def step_aliases(feats_NxHxWxC: jax.Array, order: jax.Array) -> jax.Array:
    """(C + 1,) int32: for each step k, the first step whose effective mask on these images equals step k's.

    Step k prunes ``order[k-1]`` on top of step k-1; when that channel is zero on every image given, the
    two steps see identical inputs.
    """
    changes = jnp.concatenate([jnp.ones((1,), bool), alive_channels(feats_NxHxWxC)[order]])  # step k differs from k-1?
    steps = jnp.arange(order.shape[0] + 1, dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(changes, steps, 0), axis=0)
