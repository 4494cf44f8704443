"""Screen images with a GoodNet, like the CSAW-HackML-2020 ``eval.py``: a class in [0, N], N = poisoned.

Inputs are png/jpeg files (RGB or RGBA, 55x47), folders of them (sorted by name, one line per image) and
lab-layout h5 files; all images go through one jitted GoodNet call. G comes from a GoodNet checkpoint
(``drop_X/goodnet_ckpt``), or is built from B (a Keras h5) and B' (a Keras h5, whose zeroed conv_3 channels
give the mask, or a badnet-jax B' checkpoint); B' must be B with conv_3 channels pruned, every other weight
unchanged, else G would flag whatever two unrelated networks disagree on. The input scale is the one the
badnet-jax files record (B and B' must agree), else measured on the labelled inputs
(``badnet_jax.defense.scale``), and the log says which inputs those were.
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
from badnet_jax.io.model_file import load_model as load_model_file
from badnet_jax.io.lab_data import IMAGE_SUFFIXES, image_files, label_in_name, load_image, load_lab_h5
from badnet_jax.errors import BadNetError, ConfigError, DataFileError, ModelFileError, arg, reading
from badnet_jax.goodnet import make_goodnet, predict_goodnet
from badnet_jax.model import Params
from badnet_jax.defense.scale import choose_input_scale

log = logging.getLogger(__name__)

PRUNED_LAYER = "conv_3"  # the only layer whose channels B' may zero


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


def check_pruned_from(params: Params, pruned_params: Params, mask: jax.Array, model_path: str | os.PathLike,
                      pruned_path: str | os.PathLike) -> None:
    """Refuse a B' that is not B with some conv_3 channels pruned (every other weight bit for bit B's).

    A kept channel (mask 1) of conv_3 must be B's; a pruned one (mask 0) either B's (a checkpoint keeps B's
    weights beside its mask) or zeroed (a Keras B').

    Raises:
        ModelFileError: naming both files and the first layer that differs.
    """
    fine_tuned = ("; a fine-tuned B' goes through its GoodNet checkpoint (drop_X/goodnet_finetuned_ckpt, "
                  f"{arg('goodnet_path')})")
    if pruned_params["output"]["bias"].shape != params["output"]["bias"].shape:
        raise ModelFileError(f"{arg('pruned_path', pruned_path)}: B' has {pruned_params['output']['bias'].shape[0]} "
                             f"classes, B ({arg('model_path', model_path)}) has {params['output']['bias'].shape[0]}; "
                             "B' must be B with channels pruned", field="pruned_path")
    keep = np.asarray(mask) > 0
    for layer in params:
        for what in ("kernel", "bias"):
            b, bp = np.asarray(params[layer][what]), np.asarray(pruned_params[layer][what])
            if layer == PRUNED_LAYER:
                same = (b == bp).reshape(-1, b.shape[-1]).all(axis=0)
                zero = (bp == 0).reshape(-1, b.shape[-1]).all(axis=0)
                differs = ~same & (keep | ~zero)
                if differs.any():
                    raise ModelFileError(
                        f"{arg('pruned_path', pruned_path)} is not B ({arg('model_path', model_path)}) with channels "
                        f"pruned: {layer} {what} differs in {int(differs.sum())} channel(s) that are neither B's nor "
                        f"zeroed (first: {int(np.argmax(differs))}){fine_tuned}", field="pruned_path")
            elif b.shape != bp.shape or not np.array_equal(b, bp):
                diff = int((b != bp).sum()) if b.shape == bp.shape else b.size
                raise ModelFileError(
                    f"{arg('pruned_path', pruned_path)} is not B ({arg('model_path', model_path)}) with channels "
                    f"pruned: layer {layer!r} {what} differs in {diff} of {b.size} weights (only {PRUNED_LAYER} "
                    f"channels may be zeroed){fine_tuned}", field="pruned_path")


def gather_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names ("file" or "file[row]"), the (N, 55, 47, 3) float32 images and the labels of every input.

    Inputs are image files, lab h5 files and folders of image files (sorted by name, one name per image).
    Labels are the h5 ``label`` for h5 rows; for an image file the ``label<class>`` in its name (e.g.
    ``face_label43.png``, as ``make_poisoned_h5``'s inputs and the shared faces name them), else -1 (unknown).
    """
    names, batches, labels = [], [], []
    for p in map(Path, paths):
        files = image_files(p) if p.is_dir() else [p]
        for f in files:
            if f.suffix.lower() in IMAGE_SUFFIXES:
                batches.append(load_image(f)[None])
                names.append(str(f))
                label = label_in_name(f)
                labels.append(np.full(1, -1 if label is None else label))
            elif f.suffix.lower() in (".h5", ".hdf5"):
                x, y = load_lab_h5(f)
                if not len(x):
                    raise DataFileError(f"{f}: holds no images")
                batches.append(x)
                labels.append(y)
                names += [f"{f}[{i}]" for i in range(len(x))]
            else:
                raise DataFileError(f"{f}: unsupported input (use .png, .jpg, .jpeg, a lab-layout .h5 or a folder "
                                    "of images)")
    if not batches:
        raise DataFileError("no input images given")
    return names, np.concatenate(batches), np.concatenate(labels)


def _recorded_scale(model_path: str | os.PathLike, pruned_path: str | os.PathLike,
                    pruned_scale: Optional[str]) -> Optional[str]:
    """The scale B's and B''s files record; refuses two different ones (a B' of another BadNet, or a mistake)."""
    model_scale = recorded_input_scale(model_path)
    if model_scale is not None and pruned_scale is not None and model_scale != pruned_scale:
        raise ModelFileError(f"{arg('pruned_path', pruned_path)} records input scale {pruned_scale} but B "
                             f"({arg('model_path', model_path)}) records {model_scale}: B' must be B with channels "
                             "pruned, at B's scale", field="pruned_path")
    return pruned_scale or model_scale


def _deepid_only(model_path: str | os.PathLike) -> None:
    """Refuse, before any image is read, a B that is a CNN other than the lab's DeepID (the screener's images,
    GoodNet checkpoints and B' files are DeepID's), saying so instead of a DeepID reader's complaint."""
    try:
        load_keras(model_path)
    except ModelFileError:
        try:
            other, _ = load_model_file(model_path, "255")
        except BadNetError:
            return  # not a model at all: the reading below says what is wrong with it
        raise ConfigError(f"{arg('model_path', str(model_path))}: {other.name} is not the lab's DeepID; the screener "
                          "reads DeepID BadNets only (for any CNN: badnet_jax.make_goodnet and predict_goodnet)",
                          field="model_path") from None


def screen(model_path: Optional[str | os.PathLike], pruned_path: Optional[str | os.PathLike],
           inputs: Sequence[str | os.PathLike], input_scale: str = "auto",
           goodnet_path: Optional[str | os.PathLike] = None) -> list[tuple[str, int]]:
    """GoodNet predictions for every input image: (name, class in [0, N]) with N = "poisoned".

    Args:
        model_path, pruned_path: B (Keras h5) and B' (Keras h5 or B' checkpoint); or both None with
            ``goodnet_path``.
        inputs: image files, lab h5 files and folders of image files.
        input_scale: ``auto`` (recorded by badnet-jax, else measured on the labelled inputs), ``raw`` or ``255``.
        goodnet_path: a GoodNet checkpoint directory written by the defense.

    Raises:
        ModelFileError: B' is not B with channels pruned, or their files record different input scales.
        DataFileError: unreadable inputs; labelled inputs outside B's classes when the scale is measured.
        ConfigError: neither a GoodNet nor B and B'; the input scale cannot be told.
    """
    if model_path is not None:
        _deepid_only(model_path)
    names, x, labels = gather_inputs(inputs)
    if goodnet_path is not None:
        if model_path is not None or pruned_path is not None:
            raise ConfigError(f"give either a GoodNet checkpoint ({arg('goodnet_path')}) or B and B' "
                              f"({arg('model_path')} and {arg('pruned_path')})", field="goodnet_path")
        with reading("goodnet_path", goodnet_path):
            goodnet, variables = checkpoint.restore_goodnet(goodnet_path)
        scale = choose_input_scale(goodnet, variables, input_scale, recorded=goodnet.input_scale).scale
        goodnet = goodnet.clone(model=goodnet.model.with_input_scale(scale))
    else:
        if model_path is None or pruned_path is None:
            raise ConfigError(f"give B and B' ({arg('model_path')} and {arg('pruned_path')}), or a GoodNet "
                              f"checkpoint ({arg('goodnet_path')})",
                              field="pruned_path" if model_path is not None else "model_path")
        with reading("model_path", model_path):
            model, params = load_keras(model_path)
        with reading("pruned_path", pruned_path):
            pruned_params, mask, pruned_scale = load_pruned(pruned_path)
        check_pruned_from(params, pruned_params, mask, model_path, pruned_path)
        recorded = _recorded_scale(model_path, pruned_path, pruned_scale)
        if recorded is not None and input_scale == "auto":
            log.info("Input scale %s, recorded in %s.", recorded, pruned_path if pruned_scale else model_path)
        known = labels >= 0
        scale = choose_input_scale(model, params, input_scale, recorded, x[known], labels[known],
                                   source=str(model_path), measured_on=_measured_on(names, known)).scale
        goodnet, variables = make_goodnet(model.clone(input_scale=scale), params, pruned_params, mask)
    preds, settled = predict_goodnet(goodnet, variables, x)
    if settled:
        log.info("%d near-tie prediction(s) of B or B' settled in float64.", settled)
    return list(zip(names, preds.tolist()))


def _measured_on(names: list[str], known: np.ndarray) -> str:
    """What a scale measured on the screened inputs measured on: these may be poisoned, labelled as the attacker's."""
    files = list(dict.fromkeys(n.rsplit("[", 1)[0] if n.endswith("]") else n for n, k in zip(names, known) if k))
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"inputs from {shown}, labelled by h5 'label' or label<class> in the file name, poisoned ones included"
