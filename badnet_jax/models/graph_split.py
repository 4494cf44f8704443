"""Where a CNN's graph is cut for pruning: the layer's choice and checks, and the split into four parts.

Choosing the pruned layer splits the :class:`~badnet_jax.models.ir.Graph` (:func:`split_graph`):

* the **trunk**: every node up to the layer (the layer must be a cut of the graph: every path from the input
  to the logits passes through it, or a pruned channel would leak around it; :func:`check_layer`);
* the **region**: the nodes after it that are affine in the masked features: ops that commute with a 0/1
  channel mask (relu, max pooling, padding, cropping, up-sampling) applied to the masked features themselves,
  then affine ops (convolutions, dense layers, batch norm, average pooling, flatten, add, subtract, average,
  concatenate) of those;
* the **frontier**: the region's nodes read by anything else: the *pre-activations*, a constant plus one
  contribution per kept channel;
* the **tail**: the rest, from the frontier to the output layer's input (the hidden layer). The output layer
  must be a Dense layer on a vector, or a 1 x 1 convolution on a 1 x 1 map whose output is flattened
  (:func:`output_layer`, :func:`check_output_layer`); after it, a softmax is dropped: the defense works on
  logits.

The default layer is the paper's choice (:func:`default_layer`). Everything here works on names and shapes
(:func:`infer_shapes`); ``badnet_jax.models.graph`` runs the parts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from badnet_jax.errors import ConfigError, ModelFileError, arg
from badnet_jax.models.ir import Graph, Node
from badnet_jax.models.ops import AFFINE_OPS, apply_op, commutes_with_mask

ParamShapes = tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], ...]


@dataclasses.dataclass(frozen=True)
class Split:
    """A graph cut at the pruned layer (see the module docstring); names only, hashable."""

    trunk: tuple[str, ...]  # nodes the layer's value needs, in graph order (the layer last)
    masked: frozenset  # region nodes whose value is a masked tensor (mask-commuting ops of the layer)
    region: tuple[str, ...]  # region nodes after the layer, in graph order
    frontier: tuple[str, ...]  # region nodes (or the layer) read by the tail or the output layer
    tail: tuple[str, ...]  # nodes after the frontier up to the hidden layer, in graph order
    hidden: str  # the output layer's input
    output: str  # the output layer (a Dense, or a 1 x 1 convolution whose output is flattened: output_layer)


def _dominators(graph: Graph, target: str) -> list[str]:
    """The nodes every path from the input to ``target`` passes through, in graph order (the input included).

    Immediate dominators over the graph order (a topological one): a node's is the nearest common dominator of
    its inputs' (Cooper, Harvey and Kennedy's intersection on the dominator tree). Memory linear in the nodes:
    a graph read from a file is untrusted, and a set of dominators per node grew quadratically.
    """
    root = ""  # above every node without inputs, so that several inputs still meet
    idom, depth = {root: root}, {root: 0}

    def common(a: str, b: str) -> str:
        while a != b:
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    for node in graph.nodes:
        parent = functools.reduce(common, node.inputs) if node.inputs else root
        idom[node.name], depth[node.name] = parent, depth[parent] + 1
    chain, name = set(), target
    while name != root:
        chain.add(name)
        name = idom[name]
    return [n.name for n in graph.nodes if n.name in chain]


def _ancestors(graph: Graph, target: str) -> set[str]:
    """``target`` and every node it reads, directly or not."""
    by_name, seen, todo = graph.by_name, set(), [target]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(by_name[name].inputs)
    return seen


def output_layer(graph: Graph) -> tuple[str, str]:
    """The output layer's node and its input (the hidden layer): the node whose value is the logits, or, where a
    Flatten or Reshape of a convolution's output is (keras.applications' MobileNets: a 1 x 1 convolution on the
    pooled 1 x 1 map), that convolution. ``GraphCNN.build`` checks that it is a linear Dense on a vector or a
    1 x 1 convolution on a 1 x 1 map."""
    by_name = graph.by_name
    logits = by_name[graph.logits_node()]
    if logits.op in ("flatten", "reshape") and by_name[logits.inputs[0]].op == "conv":
        logits = by_name[logits.inputs[0]]
    return logits.name, logits.inputs[0]


def split_graph(graph: Graph, layer: str) -> Split:
    """``graph`` cut at ``layer`` (a node every path to the logits passes through: :func:`check_layer`)."""
    by_name = graph.by_name
    logits, hidden = output_layer(graph)
    trunk = _ancestors(graph, layer)
    names = [n.name for n in graph.nodes]
    needed = _ancestors(graph, hidden)
    after = [n for n in names[names.index(layer) + 1:] if n in needed]
    kind = {layer: "masked"}
    for name in after:
        node = by_name[name]
        kinds = {kind.get(src) for src in node.inputs}
        if kinds == {"masked"} and commutes_with_mask(node):
            kind[name] = "masked"
        elif kinds <= {"masked", "affine"} and node.op in AFFINE_OPS:
            kind[name] = "affine"
        else:
            kind[name] = "tail"
    consumers = graph.consumers()
    in_region = [n for n in [layer, *after] if kind[n] != "tail"]
    frontier = tuple(n for n in in_region
                     if n == hidden or any(kind.get(c) == "tail" for c in consumers[n]))
    return Split(trunk=tuple(n for n in names if n in trunk), masked=frozenset(n for n in kind if kind[n] == "masked"),
                 region=tuple(n for n in in_region if n != layer), frontier=frontier,
                 tail=tuple(n for n in after if kind[n] == "tail"), hidden=hidden, output=logits)


def infer_shapes(graph: Graph, param_shapes: ParamShapes) -> dict[str, tuple[int, ...]]:
    """Every node's output shape (batch axis left out), from abstract evaluation of the graph.

    Raises:
        ModelFileError: params missing for a weighted node or shapes that do not compose.
    """
    shapes = {layer: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in entries} for layer, entries in param_shapes}
    out: dict[str, tuple[int, ...]] = {}

    def run(params, x):
        env = {graph.nodes[0].name: x}
        for node in graph.nodes[1:]:
            if node.weights and node.weights not in params:
                raise ModelFileError(f"model {graph.name!r}: no weights for layer {node.weights!r}")
            ins = [env[s] for s in node.inputs]
            try:
                env[node.name] = apply_op(node, params, ins)
            except (TypeError, ValueError, IndexError) as err:  # IndexError: a kernel's input of another rank
                got = ", ".join(str(tuple(v.shape[1:])) for v in ins)
                raise ModelFileError(f"model {graph.name!r}: its layers do not fit together: layer {node.name!r} "
                                     f"({node.op}) on input(s) of shape {got}: {err}") from None
        return env

    env = jax.eval_shape(run, shapes, jax.ShapeDtypeStruct((1, *graph.input_hwc), jnp.float32))
    for name, s in env.items():
        out[name] = tuple(s.shape[1:])
    return out


def candidates(graph: Graph, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The feature maps every path to the logits passes through, in graph order: the layers that may be pruned."""
    hidden_dominators = _dominators(graph, output_layer(graph)[1])
    return [n for n in hidden_dominators if len(shapes[n]) == 3 and graph.by_name[n].op != "input"]


