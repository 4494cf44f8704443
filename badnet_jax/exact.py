"""Near-ties settled in float64: the direct masked forward, trunk included, in NumPy on the host.

:func:`settle` finishes the sweep's predictions, :func:`settle_ranking` its activation ranking, and
:func:`predict_settled` any single forward (fine-pruned B', GoodNet screening) the same way.

The sweep flags every prediction whose float32 top-2 gap is within the float32 error bound
(``badnet_jax.ties``); those, and only those, are recomputed here. The host computes them the same way
whatever ran the sweep (plain or shortcut strategy, chunk size, device count, CPU or GPU), so the curve
does not depend on any of them. The float64 forward prunes the way the lab does: conv_3's kernel and bias
of the pruned channels are zeroed, the whole network runs.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.model import NUM_POOL3_CHANNELS, POOL3_HWC, BadNet, Params
from badnet_jax.ties import TIE_RTOL, output_with_ties, undecided_channels


def _params64(params: Params) -> dict[str, dict[str, np.ndarray]]:
    return {layer: {k: np.asarray(v, np.float64) for k, v in p.items()} for layer, p in params.items()}


def _conv_relu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, batch: int = 64) -> np.ndarray:
    """relu of the VALID cross-correlation (Keras Conv2D): im2col, one matrix product per ``batch`` images."""
    kh, kw, cin, cout = kernel.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    flat = kernel.reshape(kh * kw * cin, cout)  # HWIO: (i, j, c) rows, the order the patches are stacked in
    out = np.empty((x.shape[0], oh, ow, cout))
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch]
        patches = np.concatenate([xb[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
        np.matmul(patches, flat, out=out[s:s + batch])
    out += bias
    return np.maximum(out, 0.0, out=out)


def _pool(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def pool3_64(params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
    """(N, 5, 4, 60) float64 pool_3 activations of B (pixels 0..255 in, divided by ``divisor``)."""
    p = _params64(params)
    h = np.asarray(x_NxHxWxC, np.float64) / divisor
    for layer in ("conv_1", "conv_2", "conv_3"):
        h = _pool(_conv_relu(h, p[layer]["kernel"], p[layer]["bias"]))
    return h


def head64(params: Params, pool3_NxHxWxC: np.ndarray, masks_NxC: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, classes) float64 logits from pool_3 activations with the masked-out channels zeroed.

    ``masks_NxC``: a (60,) mask for every image, or (N, 60) one per image. Zeroing a pool_3 channel is
    exactly zeroing its conv_3 kernel and bias (relu(0) = 0, max pool of zeros is 0) in float64 too, so
    this is the lab's pruned network.
    """
    p = _params64(params)
    h = np.asarray(pool3_NxHxWxC, np.float64)
    if masks_NxC is not None:
        m = np.asarray(masks_NxC, np.float64)
        h = h * (m[None, None, None, :] if m.ndim == 1 else m[:, None, None, :])
    n = len(h)
    fc1 = h.reshape(n, -1) @ p["fc_1"]["kernel"] + p["fc_1"]["bias"]
    fc2 = _conv_relu(h, p["conv_4"]["kernel"], p["conv_4"]["bias"]).reshape(n, -1) @ p["fc_2"]["kernel"]
    hidden = np.maximum(fc1 + fc2 + p["fc_2"]["bias"], 0.0)
    return hidden @ p["output"]["kernel"] + p["output"]["bias"]


