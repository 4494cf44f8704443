"""Any :class:`~badnet_jax.models.graph.GraphCNN`'s graph as a Keras 2-style Functional model config, the
``model_config`` JSON that :func:`badnet_jax.io.keras_graph_writer.save_keras_graph` writes.

One Keras layer per Keras layer of the IR, under the same names: a weighted node ``"<name>/pre"`` and its
activation node ``"<name>"`` fold back into one Conv2D, DepthwiseConv2D or Dense with that activation string;
every other node becomes its own layer class (:func:`keras_layers`). Keras loads a legacy h5 file's weights by
position in the order it builds ``model.layers`` in (:func:`keras_layer_order`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.ir import Graph, GraphParams, Node

WEIGHTED = ("conv", "depthwise_conv", "separable_conv", "dense")
"""The ops a Keras layer with weights and a fused activation computes (its IR node ``"<name>/pre"``)."""

PRE = "/pre"
"""The suffix of a weighted layer's node before its fused activation."""

# An activation node fused after "<name>/pre" -> the Keras activation string it is.
_DEFAULT_RELU = (("max_value", None), ("negative_slope", 0.0), ("threshold", 0.0))
_LEAKY_RELU = (("max_value", None), ("negative_slope", 0.2), ("threshold", 0.0))  # keras "leaky_relu" (slope 0.2)
_RELU6 = (("max_value", 6.0), ("negative_slope", 0.0), ("threshold", 0.0))
_MERGES = {"multiply": "Multiply", "subtract": "Subtract", "average": "Average", "maximum": "Maximum",
           "minimum": "Minimum"}  # merge ops -> their Keras layer (no config of their own)


@dataclasses.dataclass
class KerasLayer:
    """One Keras layer of the file: its class, config (without the name), inputs and weights in Keras' order."""

    name: str
    cls: str
    cfg: dict
    inbound: tuple[str, ...]
    weights: list[tuple[str, np.ndarray]]


def check_names(graph: Graph) -> None:
    for node in graph.nodes:
        inside = node.name.endswith(PRE) and node.op in WEIGHTED and "/" not in node.name[:-len(PRE)]
        if "/" in node.name and not inside:
            raise ConfigError(f"{arg('model')}: layer {node.name!r} has a '/' in its name, which Keras does not "
                              "allow in a layer name", field="model")


def _activation(graph: Graph, pre: Node) -> tuple[Node, str]:
    """The activation node fused after ``pre`` (``"<name>/pre"``) and its Keras activation string."""
    name = pre.name[:-len(PRE)]
    act = graph.by_name.get(name)
    readers = graph.consumers()[pre.name]
    if act is None or readers != [name] or act.inputs != (pre.name,):
        raise ConfigError(f"{arg('model')}: node {pre.name!r} is not read by exactly one activation {name!r}; "
                          "a '<layer>/pre' node is the inside of a Keras layer", field="model")
    if act.op == "relu" and act.attrs == _DEFAULT_RELU:
        return act, "relu"
    if act.op == "relu" and act.attrs == _LEAKY_RELU:
        return act, "leaky_relu"
    if act.op == "relu" and act.attrs == _RELU6:
        return act, "relu6"
    if act.op == "activation":
        return act, act.attr("fn")
    if act.op in ("softmax", "identity"):
        return act, "softmax" if act.op == "softmax" else "linear"
    raise ConfigError(f"{arg('model')}: layer {name!r} has a fused activation ({act.op} {dict(act.attrs)}) that no "
                      "Keras activation string names", field="model")


def keras_layers(graph: Graph, params: GraphParams) -> dict[str, KerasLayer]:
    """The graph as Keras layers, by name, in graph order (fused ``/pre`` nodes folded into their layer)."""
    out: dict[str, KerasLayer] = {}
    fused: dict[str, Node] = {}  # activation node name -> its "/pre" node
    for node in graph.nodes:
        if node.name.endswith(PRE) and node.op in WEIGHTED:
            act, _ = _activation(graph, node)
            fused[act.name] = node
    inside = {pre.name for pre in fused.values()}
    for node in graph.nodes:
        if node.name in inside:
            continue
        if node.name in fused:
            pre = fused[node.name]
            _, act = _activation(graph, pre)
            out[node.name] = _layer(pre, node.name, pre.inputs, params, act)
        else:
            out[node.name] = _layer(node, node.name, node.inputs, params, "linear")
    return out


def _pair(v: tuple) -> list[int]:
    return [int(x) for x in v]


