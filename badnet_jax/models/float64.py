"""A model's generic float64 network, which settles its near-ties: its own JAX functions run by XLA in float64.

:class:`Float64Network` holds the float64 methods of :class:`~badnet_jax.models.protocol.PrunableModel` (a base
class of it): ``features64``, ``argmax64``, ``feature_means64`` and their warm-ups, for any model whose
``features`` and ``head`` compute in their inputs' dtype (a Keras or IR CNN, a checked Flax CNN). The lab's
DeepID overrides them with a canonical NumPy network (``badnet_jax.numerics.settling``). The device, the calls
and their sizes are ``badnet_jax.numerics.xla64``'s.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.numerics import xla64


class Float64Network:
    """The float64 methods of a ``PrunableModel`` (which supplies ``features``, ``head``, ``in_program``,
    ``feature_hwc``, ``num_channels`` and ``trunk_bytes_per_image``)."""

    def features64(self, params: Any, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
        """(N, H, W, C) float64 features: the model's own trunk run by XLA in float64."""
        x = np.asarray(x_NxHxWxC)
        if not len(x):
            return np.zeros((0, *self.feature_hwc))
        return xla64.run64(_fn64(self.in_program(), "features"), params, (x,), divisor)

    def argmax64(self, params: Any, x_NxHxWxC: np.ndarray, divisor: float,
                 masks_NxC: Optional[np.ndarray] = None, image_of: Optional[np.ndarray] = None) -> np.ndarray:
        """(R,) the float64 network's prediction for each row: image ``image_of[r]`` (None: row r is image r)
        under the mask ``masks_NxC`` (one (C,) mask for all rows, (R, C) one per row, or None). The trunk runs
        once per image, the head once per row."""
        feats = self.features64(params, x_NxHxWxC, divisor)
        image_of = np.arange(len(feats)) if image_of is None else np.asarray(image_of)
        if not len(image_of):
            return np.zeros((0,), np.int32)
        if masks_NxC is None:
            masks = np.ones((len(image_of), self.num_channels))
        else:
            masks = np.broadcast_to(np.asarray(masks_NxC, np.float64), (len(image_of), self.num_channels))
        return xla64.run64(_fn64(self.in_program(), "argmax"), params, (feats[image_of], masks)).astype(np.int32)

    def warm64(self, params: Any, x_NxHxWxC: np.ndarray, divisor: float) -> None:
        """Run the float64 network's XLA parts on these images (its trunk and head), so that they compile
        before a settling needs them (``compile_sweep`` runs it on zeros at each call size)."""
        self.argmax64(params, x_NxHxWxC, divisor)

    def feature_means64(self, params: Any, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
        """(C,) float64 mean of each channel of the features over these images: the model's own trunk run by
        XLA in float64, summed on the device in blocks (``xla64.sum64``)."""
        x = np.asarray(x_NxHxWxC)
        if not len(x):
            return np.zeros(self.num_channels)
        total = xla64.sum64(_fn64(self.in_program(), "feature_sums"), params, x, divisor, self._bytes64())
        return total / (len(x) * self.feature_hwc[0] * self.feature_hwc[1])

    def warm_means64(self, params: Any, images: jax.ShapeDtypeStruct) -> None:
        """Compile :meth:`feature_means64` for a ranking set of this shape and dtype without running it
        (``compile_sweep`` calls it ahead of the data: the means settle a ranking's near-ties)."""
        xla64.compile_sum64(_fn64(self.in_program(), "feature_sums"), params, images, self._bytes64())

    def _bytes64(self) -> int:
        """The float64 trunk's working memory per image (twice the float32 estimate), for its blocks' size."""
        return 2 * self.trunk_bytes_per_image()


@functools.lru_cache(maxsize=None)
def _fn64(model: Any, what: str):
    # Keyed on the model's program form (``in_program``): the divisor goes in as an argument, so the float64
    # functions that ``compile_sweep`` warms before the scale and the near-tie bound are known serve the sweep.
    # Images in their own dtype, converted and divided on the device as NumPy divides.
    features = lambda p, x, divisor: model.features(p, xla64.divided(x.astype(jnp.float64), divisor), 1.0)
    if what == "features":
        return jax.jit(features)
    if what == "feature_sums":  # blocks of images -> the weighted per-channel sum over all of them (xla64.sum64)
        def block_sum(p, x, w, divisor):
            feats = features(p, x, divisor)
            # Selected, not multiplied by 0: a padding (zero) image's features may be NaN or inf for a module
            # that divides by the image's own spread, and 0 * NaN is NaN.
            return jnp.sum(jnp.where(w[:, None] > 0, jnp.sum(feats, axis=(1, 2)), 0.0), axis=0)
        return jax.jit(lambda p, xs, ws, divisor: jnp.sum(
            jax.lax.map(lambda xw: block_sum(p, xw[0], xw[1], divisor), (xs, ws)), axis=0))
    # one head per row: each row has its own image's features and its own mask
    one = lambda p, f, m: jnp.argmax(model.head(p, f[None], m)[0])
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
