"""A Flax module's head split at its first affine layers: the sweep's shortcuts for a :class:`FlaxCNN`.

A module's ``hidden(feats)`` is code, so by default every step of a curve runs all of it on the masked
features. A module that splits it into two methods, ``pre(feats)`` affine in the features (a flatten and a
dense layer, a global average pooling, a convolution without activation) and ``post(pre)`` the rest (its
activations and later layers), with ``hidden(feats) == post(pre(feats))``, names them when the model is built
(``FlaxCNN.build(..., head_split=("pre", "post"))``; ``("hidden", None)`` when ``hidden`` is affine itself, as a
global average pooling is). Its pre-activations then follow from one contribution per channel, as a Keras
model's do (``PrunableModel.channel_contribution``): the sweep adds the contributions of the kept channels,
evaluates ``post`` per step, and where nothing follows ``pre`` it builds every step at once
(``PrunableModel.logits_affine``).

The split is checked, not trusted: in float64 on random signed features, ``pre`` must be affine (the
difference of its values along a sum and a scaling within :data:`AFFINE_RTOL` of an affine map's) and
``post(pre(f))`` must give ``hidden(f)``; a ReLU or a max inside ``pre`` fails at once. Channel c's
contribution is the linear part of ``pre`` (its matrix, read once per call through the transposed map) applied
to that channel's slice of the features: one channel's share of the work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg

# How far ``pre`` may be from affine on the check's random features, relative to the size of its values: the
# float64 rounding of a dense layer is ~1e-16; a ReLU or a max makes errors of the order of the values.
AFFINE_RTOL = 1e-9
CHECK_ROWS = 3  # random feature maps the split is checked on


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """The methods a module's head is split into, and the pre-activations' shape per image.

    Attributes:
        pre: the method from the features to the pre-activations (affine in the features).
        post: the method from the pre-activations to the output layer's input; "" when ``pre`` is the whole
            hidden part (the logits are then affine in the mask).
        pre_shape: the pre-activations' shape per image.
    """

    pre: str
    post: str
    pre_shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Numbers per image in the pre-activations."""
        return int(np.prod(self.pre_shape))


def check_split(apply: Callable[[Any, jax.Array, str], jax.Array], variables: Any, module_name: str,
                feature_hwc: tuple[int, int, int], hidden_width: int, pre: str, post: Optional[str]) -> HeadSplit:
    """The split ``(pre, post)`` of a module's head, checked on random features in float64.

    Args:
        apply: ``apply(variables, x, method)``: the module's method on an input (variables as given).
        variables: the variables the model is built from (float32; converted to float64 for the check).
        module_name: the module's class name, for errors.
        feature_hwc: the features' shape per image.
        hidden_width: the output layer's input width.
        pre, post: the methods' names (``post`` None or "": ``pre`` is all of ``hidden``).

    Raises:
        ConfigError: naming ``head_split``: a method the module lacks, ``pre`` not giving one array per image,
            ``post`` not giving the output layer's input, ``pre`` not affine in the features, or
            ``post(pre(f))`` not equal to ``hidden(f)``.
    """
    field = "head_split"
    where = f"{arg(field, (pre, post))}: {module_name}"
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((CHECK_ROWS, *feature_hwc)) for _ in range(2))
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda t: jnp.asarray(np.asarray(t, np.float64)), variables)
        run = lambda method, x: np.asarray(apply(v64, jnp.asarray(x, jnp.float64), method), np.float64)  # noqa: E731
        zero = np.zeros_like(a)
        values = [run(pre, x) for x in (zero, a, b, a + b, 2.5 * a)]
        if values[0].ndim < 2 or values[0].shape[0] != CHECK_ROWS:
            raise ConfigError(f"{where}.{pre} gives shape {values[0].shape} for {CHECK_ROWS} feature maps, not one "
                              "array with a row per image", field=field)
        f0, fa, fb, fab, f2a = values
        scale = max(float(np.abs(v).max()) for v in values) or 1.0
        sum_err = float(np.abs((fab - f0) - (fa - f0) - (fb - f0)).max())
        scale_err = float(np.abs((f2a - f0) - 2.5 * (fa - f0)).max())
        if max(sum_err, scale_err) > AFFINE_RTOL * scale:
            raise ConfigError(f"{where}.{pre} is not affine in the features: on random feature maps pre(a + b) - "
                              f"pre(0) differs from (pre(a) - pre(0)) + (pre(b) - pre(0)) by {sum_err:.3g} and "
                              f"pre(2.5 a) - pre(0) from 2.5 (pre(a) - pre(0)) by {scale_err:.3g} (values up to "
                              f"{scale:.3g}); an activation or a max belongs in the second method", field=field)
        hidden = run("hidden", a)
        split = run(post, fa) if post else fa.reshape(CHECK_ROWS, -1)
        if split.shape != (CHECK_ROWS, hidden_width):
            name = f"{post}(pre)" if post else f"{pre}"
            raise ConfigError(f"{where}.{name} gives shape {split.shape} for {CHECK_ROWS} feature maps, but the "
                              f"output layer takes ({CHECK_ROWS}, {hidden_width})", field=field)
        err = float(np.abs(split - hidden).max())
        if err > AFFINE_RTOL * (float(np.abs(hidden).max()) or 1.0):
            composed = f"{post}({pre}(f))" if post else f"{pre}(f)"
            raise ConfigError(f"{where}: {composed} differs from hidden(f) by up to {err:.3g} on random feature "
                              "maps; the split must compute the same hidden layer", field=field)
    return HeadSplit(pre, post or "", tuple(int(d) for d in fa.shape[1:]))


def linear_map(pre_fn: Callable[[jax.Array], jax.Array], feature_hwc: tuple[int, int, int],
               dtype: Any) -> jax.Array:
    """The matrix (P, H, W, C) of the linear part of an affine ``pre_fn`` ((N, H, W, C) -> (N, ...), P numbers per
    image): row p holds what each feature adds to pre-activation p. Read through the transposed map, one
    cotangent per pre-activation (traceable; the bias drops out)."""
    zeros = jnp.zeros((1, *feature_hwc), dtype)
    out, vjp = jax.vjp(pre_fn, zeros)
    size = int(np.prod(out.shape[1:]))
    basis = jnp.eye(size, dtype=dtype).reshape(size, *out.shape)
    (rows,) = jax.vmap(vjp)(basis)
    return rows.reshape(size, *feature_hwc)


def contribution(matrix_PxHxWxC: jax.Array, feats_NxHxWxC: jax.Array, c: jax.Array,
                 pre_shape: tuple[int, ...]) -> jax.Array:
    """Channel ``c``'s contribution to the pre-activations (N, *pre_shape): its slice of the linear map applied
    to its slice of the features."""
    rows_PxHxW = jnp.take(matrix_PxHxWxC, c, axis=3)
    feats_NxHxW = jnp.take(feats_NxHxWxC, c, axis=3)
    out = jnp.einsum("nhw,phw->np", feats_NxHxW, rows_PxHxW, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(feats_NxHxWxC.shape[0], *pre_shape)