def _layer(node: Node, name: str, inbound: tuple[str, ...], params: GraphParams, act: str) -> KerasLayer:
    """The Keras layer of ``node`` (a weighted one with activation ``act``) named ``name``."""
    a = dict(node.attrs)
    p = params.get(node.weights, {}) if node.weights else {}
    last = {"data_format": "channels_last"}
    bias = [("bias", p["bias"])] if "bias" in p else []
    op = node.op
    if op == "input":
        return KerasLayer(name, "InputLayer", {}, (), [])
    if op == "conv":
        k = p["kernel"]
        cfg = {"filters": int(k.shape[3]), "kernel_size": _pair(k.shape[:2]), "strides": _pair(a["strides"]),
               "padding": a["padding"], **last, "dilation_rate": _pair(a["dilation"]), "groups": 1,
               "activation": act, "use_bias": bool(bias)}
        return KerasLayer(name, "Conv2D", cfg, inbound, [("kernel", k)] + bias)
    if op == "depthwise_conv":
        k = p["kernel"]
        cfg = {"kernel_size": _pair(k.shape[:2]), "strides": _pair(a["strides"]), "padding": a["padding"],
               "depth_multiplier": int(k.shape[3]), **last, "dilation_rate": _pair(a["dilation"]),
               "activation": act, "use_bias": bool(bias)}
        return KerasLayer(name, "DepthwiseConv2D", cfg, inbound, [("depthwise_kernel", k)] + bias)
    if op == "separable_conv":
        k, pk = p["kernel"], p["pointwise_kernel"]
        cfg = {"filters": int(pk.shape[3]), "kernel_size": _pair(k.shape[:2]), "strides": _pair(a["strides"]),
               "padding": a["padding"], **last, "dilation_rate": _pair(a["dilation"]),
               "depth_multiplier": int(k.shape[3]), "activation": act, "use_bias": bool(bias)}
        return KerasLayer(name, "SeparableConv2D", cfg, inbound, [("depthwise_kernel", k), ("pointwise_kernel", pk)]
                          + bias)
    if op == "dense":
        k = p["kernel"]
        return KerasLayer(name, "Dense", {"units": int(k.shape[1]), "activation": act, "use_bias": bool(bias)},
                           inbound, [("kernel", k)] + bias)
    if op in ("max_pool", "avg_pool"):
        cls = "MaxPooling2D" if op == "max_pool" else "AveragePooling2D"
        return KerasLayer(name, cls, {"pool_size": _pair(a["window"]), "padding": a["padding"],
                                       "strides": _pair(a["strides"]), **last}, inbound, [])
    if op in ("global_avg_pool", "global_max_pool"):
        cls = "GlobalAveragePooling2D" if op == "global_avg_pool" else "GlobalMaxPooling2D"
        return KerasLayer(name, cls, {**last, "keepdims": bool(a["keepdims"])}, inbound, [])
    if op == "batch_norm":
        weights = [(k, p[k]) for k in ("gamma", "beta", "moving_mean", "moving_variance") if k in p]
        cfg = {"axis": -1, "momentum": 0.99, "epsilon": float(a["epsilon"]), "center": "beta" in p,
               "scale": "gamma" in p}
        return KerasLayer(name, "BatchNormalization", cfg, inbound, weights)
    if op == "normalize":
        # Keras' weights: mean, variance and adapt()'s sample count, which inference does not use (not kept: 0).
        weights = [("mean", p["moving_mean"]), ("variance", p["moving_variance"]), ("count", np.array(0, np.int64))]
        cfg = {"axis": -1, "invert": False, "mean": None, "variance": None}
        return KerasLayer(name, "Normalization", cfg, inbound, weights)
    if op == "relu":
        if node.attrs == _DEFAULT_RELU:
            return KerasLayer(name, "Activation", {"activation": "relu"}, inbound, [])
        cap = a["max_value"]
        return KerasLayer(name, "ReLU", {"max_value": None if cap is None else float(cap),
                                          "negative_slope": float(a["negative_slope"]),
                                          "threshold": float(a["threshold"])}, inbound, [])
    if op == "softmax":
        return KerasLayer(name, "Softmax", {"axis": -1}, inbound, [])
    if op == "activation":
        return KerasLayer(name, "Activation", {"activation": a["fn"]}, inbound, [])
    if op == "add":
        return KerasLayer(name, "Add", {}, inbound, [])
    if op in _MERGES:
        return KerasLayer(name, _MERGES[op], {}, inbound, [])
    if op == "reshape":
        return KerasLayer(name, "Reshape", {"target_shape": [int(d) for d in a["target"]]}, inbound, [])
    if op == "concat":
        return KerasLayer(name, "Concatenate", {"axis": -1}, inbound, [])
    if op == "flatten":
        return KerasLayer(name, "Flatten", dict(last), inbound, [])
    if op == "identity":
        if a["dropout"] is not None:
            return KerasLayer(name, "Dropout", {"rate": float(a["dropout"])}, inbound, [])
        return KerasLayer(name, "Activation", {"activation": "linear"}, inbound, [])
    if op == "zero_pad":
        (t, b), (left, r) = a["pad"]
        return KerasLayer(name, "ZeroPadding2D", {"padding": [[t, b], [left, r]], **last}, inbound, [])
    if op == "crop":
        (t, b), (left, r) = a["crop"]
        return KerasLayer(name, "Cropping2D", {"cropping": [[t, b], [left, r]], **last}, inbound, [])
    if op == "upsample":
        return KerasLayer(name, "UpSampling2D", {"size": _pair(a["size"]), "interpolation": "nearest", **last},
                          inbound, [])
    if op == "rescale":
        return KerasLayer(name, "Rescaling", {"scale": float(a["scale"]), "offset": float(a["offset"])}, inbound, [])
    raise ConfigError(f"{arg('model')}: layer {name!r} is the operation {op!r}, which has no Keras layer",
                      field="model")


