"""Run the pruning defense: ``python scripts/prune.py --drop 0.04``.

A thin wrapper: the flags and ``main`` live in ``badnet_jax.commands.prune``, installed as ``badnet-prune``.
"""

from badnet_jax.commands import cli

if __name__ == "__main__":
    cli.launch("badnet_jax.commands.prune")
