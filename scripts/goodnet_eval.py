"""Screen images with a GoodNet: prints, per image, a class in [0, N]; N means "poisoned input".

    python scripts/goodnet_eval.py face1.png face2.png bd_test.h5 --model bd_weights.h5 \
        --pruned results/drop_4/b_prime.h5          # or results/drop_4/b_prime_ckpt
"""

from __future__ import annotations

import sys

from absl import app, flags

from badnet_jax import cli
from badnet_jax.screen import screen

MODEL = flags.DEFINE_string("model", None, "Keras h5 of the BadNet B.", required=True)
PRUNED = flags.DEFINE_string("pruned", None, "B': a Keras h5 with zeroed conv_3 channels or a B' checkpoint.",
                             required=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: goodnet_eval.py IMAGE... --model B.h5 --pruned B_prime", file=sys.stderr)
        return cli.EXIT_ERROR

    def screen_all() -> int:
        for name, pred in screen(MODEL.value, PRUNED.value, argv[1:]):
            print(f"{name}\t{pred}")
        return 0

    return cli.run(screen_all)


if __name__ == "__main__":
    app.run(main)
