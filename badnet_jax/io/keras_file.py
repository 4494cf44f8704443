"""What the Keras file readers share: the file's kind, the size caps, a weight read and checked, the input scale.

The lab's DeepID's reader (``badnet_jax.io.keras``), any CNN's (``badnet_jax.io.keras_graph``) and the screener
all start from here:

* a ``.keras`` archive is a zip, any other Keras file HDF5; a file that is both (an HDF5 file with a zip
  appended, or the other way round) is refused (``_is_keras_archive``): h5py and Keras read one network from
  it, a zip reader another, and nothing tells which one the user meant;
* a model config is at most 1 MiB (``_MAX_CONFIG_BYTES``), and an archive's members at most the sizes of
  ``_ARCHIVE_MEMBERS``, which the readers hold each member's declared size to before anything is decompressed;
* a weight array must have the shape the architecture gives it and be floating point, finite and below
  :data:`MAX_WEIGHT` (``_read_array``);
* the input scale (raw pixels or pixels / 255) is not part of a Keras file: the files badnet-jax writes
  record it in the root attribute :data:`INPUT_SCALE_ATTR`, which :func:`recorded_input_scale` reads back.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import h5py
import numpy as np

from badnet_jax.errors import ModelFileError
from badnet_jax.io import fileio
from badnet_jax.models.pixels import INPUT_SCALES

INPUT_SCALE_ATTR = "badnet_jax_input_scale"

_MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHT = 1e6  # real DeepID weights are below ~10; larger ones overflow float32 logits to inf/NaN
_ARCHIVE_MEMBERS = {"config.json": _MAX_CONFIG_BYTES, "model.weights.h5": 256 << 20, "metadata.json": 1 << 20}


def _is_keras_archive(path: Path) -> bool:
    """Whether ``path`` is a zip (a ``.keras`` archive) rather than an HDF5 file.

    Raises:
        ModelFileError: it is both, so that two readers would see two different networks in it.
    """
    if not path.is_file():
        return False  # the HDF5 opener says what it is instead
    try:
        is_zip = zipfile.is_zipfile(path)
        is_h5 = is_zip and h5py.is_hdf5(str(path))
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read the file ({err})") from None
    if is_zip and is_h5:
        raise ModelFileError(f"{path}: is both an HDF5 file and a zip archive (a .keras appended to an h5, or the "
                             "other way round): h5py and Keras read the HDF5 network, a .keras reader the zip's; "
                             "refusing an ambiguous file (save the model again as one or the other)")
    return is_zip


def _read_array(ds: h5py.Dataset, layer: str, what: str, expected: tuple, path: Path) -> np.ndarray:
    if ds.dtype.kind != "f" or ds.dtype.itemsize > 8:
        raise ModelFileError(f"{path}: layer {layer!r} {what} has dtype {ds.dtype}, expected floating point")
    if tuple(ds.shape) != tuple(expected):
        raise ModelFileError(f"{path}: layer {layer!r} {what} has shape {tuple(ds.shape)}, expected {expected}")
    try:
        arr = np.asarray(ds[()], dtype=np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"{path}: cannot read layer {layer!r} {what}: {err} (truncated file?)") from None
    if not np.isfinite(arr).all():
        raise ModelFileError(f"{path}: layer {layer!r} {what} contains NaN or inf values")
    if arr.size and np.abs(arr).max() > MAX_WEIGHT:
        raise ModelFileError(f"{path}: layer {layer!r} {what} holds values up to {np.abs(arr).max():.3g}; a trained "
                             f"network's weights are far below {MAX_WEIGHT:g} (these would overflow the logits)")
    return arr


def recorded_input_scale(path: str | os.PathLike) -> str | None:
    """The input scale a badnet-jax-written Keras file records, or None (any other Keras file)."""
    path = Path(path)
    if _is_keras_archive(path):
        return None  # a .keras archive written by Keras: no badnet-jax metadata
    with fileio.open_h5(path, ModelFileError) as f:
        try:
            raw = f.attrs.get(INPUT_SCALE_ATTR)
            if raw is None:
                return None
            scale = raw.decode() if isinstance(raw, bytes) else str(raw)
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:  # UnicodeDecodeError included
            raise ModelFileError(f"{path}: cannot read its attributes: {err} (truncated or corrupted?)") from None
    if scale not in INPUT_SCALES:
        raise ModelFileError(f"{path}: attribute {INPUT_SCALE_ATTR} is {scale!r}, expected one of {INPUT_SCALES}")
    return scale
