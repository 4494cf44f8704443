"""The lab's h5 layout: reading, peeking and writing data sets.

The lab's h5 layout: ``data`` (N, 3, 55, 47) of any numeric dtype (channels first) and ``label`` (N,) of
any numeric dtype; another model's data has its input's size (N, C, H, W). badnet-jax works in NHWC float32
raw pixel values (0..255, no /255) and int32 labels. Image files are ``badnet_jax.io.images``'s; the trigger
paste and poisoned sets ``badnet_jax.io.poisoning``'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg
from badnet_jax.io import atomic, fileio
from badnet_jax.model import INPUT_HWC
from badnet_jax.pixels import look_divided

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048
UNKNOWN_LABEL = -1  # an image whose class no file states (screened inputs need none)


def _numeric(ds: h5py.Dataset, name: str, path: Path) -> None:
    if ds.dtype.kind not in "uif" or ds.dtype.itemsize > 8:
        raise DataFileError(f"{path}: dataset {name!r} has dtype {ds.dtype}; expected a real numeric dtype")


def _read_labels(f: h5py.File, n: int, path: Path, num_classes: Optional[int],
                 require_labels: bool = True) -> np.ndarray:
    ds = fileio.safe_get(f, "label", path, DataFileError)
    if ds is None and not require_labels:
        return np.full(n, UNKNOWN_LABEL, np.int32)
    if not isinstance(ds, h5py.Dataset):
        what = "missing dataset 'label'" if ds is None else f"'label' is a {type(ds).__name__.lower()}, not a dataset"
        raise DataFileError(f"{path}: {what}")
    _numeric(ds, "label", path)
    if ds.shape != (n,):
        raise DataFileError(f"{path}: dataset 'label' has shape {ds.shape}, expected ({n},) to match 'data'")
    raw = np.asarray(ds[()])
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise DataFileError(f"{path}: dataset 'label' contains NaN or inf")
        if not (raw == np.round(raw)).all():
            raise DataFileError(f"{path}: dataset 'label' contains non-integer values")
    lo = raw.min(initial=0)
    hi = raw.max(initial=0)
    upper = num_classes if num_classes is not None else np.iinfo(np.int32).max
    if n and (lo < 0 or hi >= upper):
        bad = raw[(raw < 0) | (raw >= upper)][0]
        if num_classes is None:  # no model to compare with: only what no label can be
            raise DataFileError(f"{path}: label {bad:g} is {'negative' if bad < 0 else 'beyond int32'}; labels are "
                                "class indices 0, 1, 2, ...")
        raise DataFileError(f"{path}: label {bad:g} is outside [0, {upper}) for a {num_classes}-class model")
    return raw.astype(np.int32)


def _image_dataset(f: h5py.File, path: Path, hwc: tuple[int, int, int] = INPUT_HWC) -> h5py.Dataset:
    ds = fileio.safe_get(f, "data", path, DataFileError)
    if not isinstance(ds, h5py.Dataset):
        what = "missing dataset 'data'" if ds is None else f"'data' is a {type(ds).__name__.lower()}, not a dataset"
        raise DataFileError(f"{path}: {what} (the lab layout has 'data' and 'label')")
    _numeric(ds, "data", path)
    chw = (hwc[2], hwc[0], hwc[1])  # lab files store channels first
    if len(ds.shape) != 4 or tuple(ds.shape[1:]) != chw:
        if hwc == INPUT_HWC:
            why = ("the lab's 55x47 RGB faces (in Python, load_lab_h5(..., hwc=model.input_hwc) reads another model's "
                   "images)")
        else:
            why = f"the model takes {hwc[0]}x{hwc[1]} images with {hwc[2]} channels, stored channels first"
        raise DataFileError(f"{path}: dataset 'data' has shape {ds.shape}, expected (N, {', '.join(map(str, chw))}): "
                            f"{why}")
    if ds.shape[0] and ds.id.get_storage_size() == 0:
        # Nothing written: every read would return the fill value (a tiny file can declare any number).
        raise DataFileError(f"{path}: dataset 'data' declares {ds.shape[0]} images but stores none "
                            "(unallocated storage)")
    return ds


def _check_fits(path: Path, n: int, hwc: tuple[int, int, int]) -> None:
    """Refuse a file declaring more images than half this machine's memory holds as float32, naming it."""
    need = n * int(np.prod(hwc)) * 4
    if need > fileio.memory_bytes() // 2:
        raise DataFileError(f"{path}: declares {n} images ({need / 2**30:.1f} GiB as float32), more than half "
                            "of this machine's memory; refusing to allocate it")