def default_layer(graph: Graph, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The paper's choice: the last 4-D feature map every path to the logits passes through (the one before
    flatten or global pooling).

    Raises:
        ConfigError: the graph has none.
    """
    found = candidates(graph, shapes)
    if not found:
        raise ConfigError(f"model {graph.name!r}: no convolutional feature map that every path to the logits passes "
                          "through; give the layer to prune", field="layer")
    # A global pooling with keepdims gives a 1 x 1 map, still 4-D: the paper's layer is the one before it.
    pooled = [i for i, name in enumerate(found) if graph.by_name[name].op in ("global_avg_pool", "global_max_pool")]
    return found[pooled[0] - 1] if pooled and pooled[0] > 0 else found[-1]


def check_layer(graph: Graph, shapes: Mapping[str, tuple[int, ...]], layer: str) -> None:
    """Refuse a ``layer`` that cannot be pruned: no such node, the input, not a feature map, or bypassed.

    Raises:
        ConfigError: naming the layer, why, and the layers that can be pruned.
    """
    output, hidden = output_layer(graph)
    if layer in (output, f"{output}/pre"):
        raise ConfigError(f"{arg('layer', layer)}: the output layer, whose channels are the logits; prune one of "
                          f"{', '.join(_keras_layers(candidates(graph, shapes)))}", field="layer")
    if layer not in graph.by_name:
        keras_layers = [n.name for n in graph.nodes if "/" not in n.name]
        base, _, suffix = layer.rpartition("/")
        if suffix == "pre" and base in graph.by_name:
            pre = [n for n in candidates(graph, shapes) if n.endswith("/pre")]  # the ones that may be pruned
            raise ConfigError(f"{arg('layer', layer)}: layer {base!r} has no fused activation, so it has no channels "
                              f"before one ('NAME/pre' names the input of a layer's fused activation: "
                              f"{', '.join(pre[:20]) or 'none prunable in this model'}); prune {base!r} itself",
                              field="layer")
        raise ConfigError(f"{arg('layer', layer)}: no such layer in {graph.name!r} (its layers: "
                          f"{', '.join(keras_layers[:40])}{'...' if len(keras_layers) > 40 else ''})", field="layer")
    if graph.by_name[layer].op == "input":
        raise ConfigError(f"{arg('layer', layer)}: the model's input, not a layer's output; prune one of "
                          f"{', '.join(_keras_layers(candidates(graph, shapes)))}", field="layer")
    if len(shapes[layer]) != 3:
        raise ConfigError(f"{arg('layer', layer)}: its output has shape {shapes[layer]}, not a feature map (height, "
                          "width, channels); prune a convolutional layer's output", field="layer")
    if layer not in _dominators(graph, hidden):
        bypass = _bypass(graph, layer)
        raise ConfigError(f"{arg('layer', layer)}: not every path to the logits passes through it ({bypass}), so a "
                          f"pruned channel would not be removed; prune one of {', '.join(_keras_layers(candidates(graph, shapes)))}",
                          field="layer")


def _keras_layers(names: list[str]) -> list[str]:
    """The names a message suggests: Keras layers' outputs, not the ``<layer>/pre`` node badnet-jax makes of a
    fused activation's input (which may be pruned too: the channels before the activation)."""
    return [n for n in names if "/" not in n]


