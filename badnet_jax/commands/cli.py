"""What every command-line tool shares: logging, multi-host start-up, list flags, errors to exit codes.

Scripts stay thin: absl flags at module level, a frozen config, one library call wrapped in :func:`run`.
The library's errors name config fields and arguments (``drops``); :func:`run` prints them with the tool's
flags (``--drop``), from the field -> flag map each tool passes.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional

from badnet_jax.errors import NO_VALUE, BadNetError, ConfigError, show_in_library

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


DISTRIBUTED_TIMEOUT_S = 60


def init_distributed(coordinator_address: Optional[str], num_processes: int, process_id: int,
                     timeout_s: int = DISTRIBUTED_TIMEOUT_S) -> None:
    """Join a multi-host run (TPU slice, GPU cluster, or processes on one machine) before any JAX computation.

    No-op without an address. Every process runs the same command with the same files; the sweep's mesh
    then spans all processes' devices, process 0 writes the results and the others write nothing. Bounded
    waits: joining gives up after ``timeout_s`` (an unreachable coordinator), and a process that dies is
    noticed by the others within about ``timeout_s`` (heartbeats), which then stop with an error.

    Raises:
        ConfigError: bad process counts or ids, or the coordinator could not be joined in time.
    """
    if not coordinator_address:
        return
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id must be in [0, --num_processes), got {process_id} of {num_processes}")
    if timeout_s < 1:
        raise ConfigError(f"--distributed_timeout must be at least 1 s, got {timeout_s}")
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout_s)
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=timeout_s)
    except Exception as err:  # noqa: BLE001 - jaxlib raises plain RuntimeErrors/XlaRuntimeErrors here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"could not join the distributed run at {coordinator_address} as process {process_id} of "
                          f"{num_processes} within {timeout_s} s ({first})") from None
    log.info("jax.distributed: process %d of %d, %d global devices (%d local).", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Connect to the coordinator's port until it answers or ``timeout_s`` passes.

    jaxlib aborts the whole process (SIGABRT, a C++ stack) when it cannot reach the coordinator; checking
    first turns that into an error a user can act on.
    """
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator_address must be host:port, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"could not join the distributed run at {address}: no coordinator answered within "
                                  f"{timeout_s} s ({err.strerror or err}); start process 0 there, or raise "
                                  "--distributed_timeout") from None
            time.sleep(0.5)


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


def as_flags(err: BadNetError, flags: Mapping[str, str]) -> str:
    """``err``'s message as a user of a tool reads it: every config field or argument it names as the tool's flag.

    Args:
        err: a library error; its message marks the names it mentions (``badnet_jax.errors.arg``).
        flags: config field or argument -> the tool's flag name without dashes, e.g. ``{"drops": "drop"}``.
            Names the tool has no flag for are shown as the library shows them.
    """

    def show(name: str, value: Any) -> str:
        flag = flags.get(name)
        if flag is None:
            return show_in_library(name, value)
        if value is NO_VALUE:
            return f"--{flag}"
        if isinstance(value, bool):
            return f"--{flag}" if value else f"--no{flag}"
        return f"--{flag} {value}"

    return err.render(show)


def _interrupt(signum, frame):
    from badnet_jax.io import fileio

    fileio.note_interrupt(signum)  # even a swallowed KeyboardInterrupt stops every later swap into place
    raise KeyboardInterrupt(f"signal {signum}")


def run(main: Callable[[], int], interrupted: str = "interrupted", flags: Mapping[str, str] | None = None) -> int:
    """Run ``main()`` as a command: a project error prints ``error: ...`` and exits 2, an interrupt exits 130.

    The error's message names the tool's flags where the library names config fields (``flags``, see
    :func:`as_flags`).

    SIGINT and SIGTERM raise KeyboardInterrupt, so they clean up alike (writers remove their temporary files),
    and are recorded: if one was swallowed on the way (Python only prints an exception raised in a
    garbage-collection callback), no result is swapped into place after it and the command still exits 130.
    After an interrupt the process leaves with ``os._exit``: a normal interpreter teardown can crash while
    XLA's worker threads are still inside the interrupted computation.
    """
    from badnet_jax.io import fileio

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        code = main()
        fileio.raise_if_interrupted()  # a signal swallowed after the last write still ends the run non-zero
        return code
    except Exception as err:
        # After a signal, whatever error comes up is the interrupt's doing: a KeyboardInterrupt raised while a C
        # extension initialises comes out as "ImportError: initialization failed" (matplotlib's ft2font does).
        if not fileio.was_interrupted():
            if isinstance(err, BadNetError):
                print(f"error: {as_flags(err, flags or {})}", file=sys.stderr)
                return EXIT_ERROR
            raise
    except KeyboardInterrupt:
        pass
    print(interrupted, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)
