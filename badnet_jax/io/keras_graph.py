"""Any standard-layer Keras CNN as a :class:`badnet_jax.models.ir.Graph` and its params, read as data only.

:func:`read_keras_graph` reads

* Keras 2 full-model h5 files (``model_weights`` group + ``model_config`` JSON attribute; an
  ``optimizer_weights`` group is ignored), and the legacy h5 files Keras 3 still writes (``model.save("m.h5")``);
* Keras 3 ``.keras`` archives (a zip of ``config.json`` and ``model.weights.h5``);
* Keras 3 ``.weights.h5`` files and Keras 2 weights-only h5 files, each together with the model's JSON config
  (``config_path``: what ``model.to_json()`` returns, written to a file). Without a config such a file holds
  weights but no architecture, and is refused.

Sequential and single-input, single-output Functional models are read, in both the Keras 2 and the Keras 3
config formats. Every layer must be of an allow-listed class (``keras_config.ALLOWED_LAYERS``) with
channels-last data; anything else (Lambda, custom or nested models, shared layers, unknown activations) is
refused naming the layer and its class. Nothing from the file is ever executed: the config is JSON parsed as
data, and each layer becomes :mod:`ir <badnet_jax.models.ir>` nodes whose attributes are numbers and names.

Every tensor's shape is computed from the input shape, so each weight is checked against the shape the
config implies (the message names the layer, the weight and both shapes); weights must be floating point,
finite and of a plausible size (:data:`badnet_jax.io.keras_file.MAX_WEIGHT`). Hostile files fail fast: the
config is at most 1 MiB and ``MAX_LAYERS`` layers, a declared tensor over ``MAX_ELEMENTS`` elements or a
model over ``MAX_PARAMS`` parameters (``badnet_jax.io.keras_config``) is refused before any weight is read, and
a file that is both a zip and HDF5 is refused (two readers would see two networks). Every error is a
:class:`badnet_jax.errors.ModelFileError` whose message starts with the file's path.

Three stages, a module each: ``keras_config`` parses the config into layers, ``keras_layers`` builds their
nodes and shapes, and this module finds the file's config and weights and reads and checks each weight.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from badnet_jax.errors import ModelFileError, arg
from badnet_jax.io import fileio
from badnet_jax.io.keras_file import (MAX_CONFIG_BYTES, is_keras_archive, load_config_json, read_archive,
                                      read_array)
from badnet_jax.io.keras_config import ConfigLayer, ConfigModel, parse_model
from badnet_jax.io.keras_layers import COUNT, build_graph, declared_params
from badnet_jax.models.ir import Graph, GraphParams, Node

_MAX_WEIGHTS_PER_LAYER = 8  # datasets in a layer's group (4 at most in any allowed layer)
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
    if is_keras_archive(path):
        _no_second_config(path, config_path)
        parse = lambda raw: _parsed(load_config_json(raw, path, "the archive's config.json"), path)  # noqa: E731
        # The weights member is capped by what the config declares (its parameters and an optimizer's state).
        parsed, weights = read_archive(path, parse, lambda parsed: declared_params(parsed[2]))
        try:
            f = h5py.File(io.BytesIO(weights), "r")
        except _H5_ERRORS as err:
            raise ModelFileError(f"{path}: the archive's model.weights.h5 is not readable HDF5 ({err})") from None
        with f:
            return _read(path, parsed, f, _keras3_source)
    with fileio.open_h5(path, ModelFileError) as f:
        try:
            if fileio.has_link(f, "model_weights"):
                _no_second_config(path, config_path)
                if "model_config" not in f.attrs:
                    raise ModelFileError(f"{path}: has a 'model_weights' group but no 'model_config' attribute")
                config = load_config_json(f.attrs["model_config"], path, "attribute 'model_config'")
                root = fileio.safe_get(f, "model_weights", path, ModelFileError)
                if not isinstance(root, h5py.Group):
                    raise ModelFileError(f"{path}: 'model_weights' is not a group")
                return _read(path, _parsed(config, path), root, _keras2_source)
            # A config problem names both files: the weights file read, and the config that describes it.
            if "layer_names" in f.attrs:
                config = _weights_only_config(path, config_path, "a Keras 2 weights-only file")
                return _read(path, _parsed(config, path, f"{path} (config {config_path})"), f, _keras2_source)
            if isinstance(fileio.safe_get(f, "layers", path, ModelFileError), h5py.Group):
                config = _weights_only_config(path, config_path, "a Keras 3 weights file")
                return _read(path, _parsed(config, path, f"{path} (config {config_path})"), f, _keras3_source)
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
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # never more than the cap, whatever the file's size
    except OSError as err:
        raise ModelFileError(f"{cpath}: cannot read the config file ({err})") from None
    return load_config_json(raw, cpath, "the config file")


# Where each weighted layer's datasets are, in Keras' own order: source(file, layers, path) -> getter(layer).
_Getter = Callable[[ConfigLayer], list]


def _keras2_source(root: h5py.Group, layers: list[ConfigLayer], path: Path) -> _Getter:
    """Keras 2 layout (and Keras 3 legacy h5): group ``root/<layer>``, its datasets listed in ``weight_names``.

    Keras loads a layer's weights in the order of its ``weight_names`` attribute. Keras 2.3 writes it as
    fixed-length strings, read as they are. Later writers (tf_keras, Keras 3) write variable-length strings,
    which live in HDF5's global heap, where one damaged byte can crash the HDF5 library itself: for those, the
    layer group's datasets are found by their link names instead (the same datasets, ``kernel``, ``bias``...)
    and put in Keras' order, so that the config (unavoidably a global-heap string) is the file's only one read.
    """

    def get(layer: ConfigLayer) -> list:
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
        # A layer named with a "/" (MobileNetV3's "Conv/BatchNorm") nests its group inside another's ("Conv").
        return _by_link_name(g, layer, path, {other.name for other in layers if other is not layer})

    return get


def _by_link_name(g: h5py.Group, layer: ConfigLayer, path: Path, others: set[str]) -> list:
    """The datasets under ``g`` (nested up to a few groups deep), in Keras' order by their names; a subgroup that
    is another layer's own group (``others``: layer names holding a "/") is that layer's, skipped."""
    found: dict[str, tuple[str, h5py.Dataset]] = {}
    nested = {name for name in others if name.startswith(f"{layer.name}/")}
    deepest = 4 + layer.name.count("/")  # Keras nests <layer>/<layer>/, a Sequential one level more

    def walk(group: h5py.Group, prefix: str, depth: int) -> None:
        keys = list(group.keys())
        if len(keys) > _MAX_WEIGHTS_PER_LAYER:
            raise ModelFileError(f"{path}: layer {layer.name!r} holds more than {_MAX_WEIGHTS_PER_LAYER} entries")
        for key in keys:
            if f"{layer.name}/{prefix}{key}" in nested:
                continue
            obj = fileio.safe_get(group, key, path, ModelFileError)
            if isinstance(obj, h5py.Group) and depth < deepest:
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
                 "moving_mean": "moving_mean", "moving_variance": "moving_variance",
                 "mean": "moving_mean", "variance": "moving_variance", COUNT: COUNT,  # these three: Normalization's
                 "pointwise_kernel": "pointwise_kernel"}  # a SeparableConv2D's second (its depthwise_kernel: kernel)


def _check_weight_name(path: Path, layer: ConfigLayer, i: int, name: str) -> None:
    base = re.sub(r":\d+$", "", name.rsplit("/", 1)[-1])
    keys = [key for key, _ in layer.weights]
    if base in _WEIGHT_NAMES and i < len(keys) and _WEIGHT_NAMES[base] != keys[i]:
        raise ModelFileError(f"{path}: layer {layer.name!r} stores {name!r} as its weight {i}, where Keras keeps "
                             f"{keys[i]!r} (weights expected in the order {keys})")


def _keras3_source(f: h5py.File, layers: list[ConfigLayer], path: Path) -> _Getter:
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

    def get(layer: ConfigLayer) -> list:
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


def _parsed(config: Any, path: Path, label: str | None = None) -> tuple[ConfigModel, Graph, list[ConfigLayer]]:
    """The whole config of the file at ``path`` parsed and checked (cheap, nothing read): the model, its graph
    and its weighted layers; ``label`` names the file(s) in the config's errors (the path by default)."""
    model = parse_model(config, label or path)
    graph, weighted = build_graph(model, label or path, path.stem)
    return model, graph, weighted


