"""Atomic writes: a file or a folder is either the earlier one or the complete new one, never half written,
whatever interrupts the writer (an exception, a signal through the commands' handler, a kill).

A signal noted by the commands' handler (:func:`note_interrupt`) cuts short only the caller's own writing:
the temporary's creation, the rename or swap and the clean-up run whole, then the run ends. What a run killed
outright left beside a folder is put right by the next run writing it, and nothing else is touched.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import h5py

log = logging.getLogger(__name__)


_interrupts: list[int] = []  # signals received so far (cli.run's handler notes them)
# How deep this thread is in interrupts_deferred() sections. Per thread: Python runs signal handlers in the main
# thread, and only a section of that thread may hold them back (not a background thread writing a cache file).
_deferring = threading.local()


def note_interrupt(signum: int) -> bool:
    """Record a signal: no rename into place happens after it, even if its KeyboardInterrupt got swallowed
    (raised inside a garbage-collection callback or a ``__del__``, Python only prints it and goes on).

    Returns:
        Whether the handler should raise KeyboardInterrupt now: not inside :func:`interrupts_deferred`, whose
        caller raises it once its section is whole.
    """
    _interrupts.append(signum)
    return not getattr(_deferring, "depth", 0)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A section that a signal noted through :func:`note_interrupt` does not cut short (a writer's life from its
    temporary's creation to its removal, but for the caller's own writing: :func:`_interruptible`). The caller
    raises after it (:func:`raise_if_interrupted`).
    """
    outer = getattr(_deferring, "depth", 0)
    _deferring.depth = outer + 1
    try:
        yield
    finally:
        _deferring.depth = outer  # the depth it found, even if an inner section's restore was cut short


def _interruptible(fn: Callable, *args):
    """``fn(*args)`` inside an :func:`interrupts_deferred` section, with signals raising again (the caller's
    writing, which may run long); one noted while deferred raises before ``fn`` starts."""
    outer = getattr(_deferring, "depth", 0)
    try:
        _deferring.depth = 0
        raise_if_interrupted()
        return fn(*args)
    finally:
        _deferring.depth = outer


