"""The JAX meaning of each :data:`~badnet_jax.models.ir.OPS` operation, in the input's float dtype.

One function per op, ``(node, params, inputs) -> output``; ``linear=True`` drops every additive constant
(biases, batch norm's shift, rescaling's offset), which leaves the linear part of an affine op: what a single
channel contributes (``badnet_jax.models.graph_contribution``). Convolutions and matrix products run at
``HIGHEST`` precision, so accelerators give float32 results.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from badnet_jax.kernels.conv2d import conv2d
from badnet_jax.models.ir import ZERO_AT_ZERO, Node
from badnet_jax.numerics.ties import HIGHEST

OpFn = Callable[[Node, Mapping[str, Any], list, bool], jax.Array]


def _bias(x: jax.Array, p: Mapping[str, Any], linear: bool) -> jax.Array:
    if linear or "bias" not in p:
        return x
    b = jnp.asarray(p["bias"], x.dtype)
    return x + b.reshape((1,) * (x.ndim - 1) + b.shape)


def _conv(node: Node, p, xs, linear):
    x, k = xs[0], jnp.asarray(p["kernel"], xs[0].dtype)
    # XLA's convolution, or the width-blocked form where measured faster (few input channels on a CPU).
    bias = None if linear or "bias" not in p else jnp.asarray(p["bias"], x.dtype)
    return conv2d(x, k, node.attr("strides"), node.attr("padding").upper(), node.attr("dilation"), HIGHEST, bias=bias)


def conv_stage(conv: Node, relu: Node, pool: Node) -> bool:
    """Whether ``conv`` -> ``relu`` -> ``pool`` is a stage :func:`apply_conv_stage` computes in one call: a plain
    ReLU (no slope, threshold or cap) and a max pool whose windows tile its input (stride = window, VALID)."""
    return (conv.op == "conv" and relu.op == "relu" and relu.attr("negative_slope") == 0.0
            and relu.attr("threshold") == 0.0 and relu.attr("max_value") is None and pool.op == "max_pool"
            and tuple(pool.attr("window")) == tuple(pool.attr("strides")) and pool.attr("padding").lower() == "valid")


def apply_conv_stage(conv: Node, pool: Node, params: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """The value of ``pool`` in a :func:`conv_stage` chain, from ``conv``'s input: one ``conv2d`` call with its
    epilogue (fused by a CPU's direct kernel; the same values as the three ops)."""
    p = params[conv.weights]
    k = jnp.asarray(p["kernel"], x.dtype)
    bias = jnp.asarray(p["bias"], x.dtype) if "bias" in p else None
    return conv2d(x, k, conv.attr("strides"), conv.attr("padding").upper(), conv.attr("dilation"), HIGHEST,
                  bias=bias, relu=True, pool=tuple(pool.attr("window")))


def _depthwise(node: Node, p, xs, linear):
    x = xs[0]
    kh, kw, cin, mult = p["kernel"].shape
    # Output channel c * mult + m reads input channel c: each tap of the window is a per-channel product. As a
    # sum of kh * kw shifted products, not XLA's grouped convolution, which on a CPU is 5-16x slower in float32
    # and up to 3000x in float64 (64 images of 2x2x1152, 3x3: 15.9 s against 5 ms), where the settling runs.
    k = jnp.asarray(p["kernel"], x.dtype).reshape(kh, kw, 1, 1, 1, cin * mult)  # k[i, j]: (1, 1, 1, C)
    if mult > 1:
        x = jnp.repeat(x, mult, axis=-1)
    (sh, sw), (dh, dw) = node.attr("strides"), node.attr("dilation")
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (span_h, span_w), (sh, sw), node.attr("padding").upper())
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    oh, ow = (x.shape[1] - span_h) // sh + 1, (x.shape[2] - span_w) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(x, (0, i * dh, j * dw, 0), (x.shape[0], i * dh + (oh - 1) * sh + 1,
                                                            j * dw + (ow - 1) * sw + 1, x.shape[3]), (1, sh, sw, 1))
            out = tap * k[i, j] if out is None else out + tap * k[i, j]
    return _bias(out, p, linear)


