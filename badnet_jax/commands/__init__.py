"""The command-line tools, installed as console entry points (``badnet-prune``, ``badnet-screen``,
``badnet-poison``, ``badnet-bench``) and wrapped by ``scripts/*.py``.

Each module: absl flags at module level, ``main(argv)`` that builds a frozen config and calls one library
function through ``badnet_jax.commands.cli.run``, and ``run()`` for the entry point. The library never imports these.
"""
