"""An independent NumPy convolution (NHWC x HWIO), the kernels' tests' reference."""

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
