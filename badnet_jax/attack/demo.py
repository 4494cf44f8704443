"""The embedded default: the shipped demo BadNet and its freshly generated synthetic data.

``scripts/make_demo.py`` trains the demo BadNet (``assets/demo_badnet.h5``) on ``DEMO_CONFIG``'s training
split; the defense regenerates the validation and test splits from the same seed in a few seconds.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from badnet_jax.io import checkpoint
from badnet_jax.attack.pruning_aware import PruningAwareConfig, train_pruning_aware
from badnet_jax.io.keras import save_keras
from badnet_jax.io.lab_data import save_lab_h5
from badnet_jax.errors import ConfigError
from badnet_jax.io.fileio import atomic_write
from badnet_jax.metrics import accuracy
from badnet_jax.model import predict
from badnet_jax.attack.synthetic import DemoConfig, make_demo
from badnet_jax.train import TrainConfig, train_badnet

log = logging.getLogger(__name__)

DEMO_CONFIG = DemoConfig()
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo_badnet.h5"


def demo_sets() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """The demo's four sets by role, generated from ``DEMO_CONFIG``, and the poisoned sets' true classes."""
    d = make_demo(DEMO_CONFIG, include_train=False)
    data = {"clean_valid": d.valid, "bd_valid": d.bd_valid, "clean_test": d.test, "bd_test": d.bd_test}
    # The poisoned splits are the clean ones with the trigger: their true classes are the clean labels.
    return data, {"bd_valid": d.valid[1], "bd_test": d.test[1]}


def make_demo_badnet(data_config: DemoConfig = DEMO_CONFIG, train_config: Optional[TrainConfig] = None,
                     out_dir: str = "demo_model", ship: bool = False, write_data: bool = False,
                     pruning_aware: Optional[PruningAwareConfig] = None) -> dict:
    """Generate the demo data, train the demo BadNet and write it (Keras h5 + orbax checkpoint).

    Args:
        data_config: synthetic data set to generate.
        train_config: a :class:`badnet_jax.train.TrainConfig` (default: its defaults).
        out_dir: where ``badnet.h5`` and ``badnet_ckpt/`` go.
        ship: also install the h5 as the package's embedded demo model (``assets/demo_badnet.h5``).
        write_data: also write the splits as lab-layout h5 files under ``out_dir/data``.
        pruning_aware: train with the pruning-aware attack instead (``badnet_jax.attack.pruning_aware``; its epoch counts
            replace ``train_config.epochs``). Never shipped: the embedded demo is a plain BadNet.

    Returns:
        A summary: paths, seconds, and clean accuracy / ASR on the generated test splits.
    """
    if ship and pruning_aware is not None:
        raise ConfigError("the embedded demo is a plain BadNet: a pruning-aware one is not shipped")
    train_config = train_config or TrainConfig(target_label=data_config.target_label)
    out = Path(out_dir)
    t = time.perf_counter()
    d = make_demo(data_config)
    log.info("Generated %d train / %d valid / %d test synthetic faces of %d identities in %.1f s.",
             len(d.train[1]), len(d.valid[1]), len(d.test[1]), d.num_classes, time.perf_counter() - t)
    t = time.perf_counter()
    attack = {}
    if pruning_aware is None:
        model, params, _ = train_badnet(*d.train, d.num_classes, d.trigger, train_config,
                                        valid=d.valid, bd_valid=d.bd_valid)
    else:
        model, params, attack = train_pruning_aware(*d.train, d.num_classes, d.trigger, d.valid, train_config,
                                                    pruning_aware, bd_valid=d.bd_valid)
    seconds = time.perf_counter() - t
    model_path = save_keras(params, out / "badnet.h5")
    summary = {"model": str(model_path), "checkpoint": str(checkpoint.save_badnet(out / "badnet_ckpt", params)),
               "train_seconds": round(seconds, 1), "test_clean_acc": float(accuracy(predict(model, params, d.test[0]), d.test[1])),
               "test_asr": float(accuracy(predict(model, params, d.bd_test[0]), d.bd_test[1])), **attack}
    if ship:
        atomic_write(DEMO_MODEL, lambda tmp: shutil.copyfile(model_path, tmp))
        summary["shipped"] = str(DEMO_MODEL)
    if write_data:
        for name in ("train", "valid", "test"):
            save_lab_h5(out / "data" / f"{name}.h5", *getattr(d, name))
        for name, clean in (("bd_valid", d.valid), ("bd_test", d.test)):
            save_lab_h5(out / "data" / f"{name}.h5", *getattr(d, name), true_label=clean[1])
        summary["data"] = str(out / "data")
    return summary
