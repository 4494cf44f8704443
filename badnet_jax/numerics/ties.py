"""Near-ties: which float32 predictions could depend on the summation order, and so are settled in float64.

A float32 logit differs from the exact one by rounding errors whose size depends on the order the sums
run in (the prefix sweep, the masked forward, XLA on a GPU, another chunk or device count all differ).
A prediction is trusted when its top-2 logit gap is larger than twice what those errors can be, and
otherwise recomputed in float64 (``badnet_jax.numerics.settling``), trunk included. The bound, per image and step:

    |logit_c(float32) - logit_c(exact)|  <=  TIE_RTOL / 2 * S,    S = sum_i h_i * max_c |W_out[i, c]| + max_c |b_c|

where h >= 0 is the float32 hidden layer (relu(fc_1 + fc_2)). So the gap test is ``gap <= TIE_RTOL * S``.

Derivation. (1) Worst case: a float32 dot product of n terms, in any order, errs by at most
gamma_n * sum |a_i b_i| (gamma_n = n u / (1 - n u), u = 2^-24); pushed through the seven layers with
|W| this bounds the logits by ~7000 on the lab's B, whose logits are ~100-300 and whose median top-2 gap is
64 (measured on the real faces): a worst-case bound would send every prediction to float64, so it is not
the one used. (2) Rounding errors of independent sums behave as independent zero-mean variables (Higham and
Mary, SIAM J. Sci. Comput. 2019): a dot product errs by at most lambda * sqrt(n) * u * sum |a_i b_i| with
probability >= 1 - 2 exp(-lambda^2 (1-u)^2 / 2), and errors reaching the logits from earlier layers pass
through the signed weights, so they cancel like the values themselves; the logit error is then u times
a modest multiple of S (which bounds the output layer's absolute sums sum_i h_i |W_out[i, c]| + |b_c|).
(3) The multiple, measured: over the real faces (47 + 53 validation, 13 + 13 test), at all 61 steps of the
activation order and of 3 random orders, max |logit(float32) - logit(float64 NumPy)| / (u S) = 5.96 for the
masked forward and 6.26 for the prefix sweep's other summation order (logits within ~1.5e-4 of float64 on
these faces). TIE_RTOL = 2 * 64 u: two logits of the gap, each with 10x the worst measured
error. This is a probabilistic bound with a margin, not a worst-case guarantee; every prediction it
trusted agreed with float64 in the tests (the near-tie tests bisect images onto the boundary).
(4) Other models: what the test bounds is the gap's error. Over the same faces and orders, max
|gap(float32) - gap(float64)| / (u S) is 1.3-1.8 for lab B, 4.5-8.8 for the four 2020 BadNets at their
scale, and 14.5-38 for them fed raw pixels (their wrong scale, which a user can force: activations cancel
in the trunk and single logits err by up to 214 u S), all within the bound's 128 u S (tests pin lab B
within a tenth and the worst case within a half).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

U = 2.0 ** -24  # float32 unit roundoff
TIE_RTOL = 2 * 64 * U  # ~7.6e-6: see the module docstring
# Every float32 product the bound covers runs at full float32 precision: an accelerator's default rounds the
# factors to TF32 or bfloat16 (2^-11 or coarser, thousands of u), far past the bound. Every such product names this.
HIGHEST = jax.lax.Precision.HIGHEST


def near_tie(gap: jax.Array | np.ndarray, scale: jax.Array | np.ndarray,
             rtol: float = TIE_RTOL) -> jax.Array | np.ndarray:
    """Whether a top-2 logit gap is within the error bound ``rtol * S`` (float32's by default; traceable)."""
    return gap <= rtol * scale


def top2_gap(logits: jax.Array | np.ndarray,
             axis: int = -1) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
    """argmax (int32, first index on ties) and the gap between the two largest logits (0 on an exact tie).

    ``axis``: the classes' axis (-1: logits (..., C); 0: class-major logits (C, ...), what :func:`output_top2`
    computes). The runner-up is the max with the winner left out (``lax.top_k`` sorts on XLA:CPU, ~10x slower).
    Traceable for a jax.Array; a NumPy array (the float64 networks) stays on the host.

    A jax.Array's argmax is the first index holding the maximum (the first NaN where there is one, as
    ``jnp.argmax``; the gap is then NaN), found with plain reductions (max, first index, runner-up max):
    ``jnp.argmax`` is a variadic (value, index) reduction that XLA:CPU does not vectorise, and it cost as much
    as the two matmuls of DeepID's tail (0.74 ms against 0.36 ms for 256 images x 1283 classes on a 2-core
    Xeon). Same bits as ``jnp.argmax``.
    """
    if isinstance(logits, np.ndarray):
        arg = logits.argmax(axis=axis).astype(np.int32)
        rest = np.where(np.arange(logits.shape[axis]).reshape(_along(logits.ndim, axis)) == np.expand_dims(arg, axis),
                        -np.inf, logits)
        return arg, logits.max(axis=axis) - rest.max(axis=axis)
    # XLA:CPU's vectorised max may skip NaNs, so the NaNs are looked for apart.
    axis = axis % logits.ndim
    n = logits.shape[axis]
    top = jnp.max(logits, axis=axis, keepdims=True)
    classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    first_nan = jnp.min(jnp.where(jnp.isnan(logits), classes, n), axis=axis)
    first_top = jnp.min(jnp.where(logits == top, classes, n), axis=axis)
    arg = jnp.where(first_nan < n, first_nan, first_top)
    second = jnp.max(jnp.where(classes == jnp.expand_dims(arg, axis), -jnp.inf, logits), axis=axis)
    return arg, jnp.where(first_nan < n, jnp.nan, jnp.squeeze(top, axis) - second)


def _along(ndim: int, axis: int) -> tuple[int, ...]:
    """The shape that broadcasts a 1-D array along ``axis`` of an ``ndim``-D one."""
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def output_top2(hidden: jax.Array, wout_HxC: jax.Array, bout_C: jax.Array) -> tuple[jax.Array, jax.Array]:
    """argmax and top-2 gap (:func:`top2_gap`) of the output layer ``hidden @ W_out + b`` on hidden layers
    (..., H); traceable. The one place the sweep, the forward and the GoodNet compute their logits.

    The logits are computed class-major, (C, ...) = W_out^T hidden^T, and reduced over their leading axis:
    XLA:CPU reduces across rows with whole vectors, where a reduction along each row's 1283 classes runs
    element by element (DeepID's output layer and top-2 for 256 images: 0.82 -> 0.61 ms on a 2-core Xeon).
    The same products, summed in another order (what the near-tie bound is there for).
    """
    lead = hidden.ndim - 1
    logits_CxN = jax.lax.dot_general(wout_HxC, hidden, (((0,), (lead,)), ((), ())), precision=HIGHEST)
    return top2_gap(logits_CxN + bout_C.reshape(_along(lead + 1, 0)), axis=0)


def output_scale_weights(wout_HxC: jax.Array | np.ndarray,
                         bout_C: jax.Array | np.ndarray) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
    """The weights' part of the output scale S: (H,) max_c |W_out[i, c]| and max_c |b_c|."""
    xp = np if isinstance(wout_HxC, np.ndarray) else jnp
    return xp.max(xp.abs(wout_HxC), axis=1), xp.max(xp.abs(bout_C))


def output_scale(hidden: jax.Array | np.ndarray, wout_HxC: jax.Array | np.ndarray,
                 bout_C: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """S = sum_i |h_i| * max_c |W_out[i, c]| + max_c |b_c| for hidden layers h (..., H): what the error of a
    logit is measured against (see the module docstring; DeepID's h is a relu's output, |h| = h).

    The one definition of S: float32 and traceable for jax.Arrays (the sweep, the masked-head reference),
    float64 for NumPy arrays (the float64 networks). The Pallas kernel sums the same products in its loop
    from :func:`output_scale_weights`.
    """
    if isinstance(hidden, np.ndarray):
        wmax_H, bmax = output_scale_weights(np.asarray(wout_HxC), np.asarray(bout_C))
        return np.abs(hidden) @ wmax_H + bmax
    wmax_H, bmax = output_scale_weights(jnp.asarray(wout_HxC), jnp.asarray(bout_C))
    return jnp.dot(jnp.abs(hidden), wmax_H, precision=HIGHEST) + bmax


def output_with_ties(hidden_NxH: jax.Array, wout_HxC: jax.Array, bout_C: jax.Array,
                     rtol: float = TIE_RTOL) -> tuple[jax.Array, jax.Array]:
    """The output layer on the hidden layer: (N,) predictions and (N,) near-tie flags within ``rtol`` (traceable)."""
    arg, gap = output_top2(hidden_NxH, wout_HxC, bout_C)
    return arg, near_tie(gap, output_scale(hidden_NxH, wout_HxC, bout_C), rtol)


def undecided_channels(pre_max_C: np.ndarray, in_max: float, kernel_conv3: np.ndarray,
                       bias_conv3: np.ndarray) -> np.ndarray:
    """(60,) bool: channels that float32 may call dead (or alive) where float64 would not.

    A channel's pool_3 mean is exactly 0 iff its conv_3 pre-activation is <= 0 at every position of every
    ranking image, and dead channels tie at 0 (ordered by index). Whether the largest pre-activation is above
    0 is decided by the same kind of rounding as a logit, so the same bound applies with conv_3's scale
    S3_c = ||W3[..., c]||_1 * max(conv_3 input) + |b3_c| (which bounds sum_i |w_i x_i| + |b_c| at every
    position): a channel whose largest pre-activation lies within ``TIE_RTOL * S3_c`` of 0 is undecided
    (a pruned channel, kernel and bias 0, is exactly 0 in any arithmetic: decided). Measured: the float32
    error of that maximum is at most 2.2 u S3_c on the real faces with the five real BadNets at both input
    scales, ~58x inside the bound (docs/numerics.md).
    """
    kernel = np.abs(np.asarray(kernel_conv3, np.float64)).reshape(-1, kernel_conv3.shape[-1])
    scale = kernel.sum(axis=0) * float(in_max) + np.abs(np.asarray(bias_conv3, np.float64))
    return np.abs(np.asarray(pre_max_C, np.float64)) < TIE_RTOL * scale  # "<": zero weights are exactly dead
