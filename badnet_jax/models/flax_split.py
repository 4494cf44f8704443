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

The split is checked, not trusted (:func:`check_split`): in float64 on signed and non-negative feature maps of
magnitudes :data:`SCALES`, ``pre`` must treat each image alone and be affine (its values along a sum and a
scaling within :data:`AFFINE_RTOL` of an affine map's, each output to its own size), and ``post(pre(f))`` must
give ``hidden(f)``; a ReLU, a clip or a max inside ``pre`` fails at once. Channel c's contribution is the linear
part of ``pre`` (its matrix, read once per compiled call from its smaller side: ``PrunableModel.contributor``,
:func:`linear_map`) applied to that channel's slice of the features: one channel's share of the work. The matrix
holds (pre-activations x features) numbers, at most :data:`LINEAR_MAP_BYTES`; the sweep's memory model counts it
(``PrunableModel.call_bytes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.flax_checks import check_float64, float64_variables

# How far ``pre`` may be from affine on the check's feature maps, relative to its values there: the float64
# rounding of a dense layer is ~1e-16 of them; a ReLU, a clip or a max within reach of the check's magnitudes
# makes errors of the order of the values. (A method that computes in a narrower dtype is refused first:
# ``badnet_jax.models.flax_checks.check_float64``.)
AFFINE_RTOL = 1e-9
# Each output is held to its own size, floored at this share of its image's largest output, so that an
# activation in a small branch beside a large one is not hidden.
ELEMENT_FLOOR = 1e-3
# The check's feature maps: signed and non-negative (as features after a ReLU are), at these magnitudes, so that a
# threshold anywhere up to ~1e5 (a clip of large activations) is crossed.
SCALES = (1e-3, 1.0, 1e3, 1e6)
# The split's linear map holds (pre-activations x features) numbers; beyond this it is refused (a convolution on a
# large feature map: its map grows with the square of the map's area, and reading it takes min(P, F) passes).
LINEAR_MAP_BYTES = 1 << 28


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


def split_names(head_split: Any) -> tuple[str, str]:
    """``(pre, post)`` of a ``head_split`` argument (``post`` "" for None).

    Raises:
        ConfigError: naming ``head_split``: not two method names, the first non-empty, the second possibly None.
    """
    if (not isinstance(head_split, (tuple, list)) or len(head_split) != 2 or not isinstance(head_split[0], str)
            or not head_split[0] or not (head_split[1] is None or isinstance(head_split[1], str))):
        raise ConfigError(f"{arg('head_split', head_split)}: expected two method names, (pre, post), or (pre, None) "
                          "when pre is the whole hidden part", field="head_split")
    return head_split[0], head_split[1] or ""


def check_split(apply: Callable[[Any, jax.Array, str], jax.Array], variables: Any, module_name: str,
                feature_hwc: tuple[int, int, int], hidden_width: int, pre: str, post: str) -> HeadSplit:
    """The split ``(pre, post)`` of a module's head (names from :func:`split_names`), checked on feature maps in
    float64.

    ``pre`` must give one array with a row per image, each row its own image's (no statistics over the batch),
    affine on signed and non-negative feature maps at the magnitudes of :data:`SCALES`; ``post(pre(f))`` (or
    ``pre(f)`` flattened, with ``post`` None) must give ``hidden(f)``. The check holds for the variables given:
    a split whose affinity depends on the weights (a learned clip) is the caller's to keep true.

    Args:
        apply: ``apply(variables, x, method)``: the module's method on an input (variables as given).
        variables: the variables the model is built from (converted to float64 for the check).
        module_name: the module's class name, for errors.
        feature_hwc: the features' shape per image.
        hidden_width: the output layer's input width.
        pre, post: the methods' names (``post`` "": ``pre`` is all of ``hidden``).

    Raises:
        ConfigError: naming ``head_split``: a method that does not run on feature maps, ``pre`` not giving one
            array per image or mixing the images, ``pre`` not affine, ``post(pre(f))`` not ``hidden(f)``, or a
            linear map larger than :data:`LINEAR_MAP_BYTES`.
    """
    field = "head_split"
    where = f"{arg(field, (pre, post or None))}: {module_name}"
    rng = np.random.default_rng(0)

    def maps() -> np.ndarray:
        rows = [s * rng.standard_normal((1, *feature_hwc)) for s in SCALES]
        return np.concatenate(rows + [np.abs(r) for r in rows])

    a, b = maps(), maps()
    with jax.enable_x64(True):
        v64 = float64_variables(variables)

        def run(method: str, x: np.ndarray) -> np.ndarray:  # its values in float64
            try:
                out = apply(v64, jnp.asarray(x, jnp.float64), method)
            except (flax.errors.FlaxError, TypeError, ValueError) as err:
                raise ConfigError(f"{where}.{method} does not run on feature maps of shape {x.shape}: {err}",
                                  field=field) from err
            if not isinstance(out, (jax.Array, np.ndarray)) or out.ndim < 2 or out.shape[0] != len(x):
                got = f"shape {tuple(out.shape)}" if isinstance(out, (jax.Array, np.ndarray)) else type(out).__name__
                raise ConfigError(f"{where}.{method} gives {got} for {len(x)} feature maps, not one array with a "
                                  "row per image", field=field)
            if method not in checked:  # it runs: now whether it runs in float64 (the settling's network)
                checked.add(method)
                check_float64(apply, variables, module_name, method, x.shape[1:])
            return np.asarray(out, np.float64)

        checked = {"hidden"}  # FlaxCNN.build checked hidden
        f0, fa, fb, fab, f2a = (run(pre, x) for x in (0 * a, a, b, a + b, 2.5 * a))
        alone = np.concatenate([run(pre, a[i:i + 1]) for i in range(len(a))])

        def off(err: np.ndarray, *values: np.ndarray) -> float:  # the largest error, each output to its own size
            rows = [v.reshape(len(v), -1) for v in values]
            size = np.max(np.abs(rows), axis=0)
            floor = ELEMENT_FLOOR * size.max(axis=1, keepdims=True)
            return float((np.abs(err.reshape(len(err), -1)) / np.maximum(np.maximum(size, floor), 1e-300)).max())

        if off(alone - fa, alone, fa) > AFFINE_RTOL:
            raise ConfigError(f"{where}.{pre} gives an image another value in a batch than alone: it mixes the "
                              "images (statistics over the batch?); each image's pre-activations must be its own",
                              field=field)
        sum_err = off((fab - f0) - (fa - f0) - (fb - f0), f0, fa, fb, fab)
        scale_err = off((f2a - f0) - 2.5 * (fa - f0), f0, fa, f2a)
        if max(sum_err, scale_err) > AFFINE_RTOL:
            raise ConfigError(f"{where}.{pre} is not affine in the features: on feature maps of magnitudes "
                              f"{SCALES[0]:g} to {SCALES[-1]:g}, pre(a + b) - pre(0) is off (pre(a) - pre(0)) + "
                              f"(pre(b) - pre(0)) by {sum_err:.3g} and pre(2.5 a) - pre(0) off 2.5 (pre(a) - pre(0)) "
                              f"by {scale_err:.3g} of their size, more than the {AFFINE_RTOL:.3g} float64 rounding "
                              "allows; an activation, a clip or a max belongs in the second method", field=field)
        hidden = run("hidden", a)
        split = run(post, fa) if post else fa.reshape(len(fa), -1)
        if split.shape != (len(a), hidden_width):
            name = f"{post}({pre}(f))" if post else f"{pre}(f)"
            raise ConfigError(f"{where}: {name} gives shape {split.shape} for {len(a)} feature maps, but the output "
                              f"layer takes ({len(a)}, {hidden_width})", field=field)
        err = off(split - hidden, split, hidden)
        if err > AFFINE_RTOL:
            composed = f"{post}({pre}(f))" if post else f"{pre}(f)"
            raise ConfigError(f"{where}: {composed} differs from hidden(f) by {err:.3g} of its size on feature maps; "
                              "the split must compute the same hidden layer", field=field)
    split = HeadSplit(pre, post, tuple(int(d) for d in fa.shape[1:]))
    nbytes = map_bytes(split, feature_hwc)
    if nbytes > LINEAR_MAP_BYTES:
        raise ConfigError(f"{where}.{pre}'s linear map would hold {split.size} pre-activations x "
                          f"{int(np.prod(feature_hwc))} features ({nbytes / 2**30:.3g} GiB, more than "
                          f"{LINEAR_MAP_BYTES / 2**30:.3g}); leave head_split out (every step then runs hidden) or "
                          "split the head after a smaller layer", field=field)
    return split


def map_bytes(split: HeadSplit, feature_hwc: tuple[int, int, int]) -> int:
    """Bytes of the split's linear map in float32: (pre-activations x features) numbers."""
    return 4 * split.size * int(np.prod(feature_hwc))


def linear_map(pre_fn: Callable[[jax.Array], jax.Array], feature_hwc: tuple[int, int, int],
               dtype: Any) -> jax.Array:
    """The matrix (P, H, W, C) of the linear part of an affine ``pre_fn`` ((N, H, W, C) -> (N, ...), P numbers per
    image): row p holds what each feature adds to pre-activation p (traceable; the bias drops out).

    Read from the smaller side: through the transposed map, one cotangent per pre-activation, where there are
    no more pre-activations than features (a dense layer that narrows); else through the map itself, one
    tangent per feature (a convolution that widens). That takes min(P, F) passes of ``pre``'s linear part
    instead of P, and the one-hot basis (min(P, F) squared numbers) is never larger than the map itself.
    """
    zeros = jnp.zeros((1, *feature_hwc), dtype)
    out, linear = jax.linearize(pre_fn, zeros)
    size, features = int(np.prod(out.shape[1:])), int(np.prod(feature_hwc))
    if size <= features:
        transpose = jax.linear_transpose(linear, zeros)
        (rows,) = jax.vmap(transpose)(jnp.eye(size, dtype=out.dtype).reshape(size, *out.shape))
        return rows.reshape(size, *feature_hwc)
    columns = jax.vmap(linear)(jnp.eye(features, dtype=dtype).reshape(features, 1, *feature_hwc))
    return columns.reshape(features, size).T.reshape(size, *feature_hwc)


def contribution(matrix_PxHxWxC: jax.Array, feats_NxHxWxC: jax.Array, c: jax.Array,
                 pre_shape: tuple[int, ...]) -> jax.Array:
    """Channel ``c``'s contribution to the pre-activations (N, *pre_shape): its slice of the linear map applied
    to its slice of the features."""
    rows_PxHxW = jnp.take(matrix_PxHxWxC, c, axis=3)
    feats_NxHxW = jnp.take(feats_NxHxWxC, c, axis=3)
    out = jnp.einsum("nhw,phw->np", feats_NxHxW, rows_PxHxW, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(feats_NxHxWxC.shape[0], *pre_shape)
