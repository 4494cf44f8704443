"""Poisoning: a trigger pasted on clean images, and lab-format poisoned sets made from a source.

``poison`` pastes an 8-bit trigger through its alpha exactly as PIL's ``paste(t, at, t)`` (the lab's
rendering of its sunglasses faces, bit for bit); ``make_poisoned_h5`` writes a poisoned set at the source's or
the model's image size, the true classes kept beside the attacker's label.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg, reading
from badnet_jax.io import fileio
from badnet_jax.io.images import image_files, image_hw, label_in_name, load_images, png_bit_depth
from badnet_jax.io.lab_data import load_lab_h5, peek_lab_h5, save_lab_h5
from badnet_jax.model import INPUT_HWC

log = logging.getLogger(__name__)

TRIGGER_AT = (0, 15)  # (x, y) of the lab's sunglasses paste


# 8 bits per channel: what poison() pastes. Other modes (16-bit or 32-bit integers, floats) have no single
# mapping to 0..255 (PIL's own conversion clips 16-bit values to white and floats in 0..1 to near black).
_TRIGGER_MODES = ("RGBA", "RGB", "LA", "L", "P", "PA", "1")


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
            if im.format == "PNG" and png_bit_depth(path) == 16:
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
        # Without a model only what no label can be is known: say that, not a bound of 2**31 - 1.
        where = f"outside [0, {upper}){of_model}" if num_classes is not None else (
            "negative; labels are class indices 0, 1, 2, ..." if target < 0 else "beyond int32")
        raise DataFileError(f"{arg('target', target)}: target label {target} is {where}", field="target")
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
    if num_classes is None and true is not None and len(true) and target > true.max():
        # Nothing here knows the classes; a typed target no clean image has is worth a second look.
        log.warning("Target %d is above every true label of %s (%d..%d), and without a model or num_classes the "
                    "classes are unknown: check that %d is one of the model's classes.", target, source,
                    true.min(), true.max(), target)
    poisoned = poison(x, trigger, at)
    return save_lab_h5(out, poisoned, np.full(len(x), int(target)), true_label=true)
