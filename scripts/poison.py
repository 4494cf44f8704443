"""Make a lab-format poisoned h5: ``python scripts/poison.py --source valid.h5 --trigger t.png --target 0 --out bd.h5``.

A thin wrapper: the flags and ``main`` live in ``badnet_jax.commands.poison``, installed as ``badnet-poison``.
"""

from badnet_jax.commands import cli

if __name__ == "__main__":
    cli.launch("badnet_jax.commands.poison")
