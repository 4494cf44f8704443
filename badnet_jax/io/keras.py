"""Keras h5 <-> Flax params for the lab's DeepID BadNet.

Reads, without executing anything from the file (no pickles, no Lambda layers, JSON parsed as data only):

* Keras 2 weights-only files (root attribute ``layer_names``; Keras 2.3 and newer Keras 2, whose extra
  ``top_level_model_weights`` group is ignored);
* Keras 2 full model files (``model_weights`` group + ``model_config`` JSON attribute), with or without an
  ``optimizer_weights`` group (ignored);
* Keras 3 ``.weights.h5`` files (``layers/<auto name>/vars`` groups carrying the layer name as attribute);
* Keras 3 ``.keras`` archives (zip of ``config.json``, allow-listed like a full-model config, and
  ``model.weights.h5``), read in memory with every member's declared size checked first.

A file that is both (an HDF5 file with a zip appended, or the other way round) is refused
(``badnet_jax.io.keras_file``): h5py and Keras read one network from it, a zip reader another.

Every layer is checked against an allow-list and every kernel/bias against the architecture's shapes;
weights must be floating point and finite. Writes full Keras model files (``model_config`` JSON +
``model_weights``, the layout of the lab's ``bd_net.h5``), which ``keras.models.load_model`` (what the lab's
eval.py calls) and ``load_weights`` read, so a pruned B' goes back into the lab's code as it is.

The input scale (raw pixels or pixels / 255, see ``badnet_jax.model``) is not part of a Keras file; the
files badnet-jax writes record it in the root attribute ``badnet_jax_input_scale``
(``badnet_jax.io.keras_file.INPUT_SCALE_ATTR``), and :func:`load_keras` takes it from there unless told.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.io import atomic, fileio
from badnet_jax.io.keras_file import (INPUT_SCALE_ATTR, is_keras_archive, load_config_json, read_archive, read_array,
                                      recorded_input_scale)
from badnet_jax.errors import ModelFileError
from badnet_jax.model import (
    CONVS, HIDDEN_UNITS, INPUT_HWC, INPUT_SCALES, KERAS_LAYER_NAMES, NUM_POOL3_CHANNELS, POOL, WEIGHT_LAYERS, BadNet,
    Params, check_params, param_shapes,
)

# Layer class -> the config fields (and values) that the DeepID architecture requires.
_ALLOWED_CLASSES = {"InputLayer", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Add", "Activation"}
_EXPECTED_CLASS = {
    "input": "InputLayer", "conv_1": "Conv2D", "pool_1": "MaxPooling2D", "conv_2": "Conv2D",
    "pool_2": "MaxPooling2D", "conv_3": "Conv2D", "pool_3": "MaxPooling2D", "conv_4": "Conv2D",
    "flatten_1": "Flatten", "flatten_2": "Flatten", "fc_1": "Dense", "fc_2": "Dense", "add_1": "Add",
    "activation_1": "Activation", "output": "Dense",
}
# Layer name -> (filters or units, kernel size) the architecture fixes (the output's units are the class count).
_SIZES = {**{name: (filters, k) for name, filters, k in CONVS}, "fc_1": (HIDDEN_UNITS, None),
          "fc_2": (HIDDEN_UNITS, None)}


def _iter_config_layers(config: Any, path: Path, what: str) -> Iterator[dict]:
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise ModelFileError(f"{path}: {what} is not a Keras model config (no 'config' object)")
    layers = config["config"].get("layers")
    if not isinstance(layers, list):
        raise ModelFileError(f"{path}: {what} has no 'layers' list")
    for layer in layers:
        if not isinstance(layer, dict):
            raise ModelFileError(f"{path}: {what} holds a layer that is not an object")
        yield layer


def _check_model_config(raw: Any, path: Path, what: str = "attribute 'model_config'") -> None:
    """Allow-list every layer of a full-model file's JSON config (``what``: where the file keeps it) and check the
    DeepID hyper-parameters."""
    config = load_config_json(raw, path, what)
    try:
        _check_layers(config, path, what)
    except (TypeError, AttributeError) as err:  # a field of another JSON type than Keras writes (a list for a name)
        raise ModelFileError(f"{path}: {what} is not a Keras model config of the lab's DeepID ({err})") from None


def _check_layers(config: Any, path: Path, what: str) -> None:
    seen = {}
    for layer in _iter_config_layers(config, path, what):
        cls = layer.get("class_name")
        cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        name = cfg.get("name", layer.get("name"))
        if cls not in _ALLOWED_CLASSES:
            raise ModelFileError(
                f"{path}: layer {name!r} has type {cls!r}, which is not allowed; badnet-jax reads only "
                f"{sorted(_ALLOWED_CLASSES)} (no Lambda or custom layers are ever executed)")
        if name not in _EXPECTED_CLASS or _EXPECTED_CLASS[name] != cls:
            raise ModelFileError(f"{path}: unexpected layer {name!r} of type {cls!r}; this is not the "
                                 f"lab's DeepID architecture (layers {list(KERAS_LAYER_NAMES)})")
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise ModelFileError(f"{path}: layer {name!r} has data_format {cfg.get('data_format')!r}; the lab's "
                                 "DeepID is channels_last")
        if cls == "Conv2D" and (cfg.get("padding") != "valid" or cfg.get("activation") != "relu"
                                or list(cfg.get("strides", [1, 1])) != [1, 1]
                                or list(cfg.get("dilation_rate", [1, 1])) != [1, 1]
                                or cfg.get("groups", 1) != 1 or cfg.get("use_bias", True) is not True
                                or [cfg.get("filters"), *cfg.get("kernel_size", [None])]
                                != [_SIZES[name][0], _SIZES[name][1], _SIZES[name][1]]):
            raise ModelFileError(f"{path}: layer {name!r} must be a valid-padded, stride-1, undilated relu Conv2D "
                                 f"with bias, {_SIZES[name][0]} filters of {_SIZES[name][1]}x{_SIZES[name][1]}")
        if cls == "MaxPooling2D" and (list(cfg.get("pool_size", [])) != [POOL, POOL]
                                      or cfg.get("padding") != "valid"
                                      or list(cfg.get("strides") or [POOL, POOL]) != [POOL, POOL]):
            raise ModelFileError(f"{path}: layer {name!r} must be a {POOL}x{POOL} stride-{POOL} valid MaxPooling2D")
        if cls == "Dense" and (cfg.get("use_bias", True) is not True
                               or (name in _SIZES and cfg.get("units") != _SIZES[name][0])):
            raise ModelFileError(f"{path}: layer {name!r} must be a Dense layer with bias"
                                 + (f" and {_SIZES[name][0]} units" if name in _SIZES else ""))
        if cls == "Dense" and cfg.get("activation") not in ("linear", "softmax"):
            raise ModelFileError(f"{path}: layer {name!r} has activation {cfg.get('activation')!r}; "
                                 "expected linear (fc_1/fc_2) or softmax (output)")
        if cls == "Activation" and cfg.get("activation") != "relu":
            raise ModelFileError(f"{path}: layer {name!r} must be a relu Activation")
        seen[name] = cls
    missing = [n for n in KERAS_LAYER_NAMES if n not in seen]
    if missing:
        raise ModelFileError(f"{path}: {what} lacks layers {missing}")


# A weights file without DeepID's layers is most likely another model's, whose architecture it does not hold.
_NOT_DEEPID = ("a weights-only file of another model needs its architecture: give a full model file "
               "(model.save(...) as .keras or .h5), or in Python load_model(path, config_path=...) with its JSON "
               "config (model.to_json() written to a file)")


def _keras2_weights(group: h5py.Group, layer: str, path: Path) -> list[h5py.Dataset]:
    g = fileio.safe_get(group, layer, path, ModelFileError)
    if not isinstance(g, h5py.Group):
        raise ModelFileError(f"{path}: not the lab's DeepID (no layer {layer!r}; the file has "
                             f"{sorted(group.keys())[:20]}); {_NOT_DEEPID}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs.get("weight_names", [])]
    if len(names) != 2:
        raise ModelFileError(f"{path}: layer {layer!r} lists {len(names)} weights, expected kernel and bias")
    out = []
    for n in names:
        obj = fileio.safe_get(g, n, path, ModelFileError)
        if not isinstance(obj, h5py.Dataset):
            raise ModelFileError(f"{path}: layer {layer!r}: weight {n!r} is missing")
        out.append(obj)
    return out


def _keras3_weights(f: h5py.File, path: Path) -> dict[str, list[h5py.Dataset]]:
    by_name = {}
    layers = fileio.safe_get(f, "layers", path, ModelFileError)
    for key in list(layers.keys())[:1000]:
        g = fileio.safe_get(layers, key, path, ModelFileError)
        vars_ = fileio.safe_get(g, "vars", path, ModelFileError) if isinstance(g, h5py.Group) else None
        if isinstance(vars_, h5py.Group):
            name = vars_.attrs.get("name", key)
            name = name.decode() if isinstance(name, bytes) else str(name)
            keys = sorted(vars_.keys(), key=lambda s: int(s) if s.isdigit() else -1)
            by_name[name] = [fileio.safe_get(vars_, k, path, ModelFileError) for k in keys[:4]]
    out = {}
    for layer in WEIGHT_LAYERS:
        if layer not in by_name:
            raise ModelFileError(f"{path}: not the lab's DeepID (no layer {layer!r} in its Keras 3 weights; they "
                                 f"hold {sorted(by_name)[:20]}); {_NOT_DEEPID}")
        if len(by_name[layer]) != 2 or not all(isinstance(d, h5py.Dataset) for d in by_name[layer]):
            raise ModelFileError(f"{path}: layer {layer!r} must hold exactly a kernel and a bias")
        out[layer] = by_name[layer]
    return out


def read_keras_params(path: str | os.PathLike) -> Params:
    """Read a Keras file of the lab's architecture into a Flax params pytree (numpy float32 leaves).

    Takes Keras 2 weights-only and full-model h5 files, Keras 3 ``.weights.h5`` files and Keras 3 ``.keras``
    archives (a zip of ``config.json``, checked through the same allow-list, and ``model.weights.h5``).

    Raises:
        ModelFileError: the file is missing, not HDF5 (or a .keras zip), truncated, of an unknown layout, has
            an unknown or missing layer, a wrong shape, a non-float dtype or non-finite values.
    """
    path = Path(path)
    if is_keras_archive(path):
        return _read_keras_archive(path)
    with fileio.open_h5(path, ModelFileError) as f:
        return _params_from_h5(f, path)


def _params_from_h5(f: h5py.File, path: Path) -> Params:
    try:
        if fileio.has_link(f, "model_weights"):
            if "model_config" not in f.attrs:
                raise ModelFileError(f"{path}: has a 'model_weights' group but no 'model_config' attribute")
            _check_model_config(f.attrs["model_config"], path)
            root = fileio.safe_get(f, "model_weights", path, ModelFileError)
            if not isinstance(root, h5py.Group):
                raise ModelFileError(f"{path}: 'model_weights' is not a group")
            datasets = {layer: _keras2_weights(root, layer, path) for layer in WEIGHT_LAYERS}
        elif "layer_names" in f.attrs:
            _check_layer_names(f.attrs["layer_names"], path)
            datasets = {layer: _keras2_weights(f, layer, path) for layer in WEIGHT_LAYERS}
        elif isinstance(fileio.safe_get(f, "layers", path, ModelFileError), h5py.Group):
            datasets = _keras3_weights(f, path)
        else:
            raise ModelFileError(f"{path}: not a Keras weights or model file (no 'layer_names' attribute, "
                                 "no 'model_weights' group, no Keras 3 'layers' group)")
        out_bias = datasets["output"][1]
        if len(out_bias.shape) != 1 or not 1 <= out_bias.shape[0] <= 1_000_000:
            raise ModelFileError(f"{path}: output bias has shape {out_bias.shape}, expected (num_classes,)")
        shapes = param_shapes(int(out_bias.shape[0]))
        return {
            layer: {
                "kernel": read_array(datasets[layer][0], layer, "kernel", shapes[layer]["kernel"], path),
                "bias": read_array(datasets[layer][1], layer, "bias", shapes[layer]["bias"], path),
            }
            for layer in WEIGHT_LAYERS
        }
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: cannot read the file: {err} (truncated or corrupted?)") from None


def _read_keras_archive(path: Path) -> Params:
    """A Keras 3 ``.keras`` zip: its config allow-listed like a full-model h5, then its weights file read."""
    _, weights = read_archive(path, lambda config: _check_model_config(config, path, "the archive's config.json"))
    try:
        f = h5py.File(io.BytesIO(weights), "r")
    except OSError as err:
        raise ModelFileError(f"{path}: the archive's model.weights.h5 is not readable HDF5 ({err})") from None
    with f:
        return _params_from_h5(f, path)


def _check_layer_names(raw: Any, path: Path) -> None:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(raw)]
    unknown = [n for n in names if n not in KERAS_LAYER_NAMES and n != "top_level_model_weights"]
    if unknown:
        raise ModelFileError(f"{path}: unknown layers {unknown}; badnet-jax reads only the lab's DeepID "
                             f"architecture ({list(KERAS_LAYER_NAMES)})")


def load_keras(path: str | os.PathLike, input_scale: str | None = None) -> tuple[BadNet, Params]:
    """Load a Keras BadNet file as ``(BadNet(num_classes, input_scale), params)``, params keyed by layer name.

    Args:
        path: a Keras 2 weights or full-model h5, or a Keras 3 ``.weights.h5``.
        input_scale: ``"raw"`` (pixels 0..255 as they are: the lab's B) or ``"255"`` (pixels / 255: the
            CSAW-HackML-2020 BadNets). None: the scale a badnet-jax-written file records, else ``"raw"``.

    Example::

        model, params = load_keras("sunglasses_bd_weights.h5", input_scale="255")
        logits = model.apply({"params": params}, x_NHWC)   # x in 0..255
    """
    if input_scale is not None and input_scale not in INPUT_SCALES:
        raise ModelFileError(f"{path}: input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
    params = jax.tree.map(jnp.asarray, read_keras_params(path))
    scale = input_scale or recorded_input_scale(path) or "raw"
    return BadNet(num_classes=int(params["output"]["bias"].shape[0]), input_scale=scale), params


def _layer_configs(num_classes: int) -> list[dict]:
    """The lab's DeepID as a Keras functional config (the fields Keras 2.3 through Keras 3 all accept)."""
    conv = lambda name, src: ("Conv2D", name, {
        "filters": _SIZES[name][0], "kernel_size": [_SIZES[name][1]] * 2, "strides": [1, 1], "padding": "valid",
        "data_format": "channels_last", "dilation_rate": [1, 1], "activation": "relu", "use_bias": True}, [src])
    pool = lambda name, src: ("MaxPooling2D", name, {"pool_size": [POOL, POOL], "padding": "valid",
                                                     "strides": [POOL, POOL], "data_format": "channels_last"}, [src])
    dense = lambda name, units, act, src: ("Dense", name, {"units": units, "activation": act, "use_bias": True}, [src])
    spec = [
        ("InputLayer", "input", {"batch_input_shape": [None, *INPUT_HWC], "dtype": "float32", "sparse": False}, []),
        conv("conv_1", "input"), pool("pool_1", "conv_1"), conv("conv_2", "pool_1"),
        pool("pool_2", "conv_2"), conv("conv_3", "pool_2"), pool("pool_3", "conv_3"),
        conv("conv_4", "pool_3"),
        ("Flatten", "flatten_1", {"data_format": "channels_last"}, ["pool_3"]),
        ("Flatten", "flatten_2", {"data_format": "channels_last"}, ["conv_4"]),
        dense("fc_1", HIDDEN_UNITS, "linear", "flatten_1"), dense("fc_2", HIDDEN_UNITS, "linear", "flatten_2"),
        ("Add", "add_1", {}, ["fc_1", "fc_2"]), ("Activation", "activation_1", {"activation": "relu"}, ["add_1"]),
        dense("output", num_classes, "softmax", "activation_1"),
    ]
    layers = []
    for cls, name, cfg, inbound in spec:
        extra = {} if cls == "InputLayer" else {"trainable": True, "dtype": "float32"}
        layers.append({"class_name": cls, "config": {"name": name, **extra, **cfg}, "name": name,
                       "inbound_nodes": [[[src, 0, 0, {}] for src in inbound]] if inbound else []})
    return layers


