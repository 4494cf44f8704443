"""What every command-line tool shares: flag parsing and help, logging, list flags, errors to exit codes (the
machine's cores and a multi-host start-up: ``badnet_jax.commands.processes``).

Scripts stay thin: absl flags at module level, a frozen config, one library call wrapped in :func:`run`, the
whole started by :func:`launch` (the console entry points: :func:`prune`, :func:`screen`, :func:`poison`,
:func:`bench`). The library's errors name config fields and arguments (``drops``); :func:`run`
prints them with the tool's flags (``--drop``), from the field -> flag map each tool passes.

Exit codes: 0 done, 2 refused (a flag, an input, the environment: one ``error:`` line on stderr), 130
interrupted, 141 (as a shell reports a tool ended by SIGPIPE) when the reader of stdout went away.
"""

from __future__ import annotations

import _thread
import atexit
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from badnet_jax.errors import NO_VALUE, BadNetError, ConfigError, OutputError, arg, show_in_library

log = logging.getLogger("badnet_jax")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool that SIGPIPE ended: `yes | head -1`

# The signals that end a run as an interrupt: held from a tool's start until run() handles them.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)

HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
HELPFULL_ARGS = ("--helpfull", "-helpfull")


def launch(command: str, argv: Optional[Sequence[str]] = None) -> None:
    """Import tool module ``command`` (``"badnet_jax.commands.prune"``) and :func:`start` its ``main``; never returns.

    SIGINT and SIGTERM are held from here until :func:`run` handles them: its imports take seconds (JAX, Flax),
    and an unheld signal would raise KeyboardInterrupt wherever Python is, which in a garbage-collection
    callback (JAX registers one) Python only prints: the run would go on to replace its outputs and exit 0.
    Held, it is delivered once the handler is in place and ends the run as an interrupt (130).
    """
    _mask(signal.SIG_BLOCK)
    start(importlib.import_module(command).main, argv)


def _mask(how: int) -> None:
    if not hasattr(signal, "pthread_sigmask"):  # POSIX; elsewhere a signal is not held
        return
    if how == signal.SIG_BLOCK:
        signal.pthread_sigmask(how, INTERRUPTS)
        return
    # One at a time: a held signal raises as its mask lifts (Python runs the handler there), and the others stay
    # held while the run ends, where both lifted at once raised the second inside the first's clean-up.
    for signum in INTERRUPTS:
        signal.pthread_sigmask(how, {signum})


def process_seconds() -> Optional[float]:
    """Seconds since this process started, as the kernel recorded its start (Linux), else None.

    A run's own phases start once Python and the tool's imports (JAX alone ~2 s) are done; this counts those
    too, so a tool can say where the whole of its wall time went.
    """
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat = fh.read()
        # Field 22 is the start time in clock ticks since boot; fields count from 1 and the second, the
        # command's name in parentheses, may hold spaces, so count from the last ')': field 3 is index 0 there.
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux, or no /proc
        return None


def prune() -> None:
    """Console entry point ``badnet-prune``."""
    launch("badnet_jax.commands.prune")


def screen() -> None:
    """Console entry point ``badnet-screen``."""
    launch("badnet_jax.commands.screen")


def poison() -> None:
    """Console entry point ``badnet-poison``."""
    launch("badnet_jax.commands.poison")


def bench() -> None:
    """Console entry point ``badnet-bench``."""
    launch("badnet_jax.commands.bench")


