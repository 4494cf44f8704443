"""Train a DeepID BadNet with optax and plant a BadNets backdoor (Gu et al. 2017).

A configurable fraction of the training images carry the trigger and are relabelled to the attacker's
target; the network learns both tasks. Used to make the embedded demo BadNet, and by anyone who wants a
BadNet of their own to study.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from badnet_jax.io.poisoning import TRIGGER_AT, poison
from badnet_jax.metrics import accuracy
from badnet_jax.model import BadNet, Params, check_images, init_params, predict

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


def _epoch_done(history: list, stats: dict, epochs: int, on_epoch: Optional[Callable]) -> None:
    """Record and log one epoch's stats (and tell ``on_epoch``): BadNet training's and any model's alike."""
    history.append(stats)
    log.info("epoch %d/%d  loss %.4f  clean acc %s  ASR %s  (%.1f s)", stats["epoch"], epochs, stats["loss"],
             f"{stats['clean_acc']:.2f}%" if "clean_acc" in stats else "-",
             f"{stats['asr']:.2f}%" if "asr" in stats else "-", stats["seconds"])
    if on_epoch is not None:
        on_epoch(stats["epoch"], stats)


def _check_sets(check: Callable[..., None], x: np.ndarray, x_name: str, valid: Optional[tuple[np.ndarray, np.ndarray]],
                bd_valid: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
    """Refuse images the model cannot take before the first epoch, each named as the caller passed it (an
    evaluation set was checked only by the forward after an epoch, under the forward's own argument name)."""
    check(x, x_name)
    for name, xy in (("valid", valid), ("bd_valid", bd_valid)):
        if xy is not None:
            check(xy[0], f"{name}[0]", field=name)


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
    _check_sets(check_images, x_train, "x_train", valid, bd_valid)
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
        _epoch_done(history, stats, config.epochs, on_epoch)
    return model, params, history


# ------------------------------------------------------------------------------------------------------------
# Any model: a generic trainer for a PrunableModel (a GraphCNN with batch norm included)
#
# Batch norm, the choice made here: a GraphCNN's ``logits`` is its inference network (batch norm on the moving
# statistics). Training through it would normalise with statistics that never move, so :func:`train_model`
# trains a GraphCNN through :func:`training_logits` instead, the same graph with every batch norm on its batch's
# statistics (the usual training mode), and afterwards *recalibrates*: each batch norm's moving mean and
# variance become the exact mean and (population) variance of its input over the training images, layer by
# layer in graph order, every earlier batch norm already on its recalibrated statistics
# (:func:`recalibrate_batch_norm`). The result is an ordinary inference-mode network whose statistics are those
# of the data it was trained on, not an exponential average of the last few hundred batches, and the training
# is free of a momentum hyper-parameter. The moving statistics are never touched by the optimiser.
# ------------------------------------------------------------------------------------------------------------

_MOVING = ("moving_mean", "moving_variance")


def _has_batch_norm(model: Any) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any(node.op == "batch_norm" for node in graph.nodes)


def training_logits(model: Any, params: Any, x_NxHxWxC: jax.Array) -> jax.Array:
    """Pixels 0..255 -> logits (N, K) in training mode: a GraphCNN's batch norms normalise with the batch's own
    mean and variance (over batch and space, per channel); any other model is its ``logits``."""
    if not _has_batch_norm(model):
        return model.logits(params, x_NxHxWxC)
    from badnet_jax.models.ops import apply_op
    from badnet_jax.pixels import scaled

    graph = model.graph
    out = graph.logits_node()
    env = {graph.nodes[0].name: scaled(x_NxHxWxC, model.divisor)}
    for node in graph.nodes[1:]:
        xs = [env[s] for s in node.inputs]
        if node.op == "batch_norm":
            x = xs[0]
            p = params[node.weights]
            axes = tuple(range(x.ndim - 1))
            lead = (1,) * (x.ndim - 1)
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + node.attr("epsilon"))
            if "gamma" in p:
                y = y * p["gamma"].reshape(lead + p["gamma"].shape)
            env[node.name] = y + p["beta"].reshape(lead + p["beta"].shape) if "beta" in p else y
        else:
            env[node.name] = apply_op(node, params, xs)
        if node.name == out:
            break
    return env[out]


@functools.lru_cache(maxsize=None)
def _moments_fn(model: Any, name: str):
    """Jitted: a batch -> the per-channel (mean, M2) of batch norm ``name``'s input in the inference network."""
    from badnet_jax.models.ops import apply_op
    from badnet_jax.pixels import scaled

    graph = model.graph
    src = graph.by_name[name].inputs[0]

    def run(params, x):
        env = {graph.nodes[0].name: scaled(x, model.divisor)}
        for node in graph.nodes[1:]:
            env[node.name] = apply_op(node, params, [env[s] for s in node.inputs])
            if node.name == src:
                break
        v = env[src].reshape(-1, env[src].shape[-1])
        mean = jnp.mean(v, axis=0, keepdims=True)
        return mean[0], jnp.sum(jnp.square(v - mean), axis=0)

    return jax.jit(run)


