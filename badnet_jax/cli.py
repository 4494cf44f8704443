"""What every command-line tool shares: logging, multi-host start-up, list flags, errors to exit codes.

Scripts stay thin: absl flags at module level, a frozen config, one library call wrapped in :func:`run`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from typing import Callable, Optional

from badnet_jax.errors import BadNetError, ConfigError

log = logging.getLogger("badnet_jax")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(level: int = logging.INFO) -> None:
    """Progress lines of badnet-jax on stderr with timestamps, without the INFO chatter of orbax/absl/jax."""
    if not any(getattr(h, "_badnet_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._badnet_cli = True
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO through absl
    logging.getLogger("jax").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'" on every CPU run


def init_distributed(coordinator_address: Optional[str], num_processes: int, process_id: int) -> None:
    """Join a multi-host run (TPU slice, GPU cluster) before any JAX computation; no-op without an address.

    Every process runs the same command with the same files; the sweep's mesh then spans all hosts' devices.
    """
    if not coordinator_address:
        return
    import jax

    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d global devices (%d local).", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())


def parse_floats(flag: str, text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers, e.g. ``--drop 0.02,0.04``.

    Raises:
        ConfigError: an entry that is not a finite number.
    """
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise ConfigError(f"--{flag} must be comma-separated numbers, got {text!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"--{flag}: {part!r} is not a finite number")
        values.append(v)
    return tuple(values)


def parse_ints(flag: str, text: str) -> tuple[int, ...]:
    """Comma-separated integers, e.g. ``--scaling 1,2,4``."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--{flag} must be comma-separated integers, got {text!r}") from None


def refuse_extra_args(argv: list[str]) -> None:
    """absl leaves unknown positional arguments in ``argv``; a tool that takes none refuses them.

    Raises:
        ConfigError: naming the stray arguments (a mistyped flag value often lands there).
    """
    extra = argv[1:]
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)!r} (flags take --name=value or --name value)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(main: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run ``main()`` as a command: a project error prints ``error: ...`` and exits 2, an interrupt exits 130.

    SIGTERM is turned into KeyboardInterrupt, so it cleans up like Ctrl-C (writers remove their temporary
    files). After an interrupt the process leaves with ``os._exit``: a normal interpreter teardown can crash
    while XLA's worker threads are still inside the interrupted computation.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return main()
    except BadNetError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
