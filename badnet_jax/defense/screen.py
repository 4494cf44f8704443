"""Screen images with a GoodNet, like the CSAW-HackML-2020 ``eval.py``: a class in [0, N], N = poisoned.

Inputs are png/jpeg files (RGB or RGBA, 55x47) and lab-layout h5 files; all images go through one jitted
GoodNet call. G comes from a GoodNet checkpoint (``drop_X/goodnet_ckpt``), or is built from B (a Keras h5)
and B' (a Keras h5, whose zeroed conv_3 channels give the mask, or a badnet-jax B' checkpoint). The input
scale is the one the badnet-jax files record, or measured on labelled h5 inputs (``badnet_jax.defense.scale``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from badnet_jax.io import checkpoint
from badnet_jax.io.keras import load_keras, mask_from_zeroed, recorded_input_scale
from badnet_jax.io.lab_data import LABEL_IN_NAME, load_image, load_lab_h5
from badnet_jax.errors import ConfigError, DataFileError, ModelFileError, arg
from badnet_jax.goodnet import make_goodnet, predict_goodnet
from badnet_jax.model import Params
from badnet_jax.defense.scale import choose_input_scale

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_pruned(path: str | os.PathLike) -> tuple[Params, jax.Array, Optional[str]]:
    """(params, mask, recorded input scale or None) of B' from a Keras h5 or a B' checkpoint directory.

    Raises:
        ConfigError: ``path`` is a GoodNet checkpoint (it goes to :func:`screen`'s ``goodnet_path``).
    """
    path = Path(path)
    if path.is_dir():
        if checkpoint.is_goodnet_checkpoint(path):
            raise ConfigError(f"{path}: is a GoodNet checkpoint; pass it as {arg('goodnet_path')} (without "
                              f"{arg('model_path')}/{arg('pruned_path')})", field="pruned_path")
        model, params, mask = checkpoint.restore_badnet(path)
        return params, mask, model.input_scale
    _, params = load_keras(path)
    return params, mask_from_zeroed(params), recorded_input_scale(path)


def gather_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names ("file" or "file[row]"), the (N, 55, 47, 3) float32 images and the labels of every input file.

    Labels are the h5 ``label`` for h5 rows; for an image file the ``label<class>`` in its name (e.g.
    ``face_label43.png``, as ``make_poisoned_h5``'s inputs and the shared faces name them), else -1 (unknown).
    """
    names, batches, labels = [], [], []
    for p in map(Path, paths):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            batches.append(load_image(p)[None])
            names.append(str(p))
            found = LABEL_IN_NAME.search(p.stem)
            labels.append(np.full(1, int(found.group(1)) if found else -1))
        elif p.suffix.lower() in (".h5", ".hdf5"):
            x, y = load_lab_h5(p)
            if not len(x):
                raise DataFileError(f"{p}: holds no images")
            batches.append(x)
            labels.append(y)
            names += [f"{p}[{i}]" for i in range(len(x))]
        else:
            raise DataFileError(f"{p}: unsupported input (use .png, .jpg, .jpeg or a lab-layout .h5)")
    if not batches:
        raise DataFileError("no input images given")
    return names, np.concatenate(batches), np.concatenate(labels)


def screen(model_path: Optional[str | os.PathLike], pruned_path: Optional[str | os.PathLike],
           inputs: Sequence[str | os.PathLike], input_scale: str = "auto",
           goodnet_path: Optional[str | os.PathLike] = None) -> list[tuple[str, int]]:
    """GoodNet predictions for every input image: (name, class in [0, N]) with N = "poisoned".

    Args:
        model_path, pruned_path: B (Keras h5) and B' (Keras h5 or B' checkpoint); or both None with
            ``goodnet_path``.
        inputs: image and lab h5 files.
        input_scale: ``auto`` (recorded by badnet-jax, else measured on labelled h5 inputs), ``raw`` or ``255``.
        goodnet_path: a GoodNet checkpoint directory written by the defense.
    """
    names, x, labels = gather_inputs(inputs)
    if goodnet_path is not None:
        if model_path is not None or pruned_path is not None:
            raise ConfigError(f"give either a GoodNet checkpoint ({arg('goodnet_path')}) or B and B' "
                              f"({arg('model_path')} and {arg('pruned_path')})", field="goodnet_path")
        goodnet, variables = checkpoint.restore_goodnet(goodnet_path)
        scale = choose_input_scale(goodnet, variables, input_scale, recorded=goodnet.input_scale).scale
        goodnet = goodnet.clone(input_scale=scale)
    else:
        if model_path is None or pruned_path is None:
            raise ConfigError(f"give B and B' ({arg('model_path')} and {arg('pruned_path')}), or a GoodNet "
                              f"checkpoint ({arg('goodnet_path')})",
                              field="pruned_path" if model_path is not None else "model_path")
        model, params = load_keras(model_path)
        pruned_params, mask, recorded = load_pruned(pruned_path)
        if pruned_params["output"]["bias"].shape != params["output"]["bias"].shape:
            raise ModelFileError(f"{pruned_path}: B' has {pruned_params['output']['bias'].shape[0]} classes, "
                                 f"B has {params['output']['bias'].shape[0]}")
        known = labels >= 0
        scale = choose_input_scale(model, params, input_scale, recorded or recorded_input_scale(model_path),
                                   x[known], labels[known], source=str(model_path)).scale
        goodnet, variables = make_goodnet(params, pruned_params, mask, input_scale=scale)
    preds, settled = predict_goodnet(goodnet, variables, x)
    if settled:
        log.info("%d near-tie prediction(s) of B or B' settled in float64.", settled)
    return list(zip(names, preds.tolist()))
