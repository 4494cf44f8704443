"""Write any :class:`~badnet_jax.models.graph.GraphCNN`, optionally pruned (B'), as a Keras full-model h5.

:func:`save_keras_graph` writes the Keras 2 full-model layout that ``badnet_jax.io.keras.save_keras`` writes
for the lab's DeepID: a ``model_config`` JSON attribute (a Keras 2-style Functional config, the format tf_keras 2
writes, which Keras 3's ``keras.models.load_model`` reads through its legacy h5 loader) and a ``model_weights``
group with one group per layer, its ``weight_names`` listed in fixed-length strings, the layers in the order
Keras loads them by (:func:`~badnet_jax.io.keras_model_config.keras_layer_order`).
:func:`badnet_jax.io.keras_graph.read_keras_graph` reads the file back.

The graph becomes one Keras layer per Keras layer of the IR, under the same names: a weighted node
``"<name>/pre"`` and its activation node ``"<name>"`` are fused back into one Conv2D, DepthwiseConv2D or Dense
with that activation; every other node becomes its own layer class
(:func:`~badnet_jax.io.keras_model_config.keras_model_config`).

Pruning (a ``mask``, (C,) 0/1 over the pruned layer's output channels, 0 = pruned): the file predicts exactly
what ``model.logits(params, x, mask)`` predicts, in one of two ways (:func:`prune_graph` chooses):

* ``"zeroed_readers"`` (same architecture): when every reader of the pruned channels is linear in them (a
  Conv2D, DepthwiseConv2D or Dense, possibly after a chain of ops that keep a zero channel zero: ReLU, max or
  average pooling, global pooling, padding, cropping, up-sampling, Dropout, Flatten, Concatenate), the reader's
  kernel entries that read a pruned channel are zeroed. A zeroed input channel and a zeroed kernel entry both
  contribute exactly nothing, so the result is exact.
* ``"mask_layer"`` (one layer more): otherwise (a BatchNormalization, Add, Subtract, ... reads them), a
  ``DepthwiseConv2D(kernel_size=1, use_bias=False)`` named ``"<layer>_prune_mask"`` whose kernel is the mask
  is inserted after the pruned layer, and every reader of the layer reads it instead (x * 1 = x, x * 0 = 0).

The producer of the pruned channels is never zeroed: with a batch norm after it, a zero pre-activation is
not a zero channel.

The file records the pruning in root attributes (:data:`PRUNED_LAYER_ATTR`, :data:`PRUNED_CHANNELS_ATTR`,
:data:`PRUNE_METHOD_ATTR`) and the model's input scale in ``badnet_jax_input_scale``
(:data:`badnet_jax.io.keras_file.INPUT_SCALE_ATTR`), so a reader can tell what it holds.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import h5py
import numpy as np

from badnet_jax.errors import ConfigError, OutputError, arg
from badnet_jax.io import atomic
from badnet_jax.io.keras_file import INPUT_SCALE_ATTR
from badnet_jax.io.keras_model_config import PRE, check_names, functional_config, keras_layer_order, keras_layers
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.ir import Graph, GraphParams, Node
from badnet_jax.models.ops import commutes_with_mask

PRUNED_LAYER_ATTR = "badnet_jax_pruned_layer"
"""Root attribute: the pruned layer's name (the node of the IR that ``model.layer`` names)."""

PRUNED_CHANNELS_ATTR = "badnet_jax_pruned_channels"
"""Root attribute: the pruned channels' indices (int64, ascending; empty if the mask keeps every channel)."""

PRUNE_METHOD_ATTR = "badnet_jax_prune_method"
"""Root attribute: ``"zeroed_readers"`` or ``"mask_layer"`` (see the module docstring)."""

MASK_LAYER_SUFFIX = "_prune_mask"
"""The inserted mask layer is named ``<pruned layer><suffix>`` (a ``_1``, ``_2``... added if that name is taken)."""

KERAS_VERSION = "2.15.0"
"""The ``keras_version`` attribute written: a Keras 2 file (Keras 3 uses it only to tell Keras 1 files apart)."""

ZEROED_READERS = "zeroed_readers"
MASK_LAYER = "mask_layer"

# Ops that keep a zero channel zero, channel by channel (f(0) = 0 on that channel alone): the value after them
# still differs from the masked network's only by channels that are zero there.
_KEEPS_ZEROS = ("avg_pool", "global_avg_pool")
# Ops linear in their input whose kernel entries reading input channel c can be zeroed: (op, kernel axis).
_ZEROABLE = {"conv": 2, "depthwise_conv": 2, "separable_conv": 2, "dense": 0}  # separable: its depthwise kernel