def _bypass(graph: Graph, layer: str) -> str:
    """A node after ``layer`` that reads a node neither before nor after it: the path around it."""
    before = _ancestors(graph, layer)
    names = [n.name for n in graph.nodes]
    for node in graph.nodes[names.index(layer) + 1:]:
        for src in node.inputs:
            if src in before and src != layer:
                return f"{node.name!r} reads {src!r}"
    return "another branch reaches the logits"


_KERAS_OF_OP = {"identity": "a Dropout or a linear Activation", "relu": "a ReLU or LeakyReLU", "softmax": "a Softmax",
                "global_avg_pool": "a GlobalAveragePooling2D", "global_max_pool": "a GlobalMaxPooling2D",
                "flatten": "a Flatten", "batch_norm": "a BatchNormalization", "add": "an Add",
                "concat": "a Concatenate", "rescale": "a Rescaling", "conv": "a Conv2D",
                "depthwise_conv": "a DepthwiseConv2D", "max_pool": "a MaxPooling2D", "avg_pool": "an AveragePooling2D",
                "zero_pad": "a ZeroPadding2D", "dense": "a Dense layer on an image tensor", "input": "the input",
                "activation": "an Activation", "multiply": "a Multiply", "reshape": "a Reshape",
                "subtract": "a Subtract", "average": "an Average", "maximum": "a Maximum", "minimum": "a Minimum",
                "crop": "a Cropping2D", "upsample": "an UpSampling2D",
                "normalize": "a Normalization", "separable_conv": "a SeparableConv2D"}


