"""Any standard-layer Keras CNN as a :class:`badnet_jax.models.ir.Graph` and its params, read as data only.

:func:`read_keras_graph` reads

* Keras 2 full-model h5 files (``model_weights`` group + ``model_config`` JSON attribute; an
  ``optimizer_weights`` group is ignored), and the legacy h5 files Keras 3 still writes (``model.save("m.h5")``);
* Keras 3 ``.keras`` archives (a zip of ``config.json`` and ``model.weights.h5``);
* Keras 3 ``.weights.h5`` files and Keras 2 weights-only h5 files, each together with the model's JSON config
  (``config_path``: what ``model.to_json()`` returns, written to a file). Without a config such a file holds
  weights but no architecture, and is refused.

Sequential and single-input, single-output Functional models are read, in both the Keras 2 and the Keras 3
config formats. Every layer must be of an allow-listed class (:data:`ALLOWED_LAYERS`) with channels-last data;
anything else (Lambda, custom or nested models, shared layers, unknown activations) is refused naming the
layer and its class. Nothing from the file is ever executed: the config is JSON parsed as data, and each
layer becomes :mod:`ir <badnet_jax.models.ir>` nodes whose attributes are numbers and names.

Every tensor's shape is computed from the input shape, so each weight is checked against the shape the
config implies (the message names the layer, the weight and both shapes); weights must be floating point,
finite and of a plausible size (:data:`badnet_jax.io.keras.MAX_WEIGHT`). Hostile files fail fast: the
config is at most 1 MiB and :data:`MAX_LAYERS` layers, a declared tensor over :data:`MAX_ELEMENTS` elements
or a model over :data:`MAX_PARAMS` parameters is refused before any weight is read, and a file that is both
a zip and HDF5 is refused (two readers would see two networks). Every error is a
:class:`badnet_jax.errors.ModelFileError` whose message starts with the file's path.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import numpy as np

from badnet_jax.errors import ModelFileError, arg
from badnet_jax.io import fileio
from badnet_jax.io.keras import _ARCHIVE_MEMBERS, _MAX_CONFIG_BYTES, _is_keras_archive, _read_array
from badnet_jax.models.ir import Graph, Node

GraphParams = dict[str, dict[str, np.ndarray]]

ALLOWED_LAYERS = (
    "Activation", "Add", "AveragePooling2D", "BatchNormalization", "Concatenate", "Conv2D", "Dense",
    "DepthwiseConv2D", "Dropout", "Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "InputLayer",
    "LeakyReLU", "MaxPooling2D", "ReLU", "Rescaling", "Softmax", "ZeroPadding2D",
)
"""The Keras layer classes badnet-jax reads (anything else is refused, naming the layer)."""

ACTIVATIONS = ("linear", "relu", "softmax", "leaky_relu")
"""Activation names allowed in an ``Activation`` layer or fused into Conv2D / DepthwiseConv2D / Dense."""

MAX_LAYERS = 10_000
MAX_ELEMENTS = 2**31  # per tensor (one image's activations or one weight), as declared by the config
MAX_PARAMS = 2**28  # all weights together: 1 GiB of float32, far above any CNN badnet-jax is meant for
MAX_NAME = 1000  # characters in a layer or model name
_MAX_WEIGHTS_PER_LAYER = 8  # datasets in a layer's group (4 at most in any allowed layer)
_MODEL_CLASSES = ("Sequential", "Functional", "Model")
_LEAKY_RELU_ACTIVATION_SLOPE = 0.2  # keras.activations.leaky_relu's default (Keras 3 names it; Keras 2 does not)
_CHANNELS_LAST = "channels_last"
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def read_keras_graph(path: str | os.PathLike, config_path: str | os.PathLike | None = None
                     ) -> tuple[Graph, GraphParams]:
    """Read a Keras CNN file as an IR graph and its params, without executing anything from the file.

    Args:
        path: a Keras 2 full-model h5 (or Keras 3 legacy ``.h5``), a Keras 3 ``.keras`` archive, or a weights-only
            file (Keras 3 ``.weights.h5``, Keras 2 weights h5) together with ``config_path``.
        config_path: the model's JSON config (``model.to_json()`` written to a file; a bare ``get_config()``
            dictionary is taken too), for a weights-only ``path`` only: a full model file carries its own.

    Returns:
        ``(graph, params)``: ``params[layer]`` holds float32 numpy arrays, ``{"kernel", "bias"?}`` for Conv2D,
        DepthwiseConv2D (its ``depthwise_kernel``, (kh, kw, cin, multiplier)) and Dense, and
        ``{"gamma"?, "beta"?, "moving_mean", "moving_variance"}`` for BatchNormalization.

    Raises:
        ModelFileError: the file (or config) is missing, unreadable, truncated, of an unknown layout, holds a
            layer or setting badnet-jax does not read, or weights of the wrong shape, dtype or values. The
            message starts with the path of the file at fault.

    Example::

        graph, params = read_keras_graph("resnet_tiny.h5")
        graph, params = read_keras_graph("model.weights.h5", config_path="model.json")
    """
    path = Path(path)
    if _is_keras_archive(path):
        _no_second_config(path, config_path)
        config_raw, weights = _read_archive(path)
        config = _load_json(config_raw, path, "the archive's config.json")
        try:
            f = h5py.File(io.BytesIO(weights), "r")
        except _H5_ERRORS as err:
            raise ModelFileError(f"{path}: the archive's model.weights.h5 is not readable HDF5 ({err})") from None
        with f:
            return _read(path, config, f, _keras3_source)
    with fileio.open_h5(path, ModelFileError) as f:
        try:
            if fileio.has_link(f, "model_weights"):
                _no_second_config(path, config_path)
                if "model_config" not in f.attrs:
                    raise ModelFileError(f"{path}: has a 'model_weights' group but no 'model_config' attribute")
                config = _load_json(f.attrs["model_config"], path, "attribute 'model_config'")
                root = fileio.safe_get(f, "model_weights", path, ModelFileError)
                if not isinstance(root, h5py.Group):
                    raise ModelFileError(f"{path}: 'model_weights' is not a group")
                return _read(path, config, root, _keras2_source)
            # A config problem names both files: the weights file read, and the config that describes it.
            if "layer_names" in f.attrs:
                config = _weights_only_config(path, config_path, "a Keras 2 weights-only file")
                return _read(path, config, f, _keras2_source, f"{path} (config {config_path})")
            if isinstance(fileio.safe_get(f, "layers", path, ModelFileError), h5py.Group):
                config = _weights_only_config(path, config_path, "a Keras 3 weights file")
                return _read(path, config, f, _keras3_source, f"{path} (config {config_path})")
        except ModelFileError:
            raise
        except _H5_ERRORS as err:
            raise ModelFileError(f"{path}: cannot read the file: {err} (truncated or corrupted?)") from None
    raise ModelFileError(f"{path}: not a Keras model or weights file (no 'model_weights' group, no 'layer_names' "
                         "attribute, no Keras 3 'layers' group)")


# ---------------------------------------------------------------------------------------------------- sources


def _no_second_config(path: Path, config_path: Any) -> None:
    if config_path is not None:
        raise ModelFileError(f"{path}: is a full model file with its own config; {arg('config_path', config_path)} is "
                             "only for weights-only files (two configs could describe two different networks)")


def _weights_only_config(path: Path, config_path: Any, kind: str) -> Any:
    """The JSON config a weights-only file needs, read from ``config_path``."""
    if config_path is None:
        raise ModelFileError(f"{path}: is {kind}: it holds weights but no architecture, so it cannot describe a "
                             "graph; give a full model file (model.save(...) as .keras or .h5) or the model's JSON "
                             f"config as {arg('config_path')} (model.to_json() written to a file)")
    cpath = fileio.require_file(config_path, ModelFileError, "config file")
    try:
        with open(cpath, "rb") as fh:
            raw = fh.read(_MAX_CONFIG_BYTES + 1)  # never more than the cap, whatever the file's size
    except OSError as err:
        raise ModelFileError(f"{cpath}: cannot read the config file ({err})") from None
    return _load_json(raw, cpath, "the config file")


def _read_archive(path: Path) -> tuple[bytes, bytes]:
    """``config.json`` and ``model.weights.h5`` of a ``.keras`` zip, each member's declared size checked first."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                # zip readers disagree on which copy of a duplicated member counts: refuse the ambiguity.
                raise ModelFileError(f"{path}: the .keras archive holds {twice} more than once")
            by_name = {i.filename: i for i in infos}
            for name in ("config.json", "model.weights.h5"):
                if name not in by_name:
                    raise ModelFileError(f"{path}: a .keras archive without {name!r} (it holds {sorted(by_name)[:10]})")
                if by_name[name].file_size > _ARCHIVE_MEMBERS[name]:
                    raise ModelFileError(f"{path}: archive member {name!r} declares {by_name[name].file_size} bytes, "
                                         f"more than {_ARCHIVE_MEMBERS[name]} (a decompression bomb?)")
            return z.read("config.json"), z.read("model.weights.h5")
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError, EOFError) as err:
        raise ModelFileError(f"{path}: cannot read the .keras archive: {err} (truncated or corrupted?)") from None


