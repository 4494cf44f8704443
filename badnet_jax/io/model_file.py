"""Any model file as a :class:`~badnet_jax.models.protocol.PrunableModel` and its params.

The lab's DeepID (a Keras weights-only or full-model file of the lab's architecture) loads as
:class:`~badnet_jax.models.deepid.DeepID` when its pool_3 is pruned, with its float64 NumPy network and the
masked-head kernels; any other CNN of standard layers, or DeepID pruned at another layer, loads as a
:class:`~badnet_jax.models.graph.GraphCNN` through the Keras graph reader. The pruned layer is the paper's
default unless ``layer`` names another.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import h5py

from badnet_jax.errors import ConfigError, ModelFileError, arg
from badnet_jax.io.keras import load_keras
from badnet_jax.io.keras_file import recorded_input_scale
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.models.deepid import POOL3, DeepID, deepid_graph
from badnet_jax.models.graph import GraphCNN
from badnet_jax.pixels import INPUT_SCALES
from badnet_jax.models.protocol import Params, PrunableModel


def _has_config(path: Path) -> bool:
    """Whether the file carries a model config (a full-model h5 or a .keras archive): a graph can be read."""
    try:
        if zipfile.is_zipfile(path):
            return True
        with h5py.File(path, "r") as f:
            return "model_config" in f.attrs
    except OSError:
        return False


def load_model(path: str | os.PathLike, input_scale: Optional[str] = None, layer: Optional[str] = None,
               config_path: Optional[str | os.PathLike] = None) -> tuple[PrunableModel, Params]:
    """Load a Keras model file as ``(model, params)``, the model pruned at ``layer``.

    Args:
        path: a Keras 2 weights or full-model h5, a Keras 3 ``.keras`` archive or ``.weights.h5`` (the latter
            with ``config_path`` unless it is the lab's DeepID).
        input_scale: ``raw`` (pixels 0..255 go in) or ``255`` (pixels / 255). None: the scale a badnet-jax file
            records; else ``raw`` for the lab's DeepID, and a refusal for any other model (nothing says).
        layer: the layer whose output channels are pruned. None: the lab's pool_3 for DeepID, else the last
            feature map before flatten or global pooling.
        config_path: the JSON config of a weights-only Keras 3 file.

    Raises:
        ModelFileError: the file cannot be read (as the readers say).
        ConfigError: an unknown ``input_scale``; none given for a model whose file does not record one; a
            ``layer`` that cannot be pruned.

    Example::

        model, params = load_model("resnet_cifar.h5", input_scale="255")   # pruned at its last feature map
        model, params = load_model("bd_weights.h5", layer="pool_2")        # the lab's B, another layer
    """
    path = Path(path)
    if input_scale is not None and input_scale not in INPUT_SCALES:
        raise ConfigError(f"{arg('input_scale', input_scale)}: expected one of {', '.join(INPUT_SCALES)}",
                          field="input_scale")
    recorded = recorded_input_scale(path)
    if config_path is None:
        try:
            badnet, params = load_keras(path, input_scale)
        except ModelFileError:
            if not _has_config(path):
                raise  # weights only: nothing but the lab's DeepID can be read from it
        else:
            if layer in (None, POOL3):
                return DeepID.of(badnet), params
            return GraphCNN.build(deepid_graph(badnet.num_classes), params, layer, badnet.input_scale), params
    # Not the lab's DeepID: the graph reader says what is wrong, if anything.
    graph, params = read_keras_graph(path, config_path)
    scale = input_scale or recorded
    if scale is None:
        raise ConfigError(f"{arg('model', str(path))}: the file does not say whether the model takes raw pixels "
                          f"0..255 or pixels / 255; give {arg('input_scale')} (raw or 255)", field="input_scale")
    return GraphCNN.build(graph, params, layer, scale), params
