"""The pruning-aware attack of Fine-Pruning (Liu et al., RAID 2018): a BadNet built to survive pruning.

The defense prunes the channels that clean data leaves dormant, because a plain BadNet keeps its backdoor
there. An attacker who knows this moves the backdoor into the channels clean data uses:

1. train the network on clean data;
2. prune the channels the defender would prune first: the longest prefix of the activation ranking (mean
   pool_3 activation on clean validation data, lowest first) whose pruning costs at most ``drop`` of clean
   validation accuracy;
3. train the pruned network on poisoned data: the backdoor can only live in the channels left;
4. put the pruned channels back (decoys), their conv_3 bias lowered by twice the largest pre-activation they
   reach on the attacker's images, so they stay exactly 0 there: the defender's ranking puts them first,
   and pruning them changes nothing.

Step 3 trains with the channels masked, so the decoys' conv_3 weights and every weight reading them keep
their clean values (they get no gradient), and on every image where the decoys are dead the reinstated
network computes the same pool_3 tensor as the pruned one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.io.poisoning import TRIGGER_AT, poison
from badnet_jax.errors import ConfigError, arg
from badnet_jax.metrics import accuracy, first_crossing, hits
from badnet_jax.model import NUM_POOL3_CHANNELS, BadNet, Params, predict
from badnet_jax.sweep import rank_and_sweep, trunk_features
from badnet_jax.train import TrainConfig, train_badnet

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruningAwareConfig:
    """The attack's settings (the training hyper-parameters are a :class:`badnet_jax.train.TrainConfig`).

    Attributes:
        clean_epochs: step 1, training on clean data.
        poison_epochs: step 3, training the pruned network on poisoned data.
        drop: step 2 prunes the longest prefix of the activation ranking that costs at most this much clean
            validation accuracy (0.04: 4 points, like the defender's X = 4).
        bias_factor: step 4 lowers each decoy's conv_3 bias by this times its largest pre-activation on the
            attacker's images (> 1 keeps it dead on similar unseen images too).
    """

    clean_epochs: int = 8
    poison_epochs: int = 4
    drop: float = 0.04
    bias_factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("clean_epochs", "poison_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"the pruning-aware attack needs {arg(name, getattr(self, name))} >= 1",
                                  field=name)
        if not 0 <= self.drop < 1:
            raise ConfigError(f"the pruning-aware attack needs 0 <= {arg('drop', self.drop)} < 1", field="drop")
        if self.bias_factor < 1:
            raise ConfigError(f"the pruning-aware attack needs {arg('bias_factor', self.bias_factor)} >= 1",
                              field="bias_factor")


def _conv3_pre_max(model: BadNet, params: Params, x_NxHxWxC: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(60,) each channel's largest conv_3 pre-activation over these images (float32, raw pixels)."""
    pre_max = jax.jit(lambda p, x: trunk_features(model, p, x, chunk, margins=True)[1])
    return np.asarray(pre_max(params, x_NxHxWxC)).max(axis=0)


def dormant_prefix(model: BadNet, params: Params, x_valid: np.ndarray, y_valid: np.ndarray,
                   drop: float) -> np.ndarray:
    """Step 2: the first channels of the defender's activation ranking on ``x_valid`` whose pruning together
    costs at most ``drop`` of clean accuracy (the defender's X-cut less one channel; the defender's own sweep
    and stop rule)."""
    sweep = rank_and_sweep(model, params, {"clean_valid": x_valid})
    k, crossed = first_crossing(hits(sweep.preds["clean_valid"], y_valid), len(y_valid), drop)
    return sweep.order[:k - 1 if crossed else k]


def train_pruning_aware(x_train: np.ndarray, y_train: np.ndarray, num_classes: int, trigger: np.ndarray,
                        valid: tuple[np.ndarray, np.ndarray], config: TrainConfig = TrainConfig(),
                        attack: PruningAwareConfig = PruningAwareConfig(),
                        bd_valid: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[BadNet, Params, dict]:
    """Train a pruning-aware BadNet (see the module docstring).

    Args:
        x_train, y_train: clean NHWC raw pixels and labels (the attacker's training data).
        num_classes: output size.
        trigger: (h, w, 4) RGBA trigger pasted at the lab's position.
        valid: clean validation images and labels: what step 2 ranks and measures on (the attacker assumes the
            defender's data looks like this).
        config: training hyper-parameters (``epochs`` is replaced by the attack's two epoch counts).
        attack: the attack's settings.
        bd_valid: optional poisoned validation set, reported after every epoch.

    Returns:
        (model, params, info): info holds the decoy channels, their bias shift, and the pruned network's and
        the final network's clean validation accuracy.
    """
    model = BadNet(num_classes)
    log.info("Pruning-aware attack, step 1: training on clean data (%d epochs).", attack.clean_epochs)
    _, clean, _ = train_badnet(x_train, y_train, num_classes, trigger,
                               dataclasses.replace(config, poison_fraction=0.0, epochs=attack.clean_epochs),
                               valid=valid)
    decoys = dormant_prefix(model, clean, *valid, attack.drop)
    mask = np.ones(NUM_POOL3_CHANNELS, np.float32)
    mask[decoys] = 0
    log.info("Step 2: pruned the %d channels clean data leaves most dormant (accuracy drop <= %g): %s.",
             len(decoys), attack.drop, decoys.tolist())
    log.info("Step 3: training the pruned network on poisoned data (%d epochs).", attack.poison_epochs)
    _, pruned, _ = train_badnet(x_train, y_train, num_classes, trigger,
                                dataclasses.replace(config, epochs=attack.poison_epochs, seed=config.seed + 1),
                                valid=valid, bd_valid=bd_valid, params=clean, mask=mask)
    # Step 4: the attacker's images, clean and triggered, are what the decoys must stay dead on.
    seen = np.concatenate([x_train, valid[0], poison(x_train, trigger, TRIGGER_AT)])
    shift = np.zeros(NUM_POOL3_CHANNELS, np.float32)
    shift[decoys] = attack.bias_factor * np.maximum(_conv3_pre_max(model, pruned, seen)[decoys], 0.0) + 1e-3
    params = {**pruned, "conv_3": {**pruned["conv_3"], "bias": pruned["conv_3"]["bias"] - jnp.asarray(shift)}}
    info = {"decoys": decoys.tolist(), "bias_shift": shift[decoys].tolist(),
            "pruned_valid_acc": float(accuracy(predict(model, pruned, valid[0], mask), valid[1])),
            "valid_acc": float(accuracy(predict(model, params, valid[0]), valid[1]))}
    if bd_valid is not None:
        info["valid_asr"] = float(accuracy(predict(model, params, bd_valid[0]), bd_valid[1]))
    log.info("Step 4: %d decoys reinstated, dormant; clean validation accuracy %.2f%%%s.", len(decoys),
             info["valid_acc"], f", ASR {info['valid_asr']:.2f}%" if "valid_asr" in info else "")
    return model, params, info
