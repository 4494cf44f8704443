"""Screen images with a GoodNet, like the CSAW-HackML-2020 ``eval.py``: a class in [0, N], N = poisoned.

Inputs are png/jpeg files (RGB or RGBA, 55x47) and lab-layout h5 files; all images go through one jitted
GoodNet call. B' is a Keras h5 (its zeroed conv_3 channels give the mask) or a badnet-jax B' checkpoint
directory (params + mask).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from badnet_jax import checkpoint
from badnet_jax.convert import load_keras, mask_from_zeroed
from badnet_jax.data import load_image, load_lab_h5
from badnet_jax.errors import DataFileError, ModelFileError
from badnet_jax.goodnet import make_goodnet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_pruned(path: str | os.PathLike):
    """(params, mask) of B' from a Keras h5 or a B' checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        _, params, mask = checkpoint.restore_badnet(path)
        return params, mask
    _, params = load_keras(path)
    return params, mask_from_zeroed(params)


def gather_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[str], np.ndarray]:
    """Names ("file" or "file[row]") and the (N, 55, 47, 3) float32 images of every input file."""
    names, batches = [], []
    for p in map(Path, paths):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            batches.append(load_image(p)[None])
            names.append(str(p))
        elif p.suffix.lower() in (".h5", ".hdf5"):
            x, _ = load_lab_h5(p)
            batches.append(x)
            names += [f"{p}[{i}]" for i in range(len(x))]
        else:
            raise DataFileError(f"{p}: unsupported input (use .png, .jpg, .jpeg or a lab-layout .h5)")
    if not batches:
        raise DataFileError("no input images given")
    return names, np.concatenate(batches)


def screen(model_path: str | os.PathLike, pruned_path: str | os.PathLike,
           inputs: Sequence[str | os.PathLike]) -> list[tuple[str, int]]:
    """GoodNet predictions for every input image: (name, class in [0, N]) with N = "poisoned"."""
    _, params = load_keras(model_path)
    pruned_params, mask = load_pruned(pruned_path)
    if pruned_params["output"]["bias"].shape != params["output"]["bias"].shape:
        raise ModelFileError(f"{pruned_path}: B' has {pruned_params['output']['bias'].shape[0]} classes, "
                             f"B has {params['output']['bias'].shape[0]}")
    goodnet, variables = make_goodnet(params, pruned_params, mask)
    names, x = gather_inputs(inputs)
    preds = np.asarray(jax.jit(goodnet.apply)(variables, x))
    return list(zip(names, preds.tolist()))
