"""Checked reading shared by every reader: h5 files opened and walked with errors that name the file, paths
told apart by kind, printable paths, the room left for writing.

Readers must fail with a project error naming the file (never an h5py traceback). Writing (whole or not at all)
is :mod:`badnet_jax.io.atomic`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterator

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
