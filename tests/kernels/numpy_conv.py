"""An independent NumPy convolution (NHWC x HWIO) and its epilogue, and the convolution cases the kernels' tests
share."""

from __future__ import annotations

import numpy as np


def numpy_conv(x, k, strides=(1, 1), padding="VALID", dilation=(1, 1)):
    """Direct NHWC x HWIO convolution in int64 (or float64): one kernel offset at a time."""
    (kh, kw, _, f), (sh, sw), (dh, dw) = k.shape, strides, dilation
    n, h, w, _ = x.shape
    if padding == "SAME":
        pads = []
        for size, kk, s, d in ((h, kh, sh, dh), (w, kw, sw, dw)):
            out = -(-size // s)
            total = max((out - 1) * s + (kk - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
    elif padding == "VALID":
        pads = [(0, 0), (0, 0)]
    else:
        pads = list(padding)
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((n, ho, wo, f), np.result_type(x, k))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw, :]
            out += patch @ k[i, j]
    return out


def numpy_epilogue(y, relu, pool):
    """The max over ``pool`` windows (stride = window, VALID; None: none), then ``max(y, 0)`` if ``relu``."""
    if pool is not None:
        ph, pw = pool
        n, h, w, f = y.shape
        y = y[:, :h // ph * ph, :w // pw * pw].reshape(n, h // ph, ph, w // pw, pw, f).max(axis=(2, 4))
    return np.maximum(y, 0) if relu else y


CASES = [  # (h, w, c, f, kh, kw, strides, padding, dilation)
    (55, 47, 3, 20, 4, 4, (1, 1), "VALID", (1, 1)),  # the lab DeepID's conv_1
    (12, 10, 3, 5, 3, 3, (1, 1), "SAME", (1, 1)),
    (11, 13, 2, 4, 3, 5, (2, 2), "SAME", (1, 1)),
    (9, 17, 1, 3, 3, 3, (1, 3), "VALID", (1, 1)),
    (10, 16, 3, 4, 3, 3, (1, 1), "VALID", (2, 2)),
    (8, 9, 4, 6, 2, 3, (2, 1), ((1, 2), (0, 3)), (1, 2)),
    (7, 5, 3, 2, 1, 1, (1, 1), "VALID", (1, 1)),  # 1x1
    (6, 7, 5, 3, 3, 3, (1, 2), "SAME", (2, 1)),
]


def case_id(case) -> str:
    return "x".join(map(str, case[:6])) + f"-s{case[6]}-{case[7]}-d{case[8]}"
