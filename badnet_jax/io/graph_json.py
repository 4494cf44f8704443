"""A :class:`~badnet_jax.models.graph.GraphCNN` as JSON, and back, checked as strictly as a Keras file's config.

A checkpoint of a model other than the lab's DeepID (``badnet_jax.io.checkpoint``) carries its architecture
beside its params: the IR graph (:mod:`badnet_jax.models.ir`) and the pruned layer, as one JSON document::

    {"format": "badnet-jax graph model", "version": 1, "layer": "b1_out", "tie_rtol": 1e-05,
     "tie_rtol_measured": false,
     "graph": {"name": "resnet_tiny", "input_hwc": [32, 32, 3], "output": "dense",
               "nodes": [{"name": "input_1", "op": "input", "inputs": [], "weights": null, "attrs": {}},
                         {"name": "conv/pre", "op": "conv", "inputs": ["input_1"], "weights": "conv",
                          "attrs": {"dilation": [1, 1], "padding": "same", "strides": [1, 1]}}, ...]}}

The input scale is not in it: checkpoints keep it as the ``input_divisor`` entry they have always had.

Reading it back (:func:`model_from_json`) treats the text as untrusted data, like the Keras reader
(``badnet_jax.io.keras_graph``) treats a file's config: nothing in it is executed; every node must be a
known operation (:data:`badnet_jax.models.ir.OPS`) with exactly that operation's attributes (one added later,
an identity's dropout rate, may be missing: older documents lack it), each of its type and range; names are
non-empty printable strings; the inputs are earlier nodes, as many as the operation takes; every weighted node
names its own entry of the params, and the params hold those entries and no other, each with the operation's
arrays (finite floats) of the shapes the graph implies for its input. Whatever does not fit is refused with a
:class:`~badnet_jax.errors.CheckpointError` naming the source and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from badnet_jax.errors import BadNetError, CheckpointError, ConfigError, arg
from badnet_jax.io import json_values as values
from badnet_jax.io.json_values import Refused
from badnet_jax.io.keras_config import MAX_ELEMENTS, MAX_LAYERS
from badnet_jax.numerics.ties import TIE_RTOL
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.ir import OPS, Graph, Node
from badnet_jax.models.protocol import Params

FORMAT = "badnet-jax graph model"
VERSION = 1
MAX_JSON_BYTES = 16 << 20  # far above any CNN's graph (a node takes ~150 bytes)
MAX_NODES = 2 * MAX_LAYERS  # a fused activation makes a second node of a Keras layer
# MAX_ELEMENTS (per tensor of one image, and per integer attribute) and MAX_NAME (characters in a name,
# ``json_values``) are the Keras reader's.

_MODEL_KEYS = ("format", "version", "graph", "layer", "tie_rtol", "tie_rtol_measured")
_GRAPH_KEYS = ("name", "input_hwc", "output", "nodes")
_NODE_KEYS = ("name", "op", "inputs", "weights", "attrs")
_WEIGHTED = ("conv", "depthwise_conv", "separable_conv", "dense", "batch_norm", "normalize")
_SAME_SHAPE_MERGES = ("add", "subtract", "average", "maximum", "minimum")
_MERGES = (*_SAME_SHAPE_MERGES, "concat", "multiply")
_IMAGE_OPS = ("conv", "depthwise_conv", "separable_conv", "max_pool", "avg_pool", "global_avg_pool", "global_max_pool",
              "zero_pad", "crop", "upsample")


# ------------------------------------------------------------------------------------------------- writing


def model_to_json(model: GraphCNN) -> str:
    """``model``'s architecture (graph, pruned layer, near-tie bound) as the JSON document of the module docstring.

    What is written is read back at once: a model that could not be restored is refused now, not at restore.

    Raises:
        ConfigError: naming ``model``: not a GraphCNN, or a graph the reader would refuse (as it says).
    """
    if not isinstance(model, GraphCNN):
        raise ConfigError(f"{arg('model')}: expected a GraphCNN, got {type(model).__name__}", field="model")
    graph = model.graph
    doc = {
        "format": FORMAT, "version": VERSION, "layer": model.layer, "tie_rtol": float(model.tie_rtol),
        "tie_rtol_measured": bool(model.tie_rtol_measured),
        "graph": {"name": graph.name, "input_hwc": [int(v) for v in graph.input_hwc], "output": graph.output,
                  "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "weights": n.weights,
                             "attrs": {k: _plain(v) for k, v in n.attrs}} for n in graph.nodes]},
    }
    try:
        text = json.dumps(doc, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
        _model_doc(json.loads(text))
    except (ValueError, Refused) as err:
        raise ConfigError(f"{arg('model')}: {model.name} cannot be saved as a graph: {err}", field="model") from None
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------- reading


def model_from_json(text: str | bytes, params: Params, input_scale: str, source: str) -> GraphCNN:
    """The :class:`GraphCNN` that :func:`model_to_json` wrote, with ``params`` checked against it.

    Args:
        text: the JSON document (untrusted).
        params: the params saved with it (untrusted: checked to be exactly the graph's).
        input_scale: ``raw`` or ``255`` (kept elsewhere in the checkpoint).
        source: what the text came from (a checkpoint's path), for the messages.

    Raises:
        CheckpointError: naming ``source`` and what does not fit (see the module docstring).
    """
    try:
        if isinstance(text, bytes):
            if len(text) > MAX_JSON_BYTES:
                raise Refused(f"{len(text)} bytes, more than {MAX_JSON_BYTES}")
            text = text.decode("utf-8")
        if len(text) > MAX_JSON_BYTES:
            raise Refused(f"{len(text)} characters, more than {MAX_JSON_BYTES}")
        try:
            doc = json.loads(text, parse_constant=values.no_constant)
        except RecursionError:
            raise Refused("nested too deeply") from None
        graph, layer, tie_rtol, measured = _model_doc(doc)
        _check_params(graph, params)
        try:
            model = GraphCNN.build(graph, params, layer, input_scale, tie_rtol)
        except BadNetError as err:
            raise Refused(str(err)) from None
        _check_shapes(model, params)
    except UnicodeDecodeError:
        raise CheckpointError(f"{source}: its architecture entry is not UTF-8 text") from None
    except ValueError as err:  # json.JSONDecodeError included
        raise CheckpointError(f"{source}: its architecture entry is not valid JSON ({err})") from None
    except Refused as err:
        raise CheckpointError(f"{source}: its architecture entry is refused: {err}") from None
    return dataclasses.replace(model, tie_rtol_measured=measured)


def _model_doc(doc: Any) -> tuple[Graph, str, float, bool]:
    doc = values.json_object(doc, _MODEL_KEYS, "the document")
    if doc["format"] != FORMAT:
        raise Refused(f"format {values.short(doc['format'])}, expected {FORMAT!r}")
    if doc["version"] != VERSION or isinstance(doc["version"], bool):
        raise Refused(f"version {values.short(doc['version'])}; this badnet-jax reads version {VERSION}")
    graph = _graph(doc["graph"])
    layer = values.name(doc["layer"], "the pruned layer")
    tie_rtol = values.number(doc["tie_rtol"], "tie_rtol", 0.0, above=True)
    if not TIE_RTOL <= tie_rtol < 1:
        # a measured bound is never below DeepID's (numerics.tie_bound); a smaller one would settle fewer near-ties
        raise Refused(f"tie_rtol is {tie_rtol:g}, expected a relative error bound from {TIE_RTOL:.3g} (the least "
                      "badnet-jax measures) to below 1")
    if not isinstance(doc["tie_rtol_measured"], bool):
        raise Refused(f"tie_rtol_measured is {values.short(doc['tie_rtol_measured'])}, expected true or false")
    return graph, layer, tie_rtol, doc["tie_rtol_measured"]


def _graph(value: Any) -> Graph:
    g = values.json_object(value, _GRAPH_KEYS, "the graph")
    name = values.name(g["name"], "the model's name")
    hwc = g["input_hwc"]
    if not isinstance(hwc, list) or len(hwc) != 3:
        raise Refused(f"input_hwc is {values.short(hwc)}, expected [height, width, channels]")
    hwc = tuple(values.integer(v, "input_hwc", 1) for v in hwc)
    output = values.name(g["output"], "the output")
    raw = g["nodes"]
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_NODES:
        count = len(raw) if isinstance(raw, list) else values.short(raw)
        raise Refused(f"the graph has {count} nodes, expected a list of 2 to {MAX_NODES}")
    nodes = [_node(entry, i) for i, entry in enumerate(raw)]
    try:
        return Graph(tuple(nodes), hwc, output, name)
    except BadNetError as err:
        raise Refused(str(err)) from None


def _node(value: Any, i: int) -> Node:
    n = values.json_object(value, _NODE_KEYS, f"node {i}")
    name = values.name(n["name"], f"node {i}'s name")
    where = f"node {name!r}"
    op = n["op"]
    if op not in OPS:
        raise Refused(f"{where} has operation {values.short(op)}, which badnet-jax does not know "
                      f"(known: {', '.join(OPS)})")
    inputs = n["inputs"]
    if not isinstance(inputs, list):
        raise Refused(f"{where} has inputs {values.short(inputs)}, expected a list of node names")
    inputs = tuple(values.name(s, f"{where}'s input") for s in inputs)
    want = "none" if op == "input" else "two" if op == "subtract" else "at least two" if op in _MERGES else "one"
    count_ok = (len(inputs) == 0 if op == "input" else len(inputs) == 2 if op == "subtract"
                else len(inputs) >= 2 if op in _MERGES else len(inputs) == 1)
    if not count_ok:
        raise Refused(f"{where} ({op}) reads {len(inputs)} node(s), expected {want}")
    weights = n["weights"]
    if op in _WEIGHTED:
        weights = values.name(weights, f"{where}'s weights")
    elif weights is not None:
        raise Refused(f"{where} ({op}) names weights {values.short(weights)}; the operation {op!r} has none (null)")
    attrs = n["attrs"]
    defaults = OPS[op][0]
    if not isinstance(attrs, dict) or not set(defaults) - set(values.OPTIONAL_ATTRS) <= set(attrs) <= set(defaults):
        got = sorted(attrs) if isinstance(attrs, dict) else values.short(attrs)
        raise Refused(f"{where} ({op}) has attributes {got}, expected {sorted(defaults)}")
    checked = {k: values.ATTRS[k](v, f"{where}'s {k}") for k, v in attrs.items()}
    try:
        return Node.make(name, op, inputs, weights, **checked)
    except BadNetError as err:
        raise Refused(str(err)) from None


# ------------------------------------------------------------------------------------ the params against it


def check_params(model: GraphCNN, params: Any, source: str) -> None:
    """Refuse params that are not exactly ``model``'s (as :func:`model_from_json` checks the params saved with a
    graph): a second set saved beside the first, such as a GoodNet's B'.

    Raises:
        CheckpointError: naming ``source`` and what does not fit.
    """
    try:
        _check_params(model.graph, params)
        model.check_params(params)
        _check_shapes(model, params)
    except (ConfigError, Refused) as err:
        raise CheckpointError(f"{source}: {err}") from None


def _check_params(graph: Graph, params: Any) -> None:
    """Every weighted node's own params entry with its op's arrays, finite floats of the op's ranks; no other
    entries (shapes are checked once the graph gives every input's shape, :func:`_check_shapes`)."""
    if not isinstance(params, Mapping):
        raise Refused(f"the params are {type(params).__name__}, expected a dict of layers")
    owners: dict[str, str] = {}
    for node in graph.nodes:
        if node.weights is None:
            continue
        if node.weights in owners:
            raise Refused(f"nodes {owners[node.weights]!r} and {node.name!r} share the weights {node.weights!r}; "
                          "every weighted node has its own")
        owners[node.weights] = node.name
        entry = params.get(node.weights)
        required, optional = OPS[node.op][1], OPS[node.op][2]
        if not isinstance(entry, Mapping) or not set(required) <= set(entry) <= set(required) | set(optional):
            have = sorted(entry) if isinstance(entry, Mapping) else "nothing"
            raise Refused(f"node {node.name!r} ({node.op}) reads weights {node.weights!r}, which hold {have}; expected "
                          f"{list(required)}" + (f" and optionally {list(optional)}" if optional else ""))
        for key, value in entry.items():
            a = np.asarray(value)
            if not np.issubdtype(a.dtype, np.floating):
                raise Refused(f"weights {node.weights!r} {key} are of dtype {a.dtype}, expected floats")
            rank = {"conv": 4, "depthwise_conv": 4, "separable_conv": 4, "dense": 2}.get(node.op, 1) \
                if key in ("kernel", "pointwise_kernel") else 1
            if a.ndim != rank or 0 in a.shape:
                raise Refused(f"weights {node.weights!r} {key} have shape {a.shape}, expected {rank} non-empty axes")
            if not np.isfinite(a).all():
                raise Refused(f"weights {node.weights!r} {key} hold NaN or infinite values")
    extra = sorted(set(params) - set(owners))
    if extra:
        raise Refused(f"the params hold layers no node reads: {', '.join(map(repr, extra[:5]))}"
                      + (" ..." if len(extra) > 5 else ""))


def _check_shapes(model: GraphCNN, params: Params) -> None:
    """Each node's inputs of the ranks and shapes its op takes and its weights of the shapes they imply (the
    graph's shape inference broadcasts what it can; a checkpoint must not lean on that)."""
    shapes = dict(model.shapes)
    for node in model.graph.nodes[1:]:
        ins = [shapes[s] for s in node.inputs]
        out = shapes[node.name]
        if min(out, default=1) < 1 or math.prod(out) > MAX_ELEMENTS:
            raise Refused(f"node {node.name!r} outputs a tensor of shape {out} per image (at least 1 and at most "
                          f"{MAX_ELEMENTS} elements)")
        if node.op in _IMAGE_OPS and len(ins[0]) != 3:
            raise Refused(f"node {node.name!r} ({node.op}) reads a tensor of shape {ins[0]}, expected (height, width, "
                          "channels)")
        if node.op == "dense" and len(ins[0]) != 1:
            raise Refused(f"node {node.name!r} (dense) reads a tensor of shape {ins[0]}, expected a vector")
        if node.op in _SAME_SHAPE_MERGES and len(set(ins)) != 1:
            raise Refused(f"node {node.name!r} ({node.op}) merges tensors of shapes {ins}; only equal shapes merge")
        if node.op == "concat" and (len({len(s) for s in ins}) != 1 or len({s[:-1] for s in ins}) != 1):
            raise Refused(f"node {node.name!r} concatenates tensors of shapes {ins}; all but the last axis must agree")
        if node.op == "multiply" and (len({len(s) for s in ins}) != 1
                                      or any(d not in (1, o) for s in ins for d, o in zip(s, out))):
            raise Refused(f"node {node.name!r} multiplies tensors of shapes {ins}; one rank, each axis equal or 1")
        if node.weights is None:
            continue
        p = {k: tuple(np.shape(v)) for k, v in params[node.weights].items()}
        c = ins[0][-1]
        kernel = p.get("kernel")
        if node.op == "conv":
            want = {"kernel": (*kernel[:2], c, out[-1]), "bias": (out[-1],)}
        elif node.op == "depthwise_conv":
            want = {"kernel": (*kernel[:2], c, out[-1] // c), "bias": (out[-1],)}
        elif node.op == "separable_conv":
            want = {"kernel": (*kernel[:2], c, kernel[3]), "pointwise_kernel": (1, 1, c * kernel[3], out[-1]),
                    "bias": (out[-1],)}
        elif node.op == "dense":
            want = {"kernel": (c, out[-1]), "bias": (out[-1],)}
        else:  # batch_norm: one entry per channel
            want = {k: (c,) for k in p}
        for key, shape in p.items():
            if shape != want[key]:
                raise Refused(f"weights {node.weights!r} {key} have shape {shape}, but node {node.name!r} "
                              f"({node.op}) on its input of shape {ins[0]} needs {want[key]}")
        if node.op == "batch_norm":
            variance = np.asarray(params[node.weights]["moving_variance"], np.float64)
            if not (variance + node.attr("epsilon") > 0).all():
                raise Refused(f"weights {node.weights!r} moving_variance + epsilon is not positive everywhere")
        if node.op == "normalize" and not (np.asarray(params[node.weights]["moving_variance"]) >= 0).all():
            raise Refused(f"weights {node.weights!r} moving_variance is negative somewhere")
