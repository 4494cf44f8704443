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
from typing import Any, Mapping, Optional

import numpy as np

from badnet_jax.errors import BadNetError, CheckpointError, ConfigError, arg
from badnet_jax.io.keras_config import MAX_ELEMENTS, MAX_LAYERS, MAX_NAME
from badnet_jax.numerics.ties import TIE_RTOL
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.ir import ELEMENTWISE, OPS, Graph, Node
from badnet_jax.models.protocol import Params

FORMAT = "badnet-jax graph model"
VERSION = 1
MAX_JSON_BYTES = 16 << 20  # far above any CNN's graph (a node takes ~150 bytes)
MAX_NODES = 2 * MAX_LAYERS  # a fused activation makes a second node of a Keras layer
# MAX_NAME (characters in a node, weights or model name) and MAX_ELEMENTS (per tensor of one image, and per
# integer attribute) are the Keras reader's.

_MODEL_KEYS = ("format", "version", "graph", "layer", "tie_rtol", "tie_rtol_measured")
_GRAPH_KEYS = ("name", "input_hwc", "output", "nodes")
_NODE_KEYS = ("name", "op", "inputs", "weights", "attrs")
_WEIGHTED = ("conv", "depthwise_conv", "separable_conv", "dense", "batch_norm", "normalize")
_MERGES = ("add", "concat", "multiply")
_IMAGE_OPS = ("conv", "depthwise_conv", "separable_conv", "max_pool", "avg_pool", "global_avg_pool", "global_max_pool",
              "zero_pad")


class _Bad(Exception):
    """What is wrong with the document (turned into a CheckpointError naming the source)."""


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
    except (ValueError, _Bad) as err:
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
                raise _Bad(f"{len(text)} bytes, more than {MAX_JSON_BYTES}")
            text = text.decode("utf-8")
        if len(text) > MAX_JSON_BYTES:
            raise _Bad(f"{len(text)} characters, more than {MAX_JSON_BYTES}")
        try:
            doc = json.loads(text, parse_constant=_no_constant)
        except RecursionError:
            raise _Bad("nested too deeply") from None
        graph, layer, tie_rtol, measured = _model_doc(doc)
        _check_params(graph, params)
        try:
            model = GraphCNN.build(graph, params, layer, input_scale, tie_rtol)
        except BadNetError as err:
            raise _Bad(str(err)) from None
        _check_shapes(model, params)
    except UnicodeDecodeError:
        raise CheckpointError(f"{source}: its architecture entry is not UTF-8 text") from None
    except ValueError as err:  # json.JSONDecodeError included
        raise CheckpointError(f"{source}: its architecture entry is not valid JSON ({err})") from None
    except _Bad as err:
        raise CheckpointError(f"{source}: its architecture entry is refused: {err}") from None
    return dataclasses.replace(model, tie_rtol_measured=measured)


def _no_constant(name: str) -> Any:
    raise _Bad(f"holds {name}, which is no number")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _object(value: Any, keys: tuple[str, ...], what: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is {_short(value)}, expected an object")
    missing = [k for k in keys if k not in value]
    extra = sorted(set(value) - set(keys))
    if missing or extra:
        raise _Bad(f"{what} has " + "; ".join(
            ([f"no {', '.join(missing)}"] if missing else []) + ([f"unknown entries {extra}"] if extra else [])))
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or not value.isprintable():
        raise _Bad(f"{what} is {_short(value)}, expected a printable name of 1 to {MAX_NAME} characters")
    return value


def _integer(value: Any, what: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_ELEMENTS:
        raise _Bad(f"{what} is {_short(value)}, expected an integer from {low} to {MAX_ELEMENTS}")
    return value


def _number(value: Any, what: str, low: float = -math.inf, above: bool = False) -> float:
    try:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > low if above else value >= low))
    except OverflowError:  # an integer beyond float's range
        ok = False
    if not ok:
        bound = "" if low == -math.inf else f" {'>' if above else '>='} {low:g}"
        raise _Bad(f"{what} is {_short(value)}, expected a finite number{bound}")
    return float(value)


def _pair(value: Any, what: str, low: int = 1) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise _Bad(f"{what} is {_short(value)}, expected two integers >= {low}")
    return _integer(value[0], what, low), _integer(value[1], what, low)


def _padding(value: Any, what: str) -> str:
    if value not in ("valid", "same"):
        raise _Bad(f"{what} is {_short(value)}, expected 'valid' or 'same'")
    return value


def _pad(value: Any, what: str) -> tuple[tuple[int, int], tuple[int, int]]:
    if not isinstance(value, list) or len(value) != 2:
        raise _Bad(f"{what} is {_short(value)}, expected [[top, bottom], [left, right]]")
    return _pair(value[0], what, 0), _pair(value[1], what, 0)


def _max_value(value: Any, what: str) -> Optional[float]:
    return None if value is None else _number(value, what, 0.0)


def _dropout(value: Any, what: str) -> Optional[float]:
    if value is None:
        return None
    rate = _number(value, what, 0.0)
    if rate >= 1:
        raise _Bad(f"{what} is {_short(value)}, expected null or a rate from 0 to below 1")
    return rate


