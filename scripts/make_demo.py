"""Regenerate the embedded demo: synthetic faces and the demo BadNet (badnet_jax/assets/demo_badnet.h5).

    python scripts/make_demo.py --ship             # retrain the shipped demo (defaults below) and install it
    python scripts/make_demo.py --out_dir my_demo --num_identities 50 --epochs 5 --write_data
    python scripts/make_demo.py --pruning_aware --out_dir pa_demo --write_data   # a BadNet built to survive pruning
"""

from __future__ import annotations

from absl import app, flags

from badnet_jax.commands import cli
from badnet_jax.attack.pruning_aware import PruningAwareConfig
from badnet_jax.attack.demo import DEMO_CONFIG, make_demo_badnet
from badnet_jax.attack.synthetic import DemoConfig
from badnet_jax.train import TrainConfig

OUT_DIR = flags.DEFINE_string("out_dir", "demo_model", "Where badnet.h5 and badnet_ckpt/ go.")
SHIP = flags.DEFINE_bool("ship", False, "Install the trained model as the package's embedded demo model.")
NUM_IDS = flags.DEFINE_integer("num_identities", DEMO_CONFIG.num_identities, "Number of identities (classes).")
DATA_SEED = flags.DEFINE_integer("data_seed", DEMO_CONFIG.seed, "Seed of the synthetic data.")
EPOCHS = flags.DEFINE_integer("epochs", TrainConfig.epochs, "Training epochs.")
POISON = flags.DEFINE_float("poison_fraction", TrainConfig.poison_fraction, "Share of poisoned training images.")
TARGET = flags.DEFINE_integer("target_label", DEMO_CONFIG.target_label, "The attacker's label.")
SEED = flags.DEFINE_integer("seed", TrainConfig.seed, "Training seed.")
WRITE_DATA = flags.DEFINE_bool("write_data", False, "Also write the splits as lab-layout h5 files.")
PRUNING_AWARE = flags.DEFINE_bool("pruning_aware", False, "Train with the pruning-aware attack (Liu et al. 2018): "
                                  "the backdoor in channels clean data uses, dormant decoys in front.")
CLEAN_EPOCHS = flags.DEFINE_integer("clean_epochs", PruningAwareConfig.clean_epochs, "Pruning-aware: clean epochs.")
POISON_EPOCHS = flags.DEFINE_integer("poison_epochs", PruningAwareConfig.poison_epochs,
                                     "Pruning-aware: poisoned epochs of the pruned network.")
ATTACK_DROP = flags.DEFINE_float("attack_drop", PruningAwareConfig.drop,
                                 "Pruning-aware: prune dormant channels costing at most this clean accuracy.")


def main(argv: list[str]) -> int:
    cli.setup_logging()
    data_cfg = DemoConfig(num_identities=NUM_IDS.value, seed=DATA_SEED.value, target_label=TARGET.value)
    train_cfg = TrainConfig(epochs=EPOCHS.value, poison_fraction=POISON.value, target_label=TARGET.value,
                            seed=SEED.value)

    def make() -> int:
        cli.refuse_extra_args(argv)
        attack = None
        if PRUNING_AWARE.value:
            attack = PruningAwareConfig(clean_epochs=CLEAN_EPOCHS.value, poison_epochs=POISON_EPOCHS.value,
                                drop=ATTACK_DROP.value)
        summary = make_demo_badnet(data_cfg, train_cfg, out_dir=OUT_DIR.value, ship=SHIP.value,
                                   write_data=WRITE_DATA.value, pruning_aware=attack)
        for key, value in summary.items():
            print(f"{key}: {value}")
        return 0

    return cli.run(make)


if __name__ == "__main__":
    app.run(main)