def _load_json(raw: Any, path: Path, what: str) -> Any:
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, bytes):
        if len(raw) > _MAX_CONFIG_BYTES:
            raise ModelFileError(f"{path}: {what} is over 1 MiB (a model config is far smaller)")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ModelFileError(f"{path}: {what} is not UTF-8 text ({err})") from None
    if not isinstance(raw, str) or len(raw) > _MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path}: {what} is not a JSON string of at most 1 MiB")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: {what} is not valid JSON ({str(err)[:200]})") from None


# Where each weighted layer's datasets are, in Keras' own order: source(file, layers, path) -> getter(layer).
_Getter = Callable[["_Layer"], list]


def _keras2_source(root: h5py.Group, layers: list["_Layer"], path: Path) -> _Getter:
    """Keras 2 layout (and Keras 3 legacy h5): group ``root/<layer>``, its datasets listed in ``weight_names``.

    Keras loads a layer's weights in the order of its ``weight_names`` attribute. Keras 2.3 writes it as
    fixed-length strings, read as they are. Later writers (tf_keras, Keras 3) write variable-length strings,
    which live in HDF5's global heap, where one damaged byte can crash the HDF5 library itself: for those, the
    layer group's datasets are found by their link names instead (the same datasets, ``kernel``, ``bias``...)
    and put in Keras' order, so that the config (unavoidably a global-heap string) is the file's only one read.
    """

    def get(layer: _Layer) -> list:
        g = fileio.safe_get(root, layer.name, path, ModelFileError)
        if not isinstance(g, h5py.Group):
            raise ModelFileError(f"{path}: no weights for layer {layer.name!r} (no group of that name; the file has "
                                 f"{sorted(root.keys())[:20]})")
        listed = g.attrs.get_id("weight_names") if "weight_names" in g.attrs else None
        if listed is not None and listed.dtype.kind == "S":
            if listed.shape is None or math.prod(listed.shape) > _MAX_WEIGHTS_PER_LAYER:
                raise ModelFileError(f"{path}: layer {layer.name!r} lists more than {_MAX_WEIGHTS_PER_LAYER} weights")
            names = [n.decode("utf-8", "replace") for n in np.atleast_1d(g.attrs["weight_names"])]
            out = []
            for i, n in enumerate(names):
                _check_weight_name(path, layer, i, n)
                obj = fileio.safe_get(g, n, path, ModelFileError)
                if not isinstance(obj, h5py.Dataset):
                    raise ModelFileError(f"{path}: layer {layer.name!r}: weight {n!r} is missing")
                out.append(obj)
            return out
        return _by_link_name(g, layer, path)

    return get