def _separable(node: Node, p, xs, linear):
    # Keras' order: the depthwise convolution (strides, padding, dilation), then the pointwise one, then the bias.
    depthwise = _depthwise(node, {"kernel": p["kernel"]}, xs, linear=True)
    pointwise = jnp.asarray(p["pointwise_kernel"], depthwise.dtype)
    bias = None if linear or "bias" not in p else jnp.asarray(p["bias"], depthwise.dtype)
    return conv2d(depthwise, pointwise, (1, 1), "VALID", (1, 1), HIGHEST, bias=bias)


def _dense(node: Node, p, xs, linear):
    return _bias(jnp.dot(xs[0], jnp.asarray(p["kernel"], xs[0].dtype), precision=HIGHEST), p, linear)


def _window(node: Node) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    (wh, ww), (sh, sw) = node.attr("window"), node.attr("strides")
    return (1, wh, ww, 1), (1, sh, sw, 1), node.attr("padding").upper()


def _max_pool(node: Node, p, xs, linear):
    dims, strides, padding = _window(node)
    return jax.lax.reduce_window(xs[0], -jnp.inf, jax.lax.max, dims, strides, padding)


def _avg_pool(node: Node, p, xs, linear):
    x = xs[0]
    dims, strides, padding = _window(node)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, padding)
    if padding == "VALID":
        return total / (dims[1] * dims[2])
    # Keras averages over the window's positions inside the image: count them.
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, dims, strides, padding)
    return total / count


def _batch_norm(node: Node, p, xs, linear):
    x = xs[0]
    f = lambda k: jnp.asarray(p[k], x.dtype)
    inv = jax.lax.rsqrt(f("moving_variance") + jnp.asarray(node.attr("epsilon"), x.dtype))
    if "gamma" in p:
        inv = inv * f("gamma")
    lead = (1,) * (x.ndim - 1)
    if linear:
        return x * inv.reshape(lead + inv.shape)
    shift = -f("moving_mean") * inv + (f("beta") if "beta" in p else 0.0)
    return x * inv.reshape(lead + inv.shape) + shift.reshape(lead + shift.shape)


def _normalize(node: Node, p, xs, linear):
    x = xs[0]
    lead = (1,) * (x.ndim - 1)
    f = lambda k: jnp.asarray(p[k], x.dtype).reshape(lead + p[k].shape)  # noqa: E731
    divisor = jnp.maximum(jnp.sqrt(f("moving_variance")), jnp.asarray(node.attr("epsilon"), x.dtype))
    return x / divisor if linear else (x - f("moving_mean")) / divisor


def _relu(node: Node, p, xs, linear):
    x = xs[0]
    slope, cap, threshold = node.attr("negative_slope"), node.attr("max_value"), node.attr("threshold")
    top = x if cap is None else jnp.minimum(x, jnp.asarray(cap, x.dtype))
    if slope == 0.0 and threshold == 0.0:
        return jnp.maximum(top, jnp.zeros((), x.dtype)) if cap is None else jnp.where(x >= 0, top, 0.0)
    return jnp.where(x >= threshold, top, slope * (x - threshold))


# Keras 3's definitions (keras.activations), which its JAX backend computes with these same jax.nn functions.
ELEMENTWISE_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "hard_silu": jax.nn.hard_silu,
    "elu": jax.nn.elu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _rescale(node: Node, p, xs, linear):
    out = xs[0] * jnp.asarray(node.attr("scale"), xs[0].dtype)
    return out if linear else out + jnp.asarray(node.attr("offset"), xs[0].dtype)


