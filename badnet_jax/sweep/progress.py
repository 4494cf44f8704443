"""Progress of the one-call sweep: a host callback per chunk from inside the jitted call, one line on stderr.

The sweep is one compiled call that can run for minutes at scale. With ``SweepPlan.progress`` the traced chunk
loops (``badnet_jax.sweep.chunks.map_chunks``) call :func:`chunk_hook`'s callback as each chunk starts: the
callback takes the loop index only, so no result depends on it and nothing waits on it but the callback
itself. The host side (:func:`showing`) turns the calls into one line, rewritten in place on a terminal, or
a line per tenth of the work otherwise. Only process 0 of a multi-process run writes; with several devices
each chunk is reported by every device and shown once.

The compiled program refers to the callback functions of this module, not to a line: the line that is
active when the call runs is the one written to, so a sweep compiled ahead (``compile_sweep``) reports too.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence, TextIO

import jax

LIVE_INTERVAL_S = 0.25  # a terminal line is rewritten at most this often
LOG_STEPS = 10  # without a terminal, a line per 1/LOG_STEPS of the work


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (the default for showing progress)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # a replaced or closed stderr
        return False


class _Line:
    """What the callbacks write to: the sweep's stages (label, weight) and how far each got.

    XLA schedules the stages in an order of its own (e.g. every block's trunk before the heads), but runs them
    one at a time: a stage seen starting for the first time means the one before it is done. Chunk ``i``
    starting means ``i`` chunks of its stage are done. A chunk reported again (by another device) counts once.
    """

    def __init__(self, stages: Sequence[tuple[str, float] | tuple[str, float, str]], stream: TextIO,
                 live: bool) -> None:
        self.labels = [stage[0] for stage in stages]
        self.weights = [stage[1] for stage in stages]
        self.units = [stage[2] if len(stage) > 2 else "chunk" for stage in stages]
        self.total = sum(self.weights) or 1.0
        self.done = [0.0] * len(stages)  # each stage's fraction done
        self.started: set[int] = set()
        self.seen: set[tuple[int, int]] = set()
        self.current: Optional[int] = None
        self.stream, self.live = stream, live
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.shown_at = -float("inf")
        self.shown_step = -1
        self.dirty = False
        self.closed = False

    def chunk(self, stage: int, blocks: int, i: int) -> None:
        with self.lock:
            if self.closed or (stage, i) in self.seen:
                return
            self.seen.add((stage, i))
            if stage not in self.started:
                if self.current is not None:
                    self.done[self.current] = 1.0
                self.started.add(stage)
                self.current = stage
            self.done[stage] = max(self.done[stage], i / max(blocks, 1))
            fraction = sum(w * d for w, d in zip(self.weights, self.done)) / self.total
            now = time.monotonic()
            text = (f"sweep {fraction:4.0%}  {self.labels[stage]}: {self.units[stage]} {i + 1}/{blocks}  "
                    f"{now - self.start:.0f} s")
            if self.live:
                if now - self.shown_at < LIVE_INTERVAL_S:
                    return
                self.stream.write("\r" + text + "\x1b[K")
                self.dirty = True
            else:
                step = int(fraction * LOG_STEPS)
                if step == self.shown_step:
                    return
                self.shown_step = step
                self.stream.write(text + "\n")
            self.shown_at = now
            self.stream.flush()

    def finish(self) -> None:
        """The sweep returned: without a terminal, a last line at 100% (chunks report as they start, so the
        last one shown is short of it); nothing more is shown after."""
        with self.lock:
            self.closed = True
            if not self.live and self.shown_step >= 0:
                self.stream.write(f"sweep 100%  done  {time.monotonic() - self.start:.0f} s\n")
                self.stream.flush()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.live and self.dirty:
                self.stream.write("\r\x1b[K")  # the next log line starts on a clean line
                self.stream.flush()


_ACTIVE: Optional[_Line] = None


def _chunk_started(stage: int, blocks: int, i) -> None:
    line = _ACTIVE
    if line is None:
        return
    try:
        line.chunk(stage, blocks, int(i))
    except Exception:  # noqa: BLE001 - an error raised here would abort the sweep; progress is never worth it
        pass


def chunk_hook(stage: int) -> Callable[[jax.Array, int], None]:
    """The traced hook ``map_chunks`` calls as chunk ``i`` of ``blocks`` of ``stage`` starts (under jit).

    The callback is unordered and returns nothing: it adds no data dependency and no token to the program.
    """
    def hook(i: jax.Array, blocks: int) -> None:
        jax.debug.callback(functools.partial(_chunk_started, stage, blocks), i)
    return hook


@contextlib.contextmanager
def showing(stages: Sequence[tuple[str, float] | tuple[str, float, str]], enabled: bool,
            stream: Optional[TextIO] = None) -> Iterator[None]:
    """Show the callbacks of a sweep running inside this block as one progress line.

    Args:
        stages: (label, weight) or (label, weight, unit) per stage id given to :func:`chunk_hook`; the weight
            is the stage's share of the work (e.g. images times orders), the unit what each call counts
            (default "chunk"; ANP's optimiser: "step").
        enabled: whether to show anything (the plan's ``progress``); process 0 alone shows it.
        stream: where to write (default ``sys.stderr``); rewritten in place if it is a terminal.
    """
    global _ACTIVE
    if not enabled or jax.process_index() != 0:
        yield
        return
    stream = stream or sys.stderr
    try:
        live = stream.isatty()
    except (AttributeError, ValueError, OSError):
        live = False
    line = _ACTIVE = _Line(stages, stream, live)
    try:
        yield
        try:
            line.finish()  # not after an error: the sweep is not done then
        except Exception:  # noqa: BLE001 - as below
            pass
    finally:
        _ACTIVE = None
        try:
            line.close()
        except Exception:  # noqa: BLE001 - a closed stderr must not hide the sweep's own result or error
            pass