def _by_link_name(g: h5py.Group, layer: "_Layer", path: Path) -> list:
    """The datasets under ``g`` (nested up to a few groups deep), in Keras' order by their names."""
    found: dict[str, tuple[str, h5py.Dataset]] = {}

    def walk(group: h5py.Group, prefix: str, depth: int) -> None:
        keys = list(group.keys())
        if len(keys) > _MAX_WEIGHTS_PER_LAYER:
            raise ModelFileError(f"{path}: layer {layer.name!r} holds more than {_MAX_WEIGHTS_PER_LAYER} entries")
        for key in keys:
            obj = fileio.safe_get(group, key, path, ModelFileError)
            if isinstance(obj, h5py.Group) and depth < 4:  # Keras nests <layer>/<layer>/, a Sequential one level more
                walk(obj, f"{prefix}{key}/", depth + 1)
            elif isinstance(obj, h5py.Dataset):
                base = re.sub(r":\d+$", "", key)
                if base not in _WEIGHT_NAMES:
                    raise ModelFileError(f"{path}: layer {layer.name!r} holds {prefix + key!r}, which is not a "
                                         f"weight of a Keras {layer.cls}")
                if _WEIGHT_NAMES[base] in found:
                    raise ModelFileError(f"{path}: layer {layer.name!r} holds two {_WEIGHT_NAMES[base]}s "
                                         f"({found[_WEIGHT_NAMES[base]][0]!r} and {prefix + key!r})")
                found[_WEIGHT_NAMES[base]] = (prefix + key, obj)

    walk(g, "", 0)
    keys = [key for key, _ in layer.weights]
    if set(found) != set(keys):
        raise ModelFileError(f"{path}: layer {layer.name!r} ({layer.cls}) stores {len(found)} weights "
                             f"({sorted(found)}), expected {len(keys)} ({', '.join(keys)}) for its config")
    return [found[key][1] for key in keys]


# A Keras 2 weight name's last component (":0" dropped) -> the params key it is; the position decides (Keras
# itself loads weights by position), the name only catches a file whose weights are stored out of order.
_WEIGHT_NAMES = {"kernel": "kernel", "depthwise_kernel": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta",
                 "moving_mean": "moving_mean", "moving_variance": "moving_variance"}


def _check_weight_name(path: Path, layer: "_Layer", i: int, name: str) -> None:
    base = re.sub(r":\d+$", "", name.rsplit("/", 1)[-1])
    keys = [key for key, _ in layer.weights]
    if base in _WEIGHT_NAMES and i < len(keys) and _WEIGHT_NAMES[base] != keys[i]:
        raise ModelFileError(f"{path}: layer {layer.name!r} stores {name!r} as its weight {i}, where Keras keeps "
                             f"{keys[i]!r} (weights expected in the order {keys})")


