"""File plumbing shared by every reader and writer: checked h5 opening and atomic writes.

Readers must fail with a project error naming the file (never an h5py traceback); writers must leave either
the previous file or the complete new one, never a half-written file, whatever interrupts them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import h5py

from badnet_jax.errors import BadNetError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_h5(path: str | os.PathLike, error: type[BadNetError]) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only, turning every way it can be unreadable into ``error``."""
    path = require_file(path, error)
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as err:
        raise error(f"{path}: cannot be read ({err})") from None
    if not is_h5:
        raise error(f"{path}: is not an HDF5 file (wrong format, or empty)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise error(f"{path}: cannot be opened as HDF5: {err} (truncated or corrupted file?)") from None
    try:
        yield f
    finally:
        f.close()


def require_file(path: str | os.PathLike, error: type[BadNetError], what: str = "file") -> Path:
    """``path`` as a Path if it is a readable regular file, else ``error`` saying exactly what it is instead.

    Tells apart what ``Path.is_file()`` lumps together as "not found": a dangling or looping symbolic link, a
    folder, a named pipe (reading one could block forever, so it is never opened), a device or socket, a path
    through something that is not a folder, and a file this user may not read.
    """
    path = Path(path)
    kind = _stat_kind(path, error, what)
    if kind != "file":
        raise error(f"{path}: is {kind}, not a regular {what}")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: permission denied (this user cannot read the {what})")
    return path


def require_dir(path: str | os.PathLike, error: type[BadNetError], what: str = "folder") -> Path:
    """``path`` as a Path if it is a folder, else ``error`` saying what it is instead (see :func:`require_file`)."""
    path = Path(path)
    kind = _stat_kind(path, error, what)
    if kind != "a folder":
        raise error(f"{path}: is {'a file' if kind == 'file' else kind}, not a {what}")
    return path


def _stat_kind(path: Path, error: type[BadNetError], what: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path}: is a dangling symbolic link (it leads to {os.path.realpath(path)}, which does not "
                        "exist)") from None
        raise error(f"{path}: {what} not found") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise error(f"{path}: too many levels of symbolic links (a link loop, or a chain longer than the system "
                        f"follows); cannot reach the {what}") from None
        if err.errno == errno.ENOTDIR:
            raise error(f"{path}: {what} not found (a component of the path is a file, not a folder)") from None
        if err.errno == errno.EACCES:
            raise error(f"{path}: permission denied (a folder on the way cannot be searched)") from None
        raise error(f"{path}: cannot be reached ({err.strerror or err})") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO; never read, it could block forever)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


MAX_LINK_HOPS = 32


def has_link(group: h5py.Group, name: str) -> bool:
    """Whether ``group`` has a link ``name`` (one component), without following it (``name in group`` would)."""
    try:
        return group.get(name, getlink=True) is not None
    except (OSError, KeyError, ValueError, TypeError):
        return False


def safe_get(group: h5py.Group, name: str, path: Path, error: type[BadNetError]):
    """``group[name]``, or None if there is no such link, with every component resolved inside the file.

    Each component of ``name`` (and of every soft link's target, up to :data:`MAX_LINK_HOPS` hops) is looked
    up as a link first and followed only when it stays in the file: external links anywhere on the way,
    virtual datasets and datasets whose raw data lives in other files (external storage) are refused before
    anything is read through them.
    """
    return _resolve(group, name, path, error, [0], name)


def _resolve(group: h5py.Group, name: str, path: Path, error: type[BadNetError], hops: list, asked: str):
    current = group.file if name.startswith("/") else group
    parts = [p for p in name.split("/") if p not in ("", ".")]
    obj = current
    for i, part in enumerate(parts):
        if not isinstance(current, h5py.Group):
            raise error(f"{path}: cannot read {asked!r}: {'/'.join(parts[:i])!r} is not a group")
        try:
            link = current.get(part, getlink=True)
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise error(f"{path}: cannot read {asked!r}: {err}") from None
        if link is None:
            return None
        if isinstance(link, h5py.ExternalLink):
            raise error(f"{path}: {asked!r} passes through an external link to {link.filename!r}; refusing to read "
                        "outside the file")
        if isinstance(link, h5py.SoftLink):
            hops[0] += 1
            if hops[0] > MAX_LINK_HOPS:
                raise error(f"{path}: {asked!r} follows more than {MAX_LINK_HOPS} soft links (a link loop?)")
            target = link.path if link.path.startswith("/") else f"{current.name.rstrip('/')}/{link.path}"
            obj = _resolve(current.file, target, path, error, hops, asked)
            if obj is None:
                raise error(f"{path}: {asked!r} is a dangling soft link (to {link.path!r}, which does not exist)")
        else:
            try:
                obj = current.get(part)
            except (OSError, KeyError, ValueError, RuntimeError) as err:
                raise error(f"{path}: cannot read {asked!r}: {err} (corrupted file?)") from None
        current = obj
    if isinstance(obj, h5py.Dataset):
        if obj.is_virtual:
            raise error(f"{path}: {asked!r} is a virtual dataset (it maps other files); refusing to read it")
        if obj.id.get_create_plist().get_external_count() > 0:
            raise error(f"{path}: {asked!r} keeps its data in external files; refusing to read outside the file")
    return obj


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this user may still write on the file system that holds ``path`` (or its nearest existing
    parent, for a folder not made yet); None where the file system does not say."""
    path = Path(path).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        st = os.statvfs(existing)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (a bound for allocations sized by file headers)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


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


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 as ``\\xff`` escapes, control characters (a
    newline in a file name) as ``\\n`` / ``\\x1b`` escapes, so that one path stays one line."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
