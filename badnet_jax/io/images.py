"""Image files (PNG/JPEG) as model inputs: read at the size the caller expects, folders of them, labels in names.

An image is read at a model's ``input_hwc`` (its size checked from the header before any pixel is decoded), as
float32 raw pixels 0..255; a folder input is its image files sorted by name; a ``label<class>`` in a file's name
gives its true class.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg
from badnet_jax.io import fileio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # the images a folder input is made of


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


def png_bit_depth(path: Path) -> Optional[int]:
    """The bit depth a PNG's IHDR declares (None: not a PNG). PIL reads 16-bit RGB(A) PNGs as 8-bit without
    saying so (the high byte of each value)."""
    with open(path, "rb") as f:
        head = f.read(25)
    if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


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
            if im.format == "PNG" and png_bit_depth(path) == 16:
                raise DataFileError(f"{path}: a 16-bit PNG, which would be read as its high bytes; save it with 8 "
                                    "bits per channel (pixels 0..255)")
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
