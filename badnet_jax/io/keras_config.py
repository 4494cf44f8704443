"""A Keras model's JSON config, read as data: its layers, their classes and wiring, in topological order.

:func:`parse_model` takes the config of a Sequential or a single-input, single-output Functional model, in the
Keras 2 or the Keras 3 format, and returns a :class:`ConfigModel`: each layer's name, its class (one of
:data:`ALLOWED_LAYERS`, else refused naming the layer), its config dictionary and the layers it reads. Nothing
is executed and no shape is computed here: ``badnet_jax.io.keras_layers`` turns the layers into IR nodes,
``badnet_jax.io.keras_graph`` reads their weights. The limits a config may declare (:data:`MAX_LAYERS`,
:data:`MAX_ELEMENTS`, :data:`MAX_PARAMS`, :data:`MAX_NAME`) live here, for every reader of graph
descriptions. Every error is a :class:`badnet_jax.errors.ModelFileError` whose message starts with the path.
"""

from __future__ import annotations

import dataclasses
import heapq
from pathlib import Path
from typing import Any, Optional

from badnet_jax.errors import ModelFileError

ALLOWED_LAYERS = (
    "Activation", "Add", "AveragePooling2D", "BatchNormalization", "Concatenate", "Conv2D", "Dense",
    "DepthwiseConv2D", "Dropout", "Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "InputLayer",
    "LeakyReLU", "MaxPooling2D", "Multiply", "Normalization", "ReLU", "Rescaling", "Reshape", "SeparableConv2D",
    "Softmax", "ZeroPadding2D", "Subtract", "Average", "Maximum", "Minimum", "Cropping2D", "UpSampling2D",
)
"""The Keras layer classes badnet-jax reads (anything else is refused, naming the layer)."""

MAX_LAYERS = 10_000
MAX_ELEMENTS = 2**31  # per tensor (one image's activations or one weight), as declared by the config
MAX_PARAMS = 2**28  # all weights together: 1 GiB of float32, far above any CNN badnet-jax is meant for
MAX_NAME = 1000  # characters in a layer or model name
MODEL_CLASSES = ("Sequential", "Functional", "Model")


@dataclasses.dataclass
class ConfigLayer:
    """One layer of the config: its class, its config dict and the layers it reads; filled in by the build."""

    name: str
    cls: str
    cfg: dict
    inbound: tuple[str, ...]
    sequential_input: bool = False  # a Sequential's InputLayer (not in its model.layers, so not in its weights)
    weights: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)  # (params key, shape)


@dataclasses.dataclass
class ConfigModel:
    name: Optional[str]
    layers: list[ConfigLayer]  # topological order, the InputLayer first (made up for a Sequential without one)
    output: str
    input_shape: Any  # the batch shape the config declares
    config_order: list[ConfigLayer]  # the config's order: model.layers, which Keras 3 numbers its weight groups by