def check_output_layer(graph: Graph, shapes: Mapping[str, tuple[int, ...]], frozen: ParamShapes) -> None:
    """Refuse an output layer (``graph_split.output_layer``) that is neither a Dense layer on a vector nor a 1 x 1
    convolution on a 1 x 1 map whose output is flattened, or that gives fewer than 2 logits. No field in these
    errors: the caller reading a file names it (``errors.reading``)."""
    output, hidden = output_layer(graph)
    node = graph.by_name[output]
    if node.op == "conv":
        kernel = dict(dict(frozen)[node.weights])["kernel"]
        if shapes[hidden][:2] != (1, 1) or tuple(kernel[:2]) != (1, 1):
            raise ConfigError(f"model {graph.name!r}: its logits are the flattened output of {node.name!r}, a Conv2D "
                              f"with a {tuple(kernel[:2])} kernel on a map of shape {shapes[hidden]}; badnet-jax reads "
                              "such logits from a 1 x 1 convolution on a 1 x 1 map (a Dense layer in effect, as in "
                              "keras.applications' MobileNets), or from a Dense layer")
    elif node.op in ("flatten", "reshape"):  # of something other than a plain convolution
        src = graph.by_name[node.inputs[0]]
        raise ConfigError(f"model {graph.name!r}: its logits are {_as_keras(graph, node)} {output!r} of {src.name!r}, "
                          f"{_as_keras(graph, src)}; badnet-jax reads logits from a linear Dense layer, or from a "
                          "linear 1 x 1 Conv2D on a 1 x 1 map with the Flatten or Reshape directly after it (a "
                          "softmax as a layer after that is dropped)")
    elif node.op != "dense" or len(shapes[hidden]) != 1:
        raise ConfigError(f"model {graph.name!r}: its output layer {output!r} is {_as_keras(graph, node)}, not a "
                          "linear Dense layer on a vector; badnet-jax needs logits = Dense(hidden layer), or a 1 x 1 "
                          "Conv2D on a 1 x 1 map, flattened (a softmax after it, fused or as a layer, is dropped)")
    logits = graph.logits_node()
    if shapes[logits] != (shapes[output][-1],):  # a Reshape that is not a flattening of the (1, 1, K) logits
        raise ConfigError(f"model {graph.name!r}: its logits {logits!r} have shape {shapes[logits]}; badnet-jax needs "
                          f"one logit per class: the output of {output!r} flattened")
    if shapes[logits][0] < 2:
        raise ConfigError(f"model {graph.name!r}: its output layer {output!r} has {shapes[logits][0]} unit; the "
                          "defense needs one logit per class, at least 2 (a sigmoid-style single logit has no top-2 "
                          "to compare)")


def refuse_steps(graph: Graph) -> None:
    """Refuse a ReLU with a threshold t > 0: it steps from 0 to t at t, so a float32 rounding that moves an
    activation across t changes the logits by far more than the near-tie bound the float64 settling covers."""
    for node in graph.nodes:
        if node.op == "relu" and node.attr("threshold") > 0:
            t = node.attr("threshold")
            raise ConfigError(f"model {graph.name!r}: layer {node.name!r} is a ReLU with threshold {t:g}, a step from "
                              f"0 to {t:g} there: a float32 rounding across it changes the logits by far more than a "
                              "rounding error, which no near-tie check can catch, so the curve would not be exact; "
                              "badnet-jax reads ReLUs with threshold 0 (a slope and a cap are fine)")


def _as_keras(graph: Graph, node: Node) -> str:
    """What a node is, in the Keras terms of the layer it came from, for a message."""
    pre = graph.by_name.get(f"{node.name}/pre")
    if pre is not None and node.inputs == (pre.name,) and pre.op in ("dense", "conv"):
        act = node.attr("fn") if node.op == "activation" else node.op
        return f"{'a Dense layer' if pre.op == 'dense' else 'a Conv2D'} with activation {act!r} fused"
    return _KERAS_OF_OP.get(node.op, f"a {node.op} node")
