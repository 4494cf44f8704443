"""The affine split's arithmetic over an order: every step's mask, and every step's pre-activations at once.

Step k of an order prunes its first k channels (:func:`prefix_masks`). A model's pre-activations are affine in
the mask (``PrunableModel.preactivation_bias`` / ``channel_contribution``), so all C + 1 steps follow from the C
channel contributions by one reverse cumulative sum over the order (:func:`cumulative_preactivations`). The
sweep (``badnet_jax.sweep``) evaluates its curves with them and the near-tie bound
(``badnet_jax.numerics.tie_bound``) measures the rounding of the same sums, so both live here, below both.
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
    times its mask instead: no sum at all. The same values as :func:`step_preactivations` but summed in another order (float32 rounding
    differs; the near-tie bound is measured on both, ``badnet_jax.numerics.tie_bound``). Working memory: the
    C contributions and the C + 1 sums.
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
