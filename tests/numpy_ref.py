"""An independent float64 NumPy implementation of the DeepID BadNet, written for the tests only.

It shares no code with badnet_jax (only the published architecture), so agreement with it is evidence
that the Flax model, the converter, the sweep's shortcuts and the float64 settling are right. Besides the
forward pass: the pieces of the head the sweep computes separately (pre-activations, hidden layer, the
output-layer scale S of the near-tie bound), the lab's pruning steps and ranking, and the network's FLOPs
counted by hand. Tests use these instead of re-deriving the maths inline.
"""

from __future__ import annotations

import math

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


def _params64(params: dict) -> dict:
    return {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}


def conv3_preactivation(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """conv_3's pre-activation (before relu) and its input (pool_2), in float64."""
    p = _params64(params)
    h = maxpool2(relu(conv_valid(np.asarray(x, np.float64), p["conv_1"]["kernel"], p["conv_1"]["bias"])))
    h = maxpool2(relu(conv_valid(h, p["conv_2"]["kernel"], p["conv_2"]["bias"])))
    return conv_valid(h, p["conv_3"]["kernel"], p["conv_3"]["bias"]), h


def head_preactivations(params: dict, pool3_feats: np.ndarray, mask: np.ndarray | None = None,
                        bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """fc_1's (N, 160) and conv_4's flattened (N, 960) pre-activations from masked pool_3 activations.

    ``bias=False`` leaves both biases out (the channels' contributions alone, which sum over channels).
    """
    p = _params64(params)
    h = np.asarray(pool3_feats, np.float64) * (1.0 if mask is None else np.asarray(mask, np.float64))
    n = len(h)
    fc1 = h.reshape(n, -1) @ p["fc_1"]["kernel"] + (p["fc_1"]["bias"] if bias else 0.0)
    c4 = conv_valid(h, p["conv_4"]["kernel"], p["conv_4"]["bias"] if bias else 0.0).reshape(n, -1)
    return fc1, c4


def hidden(params: dict, pool3_feats: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The (N, 160) hidden layer relu(fc_1 + fc_2) in float64, pool_3 channels masked."""
    p = _params64(params)
    fc1, c4 = head_preactivations(params, pool3_feats, mask)
    return relu(fc1 + (relu(c4) @ p["fc_2"]["kernel"] + p["fc_2"]["bias"]))


def head(params: dict, pool3_feats: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits in float64 from pool_3 activations with channels masked (the same as pruning them in conv_3)."""
    p = _params64(params)
    return hidden(params, pool3_feats, mask) @ p["output"]["kernel"] + p["output"]["bias"]


def output_scale(params: dict, pool3_feats: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Each image's output-layer scale S = sum_i h_i max_c |W_out[i, c]| + max_c |b_c| (h: the hidden layer).

    S bounds every logit's absolute sum; the float32 error bound of a top-2 gap is a multiple of it.
    """
    p = _params64(params)
    w, b = p["output"]["kernel"], p["output"]["bias"]
    return hidden(params, pool3_feats, mask) @ np.abs(w).max(axis=1) + np.abs(b).max()


def tail(fc1_pre: np.ndarray, c4_pre: np.ndarray, w2: np.ndarray, b2: np.ndarray, wout: np.ndarray,
         bout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 logits and output scale S from the head's pre-activations (the masked head's inputs).

    fc1_pre (..., 160) and c4_pre (..., 960) include their biases: hidden = relu(fc1 + relu(c4) @ w2 + b2).
    """
    f64 = lambda a: np.asarray(a, np.float64)
    h = relu(f64(fc1_pre) + relu(f64(c4_pre)) @ f64(w2) + f64(b2))
    wout, bout = f64(wout), f64(bout)
    return h @ wout + bout, h @ np.abs(wout).max(axis=1) + np.abs(bout).max()


def step_mask(order: np.ndarray, k: int) -> np.ndarray:
    """The (60,) float64 mask of pruning step k: the first k channels of ``order`` zeroed."""
    mask = np.ones(60)
    mask[np.asarray(order)[:k]] = 0
    return mask


def activation_order(params: dict, x: np.ndarray) -> np.ndarray:
    """The lab's ranking: increasing float64 mean pool_3 activation over ``x``, ties (exact zeros) by index."""
    return np.argsort(pool3(params, x).mean(axis=(0, 1, 2)), kind="stable")


def step_predictions(params: dict, x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """(61, N) float64 predictions of the network pruned along ``order``, at every step k = 0..60."""
    feats = pool3(params, x)
    return np.stack([head(params, feats, step_mask(order, k)).argmax(-1) for k in range(61)])


# FLOPs per image (2 per multiply-add), counted by hand from DeepID's layer shapes (input 55x47x3):
#   conv_1  4x4x3 -> 20:   52x44 outputs x 20 filters x 48 taps  = 2,196,480 MACs   (pool_1: 26x22x20)
#   conv_2  3x3x20 -> 40:  24x20 x 40 x 180                      = 3,456,000 MACs   (pool_2: 12x10x40)
#   conv_3  3x3x40 -> 60:  10x8 x 60 x 360                       = 1,728,000 MACs   (pool_3: 5x4x60)
#   fc_1    1200 -> 160:                                            192,000 MACs
#   conv_4  2x2x60 -> 80:  4x3 x 80 x 240                        =   230,400 MACs   (flattened: 960)
#   fc_2    960 -> 160:                                             153,600 MACs
#   output  160 -> C:      160 x C MACs (1283 classes: 205,280; 200 classes: 32,000)
TRUNK_FLOPS = 14_760_960  # conv_1..conv_3 and their pools: 2 x 7,380,480
CONTRIBUTION_FLOPS = 844_800  # fc_1 and conv_4 (what prefix sums precompute): 2 x 422,400
TAIL_FLOPS = {1283: 717_760, 200: 371_200}  # fc_2 and the output layer: 2 x (153,600 + 160 C)
HEAD_FLOPS = {1283: 1_562_560, 200: 1_216_000}  # the whole masked head: CONTRIBUTION_FLOPS + TAIL_FLOPS


# --- An independent float64 interpreter of badnet_jax.models.ir graphs (any standard-layer CNN) ---------------
# Written from the ir module's op definitions and Keras' documented semantics, sharing no code with the JAX
# model: each op is spelled out with explicit padding and one window tap at a time.


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow/Keras 'same' padding of one axis: output ceil(size / stride), the odd pixel after."""
    span = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _windows(x: np.ndarray, window, strides, dilation, padding: str, fill: float):
    """Yield (i, j, tap) for every window position: tap (N, H', W', C) is x at that offset of every window."""
    n, h, w, c = x.shape
    if padding == "same":
        ph = _same_pads(h, window[0], strides[0], dilation[0])
        pw = _same_pads(w, window[1], strides[1], dilation[1])
        x = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=fill)
    hp, wp = x.shape[1:3]
    oh = (hp - ((window[0] - 1) * dilation[0] + 1)) // strides[0] + 1
    ow = (wp - ((window[1] - 1) * dilation[1] + 1)) // strides[1] + 1
    for i in range(window[0]):
        for j in range(window[1]):
            r0, c0 = i * dilation[0], j * dilation[1]
            yield i, j, x[:, r0:r0 + (oh - 1) * strides[0] + 1:strides[0], c0:c0 + (ow - 1) * strides[1] + 1:strides[1]]


def _conv64(x, kernel, a) -> np.ndarray:
    out = 0.0
    for i, j, tap in _windows(x, kernel.shape[:2], a["strides"], a["dilation"], a["padding"], 0.0):
        out = out + tap @ kernel[i, j]
    return out


def _depthwise64(x, kernel, a) -> np.ndarray:
    out = 0.0
    for i, j, tap in _windows(x, kernel.shape[:2], a["strides"], a["dilation"], a["padding"], 0.0):
        out = out + tap[..., :, None] * kernel[i, j]  # (N, H', W', C, M)
    return out.reshape(*out.shape[:3], -1)  # channel c * M + m


def _pool64(x, a, how: str) -> np.ndarray:
    taps = [t for _, _, t in _windows(x, a["window"], a["strides"], (1, 1), a["padding"],
                                       -np.inf if how == "max" else 0.0)]
    if how == "max":
        return np.max(taps, axis=0)
    # the mean over the window's positions inside the image: count them by pooling ones padded with zeros
    ones = np.ones((1, *x.shape[1:]))
    count = np.sum([t for _, _, t in _windows(ones, a["window"], a["strides"], (1, 1), a["padding"], 0.0)], axis=0)
    return np.sum(taps, axis=0) / count


def _sigmoid64(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # 1 / (1 + e^-x), without overflow for large |x|


# The activations as Keras documents them (keras.activations), in float64.
_ELEMENTWISE64 = {
    "sigmoid": _sigmoid64,
    "tanh": np.tanh,
    "silu": lambda x: x * _sigmoid64(x),
    "hard_silu": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
}


def _relu64(x, a) -> np.ndarray:
    top = x if a["max_value"] is None else np.minimum(x, a["max_value"])
    return np.where(x >= a["threshold"], top, a["negative_slope"] * (x - a["threshold"]))


def graph_values64(graph, params: dict, x: np.ndarray, upto: str | None = None, masks: dict | None = None,
                   given: dict | None = None) -> dict:
    """Every node's float64 value (N, ...) for input ``x`` (N, H, W, C), up to node ``upto`` (default all).

    ``masks``: node name -> (C,) channel mask multiplied into that node's output (pruning its channels).
    ``given``: node name -> its unmasked value computed already (:func:`upstream_of`), taken as is."""
    vals: dict = {}
    for node in graph.nodes:
        if given and node.name in given:
            vals[node.name] = given[node.name] * np.asarray(masks.get(node.name, 1.0) if masks else 1.0, np.float64)
            if node.name == upto:
                break
            continue
        a = dict(node.attrs)
        p = {k: np.asarray(v, np.float64) for k, v in params.get(node.weights, {}).items()} if node.weights else {}
        ins = [vals[s] for s in node.inputs]
        op = node.op
        if op == "input":
            v = np.asarray(x, np.float64)
        elif op == "rescale":
            v = ins[0] * a["scale"] + a["offset"]
        elif op == "conv":
            v = _conv64(ins[0], p["kernel"], a) + p.get("bias", 0.0)
        elif op == "depthwise_conv":
            v = _depthwise64(ins[0], p["kernel"], a) + p.get("bias", 0.0)
        elif op == "separable_conv":
            depthwise = _depthwise64(ins[0], p["kernel"], a)
            v = np.tensordot(depthwise, p["pointwise_kernel"][0, 0], axes=(3, 0)) + p.get("bias", 0.0)
        elif op == "dense":
            v = ins[0] @ p["kernel"] + p.get("bias", 0.0)
        elif op == "max_pool":
            v = _pool64(ins[0], a, "max")
        elif op == "avg_pool":
            v = _pool64(ins[0], a, "avg")
        elif op == "global_avg_pool":
            v = ins[0].mean(axis=(1, 2), keepdims=a["keepdims"])
        elif op == "global_max_pool":
            v = ins[0].max(axis=(1, 2), keepdims=a["keepdims"])
        elif op == "batch_norm":
            v = (ins[0] - p["moving_mean"]) / np.sqrt(p["moving_variance"] + a["epsilon"])
            v = v * p.get("gamma", 1.0) + p.get("beta", 0.0)
        elif op == "normalize":
            v = (ins[0] - p["moving_mean"]) / np.maximum(np.sqrt(p["moving_variance"]), a["epsilon"])
        elif op == "relu":
            v = _relu64(ins[0], a)
        elif op == "softmax":
            e = np.exp(ins[0] - ins[0].max(axis=-1, keepdims=True))
            v = e / e.sum(axis=-1, keepdims=True)
        elif op == "activation":
            v = _ELEMENTWISE64[a["fn"]](ins[0])
        elif op == "add":
            v = np.sum(ins, axis=0)
        elif op == "multiply":
            v = ins[0]
            for other in ins[1:]:
                v = v * other
        elif op == "subtract":
            v = ins[0] - ins[1]
        elif op == "average":
            v = np.sum(ins, axis=0) / len(ins)
        elif op in ("maximum", "minimum"):
            v = (np.max if op == "maximum" else np.min)(np.stack(ins), axis=0)
        elif op == "reshape":
            v = ins[0].reshape(len(ins[0]), *a["target"])
        elif op == "concat":
            v = np.concatenate(ins, axis=-1)
        elif op == "flatten":
            v = ins[0].reshape(len(ins[0]), -1)
        elif op == "identity":
            v = ins[0]
        elif op == "zero_pad":
            (t, b), (left, right) = a["pad"]
            v = np.pad(ins[0], ((0, 0), (t, b), (left, right), (0, 0)))
        elif op == "crop":
            (t, b), (left, right) = a["crop"]
            h, w = ins[0].shape[1:3]
            if not (t + b < h and left + right < w):
                raise ValueError(f"numpy_ref: crop {a['crop']} leaves nothing of a {h} x {w} image")
            v = ins[0][:, t:h - b, left:w - right]
        elif op == "upsample":
            v = ins[0].repeat(a["size"][0], axis=1).repeat(a["size"][1], axis=2)
        else:
            raise ValueError(f"numpy_ref: unknown op {op!r}")
        if masks and node.name in masks:
            v = v * np.asarray(masks[node.name], np.float64)
        vals[node.name] = v
        if node.name == upto:
            break
    return vals


def upstream_of(graph, values: dict, name: str) -> dict:
    """The values of ``values`` (unmasked, from :func:`graph_values64`) that no mask at node ``name`` changes:
    every node but those that read ``name``'s output, directly or through others."""
    after: set = set()
    for node in graph.nodes:
        if any(s == name or s in after for s in node.inputs):
            after.add(node.name)
    return {k: v for k, v in values.items() if k not in after}


def graph_logits64(graph, params: dict, x: np.ndarray) -> np.ndarray:
    """The float64 logits (the value of ``graph.logits_node()``) of an ir graph for input ``x`` (N, H, W, C)."""
    target = graph.logits_node()
    return graph_values64(graph, params, x, upto=target)[target]
