"""Train a DeepID BadNet with optax and plant a BadNets backdoor (Gu et al. 2017).

A configurable fraction of the training images carry the trigger and are relabelled to the attacker's
target; the network learns both tasks. Used to make the embedded demo BadNet, and by anyone who wants a
BadNet of their own to study.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet_jax.io.lab_data import TRIGGER_AT, poison
from badnet_jax.metrics import accuracy
from badnet_jax.model import BadNet, Params, init_params, predict

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of BadNet training.

    Attributes:
        epochs: passes over the (partly poisoned) training set.
        batch_size: images per optimiser step.
        learning_rate: Adam's peak learning rate (cosine decay to 0 over the run).
        poison_fraction: share of training images that get the trigger and the target label.
        target_label: the attacker's label.
        seed: initialisation, poisoning choice and shuffling all derive from it.
    """

    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 1e-3
    poison_fraction: float = 0.1
    target_label: int = 0
    seed: int = 0


def poison_training_set(x: np.ndarray, y: np.ndarray, trigger: np.ndarray, fraction: float, target: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace ``fraction`` of the images by their triggered twins labelled ``target``.

    Returns:
        (x, y, poisoned_indices) with new arrays; the inputs are not modified.
    """
    idx = np.sort(rng.choice(len(x), size=int(round(fraction * len(x))), replace=False))
    x, y = x.copy(), y.copy()
    x[idx] = poison(x[idx], trigger, TRIGGER_AT)
    y[idx] = target
    return x, y, idx


def make_train_step(model: BadNet, tx: optax.GradientTransformation, mask: Optional[jax.Array] = None):
    """One jitted optimiser step on softmax cross-entropy: ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    Shared by BadNet training and fine-pruning; ``mask`` (60,) keeps pruned pool_3 channels at zero.
    """

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb, mask=mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_epoch(step: Callable, params: Params, opt_state: Any, x: np.ndarray, y: np.ndarray, batch_size: int,
                rng: np.random.Generator) -> tuple[Params, Any, float]:
    """One pass over (x, y) in a fresh random order, ``batch_size`` images per step (a last partial batch is left
    out): the epoch loop of BadNet training and fine-pruning.

    The steps are dispatched without waiting for their losses, which come back to the host once, at the end.

    Args:
        step: a step of :func:`make_train_step`.
        params, opt_state: where the epoch starts.
        x, y: float32 images and int labels.
        batch_size: images per step.
        rng: draws the epoch's order (one permutation).

    Returns:
        (params, opt_state, loss): the loss is the float64 mean of the steps' float32 losses (NaN without a step).
    """
    order = rng.permutation(len(x))
    losses = []
    for i in range(len(x) // batch_size):
        b = order[i * batch_size:(i + 1) * batch_size]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x[b]), jnp.asarray(y[b]))
        losses.append(loss)
    loss = float(np.asarray(jax.device_get(losses), np.float64).mean()) if losses else float("nan")
    return params, opt_state, loss


def train_badnet(x_train: np.ndarray, y_train: np.ndarray, num_classes: int, trigger: np.ndarray,
                 config: TrainConfig = TrainConfig(),
                 valid: Optional[tuple[np.ndarray, np.ndarray]] = None,
                 bd_valid: Optional[tuple[np.ndarray, np.ndarray]] = None,
                 on_epoch: Optional[Callable[[int, dict], None]] = None, params: Optional[Params] = None,
                 mask: Optional[np.ndarray] = None) -> tuple[BadNet, Params, list[dict]]:
    """Train a BadNet on raw-pixel images with a planted backdoor.

    Args:
        x_train, y_train: clean NHWC float32 raw pixels and int labels.
        num_classes: output size.
        trigger: (h, w, 4) uint8 RGBA trigger pasted at the lab's position.
        config: hyper-parameters (``poison_fraction`` 0 trains a clean network).
        valid, bd_valid: optional clean and poisoned evaluation sets, reported after every epoch.
        on_epoch: optional callback ``(epoch, stats)``.
        params: start from these instead of a fresh initialisation.
        mask: (60,) train the network with the pool_3 channels where it is 0 pruned: they stay zero, and
            since they get no gradient, so do their conv_3 weights and the weights reading them (Adam moves
            nothing whose gradient was always zero).

    Returns:
        (model, params, history) where history holds one stats dict per epoch.
    """
    rng = np.random.default_rng(config.seed)
    x, y, _ = poison_training_set(x_train, y_train, trigger, config.poison_fraction, config.target_label, rng)
    model = BadNet(num_classes)
    params = init_params(num_classes, seed=config.seed) if params is None else params
    steps_per_epoch = len(x) // config.batch_size
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(1, steps_per_epoch * config.epochs))
    tx = optax.adam(schedule)
    opt_state = tx.init(params)
    step = make_train_step(model, tx, None if mask is None else jnp.asarray(mask, jnp.float32))
    history = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        params, opt_state, loss = train_epoch(step, params, opt_state, x, y, config.batch_size, rng)
        stats = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - t0}
        if valid is not None:
            stats["clean_acc"] = float(accuracy(predict(model, params, valid[0], mask), valid[1]))
        if bd_valid is not None:
            stats["asr"] = float(accuracy(predict(model, params, bd_valid[0], mask), bd_valid[1]))
        history.append(stats)
        log.info("epoch %d/%d  loss %.4f  clean acc %s  ASR %s  (%.1f s)", epoch, config.epochs, stats["loss"],
                 f"{stats['clean_acc']:.2f}%" if "clean_acc" in stats else "-",
                 f"{stats['asr']:.2f}%" if "asr" in stats else "-", stats["seconds"])
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return model, params, history
