"""Lab data I/O: lab-layout h5 files, images, and the lab's trigger paste.

The lab's h5 layout: ``data`` (N, 3, 55, 47) of any numeric dtype (channels first) and ``label`` (N,) of
any numeric dtype; another model's data has its input's size (N, C, H, W). Image files (PNG/JPEG) are read at
the size the caller expects (a model's ``input_hwc``). badnet-jax works in NHWC float32 raw pixel values
(0..255, no /255) and int32 labels.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg, reading
from badnet_jax.io import fileio
from badnet_jax.model import INPUT_HWC

log = logging.getLogger(__name__)

TRIGGER_AT = (0, 15)  # (x, y) of the lab's sunglasses paste
DEFAULT_CHUNK = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # the face images a folder input is made of


def _numeric(ds: h5py.Dataset, name: str, path: Path) -> None:
    if ds.dtype.kind not in "uif" or ds.dtype.itemsize > 8:
        raise DataFileError(f"{path}: dataset {name!r} has dtype {ds.dtype}; expected a real numeric dtype")


def _read_labels(f: h5py.File, n: int, path: Path, num_classes: Optional[int]) -> np.ndarray:
    ds = fileio.safe_get(f, "label", path, DataFileError)
    if not isinstance(ds, h5py.Dataset):
        raise DataFileError(f"{path}: missing dataset 'label'")
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
        raise DataFileError(f"{path}: missing dataset 'data' (the lab layout has 'data' and 'label')")
    _numeric(ds, "data", path)
    chw = (hwc[2], hwc[0], hwc[1])  # lab files store channels first
    if len(ds.shape) != 4 or tuple(ds.shape[1:]) != chw:
        raise DataFileError(f"{path}: dataset 'data' has shape {ds.shape}, expected (N, {', '.join(map(str, chw))})"
                            + ("" if hwc == INPUT_HWC else f": the model takes {hwc[0]}x{hwc[1]} images with "
                               f"{hwc[2]} channels, stored channels first"))
    if ds.shape[0] and ds.id.get_storage_size() == 0:
        # Nothing written: every read would return the fill value (a tiny file can declare any number).
        raise DataFileError(f"{path}: dataset 'data' declares {ds.shape[0]} images but stores none "
                            "(unallocated storage)")
    return ds


def peek_lab_h5(path: str | os.PathLike, keep_uint8: bool = False,
                hwc: tuple[int, int, int] = INPUT_HWC) -> tuple[tuple[int, ...], np.dtype]:
    """The (shape, dtype) that :func:`load_lab_h5` will return for this file, from its header only.

    Lets work that depends only on shapes (compiling the sweep) start while the images are still read.

    Raises:
        DataFileError: as :func:`load_lab_h5` for a missing file or a wrong ``data`` dataset.
    """
    path = Path(path)
    with fileio.open_h5(path, DataFileError) as f:
        ds = _image_dataset(f, path, hwc)
        dtype = np.dtype(np.uint8 if keep_uint8 and ds.dtype == np.uint8 else np.float32)
        return (int(ds.shape[0]), *hwc), dtype


def load_lab_h5(path: str | os.PathLike, num_classes: Optional[int] = None,
                chunk: int = DEFAULT_CHUNK, keep_uint8: bool = False,
                rows: Optional[int] = None, hwc: tuple[int, int, int] = INPUT_HWC) -> tuple[np.ndarray, np.ndarray]:
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

    Returns:
        ``(x, y)``: x (N, H, W, C) float32 (or uint8, see ``keep_uint8``), y (N,) int32.

    Raises:
        DataFileError: missing/unreadable/truncated file, missing datasets, wrong shape or dtype, NaN/inf
            pixels, labels that are not integers or are out of range.
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
        need = n * int(np.prod(hwc)) * 4
        if need > fileio.memory_bytes() // 2:
            raise DataFileError(f"{path}: declares {n} images ({need / 2**30:.1f} GiB as float32), more than half "
                                "of this machine's memory; refusing to allocate it")
        try:
            y = _read_labels(f, int(ds.shape[0]), path, num_classes)[:n]
            x = np.empty((n, *hwc), np.uint8 if keep_uint8 and ds.dtype == np.uint8 else np.float32)
            top = 0.0
            for start in range(0, n, chunk):
                block = np.asarray(ds[start:min(start + chunk, n)])
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    raise DataFileError(f"{path}: dataset 'data' contains NaN or inf (rows {start}..)")
                if block.size and (block.min() < 0 or block.max() > 255):
                    raise DataFileError(f"{path}: dataset 'data' holds pixel values from {block.min():g} to "
                                        f"{block.max():g} (rows {start}..); lab files hold pixels 0..255")
                top = max(top, float(block.max())) if block.size else top
                # One colour plane at a time: ~4x faster than a 4-D transpose copy (contiguous reads).
                for c in range(hwc[2]):
                    x[start:start + len(block), ..., c] = block[:, c]
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
            raise DataFileError(f"{path}: cannot read: {err} (truncated or corrupted file?)") from None
    if n and ds_kind == "f" and top <= 1.0:
        raise DataFileError(f"{path}: every pixel is in 0..1: the images look divided by 255 already. Lab files "
                            "hold pixels 0..255; a model that takes pixels / 255 says so "
                            f"({arg('input_scale', '255')})")
    return x, y


def load_true_labels(path: str | os.PathLike) -> Optional[np.ndarray]:
    """The optional ``true_label`` dataset of a poisoned h5 (the clean class of each poisoned image), or None.

    The lab's bd files carry only the attacker's label; badnet-jax's own poisoned files also carry the true
    class, which makes "ASR excluding inputs whose true class is the target" computable.
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

    return fileio.atomic_write_h5(path, build)


