"""Screen images with a GoodNet: ``python scripts/goodnet_eval.py IMAGE... --goodnet drop_4/goodnet_ckpt``.

A thin wrapper: the flags and ``main`` live in ``badnet_jax.commands.screen``, installed as ``badnet-screen``.
"""

from badnet_jax.commands import cli

if __name__ == "__main__":
    cli.launch("badnet_jax.commands.screen")
