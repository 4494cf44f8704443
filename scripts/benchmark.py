"""Benchmark the pruning curve: ``python scripts/benchmark.py [--model B.h5 --clean_valid v.h5 --bd_valid bv.h5]``.

A thin wrapper: the flags and ``main`` live in ``badnet_jax.commands.bench``, installed as ``badnet-bench``.
"""

from badnet_jax.commands import cli

if __name__ == "__main__":
    cli.launch("badnet_jax.commands.bench")
