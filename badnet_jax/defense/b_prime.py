"""B' for the screener: read from its file, and checked to be B with the channels of one layer pruned.

B' comes as

* a B' checkpoint (``drop_X/b_prime_ckpt``): B's params and the mask of its pruned layer, with its model;
* a Keras h5 of the lab's DeepID whose zeroed conv_3 channels give the mask;
* a Keras h5 of any other model written by ``save_keras_graph`` (``drop_X/b_prime.h5``): it records its pruned
  layer, channels and how it pruned them, and must be exactly what that writer makes of B under that mask.

:func:`load_pruned` reads it as a :class:`PrunedFile`; :func:`b_prime_for` checks it against B and moves B's
model to B''s pruned layer. B' must be B with channels pruned, every other weight unchanged, else G would flag
whatever two unrelated networks disagree on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from badnet_jax.errors import BadNetError, ConfigError, ModelFileError, arg
from badnet_jax.io import checkpoint, fileio
from badnet_jax.io.keras import load_keras, mask_from_zeroed
from badnet_jax.io.keras_file import is_keras_archive, recorded_input_scale
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.io.keras_graph_writer import (PRUNE_METHOD_ATTR, PRUNED_CHANNELS_ATTR, PRUNED_LAYER_ATTR,
                                              prune_graph)
from badnet_jax.models.deepid import DeepID, deepid_graph
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.ir import Graph
from badnet_jax.models.protocol import Params, PrunableModel

PRUNED_LAYER = "conv_3"  # the only layer whose channels a Keras B' of the lab's DeepID may zero

_FINE_TUNED = ("; a fine-tuned B' goes through its GoodNet checkpoint (drop_X/goodnet_finetuned_ckpt, "
               f"{arg('goodnet_path')})")
_PASS_CHECKPOINT = (f"pass the drop_X/b_prime_ckpt that prune.py writes beside it as {arg('pruned_path')}, or "
                    f"drop_X/goodnet_ckpt as {arg('goodnet_path')}")


@dataclasses.dataclass(frozen=True)
class PrunedFile:
    """B' as its file gives it.

    Attributes:
        kind: ``checkpoint`` (a B' checkpoint), ``deepid_h5`` (a Keras h5 of the lab's DeepID) or ``graph_h5``
            (a Keras h5 of any model written by ``save_keras_graph``).
        params: B''s params as stored (a checkpoint: B's; a Keras file: with its pruned weights zeroed).
        input_scale: the scale the file records, or None.
        layer: the pruned layer (None for a DeepID h5: pool_3, through its zeroed conv_3 channels).
        mask: (C,) 0/1 mask of the pruned layer (None for a ``graph_h5`` until B's channel count is known).
        model: the model a checkpoint carries (None for a Keras file).
        graph: a ``graph_h5``'s graph as read.
        channels: a ``graph_h5``'s pruned channels as recorded.
        method: a ``graph_h5``'s way of pruning as recorded (``zeroed_readers`` or ``mask_layer``).
    """

    kind: str
    params: Params
    input_scale: Optional[str]
    layer: Optional[str] = None
    mask: Optional[Any] = None
    model: Optional[PrunableModel] = None
    graph: Optional[Graph] = None
    channels: Optional[np.ndarray] = None
    method: Optional[str] = None


def load_pruned(path: str | os.PathLike) -> PrunedFile:
    """B' from a B' checkpoint directory or a Keras h5 (of the lab's DeepID, or of any model written by
    ``save_keras_graph``), not yet checked against B (:func:`b_prime_for`).

    Raises:
        ConfigError: ``path`` is a GoodNet checkpoint (it goes to :func:`screen`'s ``goodnet_path``), or a Keras
            file of a model other than the lab's DeepID that does not record its pruning.
        ModelFileError, CheckpointError: the file cannot be read (as the readers say).
    """
    path = Path(path)
    if path.is_dir():
        if checkpoint.is_goodnet_checkpoint(path):
            raise ConfigError(f"{path}: is a GoodNet checkpoint; pass it as {arg('goodnet_path')} (without "
                              f"{arg('model_path')}/{arg('pruned_path')})", field="pruned_path")
        model, params, mask = checkpoint.restore_badnet(path)
        return PrunedFile("checkpoint", params, model.input_scale, model.layer, mask, model)
    recorded = _recorded_pruning(path)
    if recorded is not None:
        layer, channels, method = recorded
        graph, params = read_keras_graph(path)
        return PrunedFile("graph_h5", params, recorded_input_scale(path), layer, graph=graph, channels=channels,
                          method=method)
    try:
        _, params = load_keras(path)
    except ModelFileError:
        try:
            read_keras_graph(path)
        except BadNetError:
            raise  # not a model file at all: the DeepID reader's message says what is wrong
        raise ConfigError(f"{path}: a Keras file of a model other than the lab's DeepID that does not record which "
                          f"channels were pruned (a file prune.py writes does); {_PASS_CHECKPOINT}") from None
    return PrunedFile("deepid_h5", params, recorded_input_scale(path), None, mask_from_zeroed(params))


def _recorded_pruning(path: Path) -> Optional[tuple[str, np.ndarray, str]]:
    """(layer, channels, method) a ``save_keras_graph`` B' records in its root attributes, or None."""
    path = fileio.require_file(path, ModelFileError, "model file")
    if is_keras_archive(path):
        return None
    with fileio.open_h5(path, ModelFileError) as f:
        try:
            attrs = {key: f.attrs.get(key) for key in (PRUNED_LAYER_ATTR, PRUNED_CHANNELS_ATTR, PRUNE_METHOD_ATTR)}
            if all(v is None for v in attrs.values()):
                return None
            text = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            layer, method, channels = text[PRUNED_LAYER_ATTR], text[PRUNE_METHOD_ATTR], attrs[PRUNED_CHANNELS_ATTR]
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:  # UnicodeDecodeError included
            raise ModelFileError(f"{path}: cannot read its attributes: {err} (truncated or corrupted?)") from None
    channels = None if channels is None else np.asarray(channels)
    if not isinstance(layer, str) or not isinstance(method, str) or channels is None or channels.ndim != 1 \
            or not np.issubdtype(channels.dtype, np.integer):
        raise ModelFileError(f"{path}: records its pruning incompletely ({PRUNED_LAYER_ATTR} {layer!r}, "
                             f"{PRUNE_METHOD_ATTR} {method!r}, {PRUNED_CHANNELS_ATTR} "
                             f"{None if channels is None else channels.dtype}); {_PASS_CHECKPOINT}")
    return layer, channels.astype(np.int64), method


def _at_layer(model: PrunableModel, params: Params, pruned: PrunedFile, model_path: Any,
              pruned_path: Any) -> PrunableModel:
    """B's model pruned at B''s layer (a ``graph_h5`` needs a graph, so the lab's DeepID becomes its graph).

    Raises:
        ModelFileError: B has no such layer (B' is of another network).
    """
    layer = pruned.layer
    if layer is None or (layer == model.layer and (pruned.kind != "graph_h5" or isinstance(model, GraphCNN))):
        return model
    try:
        if isinstance(model, DeepID):
            return GraphCNN.build(deepid_graph(model.num_classes), params, layer, model.input_scale)
        if isinstance(model, GraphCNN):
            return model.with_layer(layer)
    except BadNetError as err:
        raise _not_pruned_b(model_path, pruned_path, f"B' prunes layer {layer!r}, which B cannot be pruned at "
                                                     f"({err})") from None
    raise _not_pruned_b(model_path, pruned_path, f"B' prunes layer {layer!r}, B ({model.name}) is pruned at "
                                                 f"{model.layer!r}")


def _not_pruned_b(model_path: Any, pruned_path: Any, why: str, hint: str = "") -> ModelFileError:
    return ModelFileError(f"{arg('pruned_path', pruned_path)} is not B ({arg('model_path', model_path)}) with "
                          f"channels pruned: {why}{hint}", field="pruned_path")


def b_prime_for(model: PrunableModel, params: Params, pruned: PrunedFile, model_path: str | os.PathLike,
                pruned_path: str | os.PathLike) -> tuple[PrunableModel, Optional[Params], jax.Array]:
    """``(model, B''s own params or None, mask)`` for ``make_goodnet(model, params, ...)``: B' checked to be B with
    channels of one layer pruned, B's model moved to that layer.

    Raises:
        ModelFileError: naming both files and the first difference (another architecture, another layer, a
            weight that differs, a recorded pruning that is not what ``save_keras_graph`` writes of B).
    """
    if pruned.kind == "checkpoint" and isinstance(pruned.model, DeepID) and not isinstance(model, DeepID):
        raise _not_pruned_b(model_path, pruned_path, f"B' is a checkpoint of the lab's DeepID, B is {model.name}")
    model = _at_layer(model, params, pruned, model_path, pruned_path)
    if pruned.kind == "deepid_h5" or (pruned.kind == "checkpoint" and isinstance(pruned.model, DeepID)
                                      and isinstance(model, DeepID)):
        if not isinstance(model, DeepID):
            raise _not_pruned_b(model_path, pruned_path, f"B' is the lab's DeepID, B is {model.name}")
        check_pruned_from(params, pruned.params, pruned.mask, model_path, pruned_path)
        return model, pruned.params, pruned.mask
    if pruned.kind == "checkpoint":
        _same_architecture(model, pruned.model, model_path, pruned_path)
        _same_params(params, pruned.params, model_path, pruned_path, _FINE_TUNED)
        return model, pruned.params, pruned.mask
    return model, None, _graph_h5_mask(model, params, pruned, model_path, pruned_path)


def _same_architecture(model: PrunableModel, other: PrunableModel, model_path: Any, pruned_path: Any) -> None:
    if not isinstance(model, GraphCNN) or not isinstance(other, GraphCNN):
        raise _not_pruned_b(model_path, pruned_path, f"B' is a checkpoint of {other.name}, B is {model.name}")
    diff = _graph_difference(model.graph, other.graph)
    if diff is not None:
        raise _not_pruned_b(model_path, pruned_path, f"B''s architecture is not B's ({diff})")
    if model.layer != other.layer:
        raise _not_pruned_b(model_path, pruned_path, f"B' prunes layer {other.layer!r}, B {model.layer!r}")


def _graph_difference(want: Graph, got: Graph) -> Optional[str]:
    """None if ``got`` is ``want`` (nodes, input shape, output), else the first difference in words."""
    if (got.nodes, got.input_hwc, got.output) == (want.nodes, want.input_hwc, want.output):
        return None
    return next((f"layer {x.name!r} differs" for x, y in zip(want.nodes, got.nodes) if x != y),
                f"{len(got.nodes)} nodes, expected {len(want.nodes)}")


def _same_weights(layer: str, key: str, b: Any, bp: Any, model_path: Any, pruned_path: Any, hint: str) -> None:
    """Refuse a weight array of B' (``bp``) that is not bit for bit B's (``b``), saying in how many weights."""
    b, bp = np.asarray(b), np.asarray(bp)
    if b.shape != bp.shape or not np.array_equal(b, bp):
        diff = int((b != bp).sum()) if b.shape == bp.shape else b.size
        raise _not_pruned_b(model_path, pruned_path, f"layer {layer!r} {key} differs in {diff} of {b.size} weights",
                            hint)


def _same_params(params: Params, other: Params, model_path: Any, pruned_path: Any, hint: str) -> None:
    """Every weight of ``other`` bit for bit ``params``' (the same layers and keys)."""
    if set(other) != set(params):
        raise _not_pruned_b(model_path, pruned_path, f"B' has the layers {sorted(other)}, B {sorted(params)}", hint)
    for layer in params:
        if set(other[layer]) != set(params[layer]):
            raise _not_pruned_b(model_path, pruned_path, f"layer {layer!r} holds {sorted(other[layer])} in B', "
                                f"{sorted(params[layer])} in B", hint)
        for key in params[layer]:
            _same_weights(layer, key, params[layer][key], other[layer][key], model_path, pruned_path, hint)


def _graph_h5_mask(model: PrunableModel, params: Params, pruned: PrunedFile, model_path: Any,
                   pruned_path: Any) -> np.ndarray:
    """The mask a ``save_keras_graph`` B' records, checked by writing B under it again: the same graph and weights."""
    c = model.num_channels
    channels = pruned.channels
    if len(channels) and (channels.min() < 0 or channels.max() >= c or len(np.unique(channels)) != len(channels)):
        raise _not_pruned_b(model_path, pruned_path, f"B' records pruned channels {channels.tolist()[:10]} of layer "
                            f"{model.layer!r}, which has {c} channels (each at most once)")
    mask = np.ones(c, np.float32)
    mask[channels] = 0
    expected = prune_graph(model, params, mask)
    if pruned.method != expected.method:
        raise _not_pruned_b(model_path, pruned_path, f"B' records pruning by {pruned.method!r}, but B's layer "
                            f"{model.layer!r} is pruned by {expected.method!r}")
    diff = _graph_difference(expected.graph, pruned.graph)
    if diff is not None:
        raise _not_pruned_b(model_path, pruned_path, f"B''s architecture is not B's pruned at {model.layer!r} ({diff})")
    _same_params(expected.params, pruned.params, model_path, pruned_path,
                 f" (B' must be B with the recorded channels pruned){_FINE_TUNED}")
    return mask


def check_pruned_from(params: Params, pruned_params: Params, mask: jax.Array, model_path: str | os.PathLike,
                      pruned_path: str | os.PathLike) -> None:
    """Refuse a B' of the lab's DeepID that is not B with some conv_3 channels pruned (every other weight bit for
    bit B's).

    A kept channel (mask 1) of conv_3 must be B's; a pruned one (mask 0) either B's (a checkpoint keeps B's
    weights beside its mask) or zeroed (a Keras B').

    Raises:
        ModelFileError: naming both files and the first layer that differs.
    """
    if pruned_params["output"]["bias"].shape != params["output"]["bias"].shape:
        raise ModelFileError(f"{arg('pruned_path', pruned_path)}: B' has {pruned_params['output']['bias'].shape[0]} "
                             f"classes, B ({arg('model_path', model_path)}) has {params['output']['bias'].shape[0]}; "
                             "B' must be B with channels pruned", field="pruned_path")
    keep = np.asarray(mask) > 0
    for layer in params:
        for what in ("kernel", "bias"):
            b, bp = np.asarray(params[layer][what]), np.asarray(pruned_params[layer][what])
            if layer != PRUNED_LAYER:
                _same_weights(layer, what, b, bp, model_path, pruned_path,
                              f" (only {PRUNED_LAYER} channels may be zeroed){_FINE_TUNED}")
                continue
            same = (b == bp).reshape(-1, b.shape[-1]).all(axis=0)
            zero = (bp == 0).reshape(-1, b.shape[-1]).all(axis=0)
            differs = ~same & (keep | ~zero)
            if differs.any():
                raise _not_pruned_b(model_path, pruned_path, f"{layer} {what} differs in {int(differs.sum())} "
                                    f"channel(s) that are neither B's nor zeroed (first: {int(np.argmax(differs))})",
                                    _FINE_TUNED)