@dataclasses.dataclass(frozen=True)
class PrunedGraph:
    """B' as a graph: what :func:`save_keras_graph` writes.

    Attributes:
        graph: the network's graph (the model's own, or with the mask layer inserted).
        params: float32 numpy params for ``graph`` (readers' kernels zeroed where pruned).
        method: None (no mask), :data:`ZEROED_READERS` or :data:`MASK_LAYER`.
        layer: the pruned layer (``model.layer``).
        channels: the pruned channels (int64, ascending).
        mask_layer: the inserted layer's name (method :data:`MASK_LAYER`), else None.
        zeroed: the layers whose kernels were zeroed (method :data:`ZEROED_READERS`), in graph order.
    """

    graph: Graph
    params: GraphParams
    method: Optional[str]
    layer: str
    channels: np.ndarray
    mask_layer: Optional[str] = None
    zeroed: tuple[str, ...] = ()


def save_keras_graph(model: GraphCNN, params: Mapping[str, Any], path: str | os.PathLike,
                     mask: Any = None, input_scale_attr: bool = True) -> Path:
    """Write ``model`` (B, or B' under ``mask``) as a Keras full-model h5 file, atomically.

    ``keras.models.load_model(path)`` gives a network whose logits are those ``model.logits(params, x, mask)``
    computes, to float32 rounding (its output: those logits, or their softmax where the graph ends in one; Keras
    takes the pixels the model takes: / 255 for input scale ``"255"``);
    :func:`badnet_jax.io.keras_graph.read_keras_graph` reads it back.

    Args:
        model: the network and its pruned layer (``model.layer``).
        params: its params (``model.check_params`` accepts them).
        path: the file to write (replaced atomically; nothing is left half-written on failure).
        mask: None (write B as it is), or a (C,) 0/1 mask over ``model.layer``'s channels, 0 = pruned.
        input_scale_attr: record ``model.input_scale`` in the root attribute ``badnet_jax_input_scale``.

    Returns:
        The path written.

    Raises:
        ConfigError: naming ``mask`` (wrong length, an entry neither 0 nor 1), ``params`` (not the model's, or
            not finite) or ``model`` (a graph Keras cannot express: a layer name with a ``/`` or an
            activation that no Keras layer fuses).
        OutputError: naming ``path``: it cannot be written (a missing permission, a folder in the way, a
            full disk).

    Example::

        graph, params = read_keras_graph("resnet_tiny.h5")
        model = GraphCNN.build(graph, params).with_layer("b0_out")
        save_keras_graph(model, params, "b_prime.h5", mask=mask)   # keras.models.load_model reads it
    """
    pruned = prune_graph(model, params, mask)
    layers = keras_layers(pruned.graph, pruned.params)
    order = keras_layer_order(pruned.graph)
    config = functional_config(pruned.graph, layers, order)
    path = Path(path)
    text = lambda s: np.bytes_(s.encode("utf-8"))  # short ones fixed-length, as save_keras writes them

    def build(f: h5py.File) -> None:
        f.attrs["backend"] = text("tensorflow")
        f.attrs["keras_version"] = text(KERAS_VERSION)
        # A variable-length string, as Keras writes it: its text lives outside the object header, whose 64 KB a
        # fixed-length one would have to fit (a DenseNet121's config is 363 KB).
        f.attrs["model_config"] = json.dumps(config)
        if input_scale_attr:
            f.attrs[INPUT_SCALE_ATTR] = text(model.input_scale)
        if pruned.method is not None:
            f.attrs[PRUNED_LAYER_ATTR] = text(pruned.layer)
            f.attrs[PRUNED_CHANNELS_ATTR] = np.asarray(pruned.channels, np.int64)
            f.attrs[PRUNE_METHOD_ATTR] = text(pruned.method)
        root = f.create_group("model_weights")
        root.attrs["backend"] = text("tensorflow")
        root.attrs["keras_version"] = text(KERAS_VERSION)
        # Keras loads weights by position, in model.layers' order: write the layers in that order.
        root.attrs["layer_names"] = np.array([name.encode("utf-8") for name in order])
        for name in order:
            g = root.create_group(name)
            weights = layers[name].weights
            if not weights:
                g.attrs["weight_names"] = np.array([], dtype=np.float64)
                continue
            g.attrs["weight_names"] = np.array([f"{name}/{key}:0".encode("utf-8") for key, _ in weights])
            inner = g.create_group(name)
            for key, value in weights:
                inner.create_dataset(f"{key}:0", data=value)

    try:
        atomic.atomic_write_h5(path, build)
    except OSError as err:
        raise OutputError(f"{arg('path', path)}: the model file could not be written ({_why(err)}); whatever was "
                          "there is as it was", field="path") from None
    return path