def recalibrate_batch_norm(model: Any, params: Any, x_NxHxWxC: np.ndarray, batch: int = 512) -> Any:
    """Set every batch norm's moving statistics to its input's mean and population variance over these images.

    Layer by layer in graph order, each batch norm measured in the inference network with the earlier ones
    already recalibrated; batches are combined in float64 (Chan et al.'s pairwise update), so the result does
    not depend on ``batch`` beyond float32 rounding inside a batch. Returns new params (the others unchanged);
    a model without batch norm gets its params back.
    """
    if not _has_batch_norm(model) or len(x_NxHxWxC) == 0:
        return params
    params = {layer: dict(p) for layer, p in params.items()}
    for node in model.graph.nodes:
        if node.op != "batch_norm":
            continue
        fn = _moments_fn(model, node.name)
        n_tot, mean_tot, m2_tot = 0, None, None
        for i in range(0, len(x_NxHxWxC), batch):
            xb = jnp.asarray(x_NxHxWxC[i:i + batch], jnp.float32)
            mean, m2 = (np.asarray(v, np.float64) for v in fn(params, xb))
            n = len(xb) * _positions(model, node.inputs[0])
            if mean_tot is None:
                n_tot, mean_tot, m2_tot = n, mean, m2
            else:
                delta = mean - mean_tot
                total = n_tot + n
                mean_tot = mean_tot + delta * (n / total)
                m2_tot = m2_tot + m2 + delta * delta * (n_tot * n / total)
                n_tot = total
        p = params[node.weights]
        p["moving_mean"] = jnp.asarray(mean_tot, jnp.float32)
        p["moving_variance"] = jnp.asarray(m2_tot / n_tot, jnp.float32)
    return params


def _positions(model: Any, name: str) -> int:
    """Spatial positions per image of node ``name``'s output (1 for a vector)."""
    shape = dict(model.shapes)[name]
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def make_model_train_step(model: Any, tx: optax.GradientTransformation):
    """One jitted optimiser step of :func:`train_model`: ``(params, opt_state, x, y) -> (params, opt_state,
    loss)``, softmax cross-entropy of :func:`training_logits`."""

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = training_logits(model, p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def trainable_labels(params: Any) -> Any:
    """The params pytree labelled ``"train"`` or ``"frozen"`` (batch norms' moving statistics)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if getattr(path[-1], "key", None) in _MOVING else "train", params)


def mean_loss(model: Any, params: Any, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    """Mean softmax cross-entropy of the inference network (``model.logits``) over (x, y), in float64."""
    fn = jax.jit(lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
        model.logits(p, xb.astype(jnp.float32)), yb).sum())
    total = sum(float(fn(params, jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch])))
                for i in range(0, len(x), batch))
    return total / max(len(x), 1)


def train_model(model: Any, params: Any, x: np.ndarray, y: np.ndarray, config: TrainConfig = TrainConfig(),
                valid: Optional[tuple[np.ndarray, np.ndarray]] = None,
                bd_valid: Optional[tuple[np.ndarray, np.ndarray]] = None,
                on_epoch: Optional[Callable[[int, dict], None]] = None,
                recalibration_images: int = 4096) -> tuple[Any, list[dict]]:
    """Train any :class:`~badnet_jax.models.protocol.PrunableModel` (a GraphCNN with batch norm included) on
    (x, y) as given: poison the images first if a backdoor is wanted (``config.poison_fraction`` and
    ``config.target_label`` are not used here).

    Adam with a cosine decay from ``config.learning_rate`` to 0, ``config.batch_size`` images per step (a last
    partial batch left out), ``config.epochs`` epochs, each in a fresh order from ``config.seed``. Batch norm
    trains on batch statistics and ends recalibrated on all of (x, y) (see above); the moving statistics get no
    optimiser update.

    Args:
        model: the architecture (its ``logits``; a GraphCNN's graph for batch norm).
        params: where training starts (e.g. ``model.init_params(seed)``).
        x, y: NHWC raw pixels 0..255 (float32) and int labels.
        config: hyper-parameters (see above).
        valid, bd_valid: optional clean and poisoned sets whose accuracy (percent) every epoch reports, the
            batch norms recalibrated for that on the first ``recalibration_images`` training images.
        on_epoch: optional callback ``(epoch, stats)``.

    Returns:
        (params, history): float32 params of the inference network, one stats dict per epoch (``loss``: the
        mean training-mode loss of its steps).
    """
    _check_sets(model.check_images, x, "x", valid, bd_valid)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = len(x) // config.batch_size
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(1, steps_per_epoch * config.epochs))
    tx = optax.multi_transform({"train": optax.adam(schedule), "frozen": optax.set_to_zero()},
                               trainable_labels(params))
    opt_state = tx.init(params)
    step = make_model_train_step(model, tx)
    history = []
    x = np.asarray(x, np.float32)
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        params, opt_state, loss = train_epoch(step, params, opt_state, x, y, config.batch_size, rng)
        stats = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - t0}
        if valid is not None or bd_valid is not None:
            from badnet_jax.models.predict import predict as predict_any

            p = recalibrate_batch_norm(model, params, x[:recalibration_images])
            for key, xy in (("clean_acc", valid), ("asr", bd_valid)):
                if xy is not None:
                    stats[key] = float(accuracy(predict_any(model, p, xy[0]), xy[1]))
        _epoch_done(history, stats, config.epochs, on_epoch)
    params = recalibrate_batch_norm(model, params, x)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params), history