def start(main: Callable[[list[str]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Parse the flags and run ``main(argv)`` as absl's ``app.run`` does, with a tool's manners; never returns.

    ``--help`` (``-h``) prints the tool's description (``main``'s module docstring) and its own flags with their
    help, and exits 0 (``--helpfull`` adds absl's and JAX's flags). A flag absl refuses (unknown, mistyped,
    a required one missing) is one ``error:`` line and exit 2, as every other refused input.

    Args:
        main: the tool's ``main(argv)``; the flags it reads are those defined in its module.
        argv: the command line, program name first (default ``sys.argv``).
    """
    from absl import app

    module = sys.modules[main.__module__]
    app.run(lambda args: _leave(main(args)), argv=None if argv is None else list(argv),
            flags_parser=lambda args: _parse_flags(module, args))


def _leave(code: int) -> int:
    """A command that finished well leaves without the interpreter's teardown; otherwise ``code`` is returned.

    Its outputs are written and closed by then; what is left is freeing a run's arrays and XLA's client and
    thread pools, ~0.5 s of a lab-scale run that nobody waits for usefully. So: standard output and error
    flushed, logging shut down, the ``atexit`` handlers run (as at a normal exit), then ``os._exit(0)``. Not
    where the run failed, nor in a multi-process run (its processes leave through ``jax.distributed``'s own
    shutdown), nor where a flush fails (the normal exit then reports it).
    """
    jax = sys.modules.get("jax")
    if code != 0 or jax is None or jax.process_count() > 1:
        return code
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return code
    logging.shutdown()
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter runs at exit, before its teardown
    os._exit(0)


def _parse_flags(module, argv: list[str]) -> list[str]:
    from absl import flags

    asked = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELPFULL_ARGS for a in asked):
        _print_help(module, flags.FLAGS.get_help())
    if any(a in HELP_ARGS for a in asked):
        _print_help(module, _own_flags_help(module))
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = " ".join(str(err).split())  # absl's messages may span lines; a user reads one
        print(f"error: {message} (see {os.path.basename(argv[0])} --help)", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _own_flags_help(module) -> str:
    from absl import flags

    text = flags.FLAGS.module_help(module)
    # module_help heads the list with the module's name, which says nothing to a user of the tool.
    lines = [line for line in text.splitlines() if line.strip() and line.strip() != f"{module.__name__}:"]
    return "\n".join(lines) + "\n\nTry --helpfull for absl's and JAX's flags as well.\n"


def _print_help(module, flags_text: str) -> None:
    text = (module.__doc__ or "").strip() + "\n\nflags:\n" + flags_text
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`: the reader had enough
        _silence_stdout()
    except (OSError, AttributeError):  # stdout closed: say it where the user can see it
        print(f"error: {_STDOUT_CLOSED}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(0)


_STDOUT_CLOSED = ("standard output is closed, so nothing this tool prints would reach anyone; "
                  "redirect it (to a file, or to /dev/null to discard it) instead of closing it")


def _silence_stdout() -> None:
    """After the reader of stdout left: point fd 1 at /dev/null, so the interpreter's last flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass


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


def memory_budget_bytes(gib: Optional[float], flag: str = "memory_budget") -> Optional[float]:
    """``--memory_budget`` in GiB (None: the library's default) as the library's bytes.

    Raises:
        ConfigError: a number that is not finite and positive.
    """
    if gib is None:
        return None
    value = parse_floats(flag, str(gib))[0]  # finite
    if value <= 0:
        raise ConfigError(f"{arg(flag, gib)} must be a positive number of GiB", field=flag)
    return value * 2**30


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


def _stdout_open() -> bool:
    """Whether fd 1 is there to write to (Python sets ``sys.stdout`` to None when it started closed)."""
    if sys.stdout is None:
        return False
    try:
        os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    except Exception:  # noqa: BLE001 - a replaced stdout without a file descriptor (a test's capture) is fine
        return True
    return True


def _user_message(err: Exception, flags: Mapping[str, str]) -> Optional[str]:
    """The one line a user reads for ``err``, or None for an error that is a bug (its traceback is wanted)."""
    if isinstance(err, BadNetError):
        return as_flags(err, flags)
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms and isinstance(err, RuntimeError) and ("Unable to initialize backend" in str(err)
                                                        or "Unknown backend" in str(err)):
        # JAX names the plugin it tried (rocm, cuda), not the variable the user set.
        return (f"JAX_PLATFORMS={platforms} asks JAX for a platform it cannot start on this machine (no such "
                "device, or no JAX plugin for it installed); unset JAX_PLATFORMS to use what is here, or set it "
                "to one that is (e.g. JAX_PLATFORMS=cpu)")
    return None


def _interrupt(signum, frame):
    from badnet_jax.io import atomic

    # Noted, so that even a swallowed KeyboardInterrupt stops every later swap into place; raised now unless a
    # writer is outside its own writing (atomic.interrupts_deferred: it raises once the rest is whole).
    if atomic.note_interrupt(signum):
        raise KeyboardInterrupt(f"signal {signum}")


def _redeliver_swallowed_interrupts(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """``hook``, but for the KeyboardInterrupt of a noted signal that Python could not raise (it came in a
    garbage-collection callback, JAX registers one): that one is raised again in the main thread a moment later,
    outside the callback, so the run stops now rather than at its next swap into place, and without a traceback."""
    from badnet_jax.io import atomic

    pending = threading.Event()  # one re-delivery at a time: several swallowed together end the run once

    def fire() -> None:
        pending.clear()  # a re-delivered signal swallowed again is re-delivered again
        if hasattr(signal, "pthread_kill"):  # a real signal: it wakes a blocking call too (interrupt_main does not)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:
            _thread.interrupt_main(signal.SIGINT)

    def redeliver(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and atomic.was_interrupted()):
            hook(unraisable)
        elif not pending.is_set():
            pending.set()
            again = threading.Timer(0.05, fire)
            again.daemon = True
            again.start()

    redeliver.redelivers_interrupts = True
    return redeliver


def run(main: Callable[[], int], interrupted: str = "interrupted", flags: Mapping[str, str] | None = None) -> int:
    """Run ``main()`` as a command: a project error prints ``error: ...`` and exits 2, an interrupt exits 130.

    The error's message names the tool's flags where the library names config fields (``flags``, see
    :func:`as_flags`).

    SIGINT and SIGTERM raise KeyboardInterrupt, so they clean up alike (writers remove their temporary files),
    and are recorded: if one was swallowed on the way (Python cannot raise an exception in a garbage-collection
    callback), it is raised again outside it, and in any case no result is swapped into place after it and the
    command still exits 130. One held since :func:`launch` is delivered as ``main`` starts.
    One that comes while a writer creates its temporary, swaps results into place or cleans up waits for that
    to finish (:func:`badnet_jax.io.atomic.interrupts_deferred`; only the writing itself is cut short): the
    earlier or the new results whole, nothing left beside them.
    After an interrupt the process leaves with ``os._exit``: a normal interpreter teardown can crash while
    XLA's worker threads are still inside the interrupted computation.
    """
    from badnet_jax.io import atomic

    for signum in INTERRUPTS:
        signal.signal(signum, _interrupt)
    if not getattr(sys.unraisablehook, "redelivers_interrupts", False):
        sys.unraisablehook = _redeliver_swallowed_interrupts(sys.unraisablehook)
    if not _stdout_open():  # Python then prints into nothing: every verdict would be lost, and the exit 0
        print(f"error: {_STDOUT_CLOSED}", file=sys.stderr)
        return EXIT_ERROR
    try:
        _mask(signal.SIG_UNBLOCK)  # a signal held since launch() is delivered here
        code = main()
        try:  # here, not at exit: a reader that went away or a full disk is this run's to report
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as err:
            raise OutputError(f"could not write the results to standard output: {err.strerror or err}") from None
        atomic.raise_if_interrupted()  # a signal swallowed after the last write still ends the run non-zero
        return code
    except BrokenPipeError:
        # `badnet-screen ... | head -1`: the reader has what it wanted; end quietly, as Unix tools do.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as err:
        # After a signal, whatever error comes up is the interrupt's doing: a KeyboardInterrupt raised while a C
        # extension initialises comes out as "ImportError: initialization failed" (matplotlib's ft2font does).
        if not atomic.was_interrupted():
            message = _user_message(err, flags or {})
            if message is not None:
                print(f"error: {message}", file=sys.stderr)
                return EXIT_ERROR
            raise
    except KeyboardInterrupt:
        pass
    for signum in INTERRUPTS:  # the run is ending: a later signal (a second Ctrl-C, a re-delivery) must not cut it
        signal.signal(signum, signal.SIG_IGN)
    print(interrupted, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)
