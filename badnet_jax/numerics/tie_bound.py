"""The float32 near-tie bound of a model other than the lab's DeepID, measured on the model at hand.

``badnet_jax.numerics.ties`` derives the form of the bound (a gap within ``rtol * S`` of a tie may depend on
the summation order) and measured its multiple on the lab's DeepID: TIE_RTOL = 2 * 64 u, 10x the worst
error seen on each logit. Another architecture sums other terms in other orders (batch norms, residual
additions, deeper heads), so its multiple is measured the same way before its sweep: on up to
:data:`CHECK_IMAGES` images of the ranking set, at every step of :data:`CHECK_ORDERS` seeded random orders,
the float32 logits of the summation orders the sweep uses (the masked forward, the affine split's suffix sums
carried through the reverse scan, and their cumulative sum over the order: ``badnet_jax.models.affine``)
against the model's float64 network; the bound is 10x the worst gap error on each of the two logits, never
below TIE_RTOL.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.numerics.ties import HIGHEST, TIE_RTOL, U, output_scale
from badnet_jax.models.affine import cumulative_preactivations, prefix_masks, reverse_steps

CHECK_IMAGES = 32
CHECK_ORDERS = 2
# A bound this large (~130x TIE_RTOL; a measured error of 1600 u S, where real CNNs err by 2-7 u S) is not
# rounding: the float32 and float64 networks compute different things. Still exact (every prediction within it
# is settled in float64), but slow, and worth a look: a warning says so.
IMPLAUSIBLE_RTOL = 1e-3

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _logits32(model: PrunableModel):
    """The float32 summation orders at every step of an order: (steps, N, K) logits of the masked forward, of
    the affine split's suffix sums carried through the reverse scan, and of the cumulative sum over the order
    (the sweep's three), and (steps, N) S of each. Keyed on the model's program form (``in_program``), the
    pixels' divisor traced: one program for either input scale, compiled ahead by :func:`compile_tie_bound`."""
    def run(params, x, order, divisor):
        feats = model.features(params, x.astype(jnp.float32), divisor)
        w, b = model.output_layer(params)
        masks = prefix_masks(order)

        def direct(mask):
            hidden = model.hidden(params, feats, mask)
            return jnp.dot(hidden, w, precision=HIGHEST) + b[None, :], output_scale(hidden, w, b)

        def split(k, pre):
            hidden = model.tail_hidden(params, pre)
            return jnp.dot(hidden, w, precision=HIGHEST) + b[None, :], output_scale(hidden, w, b)

        # The prefix sweep's order: the suffix sums carried through the reverse scan, a channel added per step.
        prefix = reverse_steps(model, params, feats, order, split)
        # The cumulative sweep's order: every step at once, a reverse cumulative sum over the order.
        hidden = model.tail_hidden(params, cumulative_preactivations(model, params, feats, order))
        lead = (1,) * (hidden.ndim - 1)
        cumulative = jnp.dot(hidden, w, precision=HIGHEST) + b.reshape(*lead, -1), output_scale(hidden, w, b)
        return jax.lax.map(direct, masks), prefix, cumulative
    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _heads64(model: PrunableModel):
    """(steps, N, K) logits of the model's head on float64 features under each of the masks (steps, C): jitted
    once per program form (run under ``jax.enable_x64``: float64). The features are the model's float64
    trunk (``features64``)."""
    return jax.jit(lambda p, feats, masks: jax.lax.map(lambda m: model.head(p, feats, m), masks))


def _check_rows(n: int) -> np.ndarray:
    """The check images' rows among ``n``: up to CHECK_IMAGES spread evenly."""
    return np.unique(np.linspace(0, n - 1, min(n, CHECK_IMAGES)).astype(int)) if n else np.zeros(0, int)


def compile_tie_bound(model: PrunableModel, params: Params, images: jax.ShapeDtypeStruct) -> None:
    """Compile what :func:`with_measured_tie_rtol` runs for a ranking set of this shape and dtype, ahead of the
    images (the defense calls it in a thread while they load; a model that keeps its bound compiles nothing):
    the float32 program, and the float64 trunk (the model's ``features64``, run on zeros of the check's size,
    a call size the sweep's settling shares) and heads."""
    if getattr(model, "tie_rtol_measured", True) or not images.shape[0]:
        return
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params)):
        return  # weights as shapes only: nothing to run the float64 trunk with (as compile_float64)
    form = model.in_program()
    n = len(_check_rows(images.shape[0]))
    c = model.num_channels
    model.features64(params, np.zeros((n, *images.shape[1:]), images.dtype), model.divisor)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    _logits32(form).lower(params, spec((n, *images.shape[1:]), images.dtype), spec((c,), jnp.int32),
                          spec((), jnp.float32)).compile()
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: spec(np.shape(a), jnp.float64), params)
        _heads64(form).lower(p64, spec((n, *model.feature_hwc), jnp.float64),
                             spec((c + 1, c), jnp.float64)).compile()


def measured_gap_error(model: PrunableModel, params: Params, x_NxHxWxC: np.ndarray, seed: int = 0) -> float:
    """The largest |gap(float32) - gap(float64)| / (u S) over the check images, steps and summation orders
    (the gap between float64's top two classes; S as in ``badnet_jax.numerics.ties``)."""
    x = np.asarray(x_NxHxWxC)
    x = x[_check_rows(len(x))]
    if not len(x):
        return 0.0
    form = model.in_program()
    feats64 = model.features64(params, x, model.divisor)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(CHECK_ORDERS):
        order = rng.permutation(model.num_channels).astype(np.int32)
        masks = prefix_masks(order).astype(np.float64)
        # NumPy arrays in, as compile_tie_bound's shapes: jnp.asarray would compile a copy of each.
        orders32 = _logits32(form)(params, x, order, np.float32(model.divisor))
        with jax.enable_x64(True):
            l64 = np.asarray(_heads64(form)(p64, feats64, masks))
        first = l64.argmax(-1)
        second = np.where(np.arange(l64.shape[-1]) == first[..., None], -np.inf, l64).argmax(-1)
        pick = lambda logits, c: np.take_along_axis(np.asarray(logits, np.float64), c[..., None], -1)[..., 0]
        gap64 = pick(l64, first) - pick(l64, second)
        for logits, scale in orders32:
            gap32 = pick(logits, first) - pick(logits, second)
            worst = max(worst, float((np.abs(gap32 - gap64) / (U * np.maximum(np.asarray(scale), 1e-30))).max()))
    return worst


def with_measured_tie_rtol(model: PrunableModel, params: Params, x_NxHxWxC: np.ndarray) -> PrunableModel:
    """``model`` with its ``tie_rtol`` measured on these images (10x the worst gap error, at least TIE_RTOL); a
    warning is logged when it exceeds :data:`IMPLAUSIBLE_RTOL`.

    The lab's DeepID keeps its derived and measured TIE_RTOL (``badnet_jax.numerics.ties``).
    """
    if getattr(model, "tie_rtol_measured", True):
        return model
    rtol = max(TIE_RTOL, 10.0 * measured_gap_error(model, params, x_NxHxWxC) * U)
    if rtol > IMPLAUSIBLE_RTOL:
        log.warning("The near-tie bound measured on %s is %.3g of the output scale, %.0fx the lab's DeepID's: its "
                    "float32 and float64 networks differ far beyond rounding on these images (a computation that "
                    "depends on its dtype?). Every prediction within it is recomputed in float64: exact, but slow.",
                    model.name, rtol, rtol / TIE_RTOL)
    return dataclasses.replace(model, tie_rtol=rtol, tie_rtol_measured=True)
