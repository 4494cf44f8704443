"""File plumbing shared by every reader and writer: checked h5 opening and atomic writes.

Readers must fail with a project error naming the file (never an h5py traceback); writers must leave either
the previous file or the complete new one, never a half-written file, whatever interrupts them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py

from badnet_jax.errors import BadNetError


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


def note_interrupt(signum: int) -> None:
    """Record a signal: no rename into place happens after it, even if its KeyboardInterrupt got swallowed
    (raised inside a garbage-collection callback or a ``__del__``, Python only prints it and goes on)."""
    _interrupts.append(signum)


def was_interrupted() -> bool:
    """Whether a signal was noted (see :func:`note_interrupt`)."""
    return bool(_interrupts)


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a signal was noted (see :func:`note_interrupt`)."""
    if _interrupts:
        raise KeyboardInterrupt(f"signal {_interrupts[0]} received earlier")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        raise_if_interrupted()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def _clean_after_killed_runs(path: Path) -> None:
    """Undo what a run killed outright (SIGKILL, power loss) left beside ``path``.

    Its temporary folder (``.<name>.<pid>.*.tmp``) is deleted. If it died between moving the earlier results
    aside (``.<name>.old.<pid>``) and moving the new ones in, the earlier results are put back; if the new
    ones made it in, the moved-aside folder is deleted. Entries of processes still alive are left alone.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:old\.(\d+)|(\d+)\..*\.tmp)")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or _alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(1) and not path.exists():
            os.replace(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a directory with ``write(tmp_dir)`` beside ``path``, then swap it in for ``path``.

    The old directory (if any) is moved aside first and deleted only once the new one is in place, so an
    interruption leaves either the old or the new directory under ``path``. What a killed earlier run left
    beside ``path`` is cleaned up first (:func:`_clean_after_killed_runs`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_after_killed_runs(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        # The writer (orbax) may want to create the directory itself.
        target = tmp / "d"
        write(target)
        raise_if_interrupted()
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(target, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
            old = None
        _remove_settled(tmp)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


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


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