def _fold(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> OpFn:
    """A merge that combines its inputs pairwise in their order: fn(fn(x0, x1), x2) ... (as Keras' merges do)."""
    return lambda node, p, xs, linear: functools.reduce(fn, xs)


def _crop(node: Node, p, xs, linear):
    (t, b), (left, r) = node.attr("crop")
    n, h, w, c = xs[0].shape
    # lax.slice, not x[t:h - b]: a crop past the far edge must fail, not wrap around as a negative index does.
    return jax.lax.slice(xs[0], (0, t, left, 0), (n, h - b, w - r, c))


def _upsample(node: Node, p, xs, linear):
    sh, sw = node.attr("size")
    return jnp.repeat(jnp.repeat(xs[0], sh, axis=1), sw, axis=2)


def _zero_pad(node: Node, p, xs, linear):
    (t, b), (left, r) = node.attr("pad")
    return jnp.pad(xs[0], ((0, 0), (t, b), (left, r), (0, 0)))


OP_FNS: dict[str, OpFn] = {
    "input": lambda node, p, xs, linear: xs[0],
    "identity": lambda node, p, xs, linear: xs[0],
    "rescale": _rescale,
    "conv": _conv,
    "depthwise_conv": _depthwise,
    "separable_conv": _separable,
    "dense": _dense,
    "max_pool": _max_pool,
    "avg_pool": _avg_pool,
    "global_avg_pool": lambda node, p, xs, linear: jnp.mean(xs[0], axis=(1, 2), keepdims=node.attr("keepdims")),
    "global_max_pool": lambda node, p, xs, linear: jnp.max(xs[0], axis=(1, 2), keepdims=node.attr("keepdims")),
    "batch_norm": _batch_norm,
    "normalize": _normalize,
    "relu": _relu,
    "softmax": lambda node, p, xs, linear: jax.nn.softmax(xs[0], axis=-1),
    "activation": lambda node, p, xs, linear: ELEMENTWISE_FNS[node.attr("fn")](xs[0]),
    "add": _fold(jnp.add),
    "subtract": lambda node, p, xs, linear: xs[0] - xs[1],
    "average": lambda node, p, xs, linear: functools.reduce(jnp.add, xs) / len(xs),
    "maximum": _fold(jnp.maximum),
    "minimum": _fold(jnp.minimum),
    "multiply": _fold(jnp.multiply),
    "reshape": lambda node, p, xs, linear: xs[0].reshape(xs[0].shape[0], *node.attr("target")),
    "concat": lambda node, p, xs, linear: jnp.concatenate(xs, axis=-1),
    "flatten": lambda node, p, xs, linear: xs[0].reshape(xs[0].shape[0], -1),
    "zero_pad": _zero_pad,
    "crop": _crop,
    "upsample": _upsample,
}


def apply_op(node: Node, params: Mapping[str, Any], inputs: list, linear: bool = False) -> jax.Array:
    """``node``'s output from its inputs' values (``linear``: without additive constants)."""
    p = params.get(node.weights, {}) if node.weights else {}
    return OP_FNS[node.op](node, p, inputs, linear)


# Ops that commute with a 0/1 channel mask when applied channel by channel to a masked tensor: f(m x) = m f(x)
# for m in {0, 1} (f(0) = 0 and per channel). A relu commutes unless it maps 0 elsewhere (a threshold above 0
# with a slope).
def commutes_with_mask(node: Node) -> bool:
    """Whether ``node`` applied to a channel-masked tensor gives the mask of its unmasked output."""
    if node.op in ("identity", "max_pool", "zero_pad", "global_max_pool", "crop", "upsample"):
        return True
    if node.op == "activation":
        return node.attr("fn") in ZERO_AT_ZERO
    if node.op == "relu":
        cap = node.attr("max_value")
        zero_at_zero = node.attr("threshold") <= 0 or node.attr("negative_slope") == 0.0
        return zero_at_zero and (cap is None or cap >= 0)
    return False


# Ops affine in their inputs (all of them): a constant plus a linear map.
AFFINE_OPS = frozenset({"conv", "depthwise_conv", "separable_conv", "dense", "batch_norm", "normalize", "avg_pool",
                        "global_avg_pool", "flatten", "add", "subtract", "average", "concat", "identity", "zero_pad",
                        "crop", "upsample", "rescale", "reshape"})