def _keras3_source(f: h5py.File, layers: list["_Layer"], path: Path) -> _Getter:
    """Keras 3 layout: ``layers/<key>/vars/0..n-1``, matched to the config the way Keras itself loads them.

    ``<key>`` is the layer's snake-cased class name, numbered ``_1``, ``_2``... in the order of ``model.layers``
    (the config's order; a Sequential's InputLayer is not one of its ``layers``). Keras also writes each layer's
    name as an attribute of ``vars`` but never reads it back, and neither does badnet-jax: it is a
    variable-length string in HDF5's global heap, where one damaged byte can crash the HDF5 library itself.
    """
    group = fileio.safe_get(f, "layers", path, ModelFileError)
    if not isinstance(group, h5py.Group):
        raise ModelFileError(f"{path}: no Keras 3 'layers' group in the weights file")
    keys: dict[str, str] = {}
    used: dict[str, int] = {}
    for layer in layers:
        if layer.sequential_input:
            continue
        base = _snake_case(layer.cls)
        used[base] = used.get(base, -1) + 1
        keys[layer.name] = base if used[base] == 0 else f"{base}_{used[base]}"

    def get(layer: _Layer) -> list:
        key = keys[layer.name]
        g = fileio.safe_get(group, key, path, ModelFileError)
        if isinstance(g, h5py.Group) and fileio.has_link(g, "layers"):
            raise ModelFileError(f"{path}: layer group {key!r} holds layers of its own (a nested model); badnet-jax "
                                 "reads only flat models")
        vars_ = fileio.safe_get(g, "vars", path, ModelFileError) if isinstance(g, h5py.Group) else None
        if not isinstance(vars_, h5py.Group):
            raise ModelFileError(f"{path}: no weights for layer {layer.name!r} in the Keras 3 weights file (Keras "
                                 f"keeps them in 'layers/{key}/vars', which it does not have)")
        names = list(vars_.keys())
        if len(names) > _MAX_WEIGHTS_PER_LAYER or sorted(names, key=_numeric) != [str(i) for i in range(len(names))]:
            raise ModelFileError(f"{path}: layer {layer.name!r}: its vars are {sorted(names)[:10]}, expected 0..n-1")
        out = []
        for i in range(len(names)):
            obj = fileio.safe_get(vars_, str(i), path, ModelFileError)
            if not isinstance(obj, h5py.Dataset):
                raise ModelFileError(f"{path}: layer {layer.name!r}: var {i} is not a dataset")
            out.append(obj)
        return out

    return get


def _numeric(s: str) -> int:
    return int(s) if s.isdigit() and len(s) < 6 else -1


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# ------------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class _Layer:
    """One layer of the config: its class, its config dict and the layers it reads; filled in by the build."""

    name: str
    cls: str
    cfg: dict
    inbound: tuple[str, ...]
    sequential_input: bool = False  # a Sequential's InputLayer (not in its model.layers, so not in its weights)
    weights: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)  # (params key, shape)


@dataclasses.dataclass
class _Model:
    name: Optional[str]
    layers: list[_Layer]  # topological order, the InputLayer first (made up for a Sequential without one)
    output: str
    input_shape: Any  # the batch shape the config declares
    config_order: list[_Layer]  # the config's order: model.layers, which Keras 3 numbers its weight groups by


