"""Maintainer tool: regenerate the embedded demo (synthetic faces and the demo BadNet, assets/demo_badnet.h5).

    python scripts/make_demo.py --ship             # retrain the shipped demo (defaults below) and install it
    python scripts/make_demo.py --out_dir my_demo --num_identities 50 --epochs 5 --write_data
    python scripts/make_demo.py --pruning_aware --out_dir pa_demo --write_data   # a BadNet built to survive pruning

Not part of the package: ``--ship`` writes into the source tree's ``badnet_jax/assets`` (the package reads the
demo from there, ``badnet_jax.attack.demo.DEMO_MODEL``), which only a maintainer's checkout should change.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from absl import app, flags

from badnet_jax.attack.demo import DEMO_CONFIG, DEMO_MODEL
from badnet_jax.attack.pruning_aware import PruningAwareConfig, train_pruning_aware
from badnet_jax.attack.synthetic import DemoConfig, make_demo
from badnet_jax.commands import cli
from badnet_jax.defense.inputs import LAB_DATA_DEFAULTS
from badnet_jax.errors import ConfigError
from badnet_jax.io import checkpoint
from badnet_jax.io.atomic import atomic_write
from badnet_jax.io.keras import save_keras
from badnet_jax.io.lab_data import save_lab_h5
from badnet_jax.metrics import accuracy
from badnet_jax.model import predict
from badnet_jax.train import TrainConfig, train_badnet

log = logging.getLogger("badnet_jax")

OUT_DIR = flags.DEFINE_string("out_dir", "demo_model", "Where badnet.h5 and badnet_ckpt/ go.")
SHIP = flags.DEFINE_bool("ship", False, "Install the trained model as the package's embedded demo model.")
NUM_IDS = flags.DEFINE_integer("num_identities", DEMO_CONFIG.num_identities, "Number of identities (classes).")
DATA_SEED = flags.DEFINE_integer("data_seed", DEMO_CONFIG.seed, "Seed of the synthetic data.")
EPOCHS = flags.DEFINE_integer("epochs", TrainConfig.epochs, "Training epochs.")
POISON = flags.DEFINE_float("poison_fraction", TrainConfig.poison_fraction, "Share of poisoned training images.")
TARGET = flags.DEFINE_integer("target_label", DEMO_CONFIG.target_label, "The attacker's label.")
SEED = flags.DEFINE_integer("seed", TrainConfig.seed, "Training seed.")
WRITE_DATA = flags.DEFINE_bool("write_data", False, "Also write the splits as lab-layout h5 files (data/cl/valid.h5, "
                                "data/bd/bd_valid.h5, ...), so badnet-prune --model badnet.h5 runs in --out_dir.")
PRUNING_AWARE = flags.DEFINE_bool("pruning_aware", False, "Train with the pruning-aware attack (Liu et al. 2018): "
                                  "the backdoor in channels clean data uses, dormant decoys in front.")
CLEAN_EPOCHS = flags.DEFINE_integer("clean_epochs", PruningAwareConfig.clean_epochs, "Pruning-aware: clean epochs.")
POISON_EPOCHS = flags.DEFINE_integer("poison_epochs", PruningAwareConfig.poison_epochs,
                                     "Pruning-aware: poisoned epochs of the pruned network.")
ATTACK_DROP = flags.DEFINE_float("attack_drop", PruningAwareConfig.drop,
                                 "Pruning-aware: prune dormant channels costing at most this clean accuracy.")


def make_demo_badnet(data_config: DemoConfig, train_config: TrainConfig, out_dir: str, write_data: bool = False,
                     pruning_aware: Optional[PruningAwareConfig] = None) -> dict:
    """Generate the demo data, train the demo BadNet and write it (Keras h5 + orbax checkpoint).

    Args:
        data_config: synthetic data set to generate.
        train_config: the training's hyper-parameters.
        out_dir: where ``badnet.h5`` and ``badnet_ckpt/`` go.
        write_data: also write the splits as lab-layout h5 files where the lab keeps them (``data/cl/valid.h5``,
            ``data/bd/bd_valid.h5``, ...; the training split as ``data/cl/train.h5``) under ``out_dir``.
        pruning_aware: train with the pruning-aware attack instead (``badnet_jax.attack.pruning_aware``; its
            epoch counts replace ``train_config.epochs``).

    Returns:
        A summary: paths, seconds, and clean accuracy / ASR on the generated test splits.
    """
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
    summary = {"model": str(model_path), "checkpoint": str(checkpoint.save_badnet(out / "badnet_ckpt", model, params)),
               "train_seconds": round(seconds, 1),
               "test_clean_acc": float(accuracy(predict(model, params, d.test[0]), d.test[1])),
               "test_asr": float(accuracy(predict(model, params, d.bd_test[0]), d.bd_test[1])), **attack}
    if write_data:  # where badnet-prune looks when run in out_dir with only --model
        paths = {role: out / rel for role, rel in LAB_DATA_DEFAULTS.items()}
        save_lab_h5(paths["clean_valid"].with_name("train.h5"), *d.train)
        save_lab_h5(paths["clean_valid"], *d.valid)
        save_lab_h5(paths["clean_test"], *d.test)
        save_lab_h5(paths["bd_valid"], *d.bd_valid, true_label=d.valid[1])
        save_lab_h5(paths["bd_test"], *d.bd_test, true_label=d.test[1])
        summary["data"] = str(out / "data")
        summary["defend it"] = f"cd {out} && badnet-prune --model {model_path.name}"
    return summary


def ship(model_path: str | Path) -> Path:
    """Install ``model_path`` as the embedded demo model (atomically: the package never sees half a file)."""
    return atomic_write(DEMO_MODEL, lambda tmp: shutil.copyfile(model_path, tmp))


def main(argv: list[str]) -> int:
    cli.setup_logging()
    data_cfg = DemoConfig(num_identities=NUM_IDS.value, seed=DATA_SEED.value, target_label=TARGET.value)
    train_cfg = TrainConfig(epochs=EPOCHS.value, poison_fraction=POISON.value, target_label=TARGET.value,
                            seed=SEED.value)

    def make() -> int:
        cli.refuse_extra_args(argv)
        attack = None
        if PRUNING_AWARE.value:
            if SHIP.value:
                raise ConfigError("--ship with --pruning_aware: the embedded demo is a plain BadNet, "
                                  "so a pruning-aware one is not shipped (leave out one of the two)")
            attack = PruningAwareConfig(clean_epochs=CLEAN_EPOCHS.value, poison_epochs=POISON_EPOCHS.value,
                                        drop=ATTACK_DROP.value)
        summary = make_demo_badnet(data_cfg, train_cfg, out_dir=OUT_DIR.value, write_data=WRITE_DATA.value,
                                   pruning_aware=attack)
        if SHIP.value:
            summary["shipped"] = str(ship(summary["model"]))
        for key, value in summary.items():
            print(f"{key}: {value}")
        return 0

    return cli.run(make)


if __name__ == "__main__":
    app.run(main)
