"""Screen images with a GoodNet: ``python scripts/goodnet_eval.py IMAGE... --goodnet drop_4/goodnet_ckpt``.

A thin wrapper: the flags and ``main`` live in ``badnet_jax.commands.screen``, installed as ``badnet-screen``.
"""

from absl import app

from badnet_jax.commands.screen import main

if __name__ == "__main__":
    app.run(main)
