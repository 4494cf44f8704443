"""An independent float64 NumPy implementation of the DeepID BadNet, written for the tests only.

It shares no code with badnet_jax (only the published architecture), so agreement with it is evidence
that the Flax model and the converter are right.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NHWC valid cross-correlation (what Keras Conv2D computes) with an HWIO kernel."""
    kh, kw = kernel.shape[:2]
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
    return np.einsum("nhwcij,ijco->nhwo", win, kernel, optimize=True) + bias


def maxpool2(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def forward(params: dict, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits in float64. ``mask`` zeroes conv_3 channels the way the lab prunes (kernel and bias)."""
    p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
    x = np.asarray(x, np.float64)
    k3, b3 = p["conv_3"]["kernel"], p["conv_3"]["bias"]
    if mask is not None:
        k3, b3 = k3 * np.asarray(mask, np.float64), b3 * np.asarray(mask, np.float64)
    h = maxpool2(relu(conv_valid(x, p["conv_1"]["kernel"], p["conv_1"]["bias"])))
    h = maxpool2(relu(conv_valid(h, p["conv_2"]["kernel"], p["conv_2"]["bias"])))
    pool3 = maxpool2(relu(conv_valid(h, k3, b3)))
    n = len(x)
    fc1 = pool3.reshape(n, -1) @ p["fc_1"]["kernel"] + p["fc_1"]["bias"]
    c4 = relu(conv_valid(pool3, p["conv_4"]["kernel"], p["conv_4"]["bias"]))
    fc2 = c4.reshape(n, -1) @ p["fc_2"]["kernel"] + p["fc_2"]["bias"]
    return relu(fc1 + fc2) @ p["output"]["kernel"] + p["output"]["bias"]


def pool3(params: dict, x: np.ndarray) -> np.ndarray:
    """pool_3 activations in float64 (for ranking checks)."""
    p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
    h = maxpool2(relu(conv_valid(np.asarray(x, np.float64), p["conv_1"]["kernel"], p["conv_1"]["bias"])))
    h = maxpool2(relu(conv_valid(h, p["conv_2"]["kernel"], p["conv_2"]["bias"])))
    return maxpool2(relu(conv_valid(h, p["conv_3"]["kernel"], p["conv_3"]["bias"])))


def head(params: dict, pool3_feats: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits in float64 from pool_3 activations with channels masked (the same as pruning them in conv_3)."""
    p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
    h = pool3_feats * np.asarray(mask, np.float64)
    n = len(h)
    fc1 = h.reshape(n, -1) @ p["fc_1"]["kernel"] + p["fc_1"]["bias"]
    c4 = relu(conv_valid(h, p["conv_4"]["kernel"], p["conv_4"]["bias"]))
    fc2 = c4.reshape(n, -1) @ p["fc_2"]["kernel"] + p["fc_2"]["bias"]
    return relu(fc1 + fc2) @ p["output"]["kernel"] + p["output"]["bias"]
