"""Exact shortcuts for the pruning curve: the head's first layers are linear in the pool_3 mask.

fc_1 and conv_4 *pre-activations* are sums over pool_3 channels, so with per-channel contributions
``F_c`` (fc_1, 160 wide) and ``G_c`` (conv_4, 4x3x80 = 960 wide) of each image, the network with the first
k channels of ``order`` pruned has

    fc1_pre(k)   = b1 + sum_{j >= k} F_{order[j]}        conv4_pre(k) = b4 + sum_{j >= k} G_{order[j]}

i.e. suffix sums over the order: all 61 steps cost one pass over the channels instead of 61 head passes.
Only the rest of the head (relu, fc_2, output, argmax: 0.72 MFLOP per image and mask) runs per step.

The suffix sums are carried through a reverse scan over the steps (:func:`reverse_steps`): each step adds
one channel's contribution. A channel that is zero on every image of a chunk contributes exactly nothing,
so a step that only (un)prunes such a channel has the same inputs as its neighbour and reuses its
predictions; :func:`step_aliases` states the same relation for the forward direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.model import CONV4_POSITIONS, HIDDEN_UNITS, NUM_POOL3_CHANNELS, POOL3_HWC, Params

HIGHEST = jax.lax.Precision.HIGHEST


def prefix_masks(order: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """(61, 60) float32 masks; row k prunes (zeroes) the first k channels of ``order``.

    NumPy in, NumPy out (no device round trip for host-side bookkeeping); traceable for a jax.Array.
    """
    xp = np if isinstance(order, np.ndarray) else jnp
    order = xp.asarray(order)
    rank = xp.argsort(order)  # the inverse permutation: each channel's position in the order
    return (rank[None, :] >= xp.arange(order.shape[0] + 1)[:, None]).astype(xp.float32)


def channel_contribution(params: Params, pool3_NxHxWxC: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fc_1 (N, 160) and flattened conv_4 (N, 960) pre-activation contributions of pool_3 channel ``c``.

    ``c`` may be traced. Costs ~14 kFLOP per image: a (20 x 160) and a (4 x 80) product per position.
    """
    n = pool3_NxHxWxC.shape[0]
    h, w, ch = POOL3_HWC
    v = jnp.take(pool3_NxHxWxC, c, axis=3)  # (N, 5, 4)
    w1_c = jnp.take(params["fc_1"]["kernel"].reshape(h * w, ch, -1), c, axis=1)  # (20, 160), Keras (h, w, c) order
    f = jnp.dot(v.reshape(n, h * w), w1_c, precision=HIGHEST)
    k4_c = jnp.take(params["conv_4"]["kernel"], c, axis=2)  # (2, 2, 80)
    kh, kw, o = k4_c.shape
    oh, ow = h - kh + 1, w - kw + 1
    patches = jnp.stack([v[:, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=-1)  # (N, 4, 3, 4)
    g = jnp.dot(patches, k4_c.reshape(kh * kw, o), precision=HIGHEST)  # (N, 4, 3, 80)
    return f, g.reshape(n, oh * ow * o)


def channel_contributions(params: Params, pool3_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel fc_1 and conv_4 pre-activation contributions of every channel, without biases.

    Returns:
        (F, G): F (N, 60, 160) and G (N, 60, 960), with ``sum_c F[:, c] + b1`` = fc_1's pre-activation and
        ``sum_c G[:, c] + b4`` = conv_4's flattened (4, 3, 80) pre-activation of the unpruned network.
    """
    f, g = jax.vmap(lambda c: channel_contribution(params, pool3_NxHxWxC, c))(jnp.arange(POOL3_HWC[2]))
    return jnp.moveaxis(f, 0, 1), jnp.moveaxis(g, 0, 1)


def preactivation_biases(params: Params) -> tuple[jax.Array, jax.Array]:
    """fc_1's bias (160,) and conv_4's bias in the flattened (4, 3, 80) layout (960,): the same at every position."""
    return params["fc_1"]["bias"], jnp.tile(params["conv_4"]["bias"], CONV4_POSITIONS)


def alive_channels(pool3_NxHxWxC: jax.Array) -> jax.Array:
    """(60,) bool: channels that are non-zero on at least one of these images."""
    return jnp.max(pool3_NxHxWxC, axis=(0, 1, 2)) > 0


def alive_groups(pool3_NxHxWxC: jax.Array) -> jax.Array:
    """(N,) int32 permutation that puts images with the same alive channels next to each other.

    Dedupe is decided per chunk (a step is skipped when its channel is dead on *every* image of the chunk),
    so chunks of look-alike images skip more steps. Images are sorted by their alive-channel bit pattern,
    the channels alive on the fewest images being the most significant bits (they split off small groups
    first); ties keep the input order, so the permutation is deterministic.
    """
    n = pool3_NxHxWxC.shape[0]
    alive_NxC = jnp.max(pool3_NxHxWxC, axis=(1, 2)) > 0
    rarest_first = jnp.argsort(jnp.sum(alive_NxC, axis=0), stable=True)
    bits_NxC = alive_NxC[:, rarest_first].astype(jnp.int32)
    # 60 bits do not fit one int32 key: two 30-bit keys, compared lexicographically by lax.sort.
    weights = jnp.left_shift(1, jnp.arange(29, -1, -1, dtype=jnp.int32))
    keys = []
    for i in range(0, bits_NxC.shape[1], 30):
        block = bits_NxC[:, i:i + 30]
        keys.append(jnp.sum(block * weights[None, :block.shape[1]], axis=1))
    return jax.lax.sort((*keys, jnp.arange(n, dtype=jnp.int32)), num_keys=len(keys), is_stable=True)[-1]


def reverse_steps(params: Params, pool3_NxHxWxC: jax.Array, order: jax.Array, step_fn, skip_dead: bool = False):
    """Walk the steps k = 60 .. 0, carrying fc_1/conv_4 pre-activations as running suffix sums.

    Step 60 keeps no channel (pre-activations = biases); going from step k+1 to step k adds channel
    ``order[k]``'s contribution. ``step_fn(k, fc1, c4) -> out`` is evaluated at each step; the outputs are
    returned in step order (61, ...).

    With ``skip_dead``, a step whose added channel is zero on every image given costs nothing: its
    contribution is exactly 0, so its pre-activations and hence its output equal the previous step's,
    which are reused (``lax.cond``, real control flow on every backend).
    """
    b1, b4 = preactivation_biases(params)
    n = pool3_NxHxWxC.shape[0]
    fc1 = jnp.broadcast_to(b1[None, :], (n, b1.shape[0]))
    c4 = jnp.broadcast_to(b4[None, :], (n, b4.shape[0]))
    last = step_fn(jnp.int32(order.shape[0]), fc1, c4)
    alive = alive_channels(pool3_NxHxWxC)

    def advance(k, fc1, c4, prev):
        del prev
        df, dg = channel_contribution(params, pool3_NxHxWxC, order[k])
        fc1, c4 = fc1 + df, c4 + dg
        return fc1, c4, step_fn(k, fc1, c4)

    def body(carry, k):
        if skip_dead:
            carry = jax.lax.cond(alive[order[k]], advance, lambda k, *carry: carry, k, *carry)
        else:
            carry = advance(k, *carry)
        return carry, carry[2]

    ks = jnp.arange(order.shape[0] - 1, -1, -1, dtype=jnp.int32)
    _, outs = jax.lax.scan(body, (fc1, c4, last), ks)
    return jax.tree.map(lambda o, l: jnp.concatenate([o[::-1], l[None]], axis=0), outs, last)


def step_preactivations(params: Params, pool3_NxHxWxC: jax.Array, order: jax.Array,
                        skip_dead: bool = False) -> tuple[jax.Array, jax.Array]:
    """fc_1 (61, N, 160) and conv_4 (61, N, 960) pre-activations, biases included, at every step k.

    ``skip_dead`` copies the previous step's values instead of adding a dead channel's (zero) contribution.
    """
    both = reverse_steps(params, pool3_NxHxWxC, order, lambda k, fc1, c4: jnp.concatenate([fc1, c4], axis=1),
                         skip_dead=skip_dead)
    return both[..., :HIDDEN_UNITS], both[..., HIDDEN_UNITS:]


def step_aliases(pool3_NxHxWxC: jax.Array, order: jax.Array) -> jax.Array:
    """(61,) int32: for each step k, the first step whose effective mask on these images equals step k's.

    Step k prunes ``order[k-1]`` on top of step k-1; when that channel is zero on every image given, the
    two steps see identical inputs.
    """
    changes = jnp.concatenate([jnp.ones((1,), bool), alive_channels(pool3_NxHxWxC)[order]])  # step k differs from k-1?
    steps = jnp.arange(NUM_POOL3_CHANNELS + 1, dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(changes, steps, 0), axis=0)
