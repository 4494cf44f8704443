"""The command-line tools, installed as console entry points (``badnet-prune``, ``badnet-screen``,
``badnet-poison``, ``badnet-bench``) and wrapped by ``scripts/*.py``.

Each module: absl flags at module level and ``main(argv)`` that builds a frozen config and calls one library
function through ``badnet_jax.commands.cli.run``; ``cli.launch`` starts one (the entry points are ``cli.prune``,
``cli.screen``, ``cli.poison``, ``cli.bench``). The library never imports these.
"""