def model_config_json(num_classes: int) -> str:
    """The ``model_config`` JSON of a full Keras model file of the lab's architecture."""
    return json.dumps({"class_name": "Model", "config": {
        "name": "model_1", "layers": _layer_configs(num_classes),
        "input_layers": [["input", 0, 0]], "output_layers": [["output", 0, 0]]}})


def save_keras(params: Params, path: str | os.PathLike, input_scale: str = "raw", full_model: bool = True,
               keras_version: str = "2.3.1") -> Path:
    """Write params as a full Keras model h5 (``model_config`` + ``model_weights``), atomically.

    ``keras.models.load_model(path)`` gives the network (the output layer has the lab's softmax: the same
    argmax as badnet-jax's logits), ``model.load_weights(path)`` reads it too. The input scale is recorded
    for :func:`load_keras`; Keras itself takes whatever the caller feeds (the competition's eval.py divides
    by 255 before calling the model). ``full_model=False`` writes the weights-only layout of the lab's
    ``bd_weights.h5`` instead (``load_weights`` only).

    Returns:
        The path written.
    """
    check_params(params)
    path = Path(path)
    if input_scale not in INPUT_SCALES:
        raise ModelFileError(f"{path}: input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
    num_classes = int(np.shape(params["output"]["bias"])[0])
    shapes = param_shapes(num_classes)
    arrays = {}
    for layer in WEIGHT_LAYERS:
        for what in ("kernel", "bias"):
            arr = np.asarray(params[layer][what], dtype=np.float32)
            if arr.shape != shapes[layer][what]:
                raise ModelFileError(f"{path}: refusing to write layer {layer!r} {what} of shape {arr.shape}, "
                                     f"expected {shapes[layer][what]}")
            arrays[layer, what] = arr

    # Fixed-length byte strings, as Keras 2 writes them: a variable-length string lives in the file's global
    # heap, and HDF5 can loop forever reading a corrupted one (one flipped byte in the heap is enough).
    text = lambda s: np.bytes_(s.encode("utf-8"))

    def build(f: h5py.File) -> None:
        f.attrs["backend"] = text("tensorflow")
        f.attrs["keras_version"] = text(keras_version)
        f.attrs[INPUT_SCALE_ATTR] = text(input_scale)
        root = f
        if full_model:
            f.attrs["model_config"] = text(model_config_json(num_classes))
            root = f.create_group("model_weights")
        root.attrs["backend"] = text("tensorflow")
        root.attrs["keras_version"] = text(keras_version)
        root.attrs["layer_names"] = np.array([n.encode() for n in KERAS_LAYER_NAMES])
        for name in KERAS_LAYER_NAMES:
            g = root.create_group(name)
            if name in WEIGHT_LAYERS:
                g.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()])
                inner = g.create_group(name)
                inner.create_dataset("kernel:0", data=arrays[name, "kernel"])
                inner.create_dataset("bias:0", data=arrays[name, "bias"])
            else:
                g.attrs["weight_names"] = np.array([], dtype=np.float64)

    atomic.atomic_write_h5(path, build)
    return path


