"""Screen images with a GoodNet: prints, per image, a class in [0, N]; N means "poisoned input".

    badnet-screen face1.png faces/ bd_test.h5 --goodnet results/drop_4/goodnet_ckpt
    badnet-screen face1.png bd_test.h5 --model bd_weights.h5 --pruned results/drop_4/b_prime.h5
    (--pruned results/drop_4/b_prime_ckpt works too)

Any model: the lab's DeepID or any CNN that --model's reader takes; the GoodNet and B' checkpoints carry their
model. Inputs are images of the model's input size, lab-layout h5 files and folders of images (sorted by name,
one line per image). --pruned must be --model with channels of one layer pruned (a B' of another BadNet is
refused): a B' checkpoint, the lab's DeepID as a Keras h5 with zeroed conv_3 channels, or any other model's
drop_X/b_prime.h5 as prune.py writes it.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from badnet_jax.commands import cli
from badnet_jax.defense.scale import CHOICES
from badnet_jax.defense.screen import screen

MODEL = flags.DEFINE_string("model", None, "Keras h5 of the BadNet B (with --pruned): the lab's DeepID or any CNN (a "
                            ".keras archive too).")
PRUNED = flags.DEFINE_string("pruned", None, "B': a B' checkpoint (drop_X/b_prime_ckpt) or a Keras h5 (drop_X/"
                             "b_prime.h5; the lab's DeepID: zeroed conv_3 channels).")
GOODNET = flags.DEFINE_string("goodnet", None,
                               "A GoodNet checkpoint (drop_X/goodnet_ckpt), instead of --model/--pruned.")
SCALE = flags.DEFINE_enum("input_scale", "auto", list(CHOICES),
                          "raw pixels (the lab's B) or pixels / 255 (the 2020 BadNets); auto = what the badnet-jax "
                          "files record, else measured on the labelled inputs (h5 labels, label<class> in names).")

# screen()'s arguments -> these flags, so errors name what the user typed.
FLAG_OF = {"model_path": MODEL.name, "pruned_path": PRUNED.name, "goodnet_path": GOODNET.name,
           "input_scale": SCALE.name}


def main(argv: list[str]) -> int:
    cli.setup_logging()  # quiet: badnet-jax's own lines only, no orbax/absl INFO chatter
    if len(argv) < 2:
        print(f"error: give the images to screen: {os.path.basename(argv[0])} IMAGE|FOLDER|H5... "
              "(--goodnet G_ckpt | --model B.h5 --pruned B_prime)", file=sys.stderr)
        return cli.EXIT_ERROR

    def screen_all() -> int:
        for name, pred in screen(MODEL.value, PRUNED.value, argv[1:], SCALE.value, GOODNET.value):
            print(f"{name}\t{pred}")
        return 0

    return cli.run(screen_all, flags=FLAG_OF)