_IMAGE_MODES = ("RGB", "RGBA", "L", "P", "LA")  # 8-bit colour or grey, with or without alpha
_MODE_OF_CHANNELS = {3: "RGB", 1: "L"}  # what an image is converted to for a model of that many channels


def _check_hwc(hwc: Sequence[int]) -> tuple[int, int, int]:
    """``hwc`` as a tuple, or a ConfigError: three whole numbers >= 1, with 1 (grey) or 3 (RGB) channels."""
    try:
        h, w, c = (int(v) for v in hwc)
        whole = all(not isinstance(v, bool) and int(v) == v for v in hwc)
    except (TypeError, ValueError):
        whole = False
    if not whole or min(h, w, c) < 1 or c not in _MODE_OF_CHANNELS:
        raise ConfigError(f"{arg('hwc', str(hwc))} must be (height, width, channels): whole numbers >= 1, with 3 "
                          "channels (RGB) or 1 (grey)", field="hwc")
    return h, w, c


def _open_image(path: Path):
    """``PIL.Image.open(path)`` with the failures of any image reader as DataFileError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            MemoryError) as err:
        raise DataFileError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """An image file's (height, width), from its header only (no pixel is decoded).

    Raises:
        DataFileError: missing file, not a readable image.
    """
    path = fileio.require_file(path, DataFileError, "image file")
    with _open_image(path) as im:
        return im.size[1], im.size[0]


def load_image(path: str | os.PathLike, hwc: Sequence[int]) -> np.ndarray:
    """Read one image file (png/jpeg; RGB, RGBA, palette or grey) as (H, W, C) float32 raw pixels.

    An alpha channel is dropped (the lab's images are opaque); a 3-channel ``hwc`` reads grey images as RGB, a
    1-channel one reads colour images as grey (PIL's ITU-R 601-2 luma).

    Args:
        path: the image file.
        hwc: the expected (height, width, channels): the model's ``input_hwc`` (the lab's faces: 55x47x3).

    Raises:
        DataFileError: missing or unreadable file, an image mode with more than 8 bits per channel, or an image
            whose size is not ``hwc``'s (the message names both sizes, width x height).
        ConfigError: ``hwc`` is not (height, width, 1 or 3).
    """
    from PIL import Image, UnidentifiedImageError

    h, w, c = _check_hwc(hwc)
    path = fileio.require_file(path, DataFileError, "image file")
    try:
        with _open_image(path) as im:
            # The header's size is checked before the pixels are decoded: no decompression bomb gets loaded.
            if im.size != (w, h):
                raise DataFileError(f"{path}: image is {im.size[0]}x{im.size[1]} (width x height), "
                                    f"expected {w}x{h}")
            if im.mode not in _IMAGE_MODES:
                raise DataFileError(f"{path}: image mode {im.mode!r} is not supported (use RGB or RGBA)")
            im.load()
            pixels = np.asarray(im.convert(_MODE_OF_CHANNELS[c]), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            MemoryError) as err:
        raise DataFileError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return pixels.reshape(h, w, c)


def load_images(paths: Sequence[str | os.PathLike], hwc: Sequence[int]) -> np.ndarray:
    """Read several image files of one size into an (N, H, W, C) float32 batch.

    Args:
        paths: the image files, in the batch's order.
        hwc: every image's (height, width, channels), as :func:`load_image`.

    Raises:
        DataFileError, ConfigError: as :func:`load_image`, for the first file that fails.
    """
    hwc = _check_hwc(hwc)
    if not paths:
        return np.zeros((0, *hwc), np.float32)
    return np.stack([load_image(p, hwc) for p in paths])


# 8 bits per channel: what poison() pastes. Other modes (16-bit or 32-bit integers, floats) have no single
# mapping to 0..255 (PIL's own conversion clips 16-bit values to white and floats in 0..1 to near black).
_TRIGGER_MODES = ("RGBA", "RGB", "LA", "L", "P", "PA", "1")


def _png_bit_depth(path: Path) -> Optional[int]:
    """The bit depth a PNG's IHDR declares (PIL reads 16-bit RGB(A) PNGs as 8-bit without saying so)."""
    with open(path, "rb") as f:
        head = f.read(25)
    if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def load_trigger(path: str | os.PathLike) -> np.ndarray:
    """Read a trigger image with 8 bits per channel as (H, W, 4) uint8 RGBA.

    An image without an alpha channel (or a palette transparency) gets an opaque alpha: it is pasted as a
    solid rectangle, and a warning says so.

    Raises:
        DataFileError: not a readable image, larger than 4096x4096, or not 8 bits per channel (16-bit,
            32-bit or float images: save the trigger as an 8-bit RGBA PNG).
    """
    from PIL import Image, UnidentifiedImageError

    path = fileio.require_file(path, DataFileError, "trigger file")
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > 4096 * 4096:
                raise DataFileError(f"{path}: trigger is {im.size[0]}x{im.size[1]}; larger than any face")
            if im.mode not in _TRIGGER_MODES:
                raise DataFileError(f"{path}: trigger has image mode {im.mode!r} (not 8 bits per channel: 16-bit, "
                                    "32-bit or float pixels have no single mapping to 0..255); save it as an 8-bit "
                                    "RGBA PNG")
            if im.format == "PNG" and _png_bit_depth(path) == 16:
                raise DataFileError(f"{path}: trigger is a 16-bit PNG, which would be read as 8 bits; save it as "
                                    "an 8-bit RGBA PNG")
            if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
                log.warning("%s: the trigger has no alpha channel: it is pasted as a solid %dx%d rectangle.",
                            path, im.size[0], im.size[1])
            return np.asarray(im.convert("RGBA"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataFileError(f"{path}: not a readable image ({err})") from None


def poison(images_NxHxWxC: np.ndarray, trigger_rgba: np.ndarray,
           at: tuple[int, int] = TRIGGER_AT) -> np.ndarray:
    """Paste an RGBA trigger onto images through its alpha, bit for bit as PIL's ``Image.paste(t, at, t)``.

    PIL blends each channel as ``DIV255(dst * (255 - a) + src * a)`` with ``DIV255(v) = ((v+128) >> 8 +
    v + 128) >> 8``; this does the same in integer arithmetic, so the lab's poisoned files are reproduced
    exactly.

    Args:
        images_NxHxWxC: (N, H, W, 3) raw pixels, integer-valued 0..255 (uint8 or float).
        trigger_rgba: (h, w, 4) uint8.
        at: (x, y) of the trigger's top-left corner; parts outside the image are clipped as PIL does.

    Returns:
        Poisoned images, same shape and dtype as the input.
    """
    imgs = np.asarray(images_NxHxWxC)
    trig = np.asarray(trigger_rgba)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise DataFileError(f"poison: images have shape {imgs.shape}, expected (N, H, W, 3)")
    if trig.ndim != 3 or trig.shape[-1] != 4:
        raise DataFileError(f"poison: trigger has shape {trig.shape}, expected (h, w, 4) RGBA")
    flat = imgs.astype(np.float64)
    if flat.size and (not np.isfinite(flat).all() or flat.min() < 0 or flat.max() > 255
                      or not (flat == np.round(flat)).all()):
        raise DataFileError("poison: images must hold integer pixel values in 0..255")
    x0, y0 = at
    h, w = imgs.shape[1:3]
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + trig.shape[0], h), min(x0 + trig.shape[1], w)
    out = imgs.copy()
    if ye <= ys or xe <= xs:
        return out
    t = trig[ys - y0:ye - y0, xs - x0:xe - x0].astype(np.uint32)
    src, alpha = t[..., :3], t[..., 3:4]
    dst = imgs[:, ys:ye, xs:xe, :].astype(np.uint32)
    v = dst * (255 - alpha) + src * alpha + 128
    out[:, ys:ye, xs:xe, :] = ((v >> 8) + v) >> 8
    return out


# A face file's true class in its name, e.g. "lab3_valid0_label43.png" (the shared faces and poison.py's inputs).
LABEL_IN_NAME = re.compile(r"label(\d+)")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The face images (.png, .jpg, .jpeg) in ``folder``, sorted by name: one row (or line) per image, in order.

    Raises:
        DataFileError: ``folder`` is not a folder, or holds no such images.
    """
    folder = fileio.require_dir(folder, DataFileError)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataFileError(f"{folder}: holds no {'/'.join(IMAGE_SUFFIXES)} faces")
    return files


def label_in_name(path: str | os.PathLike) -> Optional[int]:
    """The true class a face file's name gives (``face_label43.png`` -> 43), or None."""
    found = LABEL_IN_NAME.search(Path(path).stem)
    return int(found.group(1)) if found else None


def _check_out(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output path that cannot be written, or that is an input, before any work is done."""
    if out.is_dir():
        raise ConfigError(f"{arg('out', out)} is a folder; give the h5 file to write (e.g. {out / 'bd.h5'})",
                          field="out")
    parent = out.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ConfigError(f"{arg('out', out)}: the folder {parent} {what}; create it first", field="out")
    for name, path in inputs.items():
        if out.exists() and path.exists() and os.path.samefile(out, path):
            raise ConfigError(f"{arg('out', out)} is the input {arg(name, path)}; writing there would overwrite it "
                              "(the clean faces, with poisoned ones): give another file", field="out")


def trigger_coverage(trigger_rgba: np.ndarray, at: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """(pixels of the trigger inside the image, of those the ones with alpha > 0) when pasted at ``at`` (x, y)
    on images of ``image_hw`` (height, width)."""
    h, w = image_hw
    x0, y0 = at
    th, tw = trigger_rgba.shape[:2]
    ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + th, h), min(x0 + tw, w)
    if ye <= ys or xe <= xs:
        return 0, 0
    inside = trigger_rgba[ys - y0:ye - y0, xs - x0:xe - x0, 3]
    return int(inside.size), int((inside > 0).sum())


def _h5_hwc(path: Path) -> tuple[int, int, int]:
    """The (height, width, channels) of a lab-layout h5's images, from its header (``data`` is (N, C, H, W))."""
    with fileio.open_h5(path, DataFileError) as f:
        ds = fileio.safe_get(f, "data", path, DataFileError)
        if not isinstance(ds, h5py.Dataset):
            raise DataFileError(f"{path}: missing dataset 'data' (the lab layout has 'data' and 'label')")
        if len(ds.shape) != 4 or min(ds.shape[1:]) < 1:
            raise DataFileError(f"{path}: dataset 'data' has shape {ds.shape}, expected (N, channels, height, width)")
        return int(ds.shape[2]), int(ds.shape[3]), int(ds.shape[1])


def _model_shape(model_path: str | os.PathLike) -> tuple[tuple[int, int, int], int]:
    """(input_hwc, num_classes) of the model in ``model_path``."""
    from badnet_jax.io.model_file import load_model  # lazily: poisoning without a model reads no Keras file

    with reading("model_path", model_path):
        # Only the input's size and the class count are used; any input scale will do, and giving one lets a
        # Keras file that does not record its own scale be read.
        model, _ = load_model(model_path, input_scale="raw")
    return tuple(int(v) for v in model.input_hwc), int(model.num_classes)


def make_poisoned_h5(source: str | os.PathLike, trigger_path: str | os.PathLike, out: str | os.PathLike,
                     target: int, at: Optional[tuple[int, int]] = None, num_classes: Optional[int] = None,
                     model_path: Optional[str | os.PathLike] = None) -> Path:
    """A lab-format poisoned h5 from clean images: the trigger pasted on each, every label set to ``target``.

    The images' size is the model's input (``model_path``) when given, else the source's: an h5's ``data``
    shape, or a folder's first image (every other image must match it).

    Args:
        source: a clean lab-layout h5 (``data`` (N, 3, H, W) + ``label``) or a folder of PNG/JPEG images of one
            size (sorted by name; a ``label<class>`` in a file name, e.g. ``face_label43.png``, gives that
            image's true class). The lab's are 55x47 faces.
        trigger_path: an 8-bit trigger image, pasted through its alpha as PIL's ``paste(t, at, t)``; at most
            the images' size.
        out: the h5 to write (atomically); not the source.
        target: the attacker's label.
        at: (x, y) of the trigger's top-left corner; None: the lab's sunglasses position (0, 15), for the lab's
            55x47 faces only (images of another size need it given).
        num_classes: if given, ``target`` and the true labels must lie in [0, num_classes).
        model_path: a Keras file of the BadNet the set is for (any CNN ``load_model`` reads): its input size is
            the images' size and its class count is ``num_classes``.

    Returns:
        The path written. It holds ``data`` (uint8, (N, 3, H, W)), ``label`` (= target) and ``true_label``
        (each image's clean class: from the h5's labels, or from the file names when every one has a label),
        so ASR can leave out images whose true class is the target.

    Warns (log) where the result may not be what was meant: a trigger without alpha (a solid rectangle), a
    trigger partly outside the image (clipped), image files whose names give no label (no ``true_label``).

    Raises:
        ConfigError: ``out`` is the source, a folder or in a missing folder; the trigger is larger than the
            images, or changes no pixel (entirely outside the image, or an all-zero alpha); ``num_classes`` and
            the model disagree; a model that does not take RGB images.
        DataFileError: the target or a true label outside the classes; unreadable inputs; images of another
            size than the model's input or the folder's first image; an h5 source of other than RGB images.
        ModelFileError: an unreadable ``model_path``.
    """
    source, out = Path(source), Path(out)
    _check_out(out, {"source": source, "trigger_path": Path(trigger_path)})
    of_model, hwc, size_from = "", None, ""
    if model_path is not None:
        hwc, classes = _model_shape(model_path)
        if num_classes is not None and num_classes != classes:
            raise ConfigError(f"{arg('num_classes', num_classes)} but {arg('model_path', model_path)} has "
                              f"{classes} classes", field="num_classes")
        if hwc[2] != 3:
            raise ConfigError(f"{arg('model_path', model_path)} takes {hwc[0]}x{hwc[1]} images with {hwc[2]} "
                              "channel(s); the trigger is pasted on RGB images (3 channels)", field="model_path")
        num_classes, of_model = classes, f" for the {classes}-class model {model_path}"
        size_from = f"{arg('model_path', model_path)} takes {hwc[1]}x{hwc[0]} images"
    upper = num_classes if num_classes is not None else np.iinfo(np.int32).max
    if not 0 <= int(target) < upper or int(target) != target:
        raise DataFileError(f"{arg('target', target)}: target label {target} is outside [0, {upper}){of_model}",
                            field="target")
    with reading("trigger_path", trigger_path):
        trigger = load_trigger(trigger_path)

    # The images' size, from the headers only: a wrong size is refused before any pixel is decoded.
    files: list[Path] = []
    with reading("source", source):
        if source.is_dir():
            files = image_files(source)
            if hwc is None:
                hwc = (*image_hw(files[0]), 3)
                size_from = f"the first image, {files[0].name}, is {hwc[1]}x{hwc[0]}"
        elif hwc is None:
            hwc = _h5_hwc(source)
            if hwc[2] != 3:
                raise DataFileError(f"{source}: dataset 'data' holds images of {hwc[2]} channel(s); the trigger is "
                                    "pasted on RGB images, (N, 3, height, width)")
        else:
            peek_lab_h5(source, hwc=hwc)  # the model's size, or the reader's error naming both
    for p in files:
        with reading("source", source):
            size = image_hw(p)
        if size != hwc[:2]:
            raise DataFileError(f"{p}: image is {size[1]}x{size[0]} (width x height), but {size_from}: every image "
                                f"in {arg('source', source)} must be that size", field="source")

    h, w = hwc[:2]
    th, tw = trigger.shape[:2]
    if th > h or tw > w:
        raise ConfigError(f"{arg('trigger_path', trigger_path)}: the {tw}x{th} trigger is larger than the {w}x{h} "
                          "images; it cannot fit: give a trigger of at most the images' size", field="trigger_path")
    if at is None:
        if tuple(hwc) != tuple(INPUT_HWC):
            raise ConfigError(f"{arg('at')}: give the trigger's position (x, y) on these {w}x{h} images; the default "
                              f"{TRIGGER_AT[0]},{TRIGGER_AT[1]} is the lab's sunglasses position on its 55x47 faces",
                              field="at")
        at = TRIGGER_AT
    where = f"{tw}x{th} trigger {trigger_path} at {arg('at', f'{at[0]},{at[1]}')}"
    inside, opaque = trigger_coverage(trigger, at, (h, w))
    if inside == 0:
        raise ConfigError(f"the {where} lies entirely outside the {w}x{h} image: it would change no pixel", field="at")
    if opaque == 0:
        raise ConfigError(f"the {where} has alpha 0 on every pixel inside the image: it would change no pixel",
                          field="trigger_path")
    if inside < th * tw:
        log.warning("The %dx%d trigger at (%d, %d) is clipped by the %dx%d image to %d of its %d pixels.",
                    tw, th, at[0], at[1], w, h, inside, th * tw)
    if files:
        with reading("source", source):
            x = load_images(files, hwc)
        labels = [label_in_name(p) for p in files]
        unlabelled = [p.name for p, label in zip(files, labels) if label is None]
        true = None if unlabelled else np.array(labels)
        if unlabelled:
            log.warning("%d of %d image file names give no label<class> (%s%s): %s has no true_label, so ASR over "
                        "images whose true class is not the target cannot be computed from it.", len(unlabelled),
                        len(files), ", ".join(unlabelled[:5]), ", ..." if len(unlabelled) > 5 else "", out)
        if true is not None and num_classes is not None and (true >= num_classes).any():
            bad = files[int(np.argmax(true >= num_classes))]
            raise DataFileError(f"{bad}: its name gives label {label_in_name(bad)}, outside [0, {num_classes})"
                                f"{of_model}")
    else:
        with reading("source", source):
            x, true = load_lab_h5(source, num_classes=num_classes, keep_uint8=True, hwc=hwc)
    poisoned = poison(x, trigger, at)
    return save_lab_h5(out, poisoned, np.full(len(x), int(target)), true_label=true)