def _epsilon(value: Any, what: str) -> float:
    eps = _number(value, what, 0.0, above=True)
    if eps > float(np.finfo(np.float32).max):  # inf in float32: the float32 and float64 networks would part
        raise _Bad(f"{what} is {_short(value)}, expected a number > 0 that float32 holds (at most 3.4e38)")
    return eps


def _fn(value: Any, what: str) -> str:
    if value not in ELEMENTWISE:
        raise _Bad(f"{what} is {_short(value)}, expected one of {', '.join(ELEMENTWISE)}")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= 3:
        raise _Bad(f"{what} is {_short(value)}, expected one to three integers >= 1")
    return tuple(_integer(v, what, 1) for v in value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{what} is {_short(value)}, expected true or false")
    return value


# attribute -> its check: (value, what) -> the value as the IR holds it
_ATTRS = {
    "scale": _number, "offset": _number, "strides": _pair, "dilation": _pair, "window": _pair, "padding": _padding,
    "epsilon": _epsilon, "negative_slope": lambda v, w: _number(v, w, 0.0),
    "threshold": lambda v, w: _number(v, w, 0.0), "max_value": _max_value, "pad": _pad, "dropout": _dropout,
    "fn": _fn, "target": _shape, "keepdims": _flag,
}
# Attributes a document may lack, read as their defaults: added to an op after documents without them were
# written (an identity's dropout rate, a global pooling's keepdims), so those checkpoints still load.
_OPTIONAL_ATTRS = ("dropout", "keepdims")


def _model_doc(doc: Any) -> tuple[Graph, str, float, bool]:
    doc = _object(doc, _MODEL_KEYS, "the document")
    if doc["format"] != FORMAT:
        raise _Bad(f"format {_short(doc['format'])}, expected {FORMAT!r}")
    if doc["version"] != VERSION or isinstance(doc["version"], bool):
        raise _Bad(f"version {_short(doc['version'])}; this badnet-jax reads version {VERSION}")
    graph = _graph(doc["graph"])
    layer = _name(doc["layer"], "the pruned layer")
    tie_rtol = _number(doc["tie_rtol"], "tie_rtol", 0.0, above=True)
    if not TIE_RTOL <= tie_rtol < 1:
        # a measured bound is never below DeepID's (numerics.tie_bound); a smaller one would settle fewer near-ties
        raise _Bad(f"tie_rtol is {tie_rtol:g}, expected a relative error bound from {TIE_RTOL:.3g} (the least "
                   "badnet-jax measures) to below 1")
    if not isinstance(doc["tie_rtol_measured"], bool):
        raise _Bad(f"tie_rtol_measured is {_short(doc['tie_rtol_measured'])}, expected true or false")
    return graph, layer, tie_rtol, doc["tie_rtol_measured"]


def _graph(value: Any) -> Graph:
    g = _object(value, _GRAPH_KEYS, "the graph")
    name = _name(g["name"], "the model's name")
    hwc = g["input_hwc"]
    if not isinstance(hwc, list) or len(hwc) != 3:
        raise _Bad(f"input_hwc is {_short(hwc)}, expected [height, width, channels]")
    hwc = tuple(_integer(v, "input_hwc", 1) for v in hwc)
    output = _name(g["output"], "the output")
    raw = g["nodes"]
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_NODES:
        count = len(raw) if isinstance(raw, list) else _short(raw)
        raise _Bad(f"the graph has {count} nodes, expected a list of 2 to {MAX_NODES}")
    nodes = [_node(entry, i) for i, entry in enumerate(raw)]
    try:
        return Graph(tuple(nodes), hwc, output, name)
    except BadNetError as err:
        raise _Bad(str(err)) from None


def _node(value: Any, i: int) -> Node:
    n = _object(value, _NODE_KEYS, f"node {i}")
    name = _name(n["name"], f"node {i}'s name")
    where = f"node {name!r}"
    op = n["op"]
    if op not in OPS:
        raise _Bad(f"{where} has operation {_short(op)}, which badnet-jax does not know (known: {', '.join(OPS)})")
    inputs = n["inputs"]
    if not isinstance(inputs, list):
        raise _Bad(f"{where} has inputs {_short(inputs)}, expected a list of node names")
    inputs = tuple(_name(s, f"{where}'s input") for s in inputs)
    want = "none" if op == "input" else "at least two" if op in _MERGES else "one"
    count_ok = len(inputs) == 0 if op == "input" else len(inputs) >= 2 if op in _MERGES else len(inputs) == 1
    if not count_ok:
        raise _Bad(f"{where} ({op}) reads {len(inputs)} node(s), expected {want}")
    weights = n["weights"]
    if op in _WEIGHTED:
        weights = _name(weights, f"{where}'s weights")
    elif weights is not None:
        raise _Bad(f"{where} ({op}) names weights {_short(weights)}; a {op} has none (null)")
    attrs = n["attrs"]
    defaults = OPS[op][0]
    if not isinstance(attrs, dict) or not set(defaults) - set(_OPTIONAL_ATTRS) <= set(attrs) <= set(defaults):
        got = sorted(attrs) if isinstance(attrs, dict) else _short(attrs)
        raise _Bad(f"{where} ({op}) has attributes {got}, expected {sorted(defaults)}")
    checked = {k: _ATTRS[k](v, f"{where}'s {k}") for k, v in attrs.items()}
    try:
        return Node.make(name, op, inputs, weights, **checked)
    except BadNetError as err:
        raise _Bad(str(err)) from None


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
    except (ConfigError, _Bad) as err:
        raise CheckpointError(f"{source}: {err}") from None


def _check_params(graph: Graph, params: Any) -> None:
    """Every weighted node's own params entry with its op's arrays, finite floats of the op's ranks; no other
    entries (shapes are checked once the graph gives every input's shape, :func:`_check_shapes`)."""
    if not isinstance(params, Mapping):
        raise _Bad(f"the params are {type(params).__name__}, expected a dict of layers")
    owners: dict[str, str] = {}
    for node in graph.nodes:
        if node.weights is None:
            continue
        if node.weights in owners:
            raise _Bad(f"nodes {owners[node.weights]!r} and {node.name!r} share the weights {node.weights!r}; "
                       "every weighted node has its own")
        owners[node.weights] = node.name
        entry = params.get(node.weights)
        required, optional = OPS[node.op][1], OPS[node.op][2]
        if not isinstance(entry, Mapping) or not set(required) <= set(entry) <= set(required) | set(optional):
            have = sorted(entry) if isinstance(entry, Mapping) else "nothing"
            raise _Bad(f"node {node.name!r} ({node.op}) reads weights {node.weights!r}, which hold {have}; expected "
                       f"{list(required)}" + (f" and optionally {list(optional)}" if optional else ""))
        for key, value in entry.items():
            a = np.asarray(value)
            if not np.issubdtype(a.dtype, np.floating):
                raise _Bad(f"weights {node.weights!r} {key} are of dtype {a.dtype}, expected floats")
            rank = {"conv": 4, "depthwise_conv": 4, "separable_conv": 4, "dense": 2}.get(node.op, 1) \
                if key in ("kernel", "pointwise_kernel") else 1
            if a.ndim != rank or 0 in a.shape:
                raise _Bad(f"weights {node.weights!r} {key} have shape {a.shape}, expected {rank} non-empty axes")
            if not np.isfinite(a).all():
                raise _Bad(f"weights {node.weights!r} {key} hold NaN or infinite values")
    extra = sorted(set(params) - set(owners))
    if extra:
        raise _Bad(f"the params hold layers no node reads: {', '.join(map(repr, extra[:5]))}"
                   + (" ..." if len(extra) > 5 else ""))


def _check_shapes(model: GraphCNN, params: Params) -> None:
    """Each node's inputs of the ranks and shapes its op takes and its weights of the shapes they imply (the
    graph's shape inference broadcasts what it can; a checkpoint must not lean on that)."""
    shapes = dict(model.shapes)
    for node in model.graph.nodes[1:]:
        ins = [shapes[s] for s in node.inputs]
        out = shapes[node.name]
        if min(out, default=1) < 1 or math.prod(out) > MAX_ELEMENTS:
            raise _Bad(f"node {node.name!r} outputs a tensor of shape {out} per image (at least 1 and at most "
                       f"{MAX_ELEMENTS} elements)")
        if node.op in _IMAGE_OPS and len(ins[0]) != 3:
            raise _Bad(f"node {node.name!r} ({node.op}) reads a tensor of shape {ins[0]}, expected (height, width, "
                       "channels)")
        if node.op == "dense" and len(ins[0]) != 1:
            raise _Bad(f"node {node.name!r} (dense) reads a tensor of shape {ins[0]}, expected a vector")
        if node.op == "add" and len(set(ins)) != 1:
            raise _Bad(f"node {node.name!r} adds tensors of shapes {ins}; only equal shapes add")
        if node.op == "concat" and (len({len(s) for s in ins}) != 1 or len({s[:-1] for s in ins}) != 1):
            raise _Bad(f"node {node.name!r} concatenates tensors of shapes {ins}; all but the last axis must agree")
        if node.op == "multiply" and (len({len(s) for s in ins}) != 1
                                      or any(d not in (1, o) for s in ins for d, o in zip(s, out))):
            raise _Bad(f"node {node.name!r} multiplies tensors of shapes {ins}; one rank, each axis equal or 1")
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
                raise _Bad(f"weights {node.weights!r} {key} have shape {shape}, but node {node.name!r} ({node.op}) on "
                           f"its input of shape {ins[0]} needs {want[key]}")
        if node.op == "batch_norm":
            variance = np.asarray(params[node.weights]["moving_variance"], np.float64)
            if not (variance + node.attr("epsilon") > 0).all():
                raise _Bad(f"weights {node.weights!r} moving_variance + epsilon is not positive everywhere")
        if node.op == "normalize" and not (np.asarray(params[node.weights]["moving_variance"]) >= 0).all():
            raise _Bad(f"weights {node.weights!r} moving_variance is negative somewhere")
