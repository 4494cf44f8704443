"""The pixels a model takes: its input scale, the division that scale stands for, the checks of an image array.

Every model takes pixels 0..255 and divides them first by what its *input scale* says: ``raw`` (1: pixels as
they are, the lab's B) or ``255`` (pixels / 255, the CSAW-HackML-2020 BadNets) (:func:`input_divisor`). The
divisor may also be a traced scalar, so that one compiled program serves both scales (:func:`scaled`). Images
that are not (N, height, width, channels) finite real pixels of the model's input size are refused, naming the
argument (:func:`check_images_of_shape`).
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
        raise ConfigError(f"{arg('input_scale', input_scale)}: expected one of {', '.join(INPUT_SCALES)}",
                          field="input_scale")
    return INPUT_DIVISORS[input_scale]


def scaled(x_NxHxWxC: jax.Array, divisor: Any) -> jax.Array:
    """Pixels divided by ``divisor`` (a Python number or a traced scalar); a Python 1 leaves them untouched."""
    if isinstance(divisor, (int, float)) and divisor == 1.0:
        return x_NxHxWxC
    return x_NxHxWxC / jnp.asarray(divisor, x_NxHxWxC.dtype)


def check_images_of_shape(x_NxHxWxC: Any, hwc: tuple[int, int, int], name: str = "x", allow_empty: bool = False,
                          field: Optional[str] = None) -> None:
    """Refuse images that are not (N, *hwc) finite real pixels (shape and dtype; finiteness in one pass).

    ``x_NxHxWxC`` may be a NumPy or JAX array, or only a shape and dtype (``jax.ShapeDtypeStruct``).

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
    if not np.issubdtype(dtype, np.floating) or shape[0] == 0 or isinstance(x_NxHxWxC, jax.ShapeDtypeStruct) \
            or isinstance(x_NxHxWxC, jax.core.Tracer):
        return
    # One pass: a sum is finite unless a pixel is NaN or infinite (or finite pixels overflow it: then the
    # per-image check below finds nothing and the images pass).
    xp = jnp if isinstance(x_NxHxWxC, jax.Array) else np  # a device array is checked where it lives
    if bool(np.isfinite(xp.sum(x_NxHxWxC))):
        return
    bad = np.flatnonzero(~np.isfinite(np.asarray(x_NxHxWxC)).reshape(shape[0], -1).all(axis=1))
    if not len(bad):
        return
    raise DataFileError(f"{arg(name)}: image {int(bad[0])} holds NaN or infinite pixels ({len(bad)} of {shape[0]} "
                        "images do); pixels must be finite numbers 0..255", field=field)
