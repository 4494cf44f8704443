"""Screen images with a GoodNet, like the CSAW-HackML-2020 ``eval.py``: a class in [0, N], N = poisoned.

Any model works: the lab's DeepID and any CNN that ``badnet_jax.io.model_file.load_model`` reads. Inputs are
png/jpeg files (RGB or RGBA, of the model's input size), folders of them (sorted by name, one line per image)
and lab-layout h5 files; all images go through one GoodNet call. G comes from a GoodNet checkpoint
(``drop_X/goodnet_ckpt``, which carries its model), or is built from B (a model file) and B' (a B' checkpoint
or a Keras h5), read and checked to be B with channels pruned by ``badnet_jax.defense.b_prime``.

The input scale is the one the badnet-jax files record (B and B' must agree), else measured on the labelled
inputs (``badnet_jax.defense.scale``), and the log says which inputs those were.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from badnet_jax.defense.b_prime import b_prime_for, load_pruned
from badnet_jax.defense.scale import choose_input_scale
from badnet_jax.errors import ConfigError, DataFileError, ModelFileError, arg, reading
from badnet_jax.goodnet import make_goodnet, predict_goodnet
from badnet_jax.io import checkpoint, fileio
from badnet_jax.io.keras_file import recorded_input_scale
from badnet_jax.io.lab_data import UNKNOWN_LABEL, load_lab_h5
from badnet_jax.io.images import IMAGE_SUFFIXES, image_files, label_in_name, load_image
from badnet_jax.io.model_file import load_model

log = logging.getLogger(__name__)


def input_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every input file: image files and lab h5 files as given, folders as their image files (sorted by name),
    each checked to be a readable regular file before any model is read.

    Raises:
        DataFileError: a path that is missing or not a regular file (saying what it is), a folder without images,
            a file of another kind, or no paths at all.
    """
    files = []
    for p in map(Path, paths):
        for f in image_files(p) if p.is_dir() else [p]:
            suffix = f.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                files.append(fileio.require_file(f, DataFileError, "image file"))
            elif suffix in (".h5", ".hdf5"):
                files.append(fileio.require_file(f, DataFileError))
            else:
                raise DataFileError(f"{f}: unsupported input (use .png, .jpg, .jpeg, a lab-layout .h5 or a folder "
                                    "of images)")
    if not files:
        raise DataFileError("no input images given")
    return files