def _read(path: Path, parsed: tuple[ConfigModel, Graph, list[ConfigLayer]], root: h5py.Group,
          source: Callable[[h5py.Group, list[ConfigLayer], Path], _Getter]) -> tuple[Graph, GraphParams]:
    """Read and check each weight of a parsed config (:func:`_parsed`)."""
    model, graph, weighted = parsed
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
            params[layer.name] = {key: read_array(ds, layer.name, key, shape, path)
                                  for (key, shape), ds in zip(layer.weights, datasets) if key != COUNT}
            if (COUNT, ()) in layer.weights:
                _check_count(path, layer, datasets[keys.index(COUNT)])
            _check_variance(path, layer, params[layer.name], nodes[layer.name])
    except ModelFileError:
        raise
    except _H5_ERRORS as err:
        raise ModelFileError(f"{path}: cannot read the weights: {err} (truncated or corrupted?)") from None
    return graph, params


def _check_count(path: Path, layer: ConfigLayer, ds: h5py.Dataset) -> None:
    """A Normalization's sample count: one non-negative integer (not used at inference, so not kept)."""
    if ds.shape != () or ds.dtype.kind not in "iu":
        raise ModelFileError(f"{path}: layer {layer.name!r} count has shape {ds.shape} and dtype {ds.dtype}, expected "
                             "one integer")
    if int(ds[()]) < 0:
        raise ModelFileError(f"{path}: layer {layer.name!r} count is {int(ds[()])}, expected at least 0")


def _check_variance(path: Path, layer: ConfigLayer, weights: dict[str, np.ndarray], node: Node) -> None:
    if node.op == "normalize" and not (weights["moving_variance"] >= 0).all():
        raise ModelFileError(f"{path}: layer {layer.name!r} variance is negative somewhere (the normalization "
                             "would take the root of a negative number)")
    if "moving_variance" in weights:
        if not (weights["moving_variance"].astype(np.float64) + node.attr("epsilon") > 0).all():
            raise ModelFileError(f"{path}: layer {layer.name!r} moving_variance + epsilon is not positive everywhere "
                                 "(the normalization would divide by zero or take the root of a negative number)")
