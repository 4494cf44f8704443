"""Near-ties settled in float64: the direct masked forward, trunk included.

:func:`settle` finishes the sweep's predictions, :func:`settle_ranking` its activation ranking, and
:func:`predict_settled` any single forward (fine-pruned B', GoodNet screening) the same way.

The sweep flags every prediction whose float32 top-2 gap is within the float32 error bound
(``badnet_jax.numerics.ties``); those, and only those, are recomputed here. The float64 forward prunes the way the
lab does: conv_3's kernel and bias of the pruned channels are zeroed, the whole network runs.

Two float64 networks, one answer. The canonical one is NumPy on the host (:func:`logits64`): the same
code whatever ran the sweep (plain or shortcut strategy, chunk size, device count, CPU or GPU). Its trunk
is slow (~5 ms an image on two CPU cores; on a GPU it would be most of the sweep's time), so predictions are
settled by B's own Flax trunk run by XLA in float64 (``jax.enable_x64``, on the local device; on the CPU
where the device has no float64, a TPU) and the NumPy head. The two float64 trunks sum in different
orders and differ by a few float64 roundings; every settled prediction whose float64 top-2 gap is within
:data:`TIE64_RTOL` x S of that (S as in ``badnet_jax.numerics.ties``) is computed again by the NumPy network. So the
answer is the canonical network's wherever the two could disagree.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.model import NUM_POOL3_CHANNELS, POOL, POOL3_HWC, BadNet, Params, num_classes_of
from badnet_jax.models.protocol import PrunableModel
from badnet_jax.numerics import xla64
from badnet_jax.numerics.ties import near_tie, output_scale, top2_gap
from badnet_jax.numerics.ties import U as TIE_U

U64 = 2.0 ** -53  # float64 unit roundoff
# Two float64 networks agree on a prediction whose float64 gap exceeds this times S: the largest
# |logit(XLA float64) - logit(NumPy float64)| / (u64 S) on the 126 real lab faces at all 61 steps of the
# activation order. On an AMD EPYC (Zen 5) it is 0 (XLA's float64 convolutions sum as the NumPy network's
# 2-D products do); on an H200 it is 8.5 for lab B and 6.9-8.9 for the 2020 BadNets at their scale, but 158.3
# for a 2020 BadNet fed raw pixels (anonymous_1: its wrong scale, which a user can still ask for; near the last
# steps, where S is small). 10x the largest on both logits of the gap, as TIE_RTOL is for float32 (a test
# measures it).
TIE64_RTOL = 2 * 1600 * U64
# The activation ranking's means: two adjacent float32 means are told apart when they differ by more than
# this times the larger. It is a floor: float32 errors depend on the CPU (XLA picks other convolution
# algorithms and summation orders per CPU), so every ranking also measures them on its own images on the
# machine that runs it (:func:`ranking_rtol`) and uses 10x the measured error on both means when larger.
RANK_RTOL = 2 * 770 * TIE_U
RANK_CHECK_IMAGES = 32  # images of the ranking set whose float32 channel sums are checked against float64
# XLA's and NumPy's float64 channel sums differ by up to 219.4 u64 relative on the same faces (anonymous_1 at
# its scale): adjacent float64 means closer than 10x that on both are summed again by NumPy.
RANK64_RTOL = 2 * 2200 * U64
MEANS64_CHUNK = 2048  # images per float64 trunk pass of the means (bounds the float64 features held at once)


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, batch: int = 64) -> np.ndarray:
    """The VALID cross-correlation plus bias (Keras Conv2D before its relu): im2col, one matrix product per
    ``batch`` images."""
    kh, kw, cin, cout = kernel.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    flat = kernel.reshape(kh * kw * cin, cout)  # HWIO: (i, j, c) rows, the order the patches are stacked in
    out = np.empty((x.shape[0], oh, ow, cout))
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch]
        patches = np.concatenate([xb[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
        # one 2-D product: NumPy's stacked matmul over (rows, K) x (K, cout) per output row is several times slower
        np.matmul(patches.reshape(-1, len(flat)), flat, out=out[s:s + batch].reshape(-1, cout))
    out += bias
    return out


def _conv_relu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = _conv(x, kernel, bias)
    return np.maximum(out, 0.0, out=out)


def _pool(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x[:, :h // POOL * POOL, :w // POOL * POOL].reshape(n, h // POOL, POOL, w // POOL, POOL, c).max(axis=(2, 4))


def pool3_64(params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
    """(N, 5, 4, 60) float64 pool_3 activations of B by NumPy, the canonical float64 trunk (pixels 0..255 in,
    divided by ``divisor``)."""
    p = xla64.params64(params)
    h = np.asarray(x_NxHxWxC, np.float64) / divisor
    for layer in ("conv_1", "conv_2", "conv_3"):
        h = _pool(_conv_relu(h, p[layer]["kernel"], p[layer]["bias"]))
    return h


@functools.lru_cache(maxsize=None)
def _trunk64_fn(num_classes: int):
    model = BadNet(num_classes)  # raw scale: the pixels are divided here, as NumPy divides them
    return jax.jit(lambda params, x, divisor: model.apply(
        {"params": params}, xla64.divided(x.astype(jnp.float64), divisor), method=BadNet.trunk))


def pool3_64_xla(params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
    """(N, 5, 4, 60) float64 pool_3 activations of B by XLA in float64: B's own trunk under ``jax.enable_x64``.

    Equal to :func:`pool3_64` up to a few float64 roundings (its sums run in XLA's order); 8x faster on two
    CPU cores, and on a GPU it runs on the GPU (in calls of ``badnet_jax.numerics.xla64.call_sizes``).
    """
    x = np.asarray(x_NxHxWxC)
    if not len(x):
        return np.empty((0, *POOL3_HWC))
    return xla64.run64(_trunk64_fn(num_classes_of(params)), params, [x], divisor)


def head64(params: Params, pool3_NxHxWxC: np.ndarray, masks_NxC: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, classes) float64 logits from pool_3 activations with the masked-out channels zeroed.

    ``masks_NxC``: a (60,) mask for every image, or (N, 60) one per image. Zeroing a pool_3 channel is
    exactly zeroing its conv_3 kernel and bias (relu(0) = 0, max pool of zeros is 0) in float64 too, so
    this is the lab's pruned network.
    """
    return _head64(params, pool3_NxHxWxC, masks_NxC)[0]


def tail64(fc1_pre: np.ndarray, c4_pre: np.ndarray, w2: np.ndarray, b2: np.ndarray, wout: np.ndarray,
           bout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head's tail in float64: ``logits = relu(fc1_pre + relu(c4_pre) @ w2 + b2) @ wout + bout`` and each
    row's output scale S (``ties.output_scale``).

    The one float64 head after the fc_1 / conv_4 pre-activations: :func:`head64` ends in it, and the masked-head
    kernel's probe (``badnet_jax.kernels.masked_head.api.clear_rows``) checks the kernel against it.

    Args:
        fc1_pre, c4_pre: (..., 160) fc_1 and (..., 960) flattened conv_4 pre-activations, biases included.
        w2, b2, wout, bout: fc_2's kernel (960, 160) and bias (160,); the output layer's (160, C) and (C,).

    Returns:
        (..., C) float64 logits and (...) float64 S.
    """
    f64 = lambda a: np.asarray(a, np.float64)
    hidden = np.maximum(f64(fc1_pre) + np.maximum(f64(c4_pre), 0.0) @ f64(w2) + f64(b2), 0.0)
    wout, bout = f64(wout), f64(bout)
    return hidden @ wout + bout, output_scale(hidden, wout, bout)


def _head64(params: Params, pool3_NxHxWxC: np.ndarray,
            masks_NxC: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`head64`'s logits and each row's output scale S (:func:`tail64` on the masked pool_3's
    pre-activations)."""
    p = xla64.params64(params)
    h = np.asarray(pool3_NxHxWxC, np.float64)
    if masks_NxC is not None:
        m = np.asarray(masks_NxC, np.float64)
        h = h * (m[None, None, None, :] if m.ndim == 1 else m[:, None, None, :])
    n = len(h)
    fc1 = h.reshape(n, -1) @ p["fc_1"]["kernel"] + p["fc_1"]["bias"]
    c4 = _conv(h, p["conv_4"]["kernel"], p["conv_4"]["bias"]).reshape(n, -1)
    return tail64(fc1, c4, p["fc_2"]["kernel"], p["fc_2"]["bias"], p["output"]["kernel"], p["output"]["bias"])


def argmax64(params: Params, x_NxHxWxC: np.ndarray, divisor: float, masks_NxC: Optional[np.ndarray] = None,
             image_of: Optional[np.ndarray] = None) -> np.ndarray:
    """The canonical float64 network's prediction for each row, fast: the XLA float64 trunk once per image,
    the NumPy head per row, and the NumPy trunk again for rows within ``TIE64_RTOL`` x S of a tie.

    Args:
        params, divisor: B and its input scale's divisor.
        x_NxHxWxC: the images.
        masks_NxC: a (60,) pool_3 mask for every row, or (R, 60) one per row (None: B unpruned).
        image_of: (R,) which image each row is (None: row i is image i).

    Returns:
        (R,) int32 predictions, equal to ``logits64(...).argmax(-1)`` row by row.
    """
    x = np.asarray(x_NxHxWxC)
    image_of = np.arange(len(x)) if image_of is None else np.asarray(image_of)
    logits, scale = _head64(params, pool3_64_xla(params, x, divisor)[image_of], masks_NxC)
    preds, gap = top2_gap(logits)
    close = near_tie(gap, scale, TIE64_RTOL)
    if close.any():
        rows = np.flatnonzero(close)
        images, which = np.unique(image_of[rows], return_inverse=True)
        masks = None if masks_NxC is None else (masks_NxC if np.ndim(masks_NxC) == 1 else masks_NxC[rows])
        preds[rows] = head64(params, pool3_64(params, x[images], divisor)[which], masks).argmax(-1)
    return preds


def logits64(params: Params, x_NxHxWxC: np.ndarray, divisor: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, classes) float64 logits of B, or of B' with the masked-out conv_3 channels pruned.

    ``divisor``: the model's (``BadNet.divisor``: 1 for raw pixels, 255 for pixels / 255), divided in float64.
    """
    return head64(params, pool3_64(params, x_NxHxWxC, divisor), mask)


def settle(model: PrunableModel, params: Params, x_NxHxWxC: np.ndarray, orders_RxC: np.ndarray,
           preds_RxKxN: np.ndarray, near_RxKxN: np.ndarray) -> tuple[np.ndarray, int]:
    """The predictions with every flagged one replaced by the float64 answer of its order and step.

    Args:
        model, params: B (its input scale included).
        x_NxHxWxC: the set's images.
        orders_RxC: (R, C) the orders swept.
        preds_RxKxN, near_RxKxN: the sweep's (R, C + 1, N) predictions and near-tie flags.

    Returns:
        (settled predictions, number of predictions recomputed).
    """
    near = np.asarray(near_RxKxN)
    # (order, step, image) of each flagged prediction; argwhere itself is ~30x slower on these mostly-False arrays
    flagged = np.stack(np.unravel_index(np.flatnonzero(near), near.shape), axis=1)
    if not len(flagged):
        return preds_RxKxN, 0
    out = np.array(preds_RxKxN, copy=True)
    # The trunk once per flagged image, then one float64 head call over every flagged (order, step, image).
    images, which = np.unique(flagged[:, 2], return_inverse=True)
    rank_RxC = np.argsort(orders_RxC, axis=1)  # each channel's position in each order
    masks = (rank_RxC[flagged[:, 0]] >= flagged[:, 1:2]).astype(np.float64)  # step k prunes order[:k]
    out[flagged[:, 0], flagged[:, 1], flagged[:, 2]] = model.argmax64(params, np.asarray(x_NxHxWxC)[images],
                                                                      model.divisor, masks, which)
    return out, len(flagged)


def _adjacent_close(mean: np.ndarray, rtol: float) -> bool:
    """Whether two channels next to each other in the order of ``mean`` differ by at most ``rtol`` times the
    larger (two exact zeros, dead channels, tie exactly in any arithmetic and do not count)."""
    order = np.argsort(mean, kind="stable")
    a, b = mean[order[:-1]], mean[order[1:]]
    return bool(((b - a <= rtol * np.maximum(np.abs(a), np.abs(b))) & ~((a == 0) & (b == 0))).any())


def pool3_means64(params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
    """(60,) float64 mean pool_3 activation per channel over these images: the XLA float64 trunk
    (:func:`pool3_64_xla`), and the NumPy trunk (the canonical network) again if two adjacent means are
    within ``RANK64_RTOL`` (where the two float64 networks could order them differently)."""
    x = np.asarray(x_NxHxWxC)
    denom = max(len(x), 1) * POOL3_HWC[0] * POOL3_HWC[1]
    total = np.zeros(NUM_POOL3_CHANNELS)
    for start in range(0, len(x), MEANS64_CHUNK):
        total += pool3_64_xla(params, x[start:start + MEANS64_CHUNK], divisor).sum(axis=(0, 1, 2))
    if not _adjacent_close(total / denom, RANK64_RTOL):
        return total / denom
    total[:] = 0.0
    for start in range(0, len(x), 256):
        total += pool3_64(params, x[start:start + 256], divisor).sum(axis=(0, 1, 2))
    return total / denom


def ranking_rtol(model: PrunableModel, params: Params, x_NxHxWxC: np.ndarray, sums_NxC: np.ndarray) -> float:
    """The relative tolerance within which two float32 channel means cannot be told apart, on this machine.

    Measures the float32 error of the sweep's per-image channel sums on up to ``RANK_CHECK_IMAGES`` images
    spread over the set, against the model's float64 trunk: for each channel, the sum over those images of
    |float32 sum - float64 sum| divided by the float64 sum (absolute errors add, so cancellation between
    images cannot hide an error that the whole set's mean might not cancel). Returns the larger of
    ``RANK_RTOL`` and 10x the worst such error on each of two means.
    """
    sums = np.asarray(sums_NxC, np.float64)
    if not len(sums):
        return RANK_RTOL
    rows = np.unique(np.linspace(0, len(sums) - 1, min(len(sums), RANK_CHECK_IMAGES)).astype(int))
    sums64 = model.features64(params, np.asarray(x_NxHxWxC)[rows], model.divisor).sum(axis=(1, 2))
    total64 = np.abs(sums64).sum(axis=0)
    alive = total64 > 0
    if not alive.any():
        return RANK_RTOL
    measured = (np.abs(sums[rows] - sums64).sum(axis=0)[alive] / total64[alive]).max()
    return max(RANK_RTOL, 2 * 10 * float(measured))


def settle_ranking(model: PrunableModel, params: Params, x_NxHxWxC: np.ndarray, sums_NxC: np.ndarray,
                   margin_C: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The activation ranking with its near-ties settled: (order, mean activations, whether it settled any).

    ``sums_NxC`` are the sweep's float32 per-image channel sums of the features (H x W positions each); summed
    over the images in float64 they give each channel's mean up to the float32 error of the features and of
    the sums. Two channels next to each other in that order whose means differ by at most :func:`ranking_rtol`
    (measured on this machine, at least ``RANK_RTOL``) times the larger cannot be told apart in float32.
    Channels exactly 0 on every image tie exactly (by index), but only if float64 agrees that they are dead:
    ``margin_C`` and ``scale`` (the max over the set of the model's margins, ``features_with_margins``) say
    whether a channel's dead-or-alive verdict could flip (``model.undecided_channels``). In either case every
    mean is recomputed from the float64 forward.
    """
    sums = np.asarray(sums_NxC, np.float64)
    h, w, _ = model.feature_hwc
    mean = sums.sum(axis=0) / (max(len(sums), 1) * h * w)
    undecided = model.undecided_channels(params, np.asarray(margin_C), np.asarray(scale))
    if not undecided.any() and not _adjacent_close(mean, ranking_rtol(model, params, x_NxHxWxC, sums)):
        return np.argsort(mean, kind="stable").astype(np.int32), mean, False
    mean = model.feature_means64(params, x_NxHxWxC, model.divisor)
    return np.argsort(mean, kind="stable").astype(np.int32), mean, True