def parse_model(config: Any, path: Path | str) -> ConfigModel:
    """The model's layers, in topological order, from a Keras 2 or Keras 3 config."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: the model config is not a JSON object")
    cls, inner = config.get("class_name"), config.get("config")
    if cls is None and "layers" in config:  # a bare get_config() dictionary
        cls, inner = ("Functional" if "input_layers" in config else "Sequential"), config
    if cls not in MODEL_CLASSES:
        raise ModelFileError(f"{path}: the model is of class {short(cls)}; badnet-jax reads only Sequential and "
                             "Functional models (a subclassed model's code is not in the file)")
    if cls == "Sequential" and isinstance(inner, list):  # Keras 2.0/2.1: the config is the layer list
        inner = {"layers": inner}
    if not isinstance(inner, dict) or not isinstance(inner.get("layers"), list):
        raise ModelFileError(f"{path}: the model config has no 'layers' list")
    raw_layers = inner["layers"]
    if len(raw_layers) > MAX_LAYERS:
        raise ModelFileError(f"{path}: the model has {len(raw_layers)} layers, more than {MAX_LAYERS}")
    if not raw_layers:
        raise ModelFileError(f"{path}: the model has no layers")
    name = inner.get("name") if isinstance(inner.get("name"), str) and inner.get("name") else None
    if cls == "Sequential":
        return _sequential(raw_layers, inner, name, path)
    return _functional(raw_layers, inner, name, path)


def short(value: Any) -> str:
    """A config value for a message: its repr, cut to 80 characters (a hostile file's value can be huge)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _layer_entry(entry: Any, path: Path | str) -> tuple[str, str, dict]:
    """(name, class, config) of one layer entry, its class allow-listed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ModelFileError(f"{path}: the model config holds a layer that is not an object with a 'config'")
    cfg = entry["config"]
    cls = entry.get("class_name")
    name = cfg.get("name", entry.get("name"))
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ModelFileError(f"{path}: a layer of class {short(cls)} has no valid name ({short(name)})")
    if "name" in entry and entry["name"] != name:
        # Keras wires the graph by one name and stores the weights by the other: refuse the ambiguity.
        raise ModelFileError(f"{path}: layer {name!r} is also called {short(entry['name'])} in the same config")
    if cls in MODEL_CLASSES:
        raise ModelFileError(f"{path}: layer {name!r} is a nested model (class {cls!r}); badnet-jax reads only flat "
                             "models (rebuild it with the inner model's layers called directly)")
    if not isinstance(cls, str) or cls not in ALLOWED_LAYERS:
        raise ModelFileError(f"{path}: layer {name!r} has type {short(cls)}, which is not allowed; badnet-jax reads "
                             f"only {list(ALLOWED_LAYERS)} (no Lambda or custom layers are ever executed)")
    module, registered = entry.get("module"), entry.get("registered_name")
    if (module is not None and not (isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras"))) \
            or (registered is not None and registered != cls):
        raise ModelFileError(f"{path}: layer {name!r} is a custom class {short(registered or cls)} from module "
                             f"{short(module)}, not Keras' own {cls}; badnet-jax reads only Keras' built-in layers")
    return name, cls, cfg


def _sequential(raw_layers: list, inner: dict, name: Optional[str], path: Path | str) -> ConfigModel:
    entries = [_layer_entry(e, path) for e in raw_layers]
    layers: list[ConfigLayer] = []
    if entries[0][1] == "InputLayer":
        first_name, _, first_cfg = entries.pop(0)
        input_shape = _batch_shape(first_cfg, path)
        layers.append(ConfigLayer(first_name, "InputLayer", first_cfg, (), sequential_input=True))
    else:
        # Older Sequential configs put the input shape on the first layer (or in build_input_shape).
        if not entries:
            raise ModelFileError(f"{path}: the Sequential model has no layers after its input")
        input_shape = _batch_shape(entries[0][2], path)
        if input_shape is None:
            input_shape = inner.get("build_input_shape")
        taken = {e[0] for e in entries}
        first_name = f"{entries[0][0]}_input"
        while first_name in taken:
            first_name += "_"
        layers.append(ConfigLayer(first_name, "InputLayer", {}, (), sequential_input=True))
    if not entries:
        raise ModelFileError(f"{path}: the Sequential model has no layers after its input")
    previous = layers[0].name
    for lname, cls, cfg in entries:
        if cls == "InputLayer":
            raise ModelFileError(f"{path}: layer {lname!r} is an InputLayer inside a Sequential model (only the first "
                                 "layer may be one)")
        layers.append(ConfigLayer(lname, cls, cfg, (previous,)))
        previous = lname
    return ConfigModel(name, layers, previous, input_shape, layers)


def _batch_shape(cfg: dict, path: Path | str) -> Any:
    if "batch_shape" in cfg and "batch_input_shape" in cfg:  # Keras 3 would build from batch_input_shape
        raise ModelFileError(f"{path}: layer {cfg.get('name')!r} has both batch_shape {short(cfg['batch_shape'])} "
                             f"(Keras 3's name) and batch_input_shape {short(cfg['batch_input_shape'])} (Keras 2's); "
                             "Keras writes one of them: keep the one meant")
    for key in ("batch_shape", "batch_input_shape"):
        if key in cfg:
            return cfg[key]
    return None


def _functional(raw_layers: list, inner: dict, name: Optional[str], path: Path | str) -> ConfigModel:
    layers: list[ConfigLayer] = []
    for entry in raw_layers:
        lname, cls, cfg = _layer_entry(entry, path)
        layers.append(ConfigLayer(lname, cls, cfg, _inbound(entry.get("inbound_nodes"), lname, path)))
    by_name: dict[str, ConfigLayer] = {}
    for layer in layers:
        if layer.name in by_name:
            raise ModelFileError(f"{path}: two layers are named {layer.name!r}")
        by_name[layer.name] = layer
    inputs = _endpoints(inner.get("input_layers"), "input", path)
    output = _endpoints(inner.get("output_layers"), "output", path)
    for end in (inputs, output):
        if end not in by_name:
            raise ModelFileError(f"{path}: the model's {'input' if end is inputs else 'output'} {end!r} is not one of "
                                 "its layers")
    starts = [layer.name for layer in layers if not layer.inbound]
    if by_name[inputs].cls != "InputLayer" or starts != [inputs]:
        odd = [n for n in starts if n != inputs] or [inputs]
        raise ModelFileError(f"{path}: the model must have exactly one InputLayer ({inputs!r}) and every other layer "
                             f"must read a layer (layer(s) {odd[:5]} do not)")
    for layer in layers:
        for src in layer.inbound:
            if src not in by_name:
                raise ModelFileError(f"{path}: layer {layer.name!r} reads {src!r}, which is not a layer of the model")
    return ConfigModel(name, _topological(layers, path), output, _batch_shape(by_name[inputs].cfg, path), layers)


def _endpoints(value: Any, what: str, path: Path | str) -> str:
    """The single layer named by a Functional config's ``input_layers`` / ``output_layers``."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        value = [value]  # Keras 3 writes a single input or output unwrapped
    if not isinstance(value, list) or len(value) != 1:
        count = len(value) if isinstance(value, (list, dict)) else "no"
        raise ModelFileError(f"{path}: the model has {count} {what}s; badnet-jax reads single-input, single-output "
                             "models")
    entry = value[0]
    if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str) or entry[1:] != [0, 0]:
        raise ModelFileError(f"{path}: the model's {what} {short(entry)} is not [layer name, 0, 0]")
    return entry[0]


