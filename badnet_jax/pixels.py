"""The pixels a model takes: its input scale, the division that scale stands for, the checks of an image array.

Every model takes pixels 0..255 and divides them first by what its *input scale* says: ``raw`` (1: pixels as
they are, the lab's B) or ``255`` (pixels / 255, the CSAW-HackML-2020 BadNets) (:func:`input_divisor`). The
divisor may also be a traced scalar, so that one compiled program serves both scales (:func:`scaled`). Images
that are not (N, height, width, channels) real pixels 0..255 of the model's input size are refused, naming the
argument (:func:`check_images_of_shape`), as a lab file's reader refuses them.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg

# Input scale -> what the pixels 0..255 are divided by before the network: as they are, or pixels / 255.
INPUT_DIVISORS = {"raw": 1.0, "255": 255.0}
INPUT_SCALES = tuple(INPUT_DIVISORS)


def input_divisor(input_scale: str) -> float:
    """What a model of this input scale divides the pixels 0..255 by (1 for ``raw``, 255 for ``255``).

    Raises:
        ConfigError: an input scale other than :data:`INPUT_SCALES`.
    """
    if input_scale not in INPUT_DIVISORS:
        given = f" (given the {type(input_scale).__name__} {input_scale!r}: the strings 'raw' or '255')" \
            if not isinstance(input_scale, str) else ""
        raise ConfigError(f"{arg('input_scale', input_scale)}: expected one of {', '.join(INPUT_SCALES)}{given}",
                          field="input_scale")
    return INPUT_DIVISORS[input_scale]


def scaled(x_NxHxWxC: jax.Array, divisor: Any) -> jax.Array:
    """Pixels divided by ``divisor`` (a Python number or a traced scalar); a Python 1 leaves them untouched."""
    if isinstance(divisor, (int, float)) and divisor == 1.0:
        return x_NxHxWxC
    return x_NxHxWxC / jnp.asarray(divisor, x_NxHxWxC.dtype)


def look_divided(largest: float, whole: bool) -> bool:
    """Whether float pixels look divided by 255 already: all within 0..1 (``largest`` the largest) and not all
    whole numbers. Pixels of 0 and 1 alone are a near-black image, as a reader gives a uint8 one as floats."""
    return 0 < largest <= 1 and not whole


def check_images_of_shape(x_NxHxWxC: Any, hwc: tuple[int, int, int], name: str = "x", allow_empty: bool = False,
                          field: Optional[str] = None) -> None:
    """Refuse images that are not (N, *hwc) real pixels 0..255: the shape, the dtype, then the values (NaN or
    infinite, outside 0..255, or floats all within 0..1 with fractions among them: divided by 255 already).

    ``x_NxHxWxC`` may be a NumPy or JAX array, or only a shape and dtype (``jax.ShapeDtypeStruct``: its values are
    not checked, nor a traced array's).

    Raises:
        DataFileError: naming ``name`` and what was expected.
    """
    field = name if field is None else field
    want = ", ".join(map(str, hwc))
    shape, dtype = getattr(x_NxHxWxC, "shape", None), getattr(x_NxHxWxC, "dtype", None)
    if shape is None or dtype is None:
        raise DataFileError(f"{arg(name)}: expected an array of images (N, {want}), got {type(x_NxHxWxC).__name__}",
                            field=field)
    shape, dtype = tuple(shape), np.dtype(dtype)
    if len(shape) != 4 or shape[1:] != tuple(hwc):
        raise DataFileError(f"{arg(name)}: images of shape {shape}, expected (N, {want}) (N images, height, width, "
                            "channels)", field=field)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or dtype == np.bool_:
        raise DataFileError(f"{arg(name)}: images of dtype {dtype}, expected pixels 0..255 as integers or floats",
                            field=field)
    if shape[0] == 0 and not allow_empty:
        raise DataFileError(f"{arg(name)}: no images (shape {shape}); at least one is needed", field=field)
    if dtype == np.uint8 or shape[0] == 0 or isinstance(x_NxHxWxC, (jax.ShapeDtypeStruct, jax.core.Tracer)):
        return
    # Two passes over the pixels, no copy: a minimum or maximum is NaN if any pixel is, infinite if one is.
    xp = jnp if isinstance(x_NxHxWxC, jax.Array) else np  # a device array is checked where it lives
    lo, hi = float(xp.min(x_NxHxWxC)), float(xp.max(x_NxHxWxC))
    if 0 <= lo and hi <= 255:  # finite too (a NaN compares false)
        # Only floats all within 0..1 are read again, for fractions.
        if not (np.issubdtype(dtype, np.floating) and hi <= 1) or \
                not look_divided(hi, bool(xp.all(x_NxHxWxC == xp.round(x_NxHxWxC)))):
            return
        raise DataFileError(f"{arg(name)}: every pixel is within 0..1 and some are fractions (the largest is "
                            f"{hi:g}): the images look divided by 255 already; give pixels 0..255 (a model whose "
                            "input scale is '255' divides them itself)", field=field)
    per_image = np.asarray(x_NxHxWxC).reshape(shape[0], -1)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = np.flatnonzero(~np.isfinite(per_image).all(axis=1))
        raise DataFileError(f"{arg(name)}: image {int(bad[0])} holds NaN or infinite pixels ({len(bad)} of "
                            f"{shape[0]} images do); pixels must be finite numbers 0..255", field=field)
    bad = np.flatnonzero(((per_image < 0) | (per_image > 255)).any(axis=1))
    raise DataFileError(f"{arg(name)}: image {int(bad[0])} holds pixels outside 0..255 ({len(bad)} of "
                        f"{shape[0]} images do; the pixels run from {lo:g} to {hi:g}); pixels must be 0..255, "
                        "as the model divides them by its input scale itself", field=field)