def mask_from_zeroed(params: Params, atol: float = 0.0) -> jax.Array:
    """The (60,) pool_3 mask of a B' whose conv_3 channels were zeroed elsewhere (1 = kept, 0 = pruned).

    A channel counts as pruned when its whole conv_3 kernel slice and its bias are (at most ``atol`` from) 0.

    Raises:
        ModelFileError: ``params`` are not DeepID's (no conv_3 with a kernel and a bias). Another model's B'
            carries its mask in its checkpoint: ``restore_badnet("<drop>/b_prime_ckpt")``.
    """
    conv_3 = params.get("conv_3") if isinstance(params, Mapping) else None
    if not isinstance(conv_3, Mapping) or not {"kernel", "bias"} <= set(conv_3):
        layers = ", ".join(sorted(map(str, params))[:8]) if isinstance(params, Mapping) else type(params).__name__
        raise ModelFileError(f"mask_from_zeroed reads the lab's DeepID (its conv_3 kernel and bias), but these params "
                             f"have no such layer (layers: {layers}); for another model's B' the mask is in its "
                             f"checkpoint: restore_badnet('<out_dir>/drop_N/b_prime_ckpt') returns (model, params, "
                             f"mask)")
    kernel = np.asarray(conv_3["kernel"])
    bias = np.asarray(conv_3["bias"])
    if kernel.shape[-1] != NUM_POOL3_CHANNELS or bias.shape != (NUM_POOL3_CHANNELS,):
        raise ModelFileError(f"conv_3 has {kernel.shape[-1]} channels, expected {NUM_POOL3_CHANNELS}")
    zeroed = (np.abs(kernel).reshape(-1, NUM_POOL3_CHANNELS).max(axis=0) <= atol) & (np.abs(bias) <= atol)
    return jnp.asarray(~zeroed, jnp.float32)
