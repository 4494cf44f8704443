"""The affine split's arithmetic over an order: every step's mask, and every step's pre-activations.

Step k of an order prunes its first k channels (:func:`prefix_masks`). A model's pre-activations are affine in
the mask (``PrunableModel.preactivation_bias`` / ``channel_contribution``), so with per-channel contributions
``F_c`` of each image the network with the first k channels of ``order`` pruned has

    pre(k) = b + sum_{j >= k} F_{order[j]}

i.e. suffix sums over the order: all C + 1 steps cost one pass over the channels instead of C + 1 head passes,
and only the rest of the head runs per step. Two summation orders give them: a reverse scan over the steps
that adds one channel's contribution at each (:func:`reverse_steps`, :func:`step_preactivations`), and, where
the rest of the head is cheap, every step at once by one reverse cumulative sum
(:func:`cumulative_preactivations`). The sweep (``badnet_jax.sweep``) evaluates its curves with them and the
near-tie bound (``badnet_jax.numerics.tie_bound``) measures the rounding of the same sums, so both live here,
below both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.models.protocol import Params, PrunableModel


def prefix_masks(order: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """(C + 1, C) float32 masks; row k prunes (zeroes) the first k channels of ``order``.

    NumPy in, NumPy out (no device round trip for host-side bookkeeping); traceable for a jax.Array.
    """
    xp = np if isinstance(order, np.ndarray) else jnp
    order = xp.asarray(order)
    rank = xp.argsort(order)  # the inverse permutation: each channel's position in the order
    return (rank[None, :] >= xp.arange(order.shape[0] + 1)[:, None]).astype(xp.float32)


def cumulative_preactivations(model: PrunableModel, params: Params, feats_NxHxWxC: jax.Array, order: jax.Array):
    """The pre-activations at every step k (a pytree of (C + 1, N, ...) arrays, biases included), all at once.

    Every channel's contribution is computed in one call (``channel_contribution`` vmapped over the order), and
    step k's sum ``sum_{j >= k} F_{order[j]}`` is a reverse cumulative sum over that axis; step C is the bias
    alone. Where the pre-activations are per-channel images of the features
    (``PrunableModel.channelwise_preactivations``, e.g. a global average pooling), step k is those images
    times its mask instead: no sum at all. The same values as :func:`step_preactivations` but summed in another
    order (float32 rounding differs; the near-tie bound is measured on both, ``badnet_jax.numerics.tie_bound``).
    Working memory: the C contributions and the C + 1 sums.
    """
    bias = model.preactivation_bias(params)
    channelwise = model.channelwise_preactivations(params, feats_NxHxWxC)
    if channelwise is not None:
        # pre(k) = bias + mask_k * P: a product with 0 or 1 is exact, so no sum over channels is needed.
        masks = prefix_masks(order)  # (C + 1, C)

        def masked(b, p):
            mask = masks.reshape(masks.shape[0], *(1,) * (p.ndim - 1), masks.shape[1]).astype(p.dtype)
            return p[None] * mask + b[None, None]
        return jax.tree.map(masked, bias, channelwise)
    contribute = model.contributor(params)
    contribs = jax.vmap(lambda c: contribute(feats_NxHxWxC, c))(order)  # (C, N, ...)

    def steps(bias, contrib):
        suffix = jax.lax.cumsum(contrib, axis=0, reverse=True)  # suffix[k] = sum over j >= k
        suffix = jnp.concatenate([suffix, jnp.zeros_like(contrib[:1])], axis=0)
        return suffix + bias[None, None]
    return jax.tree.map(steps, bias, contribs)


def alive_channels(feats_NxHxWxC: jax.Array) -> jax.Array:
    """(C,) bool: channels that are non-zero on at least one of these images."""
    return jnp.max(jnp.abs(feats_NxHxWxC), axis=(0, 1, 2)) > 0


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