def keras_layer_order(graph: Graph) -> list[str]:
    """The Keras layers of ``graph`` in the order of the ``model.layers`` Keras builds from its config.

    Keras loads a legacy h5 file's weights by position in that order (``keras.src.ops.function.map_graph``):
    by decreasing depth (the longest path to the output), ties by first visit of a depth-first walk from the
    output over each layer's inputs in order. Layers the output does not read are left out, as Keras leaves them.
    """
    links = {name: layer.inbound for name, layer in _keras_links(graph).items()}
    output = graph.output
    index: dict[str, int] = {}
    stack = [output]
    while stack:  # pre-order: a layer is numbered when first reached, then its inputs, first input first
        name = stack.pop()
        if name in index:
            continue
        index[name] = len(index)
        stack.extend(reversed([s for s in links[name] if s not in index]))
    depth = {output: 0}
    for name in reversed([n for n in links if n in index]):  # graph order is topological
        for src in links[name]:
            depth[src] = max(depth.get(src, 0), depth[name] + 1)
    return sorted(index, key=lambda n: (-depth[n], index[n]))


def _keras_links(graph: Graph) -> dict[str, KerasLayer]:
    """Each Keras layer's inputs (names only; no weights), in graph order."""
    out: dict[str, KerasLayer] = {}
    for node in graph.nodes:
        if node.name.endswith(PRE) and node.op in WEIGHTED:
            continue
        inputs = node.inputs
        if len(inputs) == 1 and inputs[0].endswith(PRE) and graph.by_name[inputs[0]].op in WEIGHTED:
            inputs = graph.by_name[inputs[0]].inputs
        out[node.name] = KerasLayer(node.name, "", {}, inputs, [])
    return out


def keras_model_config(graph: Graph, params: Mapping[str, Mapping[str, Any]]) -> dict:
    """The Keras 2-style Functional config (``model_config``) of ``graph``: one layer per Keras layer, same names.

    Raises:
        ConfigError: naming ``model``: a graph no Keras config expresses (see :func:`save_keras_graph`).
    """
    check_names(graph)
    arrays = {layer: {k: np.asarray(v) for k, v in p.items()} for layer, p in params.items()}
    return functional_config(graph, keras_layers(graph, arrays), keras_layer_order(graph))


def functional_config(graph: Graph, layers: Mapping[str, "KerasLayer"], order: list[str]) -> dict:
    keep = set(order)
    entries = []
    for name, layer in layers.items():
        if name not in keep:
            continue
        if layer.cls == "InputLayer":
            cfg = {"batch_input_shape": [None, *map(int, graph.input_hwc)], "dtype": "float32", "sparse": False,
                   "name": name}
        else:
            cfg = {"name": name, "trainable": True, "dtype": "float32", **layer.cfg}
        entries.append({"class_name": layer.cls, "config": cfg, "name": name,
                        "inbound_nodes": [[[src, 0, 0, {}] for src in layer.inbound]] if layer.inbound else []})
    first = graph.nodes[0].name
    return {"class_name": "Functional", "config": {"name": graph.name, "layers": entries,
                                                   "input_layers": [[first, 0, 0]],
                                                   "output_layers": [[graph.output, 0, 0]]}}
