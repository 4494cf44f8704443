"""Exact shortcuts for the pruning curve: the head's first layers are linear in the pool_3 mask.

fc_1 and conv_4 *pre-activations* are sums over pool_3 channels, so with per-channel contributions
``F_c`` (fc_1, 160 wide) and ``G_c`` (conv_4, 4x3x80 = 960 wide) of each image, the network with the first
k channels of ``order`` pruned has

    fc1_pre(k)   = b1 + sum_{j >= k} F_{order[j]}        conv4_pre(k) = b4 + sum_{j >= k} G_{order[j]}

i.e. suffix sums over the order: all 61 steps cost one pass over the channels instead of 61 head passes.
Only the rest of the head (relu, fc_2, output, argmax: 0.72 MFLOP per image and mask) runs per step.

A channel that is zero on every image of a set contributes exactly nothing there, so steps that prune only
such channels give the same predictions as the step before: :func:`step_aliases` maps each step to the
first step with the same effective mask, and only those distinct steps are evaluated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from badnet_jax.model import NUM_POOL3_CHANNELS, POOL3_HWC, Params

HIGHEST = jax.lax.Precision.HIGHEST


def channel_contributions(params: Params, pool3_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel fc_1 and conv_4 pre-activation contributions, without biases.

    Returns:
        (F, G): F (N, 60, 160) and G (N, 60, 960), with ``sum_c F[:, c] + b1`` = fc_1's pre-activation and
        ``sum_c G[:, c] + b4`` = conv_4's flattened (4, 3, 80) pre-activation of the unpruned network.
    """
    n = pool3_NxHxWxC.shape[0]
    h, w, c = POOL3_HWC
    w1 = params["fc_1"]["kernel"].reshape(h * w, c, -1)  # Keras flatten order: (h, w, c)
    f_NxCxD = jnp.einsum("npc,pcd->ncd", pool3_NxHxWxC.reshape(n, h * w, c), w1, precision=HIGHEST)
    # conv_4 per input channel: a grouped convolution, one group per pool_3 channel.
    k4 = params["conv_4"]["kernel"]  # (2, 2, 60, 80)
    kh, kw, _, o = k4.shape
    grouped = k4.reshape(kh, kw, 1, c * o)  # output feature c*80 + o uses input channel c
    g = jax.lax.conv_general_dilated(pool3_NxHxWxC, grouped, (1, 1), "VALID", feature_group_count=c,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    oh, ow = g.shape[1:3]
    g_NxCxD = g.reshape(n, oh, ow, c, o).transpose(0, 3, 1, 2, 4).reshape(n, c, oh * ow * o)
    return f_NxCxD, g_NxCxD


def step_preactivations(params: Params, pool3_NxHxWxC: jax.Array, order: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fc_1 (61, N, 160) and conv_4 (61, N, 960) pre-activations, biases included, at every step k."""
    f, g = channel_contributions(params, pool3_NxHxWxC)
    b4 = params["conv_4"]["bias"]
    b4_flat = jnp.tile(b4, g.shape[-1] // b4.shape[0])  # the flattened (4, 3, 80) layout repeats the bias
    return (suffix_preactivations(f, order, params["fc_1"]["bias"]), suffix_preactivations(g, order, b4_flat))


def suffix_preactivations(contrib_NxCxD: jax.Array, order: jax.Array, bias: jax.Array) -> jax.Array:
    """(61, N, D): row k = bias + sum of the contributions of the channels kept at step k (``order[k:]``)."""
    ordered = jnp.take(contrib_NxCxD, order, axis=1)  # (N, 60, D), pruning order
    suffix = jnp.cumsum(ordered[:, ::-1], axis=1)[:, ::-1]  # suffix[:, k] = sum_{j >= k}
    suffix = jnp.concatenate([suffix, jnp.zeros_like(suffix[:, :1])], axis=1)  # step 60: nothing kept
    return jnp.moveaxis(suffix, 1, 0) + bias[None, None, :]


def step_aliases(pool3_NxHxWxC: jax.Array, order: jax.Array) -> jax.Array:
    """(61,) int32: for each step k, the first step whose effective mask on these images equals step k's.

    Step k prunes ``order[k-1]`` on top of step k-1; when that channel is zero on every image given, the
    two steps see identical inputs.
    """
    alive = jnp.max(pool3_NxHxWxC, axis=(0, 1, 2)) > 0  # (60,)
    changes = jnp.concatenate([jnp.ones((1,), bool), alive[order]])  # step k differs from k-1?
    steps = jnp.arange(NUM_POOL3_CHANNELS + 1, dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(changes, steps, 0), axis=0)
