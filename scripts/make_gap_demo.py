"""Maintainer tool: regenerate the GAP demo BadNet (assets/gap_demo_badnet.h5), a small non-DeepID CNN.

    python scripts/make_gap_demo.py                                  # retrain the shipped model (defaults below)
    python scripts/make_gap_demo.py --out my_gap.h5 --data_dir my_gap_data --epochs 4

32x32 shape pictures of ten families (``badnet_jax.attack.gap_demo``), 10% of the training set carrying a 5x5
corner trigger labelled with the target; conv-BN-relu x3 -> global average pooling -> dense, trained with batch
statistics and recalibrated. ``--data_dir`` also writes the four sets (clean_valid.h5, bd_valid.h5,
clean_test.h5, bd_test.h5) for ``scripts/prune.py --model ... --clean_valid ...``.

Not part of the package: the default ``--out`` is the source tree's ``badnet_jax/assets`` (the package reads
the model from there, ``badnet_jax.attack.gap_demo.GAP_DEMO_MODEL``), which only a maintainer's checkout
should change.
"""

from __future__ import annotations

from absl import flags

from badnet_jax.attack.gap_demo import GAP_DEMO_CONFIG, GAP_DEMO_MODEL, GapDemoConfig, default_train_config, \
    make_gap_demo_badnet
from badnet_jax.commands import cli

_TRAIN = default_train_config()
OUT = flags.DEFINE_string("out", str(GAP_DEMO_MODEL), "The model file to write (default: the shipped asset).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Also write the valid/test sets as lab-layout h5 files there.")
NUM_CLASSES = flags.DEFINE_integer("num_classes", GAP_DEMO_CONFIG.num_classes, "Classes (shape families, 2..10).")
TRAIN_PER_CLASS = flags.DEFINE_integer("train_per_class", GAP_DEMO_CONFIG.train_per_class, "Training images per class.")
DATA_SEED = flags.DEFINE_integer("data_seed", GAP_DEMO_CONFIG.seed, "Seed of the generated data.")
TARGET = flags.DEFINE_integer("target_label", GAP_DEMO_CONFIG.target_label, "The attacker's label.")
EPOCHS = flags.DEFINE_integer("epochs", _TRAIN.epochs, "Training epochs.")
LR = flags.DEFINE_float("learning_rate", _TRAIN.learning_rate, "Adam's peak learning rate (cosine decay).")
POISON = flags.DEFINE_float("poison_fraction", _TRAIN.poison_fraction, "Share of poisoned training images.")
SEED = flags.DEFINE_integer("seed", _TRAIN.seed, "Training seed (initialisation, poisoning, order).")
FLAGS_OF = {"num_classes": "--num_classes", "target_label": "--target_label", "train_per_class": "--train_per_class"}


def configs() -> tuple[GapDemoConfig, object]:
    """The data/architecture config and the training config the flags describe (the defaults: the shipped ones)."""
    import dataclasses

    cfg = dataclasses.replace(GAP_DEMO_CONFIG, num_classes=NUM_CLASSES.value, train_per_class=TRAIN_PER_CLASS.value,
                              seed=DATA_SEED.value, target_label=TARGET.value)
    train = dataclasses.replace(_TRAIN, epochs=EPOCHS.value, learning_rate=LR.value,
                                poison_fraction=POISON.value, target_label=TARGET.value, seed=SEED.value)
    return cfg, train


def main(argv: list[str]) -> int:
    cli.setup_logging()

    def make() -> int:
        cli.refuse_extra_args(argv)
        cfg, train = configs()
        summary = make_gap_demo_badnet(OUT.value, cfg, train, data_dir=DATA_DIR.value)
        for key, value in summary.items():
            print(f"{key}: {value}")
        return 0

    return cli.run(make, flags=FLAGS_OF)


if __name__ == "__main__":
    cli.start(main)
