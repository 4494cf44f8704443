"""A CNN as data: the layer graph that badnet-jax reads from a Keras file and runs as a JAX function.

A :class:`Graph` is a tuple of :class:`Node` in topological order, the first one the input. Each node is one
primitive operation (:data:`OPS`) on the outputs of the nodes it names; a Keras layer with a fused activation
becomes two nodes, the operation named ``"<layer>/pre"`` and the activation named ``"<layer>"``, so that every
Keras layer's output is the node of its own name. Weighted nodes name their entry of the params pytree
(``Node.weights``, the Keras layer name); nothing in a graph is executable code, only names and numbers.

The graph is hashable (frozen dataclasses, attributes as sorted tuples), so a model holding it can be a static
argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from badnet_jax.errors import ModelFileError

# A graph's weights as a file holds them: node name -> weight name (``kernel``, ``bias``, ...) -> array.
GraphParams = dict[str, dict[str, np.ndarray]]

# op -> (its attributes and their defaults, the params it reads: required, optional)
OPS: dict[str, tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]] = {
    "input": ({}, (), ()),
    # x * scale + offset (Keras Rescaling)
    "rescale": ({"scale": 1.0, "offset": 0.0}, (), ()),
    # cross-correlation, NHWC, kernel HWIO; padding "valid" or "same" (Keras' split of odd padding: more after)
    "conv": ({"strides": (1, 1), "padding": "valid", "dilation": (1, 1)}, ("kernel",), ("bias",)),
    # depthwise: kernel (kh, kw, cin, multiplier); output channel c * multiplier + m (Keras' order)
    "depthwise_conv": ({"strides": (1, 1), "padding": "valid", "dilation": (1, 1)}, ("kernel",), ("bias",)),
    # Keras SeparableConv2D: the depthwise convolution of ``kernel`` (kh, kw, cin, multiplier), then the 1x1
    # convolution of ``pointwise_kernel`` (1, 1, cin * multiplier, cout) and the bias
    "separable_conv": ({"strides": (1, 1), "padding": "valid", "dilation": (1, 1)}, ("kernel", "pointwise_kernel"),
                       ("bias",)),
    # on the last axis: kernel (din, dout)
    "dense": ({}, ("kernel",), ("bias",)),
    "max_pool": ({"window": (2, 2), "strides": (2, 2), "padding": "valid"}, (), ()),
    # Keras' average pooling: with "same" padding, the mean over the window's positions inside the image
    "avg_pool": ({"window": (2, 2), "strides": (2, 2), "padding": "valid"}, (), ()),
    "global_avg_pool": ({"keepdims": False}, (), ()),  # (N, H, W, C) -> (N, C), or (N, 1, 1, C) with keepdims
    "global_max_pool": ({"keepdims": False}, (), ()),
    # inference: (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta, on the last axis
    "batch_norm": ({"epsilon": 1e-3}, ("moving_mean", "moving_variance"), ("gamma", "beta")),
    # Keras Normalization: (x - moving_mean) / max(sqrt(moving_variance), epsilon), on the last axis; the mean and
    # variance its adapt() measured, named as a batch norm's statistics (which fine-tuning keeps frozen)
    "normalize": ({"epsilon": 1e-7}, ("moving_mean", "moving_variance"), ()),
    # Keras ReLU: x >= threshold ? min(x, max_value) : negative_slope * (x - threshold); LeakyReLU is a
    # negative_slope; max_value None is no cap. A model is built only with threshold 0 (GraphCNN.build: a
    # threshold above 0 is a step), where Keras' x > threshold gives the same values.
    "relu": ({"negative_slope": 0.0, "max_value": None, "threshold": 0.0}, (), ()),
    "softmax": ({}, (), ()),  # on the last axis
    # an elementwise activation by its Keras 3 name (one of ELEMENTWISE): fn(x)
    "activation": ({"fn": "sigmoid"}, (), ()),
    "add": ({}, (), ()),  # elementwise sum of every input (same shapes)
    "subtract": ({}, (), ()),  # the first input minus the second (same shapes; Keras Subtract)
    # the inputs' sum, in order, divided by their count (same shapes; Keras Average)
    "average": ({}, (), ()),
    "maximum": ({}, (), ()),  # elementwise maximum of every input, in order (same shapes)
    "minimum": ({}, (), ()),  # elementwise minimum of every input, in order (same shapes)
    # elementwise product of every input (same rank; an axis of size 1 is broadcast, as Keras' Multiply does)
    "multiply": ({}, (), ()),
    # each image's tensor read in row-major order into the ``target`` shape (Keras Reshape's target_shape)
    "reshape": ({"target": (1,)}, (), ()),
    "concat": ({}, (), ()),  # along the last (channel) axis
    "flatten": ({}, (), ()),  # (N, ...) -> (N, prod) in row-major (Keras channels-last) order
    # a linear activation, an InputLayer alias, or a Dropout (inference: the identity), whose rate is kept so a
    # written Keras file trains like the one read (None: not a Dropout)
    "identity": ({"dropout": None}, (), ()),
    "zero_pad": ({"pad": ((0, 0), (0, 0))}, (), ()),  # ((top, bottom), (left, right))
    "crop": ({"crop": ((0, 0), (0, 0))}, (), ()),  # rows and columns removed: ((top, bottom), (left, right))
    # Keras UpSampling2D, nearest: each pixel repeated (rows, columns) times
    "upsample": ({"size": (2, 2)}, (), ()),
}


ELEMENTWISE = ("sigmoid", "tanh", "silu", "hard_silu", "elu", "gelu")
"""The ``activation`` op's functions, as Keras 3 defines them: ``silu`` x * sigmoid(x) (Keras' ``swish``),
``hard_silu`` x * relu6(x + 3) / 6 (``hard_swish``), ``elu`` with alpha 1, ``gelu`` the exact (erf) form."""

ZERO_AT_ZERO = ("tanh", "silu", "hard_silu", "elu", "gelu")
"""The :data:`ELEMENTWISE` functions that map 0 to 0: applied to a channel-masked tensor, they keep a pruned
channel zero."""


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Node:
    """One primitive operation of a :class:`Graph`.

    Attributes:
        name: unique within the graph; a Keras layer's output carries the layer's name.
        op: one of :data:`OPS`.
        inputs: the names of the nodes it reads, in order (none for ``input``).
        attrs: the op's attributes as sorted ``(name, value)`` pairs (lists frozen into tuples).
        weights: the params entry of a weighted op (the Keras layer name), None for the others.
    """

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    weights: Optional[str] = None

    @staticmethod
    def make(name: str, op: str, inputs: tuple[str, ...] = (), weights: Optional[str] = None,
             **attrs: Any) -> "Node":
        """A node with ``attrs`` completed by the op's defaults and frozen.

        Raises:
            ModelFileError: an unknown op or attribute.
        """
        if op not in OPS:
            raise ModelFileError(f"layer {name!r}: unknown operation {op!r}")
        defaults = OPS[op][0]
        unknown = sorted(set(attrs) - set(defaults))
        if unknown:
            raise ModelFileError(f"layer {name!r}: operation {op!r} has no attribute(s) {unknown}")
        merged = {**defaults, **attrs}
        return Node(name, op, tuple(inputs), tuple(sorted((k, _freeze(v)) for k, v in merged.items())), weights)

    def attr(self, key: str) -> Any:
        """The value of attribute ``key``."""
        return dict(self.attrs)[key]


@dataclasses.dataclass(frozen=True)
class Graph:
    """A CNN's layer graph (see the module docstring).

    Attributes:
        nodes: every node in topological order; ``nodes[0]`` is the single ``input``.
        input_hwc: the input's (height, width, channels).
        output: the node whose value is the network's output (a final softmax is dropped by
            :meth:`logits_node`: badnet-jax works on logits).
        name: the model's name (from the file), for logs and reports.
    """

    nodes: tuple[Node, ...]
    input_hwc: tuple[int, int, int]
    output: str
    name: str = "model"

    def __post_init__(self) -> None:
        seen: dict[str, Node] = {}
        for i, node in enumerate(self.nodes):
            if node.name in seen:
                raise ModelFileError(f"model {self.name!r}: two layers named {node.name!r}")
            if (node.op == "input") != (i == 0):
                raise ModelFileError(f"model {self.name!r}: the graph must have exactly one input, first "
                                     f"(node {i} {node.name!r} is {node.op!r})")
            for src in node.inputs:
                if src not in seen:
                    raise ModelFileError(f"model {self.name!r}: layer {node.name!r} reads {src!r}, which is not an "
                                         "earlier layer")
            seen[node.name] = node
        if self.output not in seen:
            raise ModelFileError(f"model {self.name!r}: output {self.output!r} is not a layer")

    @property
    def by_name(self) -> Mapping[str, Node]:
        """Nodes by name."""
        return {node.name: node for node in self.nodes}

    def logits_node(self) -> str:
        """The node whose value is the logits: the output, or the input of a final softmax."""
        node = self.by_name[self.output]
        return node.inputs[0] if node.op == "softmax" else node.name

    def consumers(self) -> dict[str, list[str]]:
        """Node name -> the names of the nodes that read it, in graph order."""
        out: dict[str, list[str]] = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for src in node.inputs:
                out[src].append(node.name)
        return out