def _why(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return err.strerror or str(err)


# ------------------------------------------------------------------------------------------------ pruning


def prune_graph(model: GraphCNN, params: Mapping[str, Any], mask: Any = None) -> PrunedGraph:
    """B' as a graph and params whose plain forward is ``model.logits(params, x, mask)`` (see the module docstring).

    Raises:
        ConfigError: naming ``mask``, ``params`` or ``model``, as :func:`save_keras_graph` says.
    """
    model.check_params(params)
    arrays: GraphParams = {}
    for layer, entries in model.param_shapes:  # the model's layers only (extra entries are not written)
        arrays[layer] = {}
        for key, _ in entries:
            a = np.asarray(params[layer][key], np.float32)
            if not np.isfinite(a).all():
                raise ConfigError(f"{arg('params')}: layer {layer!r} {key} holds NaN or infinite values; a Keras file "
                                  "of them would predict nothing useful", field="params")
            arrays[layer][key] = a
    check_names(model.graph)
    empty = np.zeros((0,), np.int64)
    if mask is None:
        return PrunedGraph(model.graph, arrays, None, model.layer, empty)
    m = model.check_mask(mask, "mask")
    pruned = np.asarray(m) == 0
    channels = np.flatnonzero(pruned).astype(np.int64)
    target = _keras_output(model)
    zeroed = _zero_readers(model, target, pruned)
    if zeroed is not None:
        for layer, axis in zeroed:
            kernel = arrays[layer]["kernel"].copy()
            index = [slice(None)] * kernel.ndim
            index[axis] = zeroed[layer, axis]
            kernel[tuple(index)] = 0.0
            arrays[layer] = {**arrays[layer], "kernel": kernel}
        return PrunedGraph(model.graph, arrays, ZEROED_READERS, model.layer, channels,
                           zeroed=tuple(layer for layer, _ in zeroed))
    graph, name = _insert_mask_layer(model.graph, target)
    arrays[name] = {"kernel": np.asarray(m, np.float32).reshape(1, 1, -1, 1)}
    return PrunedGraph(graph, arrays, MASK_LAYER, model.layer, channels, mask_layer=name)


def _keras_output(model: GraphCNN) -> str:
    """The Keras layer whose output the mask prunes: ``model.layer``, or for a fused ``"<name>/pre"`` the layer
    ``<name>`` itself when its activation keeps a zero channel zero (then masking either is the same)."""
    graph, layer = model.graph, model.layer
    if not layer.endswith(PRE):
        return layer
    readers = graph.consumers()[layer]
    by_name = graph.by_name
    reader = by_name[readers[0]] if len(readers) == 1 else None
    if reader is not None and reader.op in ("relu", "identity", "activation") and commutes_with_mask(reader):
        return readers[0]
    raise ConfigError(f"{arg('model')}: its pruned layer {layer!r} is the inside of a Keras layer whose activation "
                      "does not keep a pruned channel zero, so no Keras file can prune it; prune "
                      f"{layer[:-len(PRE)]!r} instead", field="model")


def _keeps_zeros(node: Node) -> bool:
    if node.op in _KEEPS_ZEROS:
        return True
    if node.op == "rescale":
        return node.attr("offset") == 0.0
    return commutes_with_mask(node)


def _zero_readers(model: GraphCNN, target: str, pruned: np.ndarray) -> Optional[dict]:
    """``{(layer, kernel axis): bool index of the entries to zero}`` making the unmasked graph compute the masked
    one, or None when a reader of the pruned channels is not linear in them alone (then a mask layer is needed).

    Follows the nodes whose value differs from the masked network's, each by a set of entries of its last axis
    that are zero there (``differ``), until every path ends at a Conv2D, DepthwiseConv2D or Dense.
    """
    graph = model.graph
    shapes = dict(model.shapes)
    names = [n.name for n in graph.nodes]
    differ: dict[str, np.ndarray] = {target: pruned}
    fixes: dict[tuple[str, int], np.ndarray] = {}
    for node in graph.nodes[names.index(target) + 1:]:
        zs = [differ.get(src) for src in node.inputs]
        if all(z is None for z in zs):
            continue
        if node.op in _ZEROABLE and len(zs) == 1:
            fixes[node.weights, _ZEROABLE[node.op]] = zs[0]
        elif node.op == "flatten":
            lead = math.prod(shapes[node.inputs[0]][:-1])
            differ[node.name] = np.tile(zs[0], lead)  # Keras' (h, w, c) order: the channel is the fastest axis
        elif node.op == "concat":
            differ[node.name] = np.concatenate([
                z if z is not None else np.zeros(shapes[src][-1], bool) for z, src in zip(zs, node.inputs)])
        elif len(zs) == 1 and _keeps_zeros(node):
            differ[node.name] = zs[0]
        else:
            return None
    if graph.logits_node() in differ or graph.output in differ:
        return None
    return {key: z for key, z in fixes.items() if z.any()}


def _insert_mask_layer(graph: Graph, target: str) -> tuple[Graph, str]:
    """The graph with a 1x1 depthwise convolution ``<target>_prune_mask`` after ``target``, read by every reader
    of ``target``."""
    taken = {node.name for node in graph.nodes} | {node.weights for node in graph.nodes if node.weights}
    name, i = f"{target}{MASK_LAYER_SUFFIX}", 0
    while name in taken:
        i += 1
        name = f"{target}{MASK_LAYER_SUFFIX}_{i}"
    nodes = []
    for node in graph.nodes:
        if target in node.inputs:
            node = dataclasses.replace(node, inputs=tuple(name if s == target else s for s in node.inputs))
        nodes.append(node)
        if node.name == target:
            nodes.append(Node.make(name, "depthwise_conv", (target,), name))
    return Graph(tuple(nodes), graph.input_hwc, graph.output, graph.name), name
