"""Single forwards of any model: float32 predictions, and predictions with near-ties settled in float64.

The sweep evaluates whole curves; these evaluate one network, B or B' under a channel mask (a fine-pruned B',
the GoodNet's screening, the input-scale check), a ``batch`` of images per jitted call.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.numerics.tie_bound import with_measured_tie_rtol
from badnet_jax.numerics.ties import output_with_ties


@functools.lru_cache(maxsize=None)
def _top2_fn(model: PrunableModel):
    def run(params, mask, x):
        feats = model.features(params, x.astype(jnp.float32))
        hidden = model.hidden(params, feats, mask)
        return output_with_ties(hidden, *model.output_layer(params), model.tie_rtol)
    return jax.jit(run)


def _checked(model: Any, params: Params, x_NxHxWxC: Any, mask: Any, batch: int) -> tuple[PrunableModel, np.ndarray]:
    model = as_model(model)
    model.check_weights(params)
    model.check_images(x_NxHxWxC, "x_NxHxWxC", allow_empty=True)
    if batch < 1:
        raise ConfigError(f"{arg('batch', batch)}: expected at least 1 image per call", field="batch")
    m = np.ones(model.num_channels, np.float32) if mask is None else model.check_mask(mask)
    return model, np.asarray(m, np.float32)


def predict_settled(model: Any, params: Params, x_NxHxWxC: np.ndarray, mask: Optional[np.ndarray] = None,
                    batch: int = 1024) -> tuple[np.ndarray, int]:
    """(N,) predictions of B (or of B' under a channel mask) with near-ties settled in float64, and how many were.

    ``model``: a :class:`~badnet_jax.models.protocol.PrunableModel` (a ``BadNet`` module is taken as the lab's
    DeepID). The float32 forward runs jitted ``batch`` images at a time; the flagged images run again in float64
    (the model's own float64 network). The flags are the model's ``tie_rtol``: a model other than DeepID whose
    bound is unmeasured has it measured first, on these weights and images
    (``badnet_jax.numerics.tie_bound.with_measured_tie_rtol``), since float32 errs as each network's weights
    do. A model given measured (to measure once for several calls on the same weights) is used as given.

    Raises:
        ConfigError: params that are not the model's or hold NaN or infinite values, a mask that is not (C,) zeros
            and ones, or ``batch`` < 1.
        DataFileError: images the model cannot take.
    """
    model, m = _checked(model, params, x_NxHxWxC, mask, batch)
    model = with_measured_tie_rtol(model, params, x_NxHxWxC)
    fn = _top2_fn(model)
    preds, near = [], []
    for i in range(0, len(x_NxHxWxC), batch):
        arg_, flag = fn(params, jnp.asarray(m), jnp.asarray(x_NxHxWxC[i:i + batch]))
        preds.append(np.asarray(arg_))
        near.append(np.asarray(flag))
    if not preds:
        return np.zeros((0,), np.int32), 0
    preds, near = np.concatenate(preds), np.concatenate(near)
    if near.any():
        preds[near] = model.argmax64(params, np.asarray(x_NxHxWxC)[near], model.divisor, m)
    return preds, int(near.sum())


@functools.lru_cache(maxsize=None)
def _argmax_at_scale(model: PrunableModel):
    # The divisor is traced, so one compiled forward serves both input scales (the input-scale check runs B at
    # both on its sample). x / 1 is x exactly, as in the sweep, which divides by a traced divisor too.
    return jax.jit(lambda p, m, x, d: jnp.argmax(model.logits(p, x.astype(jnp.float32), m, d), -1).astype(jnp.int32))


def _argmax_fn(model: PrunableModel):
    fn = _argmax_at_scale(model.in_program())  # its scale goes in as the divisor: one program for every scale
    divisor = jnp.float32(model.divisor)
    return lambda p, m, x: fn(p, m, x, divisor)


def predict(model: Any, params: Params, x_NxHxWxC: np.ndarray, mask: Optional[np.ndarray] = None,
            batch: int = 1024) -> np.ndarray:
    """(N,) int32 float32 argmax predictions of B (or of B' under a channel mask), ``batch`` images per call.

    Raises:
        ConfigError: params that are not the model's or hold NaN or infinite values, a mask that is not (C,) zeros
            and ones, or ``batch`` < 1.
        DataFileError: images the model cannot take.
    """
    model, m = _checked(model, params, x_NxHxWxC, mask, batch)
    fn = _argmax_fn(model)
    parts = [np.asarray(fn(params, jnp.asarray(m), x_NxHxWxC[i:i + batch])) for i in range(0, len(x_NxHxWxC), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)