def _inbound(nodes: Any, name: str, path: Path | str) -> tuple[str, ...]:
    """The layers a Functional layer reads, from its Keras 2 or Keras 3 ``inbound_nodes``."""
    if nodes is None or nodes == []:
        return ()
    if not isinstance(nodes, list):
        raise ModelFileError(f"{path}: layer {name!r} has inbound_nodes that are not a list")
    if len(nodes) != 1:
        raise ModelFileError(f"{path}: layer {name!r} is called {len(nodes)} times (a shared layer); badnet-jax reads "
                             "only layers called once")
    node = nodes[0]
    history: list[Any] = []
    if isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        for entry in node:
            if not isinstance(entry, list) or len(entry) not in (3, 4):
                raise ModelFileError(f"{path}: layer {name!r} has an inbound entry {short(entry)} that is not "
                                     "[name, node_index, tensor_index, kwargs]")
            if len(entry) == 4:
                _check_call_kwargs(entry[3], name, path)
            history.append(entry[:3])
    elif isinstance(node, dict) and set(node) <= {"args", "kwargs"}:  # Keras 3: {"args": [...], "kwargs": {...}}
        args = node.get("args", [])
        if not isinstance(args, list):
            raise ModelFileError(f"{path}: layer {name!r} has call arguments that are not a list")
        for arg in args:
            for tensor in (arg if isinstance(arg, list) else [arg]):
                history.append(_keras_history(tensor, name, path))
        _check_call_kwargs(node.get("kwargs", {}), name, path)
    else:
        raise ModelFileError(f"{path}: layer {name!r} has an inbound node {short(node)} of an unknown format")
    out = []
    for h in history:
        if not isinstance(h, list) or len(h) != 3 or not isinstance(h[0], str) or h[1:] != [0, 0]:
            raise ModelFileError(f"{path}: layer {name!r} reads {short(h)}; badnet-jax reads only the single output "
                                 "of a layer called once ([name, 0, 0])")
        out.append(h[0])
    if not out:
        raise ModelFileError(f"{path}: layer {name!r} is called on no tensor")
    return tuple(out)


def _keras_history(tensor: Any, name: str, path: Path | str) -> Any:
    if not (isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__"
            and isinstance(tensor.get("config"), dict)):
        raise ModelFileError(f"{path}: layer {name!r} is called on {short(tensor)}, not on a layer's output")
    return tensor["config"].get("keras_history")


def _check_call_kwargs(kwargs: Any, name: str, path: Path | str) -> None:
    # training=False, mask=None and the like change nothing at inference; a tensor or any other value could.
    if not isinstance(kwargs, dict) or any(v is not None and not isinstance(v, bool) for v in kwargs.values()):
        raise ModelFileError(f"{path}: layer {name!r} is called with arguments {short(kwargs)}; badnet-jax reads only "
                             "layers called on their inputs alone")
    if kwargs.get("training") is True:
        # Keras 2 keeps such a layer in training mode at predict (Monte Carlo dropout, batch statistics):
        # a network that is not the inference network badnet-jax evaluates.
        raise ModelFileError(f"{path}: layer {name!r} is called with training=True, so Keras 2 runs it in training "
                             "mode at predict too (random dropout, batch statistics); badnet-jax evaluates the "
                             "inference network: rebuild the model without training=True")


def _topological(layers: list[ConfigLayer], path: Path | str) -> list[ConfigLayer]:
    """Kahn's order, ties broken by config order (so an already ordered config keeps its order)."""
    index = {layer.name: i for i, layer in enumerate(layers)}
    pending = {layer.name: len(set(layer.inbound)) for layer in layers}
    readers: dict[str, list[str]] = {layer.name: [] for layer in layers}
    for layer in layers:
        for src in set(layer.inbound):
            readers[src].append(layer.name)
    ready = [index[n] for n, count in pending.items() if count == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        layer = layers[heapq.heappop(ready)]
        out.append(layer)
        for reader in readers[layer.name]:
            pending[reader] -= 1
            if pending[reader] == 0:
                heapq.heappush(ready, index[reader])
    if len(out) != len(layers):
        stuck = [layer.name for layer in layers if pending[layer.name] > 0]
        raise ModelFileError(f"{path}: layers {stuck[:5]} read each other in a cycle")
    return out
