"""Fine-pruning (Liu et al. 2018): fine-tune the pruned B' on clean data with its pruning mask frozen.

The mask multiplies the pruned layer's output (DeepID: pool_3) in every forward pass, so the pruned channels
get exactly zero gradient; with Adam (no weight decay) a zero gradient is a zero update, so channels zeroed
before fine-tuning (DeepID's conv_3, as the lab prunes) stay exactly zero after it; any other model keeps the
mask in B'. Training uses one part of the clean validation data and early stopping the rest;
test data and poisoned data are never touched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet_jax.errors import ConfigError, arg
from badnet_jax.metrics import accuracy
from badnet_jax.model import BadNet, predict, prune_params
from badnet_jax.models.deepid import DeepID, as_model
from badnet_jax.models.predict import predict as predict_any
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.train import make_train_step, train_epoch, trainable_labels

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyper-parameters.

    Attributes:
        epochs: maximum passes over the training part.
        batch_size: images per step.
        learning_rate: Adam's learning rate.
        holdout_fraction: share of the clean validation data kept for early stopping (the rest trains).
        patience: epochs without improvement on the early-stopping part before stopping.
        seed: the split and the shuffling.
    """

    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-4
    holdout_fraction: float = 0.2
    patience: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked when the config is made, before any work: a NaN learning rate would "train" nothing and
        # still report a fine-pruned row.
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ConfigError(f"fine-tuning: {arg('learning_rate', self.learning_rate)} is not a finite positive "
                              "number", field="learning_rate")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fine-tuning: {arg(name, getattr(self, name))} must be >= 1", field=name)
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"fine-tuning: {arg('holdout_fraction', self.holdout_fraction)} must be in (0, 1)",
                              field="holdout_fraction")


def split_clean_valid(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train part, early-stopping part) of n clean validation images."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, int(round(holdout_fraction * n))) if n > 1 else 0
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def finetune(model: Any, params: Params, mask: jax.Array, x_clean: np.ndarray, y_clean: np.ndarray,
             config: FinetuneConfig = FinetuneConfig()) -> tuple[Params, list[dict]]:
    """Fine-tune B' = (params, mask) on clean images; returns the best params by early-stopping accuracy.

    Args:
        model: B's model: the lab's DeepID (a ``DeepID`` or its ``BadNet`` module: the pruned conv_3 channels
            are zeroed first, as the lab prunes) or any ``PrunableModel`` (the mask stays in every forward; batch
            norms' moving statistics stay as they are).
        params: B's (or B''s) params.
        mask: (C,) mask of the pruned layer's channels, frozen.
        x_clean, y_clean: clean validation images and labels (split into train / early-stopping parts).
        config: hyper-parameters.

    Returns:
        (params, history): fine-tuned params (with the mask, B') and one stats dict per epoch.
    """
    mask = jnp.asarray(mask, jnp.float32)
    if isinstance(model, DeepID):
        model = model.flax_module
    if isinstance(model, BadNet):
        params = prune_params(params, mask)
        tx = optax.adam(config.learning_rate)
        step = make_train_step(model, tx, mask)
        predict_fn = lambda p, x: predict(model, p, x, mask)
    else:
        model = as_model(model)
        # Only the learned weights move: the batch norms' moving statistics are the inference network's.
        tx = optax.multi_transform({"train": optax.adam(config.learning_rate), "frozen": optax.set_to_zero()},
                                   trainable_labels(params))
        step = _masked_step(model, tx, mask)
        predict_fn = lambda p, x: predict_any(model, p, x, mask)
    train_idx, hold_idx = split_clean_valid(len(x_clean), config.holdout_fraction, config.seed)
    x_tr, y_tr = x_clean[train_idx].astype(np.float32), y_clean[train_idx]
    x_ho, y_ho = x_clean[hold_idx], y_clean[hold_idx]
    opt_state = tx.init(params)

    def holdout_acc(p):
        return float(accuracy(predict_fn(p, x_ho), y_ho))

    rng = np.random.default_rng(config.seed)
    start, start_acc = params, holdout_acc(params)
    best, best_acc, stale, history = start, start_acc, 0, []
    log.info("fine-tune: %d train / %d early-stopping images; start accuracy %.2f%%", len(y_tr), len(y_ho), best_acc)
    batch = max(1, min(config.batch_size, len(y_tr)))
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        params, opt_state, loss = train_epoch(step, params, opt_state, x_tr, y_tr, batch, rng)
        acc = holdout_acc(params)
        # No wall times in the history: it goes into curve.json, which identical runs write identically.
        history.append({"epoch": epoch, "loss": loss, "holdout_acc": acc})
        log.info("fine-tune epoch %d/%d  loss %.4f  early-stopping accuracy %.2f%%  (%.1f s)", epoch, config.epochs,
                 history[-1]["loss"], acc, time.perf_counter() - t0)
        if acc > best_acc:
            best, best_acc, stale = params, acc, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if history and best is start:
        # Said, not left to be inferred from a "+FT" row equal to B''s: the tuning did nothing here.
        log.warning("fine-tune: no epoch raised the early-stopping accuracy above its start (%.2f%%; best epoch "
                    "%.2f%%): the fine-pruned B' is B' unchanged (a smaller learning rate than %g may help)",
                    start_acc, max(h["holdout_acc"] for h in history), config.learning_rate)
    return best, history


def _masked_step(model: PrunableModel, tx: optax.GradientTransformation, mask: jax.Array):
    """One jitted step of softmax cross-entropy of B' (the model under ``mask``): the pruned channels stay zero
    in every forward, so nothing after them learns from them."""

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.logits(p, xb, mask), yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
