"""Make a poisoned set in the lab's h5 format: a trigger pasted on clean images, every label the target.

    badnet-poison --source data/cl/test.h5 --trigger sun_glass_trigger.png --target 0 --out bd_test.h5
    badnet-poison --source my_faces/ --trigger lipstick.png --at 10,30 --target 4 --out bd_mine.h5
    badnet-poison --source cifar_pngs/ --trigger patch.png --at 26,26 --target 0 --model resnet.h5 --out bd.h5

The images are of any size: ``--model``'s input size when given, else the source's (an h5's ``data``, or a
folder's first image; every image must be that size). The file keeps each image's true class
(``true_label``), so ``prune.py`` also reports ASR without the images whose true class is the target. With
the lab's sunglasses trigger at (0, 15) on the lab's 55x47 faces it reproduces the lab's bd_*.h5 images bit
for bit. It warns about a trigger without alpha (a solid rectangle), a trigger clipped by the image, file
names without a label (no ``true_label``), and, without ``--model``, a target above every true label; it refuses images of another size, a trigger larger than the
images or one that changes no pixel, a target outside ``--model``'s classes, and an ``--out`` that is the
source.
"""

from __future__ import annotations

from absl import flags

from badnet_jax import ConfigError

from badnet_jax.commands import cli
from badnet_jax.io.poisoning import TRIGGER_AT, make_poisoned_h5

SOURCE = flags.DEFINE_string("source", None, "Clean images: a lab-layout h5 or a folder of PNG/JPEG files of one "
                             "size (--model's input size when given).", required=True)
TRIGGER = flags.DEFINE_string("trigger", None, "8-bit trigger image, at most the images' size: RGBA is pasted "
                              "through its alpha, one without alpha as a solid rectangle (with a warning).",
                              required=True)
TARGET = flags.DEFINE_integer("target", None, "The attacker's label.", required=True)
AT = flags.DEFINE_string("at", None, "x,y of the trigger's top-left corner (default: %d,%d, the lab's sunglasses "
                         "place on its 55x47 faces; needed for images of another size)." % TRIGGER_AT)
OUT = flags.DEFINE_string("out", None, "Poisoned h5 to write.", required=True)
NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "If given, labels must lie in [0, num_classes).")
MODEL = flags.DEFINE_string("model", None, "Keras file of the BadNet the set is for (the lab's DeepID or any CNN "
                            "badnet-prune reads): the images must be its input size, and the target and the true "
                            "labels among its classes.")

# make_poisoned_h5's arguments -> these flags, so errors name what the user typed.
FLAG_OF = {"source": SOURCE.name, "trigger_path": TRIGGER.name, "target": TARGET.name, "at": AT.name,
           "out": OUT.name, "num_classes": NUM_CLASSES.name, "model_path": MODEL.name}


def main(argv: list[str]) -> int:
    cli.setup_logging()  # the library's warnings (a clipped trigger, no alpha, unlabelled images) reach the user

    def make() -> int:
        cli.refuse_extra_args(argv)
        at = None if AT.value is None else cli.parse_ints("at", AT.value)
        if at is not None and len(at) != 2:
            raise ConfigError(f"--at must be two integers x,y, got {AT.value!r}")
        path = make_poisoned_h5(SOURCE.value, TRIGGER.value, OUT.value, TARGET.value, at, NUM_CLASSES.value,
                                MODEL.value)
        print(f"wrote {path}")
        return 0

    return cli.run(make, flags=FLAG_OF)