def logits64(params: Params, x_NxHxWxC: np.ndarray, divisor: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, classes) float64 logits of B, or of B' with the masked-out conv_3 channels pruned.

    ``divisor``: 1 for a raw-pixel model, 255 for one that takes pixels / 255 (divided in float64).
    """
    return head64(params, pool3_64(params, x_NxHxWxC, divisor), mask)


def settle(params: Params, divisor: float, x_NxHxWxC: np.ndarray, orders_RxC: np.ndarray, preds_RxKxN: np.ndarray,
           near_RxKxN: np.ndarray) -> tuple[np.ndarray, int]:
    """The predictions with every flagged one replaced by the float64 answer of its order and step.

    Args:
        params, divisor: B and its input scale's divisor.
        x_NxHxWxC: the set's images.
        orders_RxC: (R, 60) the orders swept.
        preds_RxKxN, near_RxKxN: the sweep's (R, 61, N) predictions and near-tie flags.

    Returns:
        (settled predictions, number of predictions recomputed).
    """
    flagged = np.argwhere(near_RxKxN)
    if not len(flagged):
        return preds_RxKxN, 0
    out = np.array(preds_RxKxN, copy=True)
    # The trunk once per flagged image, then one float64 head call over every flagged (order, step, image).
    images, which = np.unique(flagged[:, 2], return_inverse=True)
    feats = pool3_64(params, np.asarray(x_NxHxWxC)[images], divisor)
    rank_RxC = np.argsort(orders_RxC, axis=1)  # each channel's position in each order
    masks = (rank_RxC[flagged[:, 0]] >= flagged[:, 1:2]).astype(np.float64)  # step k prunes order[:k]
    out[flagged[:, 0], flagged[:, 1], flagged[:, 2]] = head64(params, feats[which], masks).argmax(-1)
    return out, len(flagged)


def pool3_means64(params: Params, x_NxHxWxC: np.ndarray, divisor: float, batch: int = 256) -> np.ndarray:
    """(60,) float64 mean pool_3 activation per channel over these images (float64 forward, ``batch`` at a time)."""
    total = np.zeros(NUM_POOL3_CHANNELS)
    for start in range(0, len(x_NxHxWxC), batch):
        total += pool3_64(params, x_NxHxWxC[start:start + batch], divisor).sum(axis=(0, 1, 2))
    return total / (max(len(x_NxHxWxC), 1) * POOL3_HWC[0] * POOL3_HWC[1])


def settle_ranking(params: Params, divisor: float, x_NxHxWxC: np.ndarray, sums_NxC: np.ndarray,
                   pre_max_C: np.ndarray, in_max: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """The activation ranking with its near-ties settled: (order, mean activations, whether it settled any).

    ``sums_NxC`` are the sweep's float32 per-image channel sums of pool_3 (5 x 4 positions each); summed over
    the images in float64 they give each channel's mean up to the float32 error of the features and of the
    20-term sums. Two channels next to each other in that order whose means differ by at most ``TIE_RTOL``
    times the larger cannot be told apart in float32. Channels exactly 0 on every image tie exactly (by
    index), but only if float64 agrees that they are dead: ``pre_max_C`` (each channel's largest conv_3
    pre-activation over the set) and ``in_max`` (the largest conv_3 input) say whether a channel's
    dead-or-alive verdict could flip (``ties.undecided_channels``). In either case every mean is recomputed
    from the float64 forward.
    """
    sums = np.asarray(sums_NxC, np.float64)
    mean = sums.sum(axis=0) / (max(len(sums), 1) * POOL3_HWC[0] * POOL3_HWC[1])
    order = np.argsort(mean, kind="stable")
    a, b = mean[order[:-1]], mean[order[1:]]
    close = (b - a <= TIE_RTOL * np.maximum(np.abs(a), np.abs(b))) & ~((a == 0) & (b == 0))
    undecided = undecided_channels(pre_max_C, in_max, params["conv_3"]["kernel"], params["conv_3"]["bias"])
    if not close.any() and not undecided.any():
        return order.astype(np.int32), mean, False
    mean = pool3_means64(params, x_NxHxWxC, divisor)
    return np.argsort(mean, kind="stable").astype(np.int32), mean, True


@functools.lru_cache(maxsize=None)
def _top2_fn(model: BadNet):
    def run(params, mask, x):
        feats = model.apply({"params": params}, x.astype(jnp.float32), method=BadNet.trunk)
        hidden = model.apply({"params": params}, feats, mask, method=BadNet.hidden)
        return output_with_ties(hidden, params["output"]["kernel"], params["output"]["bias"])
    return jax.jit(run)


def predict_settled(model: BadNet, params: Params, x_NxHxWxC: np.ndarray, mask: Optional[np.ndarray] = None,
                    batch: int = 1024) -> tuple[np.ndarray, int]:
    """(N,) predictions of B (or of B' under a pool_3 mask) with near-ties settled in float64, and how many were.

    The float32 forward runs jitted ``batch`` images at a time; the flagged images run again in float64.
    """
    m = np.ones(NUM_POOL3_CHANNELS, np.float32) if mask is None else np.asarray(mask, np.float32)
    fn = _top2_fn(model)
    preds, near = [], []
    for i in range(0, len(x_NxHxWxC), batch):
        arg, flag = fn(params, jnp.asarray(m), jnp.asarray(x_NxHxWxC[i:i + batch]))
        preds.append(np.asarray(arg))
        near.append(np.asarray(flag))
    if not preds:
        return np.zeros((0,), np.int32), 0
    preds, near = np.concatenate(preds), np.concatenate(near)
    if near.any():
        divisor = 255.0 if model.input_scale == "255" else 1.0
        preds[near] = logits64(params, np.asarray(x_NxHxWxC)[near], divisor, m).argmax(-1)
    return preds, int(near.sum())
