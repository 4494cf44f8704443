"""badnet_jax.pixels: the checks every forward, sweep and GoodNet runs on images given in memory, against the
same images read by hand (what a lab file's reader refuses, an array refuses too)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.errors import DataFileError
from badnet_jax.pixels import check_images_of_shape

HWC = (5, 4, 3)


def _images(rng, n=6, dtype=np.float32):
    return rng.integers(0, 256, (n, *HWC)).astype(dtype)


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray], ids=["numpy", "device"])
@pytest.mark.parametrize("value,complaint", [
    (np.nan, r"x: image 4 holds NaN or infinite pixels \(1 of 6 images do\)"),
    (-np.inf, r"x: image 4 holds NaN or infinite pixels"),
    (300.0, r"x: image 4 holds pixels outside 0..255 \(1 of 6 images do; the pixels run from 0 to 300\); pixels "
            r"must be 0..255, as the model divides them by its input scale itself"),
    (-0.5, r"x: image 4 holds pixels outside 0..255 \(1 of 6 images do; the pixels run from -0.5 to"),
])
def test_pixels_that_are_no_pixels_are_refused_naming_the_image(rng, to_array, value, complaint):
    x = _images(rng)
    x[:, 0, 0, 0] = 0.0  # the smallest pixel, for the message's range
    x[4, 2, 1, 0] = value
    x[5, 0, 0, 1] = 255.0
    with pytest.raises(DataFileError, match=complaint) as err:
        check_images_of_shape(to_array(x), HWC, "x")
    assert err.value.field == "x"


def test_pixels_divided_by_255_already_are_refused(rng):
    x = _images(rng) / np.float32(255)
    x[0, 0, 0, 0] = 1.0
    with pytest.raises(DataFileError, match=r"sets\['clean_valid'\]: every pixel is within 0..1 and some are "
                                            r"fractions \(the largest is 1\): the images look divided by 255 "
                                            r"already") as err:
        check_images_of_shape(x, HWC, "sets['clean_valid']", field="clean_valid")
    assert err.value.field == "clean_valid"


def test_what_pixels_may_be(rng):
    x = _images(rng)
    for ok in (x, x.astype(np.uint8), x.astype(np.int64), x.astype(np.float64), jnp.asarray(x),
               np.zeros((2, *HWC), np.float32),  # all black: nothing says it was divided
               rng.integers(0, 2, (2, *HWC)).astype(np.float32),  # near black, as a reader gives a uint8 file
               np.full((2, *HWC), 255.0, np.float32), x[:0]):
        check_images_of_shape(ok, HWC, "x", allow_empty=True)
    # Integers beyond 0..255 are no pixels either; shapes and traced arrays are checked by shape alone.
    with pytest.raises(DataFileError, match="image 0 holds pixels outside 0..255"):
        check_images_of_shape(np.full((1, *HWC), 256, np.int64), HWC, "x")
    check_images_of_shape(jax.ShapeDtypeStruct((3, *HWC), jnp.float32), HWC, "x")
    jax.jit(lambda v: check_images_of_shape(v, HWC, "x") or v)(x / 255)