def _parse_model(config: Any, path: Path | str) -> _Model:
    """The model's layers, in topological order, from a Keras 2 or Keras 3 config."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: the model config is not a JSON object")
    cls, inner = config.get("class_name"), config.get("config")
    if cls is None and "layers" in config:  # a bare get_config() dictionary
        cls, inner = ("Functional" if "input_layers" in config else "Sequential"), config
    if cls not in _MODEL_CLASSES:
        raise ModelFileError(f"{path}: the model is of class {_short(cls)}; badnet-jax reads only Sequential and "
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


def _short(value: Any) -> str:
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
        raise ModelFileError(f"{path}: a layer of class {_short(cls)} has no valid name ({_short(name)})")
    if "name" in entry and entry["name"] != name:
        # Keras wires the graph by one name and stores the weights by the other: refuse the ambiguity.
        raise ModelFileError(f"{path}: layer {name!r} is also called {_short(entry['name'])} in the same config")
    if cls in _MODEL_CLASSES:
        raise ModelFileError(f"{path}: layer {name!r} is a nested model (class {cls!r}); badnet-jax reads only flat "
                             "models (rebuild it with the inner model's layers called directly)")
    if not isinstance(cls, str) or cls not in ALLOWED_LAYERS:
        raise ModelFileError(f"{path}: layer {name!r} has type {_short(cls)}, which is not allowed; badnet-jax reads "
                             f"only {list(ALLOWED_LAYERS)} (no Lambda or custom layers are ever executed)")
    module, registered = entry.get("module"), entry.get("registered_name")
    if (module is not None and not (isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras"))) \
            or (registered is not None and registered != cls):
        raise ModelFileError(f"{path}: layer {name!r} is a custom class {_short(registered or cls)} from module "
                             f"{_short(module)}, not Keras' own {cls}; badnet-jax reads only Keras' built-in layers")
    return name, cls, cfg


def _sequential(raw_layers: list, inner: dict, name: Optional[str], path: Path | str) -> _Model:
    entries = [_layer_entry(e, path) for e in raw_layers]
    layers: list[_Layer] = []
    if entries[0][1] == "InputLayer":
        first_name, _, first_cfg = entries.pop(0)
        input_shape = _batch_shape(first_cfg)
        layers.append(_Layer(first_name, "InputLayer", first_cfg, (), sequential_input=True))
    else:
        # Older Sequential configs put the input shape on the first layer (or in build_input_shape).
        if not entries:
            raise ModelFileError(f"{path}: the Sequential model has no layers after its input")
        input_shape = _batch_shape(entries[0][2])
        if input_shape is None:
            input_shape = inner.get("build_input_shape")
        taken = {e[0] for e in entries}
        first_name = f"{entries[0][0]}_input"
        while first_name in taken:
            first_name += "_"
        layers.append(_Layer(first_name, "InputLayer", {}, (), sequential_input=True))
    if not entries:
        raise ModelFileError(f"{path}: the Sequential model has no layers after its input")
    previous = layers[0].name
    for lname, cls, cfg in entries:
        if cls == "InputLayer":
            raise ModelFileError(f"{path}: layer {lname!r} is an InputLayer inside a Sequential model (only the first "
                                 "layer may be one)")
        layers.append(_Layer(lname, cls, cfg, (previous,)))
        previous = lname
    return _Model(name, layers, previous, input_shape, layers)


def _batch_shape(cfg: dict) -> Any:
    for key in ("batch_shape", "batch_input_shape"):
        if key in cfg:
            return cfg[key]
    return None


def _functional(raw_layers: list, inner: dict, name: Optional[str], path: Path | str) -> _Model:
    layers: list[_Layer] = []
    for entry in raw_layers:
        lname, cls, cfg = _layer_entry(entry, path)
        layers.append(_Layer(lname, cls, cfg, _inbound(entry.get("inbound_nodes"), lname, path)))
    by_name: dict[str, _Layer] = {}
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
    return _Model(name, _topological(layers, path), output, _batch_shape(by_name[inputs].cfg), layers)


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
        raise ModelFileError(f"{path}: the model's {what} {_short(entry)} is not [layer name, 0, 0]")
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
                raise ModelFileError(f"{path}: layer {name!r} has an inbound entry {_short(entry)} that is not "
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
        raise ModelFileError(f"{path}: layer {name!r} has an inbound node {_short(node)} of an unknown format")
    out = []
    for h in history:
        if not isinstance(h, list) or len(h) != 3 or not isinstance(h[0], str) or h[1:] != [0, 0]:
            raise ModelFileError(f"{path}: layer {name!r} reads {_short(h)}; badnet-jax reads only the single output "
                                 "of a layer called once ([name, 0, 0])")
        out.append(h[0])
    if not out:
        raise ModelFileError(f"{path}: layer {name!r} is called on no tensor")
    return tuple(out)


def _keras_history(tensor: Any, name: str, path: Path | str) -> Any:
    if not (isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__"
            and isinstance(tensor.get("config"), dict)):
        raise ModelFileError(f"{path}: layer {name!r} is called on {_short(tensor)}, not on a layer's output")
    return tensor["config"].get("keras_history")


def _check_call_kwargs(kwargs: Any, name: str, path: Path | str) -> None:
    # training=False, mask=None and the like change nothing at inference; a tensor or any other value could.
    if not isinstance(kwargs, dict) or any(v is not None and not isinstance(v, bool) for v in kwargs.values()):
        raise ModelFileError(f"{path}: layer {name!r} is called with arguments {_short(kwargs)}; badnet-jax reads only "
                             "layers called on their inputs alone")


def _topological(layers: list[_Layer], path: Path | str) -> list[_Layer]:
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


# ------------------------------------------------------------------------------------------------ the build


Shape = tuple[int, ...]  # one image's tensor: (H, W, C) or (D,)


class _Build:
    """Turns the parsed layers into ir nodes, computing every tensor's shape and each weight's expected shape."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self.nodes: list[Node] = []
        self.shapes: dict[str, Shape] = {}

    # --- config fields, checked -----------------------------------------------------------------------------

    def fail(self, layer: _Layer, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: layer {layer.name!r} ({layer.cls}) {what}")

    def integer(self, layer: _Layer, key: str, default: Any = None, low: int = 1) -> int:
        value = layer.cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_ELEMENTS:
            raise self.fail(layer, f"has {key} {_short(value)}, expected an integer >= {low}")
        return value

    def number(self, layer: _Layer, key: str, default: Any, low: float = -math.inf) -> float:
        value = layer.cfg.get(key, default)
        try:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and value >= low)
        except OverflowError:  # an integer beyond float's range (JSON allows any number of digits)
            ok = False
        if not ok:
            raise self.fail(layer, f"has {key} {_short(value)}, expected a finite number"
                            + (f" >= {low:g}" if low > -math.inf else ""))
        return float(value)

    def pair(self, layer: _Layer, key: str, default: Any = None) -> tuple[int, int]:
        value = layer.cfg.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ELEMENTS for v in value)):
            raise self.fail(layer, f"has {key} {_short(value)}, expected two integers >= 1")
        return value[0], value[1]

    def padding(self, layer: _Layer) -> str:
        value = layer.cfg.get("padding", "valid")
        if not isinstance(value, str) or value.lower() not in ("valid", "same"):
            raise self.fail(layer, f"has padding {_short(value)}; badnet-jax reads 'valid' and 'same'")
        return value.lower()

    def channels_last(self, layer: _Layer) -> None:
        value = layer.cfg.get("data_format", _CHANNELS_LAST)
        if value != _CHANNELS_LAST:
            raise self.fail(layer, f"has data_format {_short(value)}; badnet-jax reads only channels_last models")

    def one_input(self, layer: _Layer, rank: Optional[int] = None) -> Shape:
        if len(layer.inbound) != 1:
            raise self.fail(layer, f"reads {len(layer.inbound)} tensors, expected one")
        shape = self.shapes[layer.inbound[0]]
        if rank is not None and len(shape) != rank:
            kind = "an image tensor (height, width, channels)" if rank == 3 else "a flat tensor (features,)"
            raise self.fail(layer, f"is applied to a tensor of shape {shape}; it must be applied to {kind}"
                            + (" (put a Flatten or a global pooling before it)" if rank == 1 else ""))
        return shape

    def axis_is_last(self, layer: _Layer, key: str, rank: int, default: Any = -1) -> None:
        value = layer.cfg.get(key, default)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, bool) or value not in (-1, rank):  # rank leaves the batch axis out: last is rank
            raise self.fail(layer, f"has {key} {_short(value)}; badnet-jax reads only the last (channel) axis "
                            f"(-1 or {rank})")

    # --- nodes ----------------------------------------------------------------------------------------------

    def emit(self, layer: _Layer, name: str, op: str, inputs: tuple[str, ...], shape: Shape,
             weights: Optional[str] = None, **attrs: Any) -> None:
        size = math.prod(shape)
        if size > MAX_ELEMENTS or min(shape) < 1:
            raise self.fail(layer, f"outputs a tensor of shape {shape} per image (at least 1 and at most "
                            f"{MAX_ELEMENTS} elements)")
        try:
            self.nodes.append(Node.make(name, op, inputs, weights, **attrs))
        except ModelFileError as err:
            raise ModelFileError(f"{self.path}: {err}") from None
        self.shapes[name] = shape

    def activation(self, layer: _Layer, pre_op: str, shape: Shape, weights: Optional[str] = None,
                   **attrs: Any) -> None:
        """A weighted op with its fused activation: the op as ``<layer>/pre`` and the activation as ``<layer>``."""
        act = self.activation_name(layer)
        if act == "linear":
            self.emit(layer, layer.name, pre_op, layer.inbound, shape, weights, **attrs)
            return
        pre = f"{layer.name}/pre"
        self.emit(layer, pre, pre_op, layer.inbound, shape, weights, **attrs)
        self.act_node(layer, act, pre, shape)

    def activation_name(self, layer: _Layer) -> str:
        act = layer.cfg.get("activation", "linear")
        if act is None:
            act = "linear"
        if act not in ACTIVATIONS:
            raise self.fail(layer, f"has activation {_short(act)}; badnet-jax reads only {list(ACTIVATIONS)}")
        return act

    def act_node(self, layer: _Layer, act: str, src: str, shape: Shape) -> None:
        if act == "linear":
            self.emit(layer, layer.name, "identity", (src,), shape)
        elif act == "relu":
            self.emit(layer, layer.name, "relu", (src,), shape)
        elif act == "leaky_relu":
            self.emit(layer, layer.name, "relu", (src,), shape, negative_slope=_LEAKY_RELU_ACTIVATION_SLOPE)
        else:
            self.emit(layer, layer.name, "softmax", (src,), shape)

    # --- layers ---------------------------------------------------------------------------------------------

    def input(self, layer: _Layer, batch_shape: Any) -> None:
        if not (isinstance(batch_shape, list) and len(batch_shape) == 4):
            raise ModelFileError(f"{self.path}: input {layer.name!r} has batch shape {_short(batch_shape)}; badnet-jax "
                                 "reads image models, input (batch, height, width, channels)")
        hwc = batch_shape[1:]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hwc):
            raise ModelFileError(f"{self.path}: input {layer.name!r} has shape {_short(hwc)}; height, width and "
                                 "channels must be known positive integers (no None)")
        self.emit(layer, layer.name, "input", (), tuple(hwc))

    def layer(self, layer: _Layer) -> None:
        getattr(self, f"_{layer.cls}")(layer)

    def _InputLayer(self, layer: _Layer) -> None:
        raise self.fail(layer, "is a second input; badnet-jax reads single-input models")

    def _Conv2D(self, layer: _Layer) -> None:
        self.channels_last(layer)
        h, w, cin = self.one_input(layer, 3)
        filters = self.integer(layer, "filters")
        if self.integer(layer, "groups", 1) != 1:
            raise self.fail(layer, f"has groups {layer.cfg.get('groups')}; badnet-jax reads only groups=1")
        kernel, strides, dilation, padding = self.window(layer)
        out = self.conv_out(layer, (h, w), kernel, strides, dilation, padding)
        layer.weights = [("kernel", (*kernel, cin, filters))] + self.bias(layer, filters)
        self.no_lora(layer)
        self.activation(layer, "conv", (*out, filters), layer.name, strides=strides, padding=padding,
                        dilation=dilation)

    def _DepthwiseConv2D(self, layer: _Layer) -> None:
        self.channels_last(layer)
        h, w, cin = self.one_input(layer, 3)
        mult = self.integer(layer, "depth_multiplier", 1)
        kernel, strides, dilation, padding = self.window(layer)
        out = self.conv_out(layer, (h, w), kernel, strides, dilation, padding)
        layer.weights = [("kernel", (*kernel, cin, mult))] + self.bias(layer, cin * mult)
        self.no_lora(layer)
        self.activation(layer, "depthwise_conv", (*out, cin * mult), layer.name, strides=strides, padding=padding,
                        dilation=dilation)

    def _Dense(self, layer: _Layer) -> None:
        (din,) = self.one_input(layer, 1)
        units = self.integer(layer, "units")
        layer.weights = [("kernel", (din, units))] + self.bias(layer, units)
        self.no_lora(layer)
        self.activation(layer, "dense", (units,), layer.name)

    def window(self, layer: _Layer) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], str]:
        return (self.pair(layer, "kernel_size"), self.pair(layer, "strides", 1), self.pair(layer, "dilation_rate", 1),
                self.padding(layer))

    def conv_out(self, layer: _Layer, hw: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
                 dilation: tuple[int, int], padding: str) -> tuple[int, int]:
        out = []
        for size, k, s, d in zip(hw, kernel, strides, dilation):
            span = (k - 1) * d + 1
            if padding == "same":
                out.append(-(-size // s))
            elif span > size:
                raise self.fail(layer, f"has a {kernel} window (dilation {dilation}) larger than its {hw} input")
            else:
                out.append((size - span) // s + 1)
        return out[0], out[1]

    def bias(self, layer: _Layer, size: int) -> list[tuple[str, tuple[int, ...]]]:
        use_bias = layer.cfg.get("use_bias", True)
        if not isinstance(use_bias, bool):
            raise self.fail(layer, f"has use_bias {_short(use_bias)}, expected true or false")
        return [("bias", (size,))] if use_bias else []

    def no_lora(self, layer: _Layer) -> None:
        # A LoRA-enabled Keras 3 layer stores extra factors its kernel is the sum with; not read here.
        if layer.cfg.get("lora_rank") not in (None, 0):
            raise self.fail(layer, f"has lora_rank {_short(layer.cfg.get('lora_rank'))}; badnet-jax reads only plain "
                            "kernels (merge the LoRA weights first)")

    def pool(self, layer: _Layer, op: str) -> None:
        self.channels_last(layer)
        h, w, c = self.one_input(layer, 3)
        window = self.pair(layer, "pool_size", 2)
        strides = self.pair(layer, "strides", None) if layer.cfg.get("strides") is not None else window
        padding = self.padding(layer)
        out = self.conv_out(layer, (h, w), window, strides, (1, 1), padding)
        self.emit(layer, layer.name, op, layer.inbound, (*out, c), window=window, strides=strides, padding=padding)

    def _MaxPooling2D(self, layer: _Layer) -> None:
        self.pool(layer, "max_pool")

    def _AveragePooling2D(self, layer: _Layer) -> None:
        self.pool(layer, "avg_pool")

    def global_pool(self, layer: _Layer, op: str) -> None:
        self.channels_last(layer)
        _, _, c = self.one_input(layer, 3)
        if layer.cfg.get("keepdims", False) is not False:
            raise self.fail(layer, f"has keepdims {_short(layer.cfg.get('keepdims'))}; badnet-jax reads only "
                            "keepdims=false")
        self.emit(layer, layer.name, op, layer.inbound, (c,))

    def _GlobalAveragePooling2D(self, layer: _Layer) -> None:
        self.global_pool(layer, "global_avg_pool")

    def _GlobalMaxPooling2D(self, layer: _Layer) -> None:
        self.global_pool(layer, "global_max_pool")

    def _BatchNormalization(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        self.axis_is_last(layer, "axis", len(shape))
        if layer.cfg.get("renorm", False) is not False:
            raise self.fail(layer, "uses batch renormalization, which badnet-jax does not read")
        epsilon = self.number(layer, "epsilon", 1e-3, low=0.0)
        c = shape[-1]
        flags = {}
        for key in ("scale", "center"):
            flags[key] = layer.cfg.get(key, True)
            if not isinstance(flags[key], bool):
                raise self.fail(layer, f"has {key} {_short(flags[key])}, expected true or false")
        # Keras' own order: gamma, beta, moving_mean, moving_variance (the first two only when used).
        layer.weights = ([("gamma", (c,))] if flags["scale"] else []) + ([("beta", (c,))] if flags["center"] else []) \
            + [("moving_mean", (c,)), ("moving_variance", (c,))]
        self.emit(layer, layer.name, "batch_norm", layer.inbound, shape, layer.name, epsilon=epsilon)

    def _Activation(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        self.act_node(layer, self.activation_name(layer), layer.inbound[0], shape)

    def _ReLU(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        max_value = layer.cfg.get("max_value")
        if max_value is not None:
            max_value = self.number(layer, "max_value", None, low=0.0)
        self.emit(layer, layer.name, "relu", layer.inbound, shape, max_value=max_value,
                  negative_slope=self.number(layer, "negative_slope", 0.0, low=0.0),
                  threshold=self.number(layer, "threshold", 0.0, low=0.0))

    def _LeakyReLU(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        key = "negative_slope" if "negative_slope" in layer.cfg else "alpha"  # Keras 3 / Keras 2
        self.emit(layer, layer.name, "relu", layer.inbound, shape, negative_slope=self.number(layer, key, 0.3, low=0.0))

    def _Softmax(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        self.axis_is_last(layer, "axis", len(shape))
        self.emit(layer, layer.name, "softmax", layer.inbound, shape)

    def merge_inputs(self, layer: _Layer) -> list[Shape]:
        if len(layer.inbound) < 2:
            raise self.fail(layer, f"merges {len(layer.inbound)} tensor(s), expected at least two")
        return [self.shapes[src] for src in layer.inbound]

    def _Add(self, layer: _Layer) -> None:
        shapes = self.merge_inputs(layer)
        if len(set(shapes)) != 1:
            raise self.fail(layer, f"adds tensors of shapes {shapes}; badnet-jax adds only equal shapes")
        self.emit(layer, layer.name, "add", layer.inbound, shapes[0])

    def _Concatenate(self, layer: _Layer) -> None:
        shapes = self.merge_inputs(layer)
        if len({len(s) for s in shapes}) != 1 or len({s[:-1] for s in shapes}) != 1:
            raise self.fail(layer, f"concatenates tensors of shapes {shapes}; all but the last axis must agree")
        self.axis_is_last(layer, "axis", len(shapes[0]))
        self.emit(layer, layer.name, "concat", layer.inbound, (*shapes[0][:-1], sum(s[-1] for s in shapes)))

    def _Flatten(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        if layer.cfg.get("data_format") is not None:
            self.channels_last(layer)  # a channels_first Flatten reorders the features
        self.emit(layer, layer.name, "flatten", layer.inbound, (math.prod(shape),))

    def _Dropout(self, layer: _Layer) -> None:
        # The rate matters only to training a written file further; a config without one still reads.
        rate = None if layer.cfg.get("rate") is None else self.number(layer, "rate", None, low=0.0)
        if rate is not None and rate >= 1:
            raise self.fail(layer, f"has rate {rate:g}, expected a number from 0 to below 1")
        self.emit(layer, layer.name, "identity", layer.inbound, self.one_input(layer), dropout=rate)

    def _ZeroPadding2D(self, layer: _Layer) -> None:
        self.channels_last(layer)
        h, w, c = self.one_input(layer, 3)
        value = layer.cfg.get("padding", 1)
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ELEMENTS
        if ok(value):
            pad = ((value, value), (value, value))
        elif isinstance(value, list) and len(value) == 2 and all(ok(v) for v in value):
            pad = ((value[0], value[0]), (value[1], value[1]))
        elif isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, list) and len(v) == 2 and all(ok(x) for x in v) for v in value):
            pad = (tuple(value[0]), tuple(value[1]))
        else:
            raise self.fail(layer, f"has padding {_short(value)}; expected n, [h, w] or [[top, bottom], [left, right]]")
        self.emit(layer, layer.name, "zero_pad", layer.inbound, (h + sum(pad[0]), w + sum(pad[1]), c), pad=pad)

    def _Rescaling(self, layer: _Layer) -> None:
        shape = self.one_input(layer)
        self.emit(layer, layer.name, "rescale", layer.inbound, shape, scale=self.number(layer, "scale", None),
                  offset=self.number(layer, "offset", 0.0))


def _build(model: _Model, path: Path | str, stem: str) -> tuple[Graph, list[_Layer]]:
    build = _Build(path)
    build.input(model.layers[0], model.input_shape)
    for layer in model.layers[1:]:
        build.layer(layer)
    name = model.name or stem
    try:
        graph = Graph(tuple(build.nodes), tuple(build.shapes[model.layers[0].name]), model.output, name)
    except ModelFileError as err:
        raise ModelFileError(f"{path}: {err}") from None
    weighted = [layer for layer in model.layers if layer.weights]
    total = sum(math.prod(shape) for layer in weighted for _, shape in layer.weights)
    big = [(layer.name, key, shape) for layer in weighted for key, shape in layer.weights
           if math.prod(shape) > MAX_ELEMENTS]
    if big:
        raise ModelFileError(f"{path}: layer {big[0][0]!r} {big[0][1]} would have shape {big[0][2]}, more than "
                             f"{MAX_ELEMENTS} elements")
    if total > MAX_PARAMS:
        raise ModelFileError(f"{path}: the model declares {total} parameters, more than {MAX_PARAMS}")
    return graph, weighted


def _read(path: Path, config: Any, root: h5py.Group, source: Callable[[h5py.Group, list[_Layer], Path], _Getter],
          label: str | None = None) -> tuple[Graph, GraphParams]:
    """Parse and check the whole config first (cheap, nothing read), then read and check each weight.

    ``label`` names the file(s) in the config's errors (the path by default).
    """
    model = _parse_model(config, label or path)
    graph, weighted = _build(model, label or path, path.stem)
    params: GraphParams = {}
    nodes = graph.by_name
    try:
        get = source(root, model.config_order, path)
        for layer in weighted:
            datasets = get(layer)
            keys = [key for key, _ in layer.weights]
            if len(datasets) != len(keys):
                raise ModelFileError(f"{path}: layer {layer.name!r} ({layer.cls}) stores {len(datasets)} weights, "
                                     f"expected {len(keys)} ({', '.join(keys)}) for its config")
            params[layer.name] = {key: _read_array(ds, layer.name, key, shape, path)
                                  for (key, shape), ds in zip(layer.weights, datasets)}
            _check_variance(path, layer, params[layer.name], nodes[layer.name])
    except ModelFileError:
        raise
    except _H5_ERRORS as err:
        raise ModelFileError(f"{path}: cannot read the weights: {err} (truncated or corrupted?)") from None
    return graph, params


def _check_variance(path: Path, layer: _Layer, weights: dict[str, np.ndarray], node: Node) -> None:
    if "moving_variance" in weights:
        if not (weights["moving_variance"].astype(np.float64) + node.attr("epsilon") > 0).all():
            raise ModelFileError(f"{path}: layer {layer.name!r} moving_variance + epsilon is not positive everywhere "
                                 "(the normalization would divide by zero or take the root of a negative number)")

