"""What the sweep's tests share: the sweep of a clean and a poisoned set, and the lab's own per-step loop."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from badnet_jax import prune_params
from badnet_jax import sweep as sw
from badnet_jax.models.deepid import DeepID


def two_sets(model, params, x, xb, chunk, options=sw.SweepOptions(), **extra):
    """The sweep of a clean (ranking) and a poisoned set, plus named extra sets."""
    return sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb, **extra},
                             dataclasses.replace(options, chunk=chunk))


def plan(options, chunk):
    return sw.plan_sweep(dataclasses.replace(options, chunk=chunk), [], DeepID())


def sequential_predictions(model, params, x, masks):
    """What the lab's Keras loop does: one pruned model and one full forward per step."""
    forward = jax.jit(lambda p, xb: model.apply({"params": p}, xb).argmax(-1))
    return np.stack([np.asarray(forward(prune_params(params, m), x)) for m in masks])