def gather_inputs(paths: Sequence[str | os.PathLike],
                  hwc: tuple[int, int, int]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names ("file" or "file[row]"), the (N, *hwc) float32 images and the labels of every input.

    Inputs are image files, lab h5 files and folders of image files (sorted by name, one name per image), all of
    the model's input size ``hwc``. Labels are the h5 ``label`` for h5 rows (an h5 without one is screened
    too); for an image file the ``label<class>`` in its name (e.g. ``face_label43.png``, as
    ``make_poisoned_h5``'s inputs and the shared faces name them); else ``UNKNOWN_LABEL`` (-1).

    Raises:
        DataFileError: as :func:`input_files` says, or a file that cannot be read, of another size than ``hwc``,
            or an h5 file without images.
    """
    names, batches, labels = [], [], []
    for f in input_files(paths):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            batches.append(load_image(f, hwc=hwc)[None])
            names.append(str(f))
            label = label_in_name(f)
            labels.append(np.full(1, UNKNOWN_LABEL if label is None else label))
        else:
            x, y = load_lab_h5(f, hwc=hwc, require_labels=False)
            if not len(x):
                raise DataFileError(f"{f}: holds no images")
            batches.append(x)
            labels.append(y)
            names += [f"{f}[{i}]" for i in range(len(x))]
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


def screen(model_path: Optional[str | os.PathLike], pruned_path: Optional[str | os.PathLike],
           inputs: Sequence[str | os.PathLike], input_scale: str = "auto",
           goodnet_path: Optional[str | os.PathLike] = None) -> list[tuple[str, int]]:
    """GoodNet predictions for every input image: (name, class in [0, N]) with N = "poisoned".

    Args:
        model_path, pruned_path: B (any model file ``load_model`` reads) and B' (a B' checkpoint, or a Keras h5:
            the lab's DeepID with zeroed conv_3 channels, any other model as ``save_keras_graph`` writes it); or
            both None with ``goodnet_path``.
        inputs: image files, lab h5 files and folders of image files, of the model's input size.
        input_scale: ``auto`` (recorded by badnet-jax, else measured on the labelled inputs), ``raw`` or ``255``.
        goodnet_path: a GoodNet checkpoint directory written by the defense.

    Raises:
        ModelFileError: B' is not B with channels pruned, or their files record different input scales.
        DataFileError: unreadable inputs, or of another size than the model's; labelled inputs outside B's
            classes when the scale is measured.
        ConfigError: neither a GoodNet nor B and B'; the input scale cannot be told; a Keras B' of a model other
            than the lab's DeepID that does not record its pruning.
    """
    files = input_files(inputs)  # a wrong path is named before any model is read
    if goodnet_path is not None:
        if model_path is not None or pruned_path is not None:
            raise ConfigError(f"give either a GoodNet checkpoint ({arg('goodnet_path')}) or B and B' "
                              f"({arg('model_path')} and {arg('pruned_path')})", field="goodnet_path")
        with reading("goodnet_path", goodnet_path):
            goodnet, variables = checkpoint.restore_goodnet(goodnet_path)
        names, x, labels = gather_inputs(files, goodnet.model.input_hwc)
        scale = choose_input_scale(goodnet, variables, input_scale, recorded=goodnet.input_scale,
                                   source=str(goodnet_path)).scale
        goodnet = goodnet.clone(model=goodnet.model.with_input_scale(scale))
    else:
        if model_path is None or pruned_path is None:
            raise ConfigError(f"give B and B' ({arg('model_path')} and {arg('pruned_path')}), or a GoodNet "
                              f"checkpoint ({arg('goodnet_path')})",
                              field="pruned_path" if model_path is not None else "model_path")
        with reading("model_path", model_path):
            # the scale is settled below (recorded or measured); a model needs one to load
            model, params = load_model(model_path, recorded_input_scale(model_path) or "raw")
        with reading("pruned_path", pruned_path):
            pruned = load_pruned(pruned_path)
        model, pruned_params, mask = b_prime_for(model, params, pruned, model_path, pruned_path)
        names, x, labels = gather_inputs(files, model.input_hwc)
        recorded = _recorded_scale(model_path, pruned_path, pruned.input_scale)
        recorded_in = str(pruned_path if pruned.input_scale else model_path)
        if recorded is not None and input_scale == "auto":
            log.info("Input scale %s, recorded in %s.", recorded, recorded_in)
        known = labels != UNKNOWN_LABEL
        scale = choose_input_scale(model, params, input_scale, recorded, x[known], labels[known],
                                   source=str(model_path), measured_on=_measured_on(names, known),
                                   recorded_in=recorded_in).scale
        goodnet, variables = make_goodnet(model.with_input_scale(scale), params, pruned_params, mask)
    # A model other than the lab's DeepID has its near-tie bound measured on the images at hand, for B and for B'
    # on their own weights (predict_goodnet), as the sweep measures it on its ranking set: a checkpoint stores none.
    preds, settled = predict_goodnet(goodnet, variables, x)
    if settled:
        log.info("%d near-tie prediction(s) of B or B' settled in float64.", settled)
    return list(zip(names, preds.tolist()))


def _measured_on(names: list[str], known: np.ndarray) -> str:
    """What a scale measured on the screened inputs measured on: these may be poisoned, labelled as the attacker's."""
    files = list(dict.fromkeys(n.rsplit("[", 1)[0] if n.endswith("]") else n for n, k in zip(names, known) if k))
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"inputs from {shown}, labelled by h5 'label' or label<class> in the file name, poisoned ones included"