def was_interrupted() -> bool:
    """Whether a signal was noted (see :func:`note_interrupt`)."""
    return bool(_interrupts)


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a signal was noted (see :func:`note_interrupt`)."""
    if _interrupts:
        raise KeyboardInterrupt(f"signal {_interrupts[0]} received earlier")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o666,
                 durable: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    ``mode``: the file's permissions before the umask (0o666: what ``open()`` gives). ``durable``: the file's
    bytes are flushed to disk before the rename, so a crash cannot leave ``path`` naming a partly written file.
    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A signal (through the commands' handler) cuts short only write() and the flush to disk: from the
    # temporary's creation to its removal everything else runs whole, so no temporary is left beside `path`.
    with interrupts_deferred():
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _interruptible(_write_file, write, tmp, mode, durable)
            if not was_interrupted():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    raise_if_interrupted()
    return path


def _write_file(write: Callable[[Path], None], tmp: Path, mode: int, durable: bool) -> None:
    write(tmp)
    os.chmod(tmp, mode & ~_umask())  # mkstemp makes 0600
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def atomic_write_h5(path: str | os.PathLike, build: Callable[[h5py.File], None]) -> Path:
    """Build an HDF5 file in memory with ``build(f)``, then write its bytes to ``path`` atomically.

    HDF5 does not survive a full disk well (errors raised in deallocators, then a segmentation fault): built
    in memory, the only write to disk is a plain one whose ``OSError`` (ENOSPC) the caller can report.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        build(f)
    return atomic_write_bytes(path, buffer.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


_OWNER_FILE = "owner.json"
_TOKEN = r"[a-z0-9_]{8}"  # what tempfile.mkdtemp puts between prefix and suffix


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def _start_ticks(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), None if unknown."""
    stat_line = _read_text(f"/proc/{pid}/stat")
    if stat_line is None:
        return None
    fields = stat_line.rsplit(")", 1)[-1].split()  # the command name (field 2) may hold spaces and ')'
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner_record(path: Path) -> dict:
    """Who this process is, in terms that tell it apart from every other process that may share the folder:
    a pid means something only on one machine (host name and boot id) and in one pid namespace, and only
    while that process lives (its start time tells a recycled pid)."""
    return {"target": os.path.abspath(path), "pid": os.getpid(),
            "start": _start_ticks(os.getpid()), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": _pid_namespace(), "host": os.uname().nodename}


def _write_owner(tmp: Path, path: Path) -> None:
    # Written whole or not at all: a run killed while writing it leaves no record, and without one its
    # folder is never touched.
    part = tmp / f".{_OWNER_FILE}.part"
    part.write_text(json.dumps(_owner_record(path)), encoding="utf-8")
    os.replace(part, tmp / _OWNER_FILE)


def _abandoned(owner: dict, path: Path) -> bool:
    """Whether ``owner`` (a record of :func:`_owner_record`) is provably a dead run that wrote to ``path``.

    Everything must be known and match this process's machine, boot and pid namespace; then the pid is dead,
    or lives on as another process (another start time). Anything else (another machine or container
    sharing the folder, a system without /proc) is not provably dead, and is left alone.
    """
    if not isinstance(owner, dict) or owner.get("target") != _owner_record(path)["target"] or not _same_system(owner):
        return False
    pid, start = owner.get("pid"), owner.get("start")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid() or start is None:
        return False
    if not _alive(pid):
        return True
    now = _start_ticks(pid)
    return now is not None and now != start  # the pid lives on as another process


def _same_system(owner: dict) -> bool:
    """Whether ``owner`` ran on this machine, since its last boot, in this pid namespace (all known)."""
    me = _owner_record(Path("."))
    return all(me[key] is not None and owner.get(key) == me[key] for key in ("boot_id", "pid_namespace", "host"))


def _clean_after_killed_runs(path: Path) -> None:
    """Undo what a run killed outright (SIGKILL, power loss) left beside ``path``, and nothing else.

    A run keeps its work in ``.<name>.<pid>.<token>.tmp`` with an owner record (:func:`_owner_record`) in it,
    and moves the earlier results aside to ``.<name>.old.<pid>.<token>`` (the same pid and token). Only
    folders of exactly these names whose record proves a dead run on this machine, boot and pid namespace,
    writing this very ``path``, are touched: their earlier results are put back if the new ones never made
    it in (else deleted), then the temporary folder is deleted. A live run's folders, another machine's or
    container's, a sibling output folder's (``path`` ``out`` beside ``out.20241202``) and anything without a
    readable record are left alone; those that look like this path's are named in a warning.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.({_TOKEN})\.tmp")
    for entry in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            owner = json.loads((entry / _OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = None
        if owner is None or not _abandoned(owner, path):
            if isinstance(owner, dict) and owner.get("target") == _owner_record(path)["target"] \
                    and not _same_system(owner):
                log.warning("Left %s beside %s: the folder of a run on another machine, boot or pid namespace "
                            "(host %s, pid %s); delete it once that run is gone.", entry.name, path,
                            owner.get("host"), owner.get("pid"))
            continue
        if int(match.group(1)) != owner["pid"]:
            continue
        old = entry.with_name(f".{path.name}.old.{match.group(1)}.{match.group(2)}")
        if os.path.isdir(old) and not os.path.islink(old):
            if not os.path.lexists(path):
                os.replace(old, path)
            else:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(entry, ignore_errors=True)


def real_target(path: str | os.PathLike) -> Path:
    """``path`` with symbolic links resolved, so that a folder reached through a link is replaced where it
    lies and the link stays (replacing the link itself would cut it off from its folder)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a directory with ``write(tmp_dir)`` beside ``path``, then swap it in for ``path``.

    The old directory (if any) is moved aside first and deleted only once the new one is in place, so an
    interruption leaves either the old or the new directory under ``path``. What a killed earlier run left
    beside ``path`` is cleaned up first (:func:`_clean_after_killed_runs`). A signal noted (through the
    commands' handler) anywhere but in ``write`` lets the rest finish, then raises (:func:`interrupts_deferred`).
    A ``path`` that is a symbolic link to a folder stays one: the folder it leads to is replaced.
    """
    path = real_target(path)
    if not path.name or path.name in (".", ".."):
        raise ValueError(f"{path}: not a folder name that can be replaced (resolve it first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_after_killed_runs(path)
    # A signal (through the commands' handler) cuts short only write(): from the temporary folder's creation to
    # its removal everything else (the owner record, the swap, the clean-up) runs whole, then the signal takes
    # effect: the earlier results or the new ones in place, nothing left beside them.
    with interrupts_deferred():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        token = tmp.name[len(f".{path.name}.{os.getpid()}."):-len(".tmp")]
        target = tmp / "d"  # not tmp itself: the writer (orbax) may want to create the directory
        try:
            _write_owner(tmp, path)
            _interruptible(write, target)
        except BaseException:
            _remove_settled(tmp)  # still deferred: a second signal, once write() raised, waits too
            raise
        _swap_in(target, path, tmp, token)
    raise_if_interrupted()
    return path


def _swap_in(target: Path, path: Path, tmp: Path, token: str) -> None:
    """Move ``target`` to ``path`` (the earlier ``path`` aside first, deleted once the new one is in), unless a
    signal was noted; then delete ``tmp``. On failure the earlier ``path`` is put back."""
    old = None
    try:
        if was_interrupted():
            return
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}.{token}")
            os.replace(path, old)
        os.replace(target, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
            old = None
        raise
    finally:
        # The earlier results go first and the owner record last: a kill in between leaves a record that
        # lets the next run finish the job.
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_settled(tmp: Path, quiet_s: float = 0.3, max_s: float = 10.0) -> None:
    """Remove ``tmp`` and keep removing it until it stays gone for ``quiet_s`` (at most ``max_s``).

    After a failed orbax save, tensorstore's writes still in flight re-create their parent folders (the whole
    chain up to ``tmp``) after a first removal; a failed run must not leave them behind.
    """
    deadline = time.monotonic() + max_s
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(quiet_s)
        if not os.path.lexists(tmp) or time.monotonic() > deadline:
            return