def peek_lab_h5(path: str | os.PathLike, keep_uint8: bool = False,
                hwc: tuple[int, int, int] = INPUT_HWC) -> tuple[tuple[int, ...], np.dtype]:
    """The (shape, dtype) that :func:`load_lab_h5` will return for this file, from its header only.

    Lets work that depends only on shapes (compiling the sweep) start while the images are still read.

    Raises:
        DataFileError: as :func:`load_lab_h5` for a missing file, a wrong ``data`` dataset, or more declared
            images than this machine can hold.
    """
    path = Path(path)
    with fileio.open_h5(path, DataFileError) as f:
        ds = _image_dataset(f, path, hwc)
        _check_fits(path, int(ds.shape[0]), hwc)
        dtype = np.dtype(np.uint8 if keep_uint8 and ds.dtype == np.uint8 else np.float32)
        return (int(ds.shape[0]), *hwc), dtype


def load_lab_h5(path: str | os.PathLike, num_classes: Optional[int] = None,
                chunk: int = DEFAULT_CHUNK, keep_uint8: bool = False,
                rows: Optional[int] = None, hwc: tuple[int, int, int] = INPUT_HWC,
                require_labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a lab-layout h5 file into NHWC float32 raw pixels and int32 labels.

    The images are read ``chunk`` rows at a time straight into the float32 output, so a 400 MB file never
    needs two full copies in memory.

    Args:
        path: h5 file with ``data`` (N, C, H, W) for ``hwc`` = (H, W, C) (the lab's: (N, 3, 55, 47)) and
            ``label`` (N,).
        num_classes: if given, labels must lie in [0, num_classes).
        chunk: rows per read.
        keep_uint8: return uint8 pixels when the file stores uint8 (a quarter of the memory; every
            badnet-jax computation casts to float32 exactly, per chunk).
        rows: read only the first ``rows`` images and labels (e.g. a sample to check the input scale on).
        hwc: the images' (height, width, channels): the model's input (default the lab's faces, 55x47x3).
        require_labels: if False, a file without ``label`` reads with every label ``UNKNOWN_LABEL`` (-1), for
            inputs that are only predicted (a ``label`` the file has is still checked).

    Returns:
        ``(x, y)``: x (N, H, W, C) float32 (or uint8, see ``keep_uint8``), y (N,) int32.

    Raises:
        DataFileError: missing/unreadable/truncated file, missing datasets (``label`` only if
            ``require_labels``), wrong shape or dtype, NaN/inf pixels, labels that are not integers or are out
            of range.
        ConfigError: ``chunk`` below 1 or ``rows`` below 0.
    """
    # The caller's mistakes are named as such, before the file is blamed for anything.
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ConfigError(f"{arg('chunk', chunk)} must be a whole number of rows >= 1", field="chunk")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0):
        raise ConfigError(f"{arg('rows', rows)} must be a whole number of rows >= 0 (or None: all)", field="rows")
    path = Path(path)
    with fileio.open_h5(path, DataFileError) as f:
        ds = _image_dataset(f, path, hwc)
        ds_kind = ds.dtype.kind
        n = int(ds.shape[0]) if rows is None else min(int(rows), int(ds.shape[0]))
        _check_fits(path, n, hwc)
        try:
            y = _read_labels(f, int(ds.shape[0]), path, num_classes, require_labels)[:n]
            x = np.empty((n, *hwc), np.uint8 if keep_uint8 and ds.dtype == np.uint8 else np.float32)
            top, whole = 0.0, True
            for start in range(0, n, chunk):
                block = np.asarray(ds[start:min(start + chunk, n)])
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    raise DataFileError(f"{path}: dataset 'data' contains NaN or inf (rows {start}..)")
                if block.size and (block.min() < 0 or block.max() > 255):
                    raise DataFileError(f"{path}: dataset 'data' holds pixel values from {block.min():g} to "
                                        f"{block.max():g} (rows {start}..); lab files hold pixels 0..255")
                top = max(top, float(block.max())) if block.size else top
                if top <= 1 and whole and block.dtype.kind == "f":  # only while the file could look divided
                    whole = bool((block == np.rint(block)).all())
                # One colour plane at a time: ~4x faster than a 4-D transpose copy (contiguous reads).
                for c in range(hwc[2]):
                    x[start:start + len(block), ..., c] = block[:, c]
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
            raise DataFileError(f"{path}: cannot read: {err} (truncated or corrupted file?)") from None
    if n and ds_kind == "f" and look_divided(top, whole):
        raise DataFileError(f"{path}: every pixel is in 0..1 and some are fractions: the images look divided by 255 "
                            "already. Lab files hold pixels 0..255; a model that takes pixels / 255 says so "
                            f"({arg('input_scale', '255')})")
    return x, y


def load_true_labels(path: str | os.PathLike, num_classes: Optional[int] = None) -> Optional[np.ndarray]:
    """The optional ``true_label`` dataset of a poisoned h5 (the clean class of each poisoned image), or None.

    The lab's bd files carry only the attacker's label; badnet-jax's own poisoned files also carry the true
    class, which makes "ASR excluding inputs whose true class is the target" computable. With ``num_classes``
    the true labels must be among the model's classes, as ``label`` must.
    """
    path = Path(path)
    with fileio.open_h5(path, DataFileError) as f:
        ds = fileio.safe_get(f, "true_label", path, DataFileError)
        if ds is None:
            return None
        data = fileio.safe_get(f, "data", path, DataFileError)
        n = data.shape[0] if isinstance(data, h5py.Dataset) and data.shape else -1
        if not isinstance(ds, h5py.Dataset) or ds.shape != (n,) or ds.dtype.kind not in "uif":
            raise DataFileError(f"{path}: dataset 'true_label' must be numeric with one entry per image")
        raw = np.asarray(ds[()])
    if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
        raise DataFileError(f"{path}: dataset 'true_label' holds values that are not whole numbers (NaN, 0.5, ...)")
    if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int32).max):
        raise DataFileError(f"{path}: dataset 'true_label' holds {raw.min():g}..{raw.max():g}; classes are >= 0")
    if num_classes is not None and raw.size and raw.max() >= num_classes:
        raise DataFileError(f"{path}: dataset 'true_label' holds class {raw.max():g}, outside [0, {num_classes}) for "
                            f"a {num_classes}-class model")
    return raw.astype(np.int32)


def _check_pixels(path: str | os.PathLike, x: np.ndarray, rows: int = 1024) -> None:
    """Refuse pixels that uint8 cannot hold exactly: NaN/inf, values outside 0..255 or between whole numbers.

    Checked ``rows`` images at a time, so a large float batch needs no full-size temporaries.
    """
    if x.dtype == np.uint8 or x.dtype == np.bool_:
        return
    if x.dtype.kind not in "uif":
        raise DataFileError(f"{path}: images have dtype {x.dtype}; expected real pixel values 0..255")
    lo, hi, fractional, example = np.inf, -np.inf, 0, None
    for start in range(0, len(x), rows):
        block = x[start:start + rows]
        if block.dtype.kind == "f":
            if not np.isfinite(block).all():
                raise DataFileError(f"{path}: images contain NaN or inf (rows {start}..)")
            off = block != np.rint(block)
            if example is None and off.any():
                example = block[off].flat[0]
            fractional += int(off.sum())
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if x.size and (lo < 0 or hi > 255):
        raise DataFileError(f"{path}: images hold pixel values from {lo:g} to {hi:g}; the lab layout stores raw "
                            "pixels 0..255 as uint8 (images scaled to 0..1 are multiplied by 255 first)")
    if fractional:
        raise DataFileError(f"{path}: {fractional} of {x.size} pixel values are not whole numbers (e.g. "
                            f"{example:g}); the lab layout stores uint8: round them first (np.rint) if that is "
                            "what is meant")


def save_lab_h5(path: str | os.PathLike, x_NxHxWxC: np.ndarray, y: np.ndarray,
                true_label: Optional[np.ndarray] = None) -> Path:
    """Write images and labels in the lab's h5 layout (``data`` uint8 (N, C, H, W), e.g. the lab's (N, 3, 55, 47),
    ``label`` float), atomically.

    The pixels are stored exactly: what :func:`load_lab_h5` reads back equals ``x_NxHxWxC``. Pixels uint8
    cannot hold are refused, not rounded or clipped: a float batch that is not whole numbers 0..255 is almost
    always a mistake (images already divided by 255, a normalised or noisy batch), and silently rounding it
    would write a data set other than the one the caller has.

    Args:
        path: the h5 file to write.
        x_NxHxWxC: (N, H, W, C) raw pixels: uint8, or integers / whole-number floats in 0..255.
        y: (N,) labels.
        true_label: (poisoned sets only) each image's clean class, stored as an extra dataset that the lab's
            code ignores.

    Returns:
        The path written.

    Raises:
        DataFileError: images not of shape (N, H, W, C); a label count other than N; pixels that are NaN/inf,
            outside 0..255 or not whole numbers.
    """
    x = np.asarray(x_NxHxWxC)
    if x.ndim != 4 or min(x.shape[1:]) < 1:
        raise DataFileError(f"{path}: images have shape {x.shape}, expected (N, height, width, channels), e.g. "
                            f"(N, {', '.join(map(str, INPUT_HWC))}) for the lab's faces")
    if len(y) != len(x):
        raise DataFileError(f"{path}: {len(x)} images but {len(y)} labels")
    _check_pixels(path, x)

    def build(f: h5py.File) -> None:
        f.create_dataset("data", data=x.astype(np.uint8).transpose(0, 3, 1, 2))
        f.create_dataset("label", data=np.asarray(y, np.float64))
        if true_label is not None:
            f.create_dataset("true_label", data=np.asarray(true_label, np.int32))

    return atomic.atomic_write_h5(path, build)
