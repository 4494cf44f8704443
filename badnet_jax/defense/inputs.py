"""Where the defense's model and data come from: given files, the lab's default layout, or the embedded demo.

Three steps, so the defense can overlap work: :func:`locate_inputs` decides which files (errors up front,
before anything is read), :func:`peek_sets` reads only the h5 headers (shapes and dtypes, enough to compile
the sweep), :func:`load_sets` reads the images.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

from badnet_jax.attack.demo import DEMO_MODEL, demo_sets
from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL, gap_demo_sets
from badnet_jax.errors import ConfigError, arg, reading
from badnet_jax.io.fileio import sha256_of
from badnet_jax.io.keras_file import recorded_input_scale
from badnet_jax.io.model_file import load_model as load_model_file
from badnet_jax.io.lab_data import load_lab_h5, load_true_labels, peek_lab_h5
from badnet_jax.models.protocol import Params, PrunableModel

log = logging.getLogger(__name__)

LAB_MODEL_CANDIDATES = ("models/bd_net.h5", "models/bd_weights.h5")
LAB_DATA_DEFAULTS = {"clean_valid": "data/cl/valid.h5", "bd_valid": "data/bd/bd_valid.h5",
                     "clean_test": "data/cl/test.h5", "bd_test": "data/bd/bd_test.h5"}
DATA_ROLES = tuple(LAB_DATA_DEFAULTS)  # the ranking set (clean validation) first
CLEAN_ROLES = ("clean_valid", "clean_test")  # required: the ranking, the cut and the clean test numbers
POISONED_ROLES = ("bd_valid", "bd_test")  # optional: a defender seldom has poisoned data


# The embedded examples: name -> (the shipped model, its data generator, what it is).
EXAMPLES = {
    "deepid": (DEMO_MODEL, demo_sets, "the embedded demo (synthetic faces, demo DeepID BadNet)"),
    "gapnet": (GAP_DEMO_MODEL, gap_demo_sets, "the embedded GAP-head example (32x32 shapes, a BatchNorm CNN)"),
}


@dataclasses.dataclass(frozen=True)
class InputFiles:
    """The files a run reads: a Keras model and the lab h5 sets by role, or an embedded example (``demo``).

    ``data`` holds both clean sets and those poisoned sets that were given (none, one or both); ``example``
    names the embedded example (a key of :data:`EXAMPLES`) when ``demo``.
    """

    model: Path
    data: dict[str, Path]
    demo: bool = False
    example: str = "deepid"


@dataclasses.dataclass(frozen=True)
class Sets:
    """The data sets as (x, y) by role (clean ones always), and the true classes of the poisoned ones if known."""

    data: dict[str, tuple[np.ndarray, np.ndarray]]
    true_labels: dict[str, Optional[np.ndarray]]


def _check_paths(paths: Mapping[str, Any]) -> None:
    """Refuse a model or data set given as something other than a file's path (a model object, an array).

    Raises:
        ConfigError: naming the field, what it got and where such an object goes instead.
    """
    for role, value in paths.items():
        if value is None or isinstance(value, (str, os.PathLike)):
            continue
        kind = "a model file" if role == "model" else "an h5 file in the lab's layout"
        instead = ("a model object (a FlaxCNN, a GraphCNN) runs through rank_and_sweep and make_goodnet"
                   if role == "model" else "images in memory run through rank_and_sweep")
        raise ConfigError(f"{arg(role)}: expected the path of {kind}, got a {type(value).__name__}: the defense reads "
                          f"its inputs from files; {instead}", field=role)


def locate_inputs(model: Optional[str], data: Mapping[str, Optional[str]],
                  example: Optional[str] = None) -> InputFiles:
    """The files to read: the given ones, else the lab's default layout if present, else the embedded demo;
    ``example`` asks for an embedded example by name (:data:`EXAMPLES`) and takes no files.

    The clean sets are required; the poisoned ones are optional (without them ASR is "n/a").

    Raises:
        ConfigError: a poisoned set without the clean ones, lab files partly missing, or no model for lab data.
    """
    _check_paths({"model": model, **data})
    given = {r: Path(data[r]) for r in DATA_ROLES if data.get(r)}
    if example is not None:
        if example not in EXAMPLES:
            raise ConfigError(f"{arg('example', example)}: expected one of {', '.join(EXAMPLES)}", field="example")
        if given or model:
            raise ConfigError(f"{arg('example', example)} runs an embedded example and reads no files; leave out "
                              f"{arg('model' if model else next(iter(given)))}", field="example")
        log.info("Running %s.", EXAMPLES[example][2])
        return InputFiles(model=EXAMPLES[example][0], data={}, demo=True, example=example)
    if given and any(r not in given for r in CLEAN_ROLES):
        missing = [r for r in CLEAN_ROLES if r not in given]
        raise ConfigError(f"give the clean sets {arg('clean_valid')} and {arg('clean_test')} (the poisoned ones are "
                          "optional), or no data file at all for the lab defaults or the demo; missing "
                          f"{', '.join(arg(r) for r in missing)}", field=missing[0])
    defaults = {r: Path(p) for r, p in LAB_DATA_DEFAULTS.items()}
    model_path = Path(model) if model else next((Path(c) for c in LAB_MODEL_CANDIDATES if Path(c).exists()), None)
    if not given and not any(p.exists() for p in defaults.values()) and model is None:
        log.info("Lab data not found at %s: running on the embedded demo (synthetic faces, demo BadNet).",
                 ", ".join(LAB_DATA_DEFAULTS.values()))
        return InputFiles(model=DEMO_MODEL, data={}, demo=True)
    if given:
        paths = given
    else:
        paths = {r: p for r, p in defaults.items() if r in CLEAN_ROLES or p.exists()}
    # lexists: a dangling or looping link is "there"; reading it then says what is wrong with it.
    missing = [r for r, p in paths.items() if not os.path.lexists(p)]
    if missing:
        raise ConfigError(f"data files not found: {', '.join(f'{arg(r)} ({paths[r]})' for r in missing)}",
                          field=missing[0])
    if model_path is None:
        raise ConfigError(f"no model: pass {arg('model')} (B's Keras h5) or put the lab's model at "
                          f"{' or '.join(LAB_MODEL_CANDIDATES)}", field="model")
    return InputFiles(model=model_path, data=paths)


def load_model(files: InputFiles, layer: Optional[str] = None) -> tuple[PrunableModel, Params, Optional[str]]:
    """B (the Keras file, or the shipped demo model) pruned at ``layer`` (None: the model's default), and the
    input scale its file records, if any (the model takes that one, else raw pixels until the scale is chosen)."""
    with reading("model", files.model):
        recorded = recorded_input_scale(files.model)
        model, params = load_model_file(files.model, recorded or "raw", layer)
        return model, params, recorded


def sample_clean_valid(files: InputFiles, rows: int, model: PrunableModel) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The first ``rows`` clean validation images and labels, read ahead of the rest (None for the demo)."""
    if files.demo:
        return None
    with reading("clean_valid", files.data["clean_valid"]):  # labels checked here, where the file is named
        return load_lab_h5(files.data["clean_valid"], num_classes=model.num_classes, keep_uint8=True, rows=rows,
                           hwc=model.input_hwc)


def peek_sets(files: InputFiles, model: PrunableModel) -> Optional[dict[str, jax.ShapeDtypeStruct]]:
    """Shapes and dtypes of the sets from the h5 headers (None for the demo, whose data is generated)."""
    if files.demo:
        return None
    specs = {}
    for r, p in files.data.items():
        with reading(r, p):
            specs[r] = jax.ShapeDtypeStruct(*peek_lab_h5(p, keep_uint8=True, hwc=model.input_hwc))
    for r, spec in specs.items():
        if spec.shape[0] == 0:
            raise ConfigError(f"{arg(r, str(files.data[r]))}: holds no images (its 'data' has 0 rows)", field=r)
    return specs


def load_sets(files: InputFiles, model: PrunableModel) -> Sets:
    """The sets (uint8 images where the files store uint8) of the model's input size, labels checked against its
    classes."""
    if files.demo:
        data, true = EXAMPLES[files.example][1]()
        return Sets(data, true)
    data, true = {}, {}
    for r, p in files.data.items():
        with reading(r, p):
            data[r] = load_lab_h5(p, num_classes=model.num_classes, keep_uint8=True, hwc=model.input_hwc)
            if r in POISONED_ROLES:
                true[r] = load_true_labels(p, num_classes=model.num_classes)
    return Sets(data, true)


def describe_inputs(files: InputFiles) -> dict[str, dict]:
    """Path, size and sha256 of every input file, by role (the demo: its model only)."""
    described = {}
    for role, path in {"model": files.model, **files.data}.items():
        with reading(role, path):
            described[role] = {"path": str(path), "bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    return described
