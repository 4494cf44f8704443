"""What the Keras file readers share: the file's kind, the size caps, a weight read and checked, the input scale.

The lab's DeepID's reader (``badnet_jax.io.keras``), any CNN's (``badnet_jax.io.keras_graph``) and the screener
all start from here:

* a ``.keras`` archive is a zip, any other Keras file HDF5; a file that is both (an HDF5 file with a zip
  appended, or the other way round) is refused (:func:`is_keras_archive`): h5py and Keras read one network
  from it, a zip reader another, and nothing tells which one the user meant;
* a model config is UTF-8 JSON of at most 1 MiB (:data:`MAX_CONFIG_BYTES`), decoded and parsed by
  :func:`load_config_json` wherever a reader finds it; an archive's members are read by
  :func:`read_archive` only, which checks the members' names, count, methods and declared sizes before
  anything is decompressed, reads no member past its declared size, and has the config checked before the
  weights are read;
* a weight array must have the shape the architecture gives it and be floating point, finite and below
  :data:`MAX_WEIGHT` (:func:`read_array`);
* the input scale (raw pixels or pixels / 255) is not part of a Keras file: the files badnet-jax writes
  record it in the root attribute :data:`INPUT_SCALE_ATTR`, which :func:`recorded_input_scale` reads back.
"""

from __future__ import annotations

import collections
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

import h5py
import numpy as np

from badnet_jax.errors import ModelFileError
from badnet_jax.io import fileio
from badnet_jax.pixels import INPUT_SCALES

INPUT_SCALE_ATTR = "badnet_jax_input_scale"

MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHT = 1e6  # real DeepID weights are below ~10; larger ones overflow float32 logits to inf/NaN
ARCHIVE_MEMBERS = {"config.json": MAX_CONFIG_BYTES, "model.weights.h5": 2 << 30, "metadata.json": 1 << 20}
# A model's weights file holds its parameters and, saved after training, its optimizer's state (Adam: two more
# copies): a reader that knows the parameters its config declares caps the member at this many float64 copies
# (never above ARCHIVE_MEMBERS'); one that does not (the lab's DeepID's, whose weights take 2.4 MB) at
# WEIGHTS_UNDECLARED.
WEIGHT_COPIES = 4
WEIGHTS_UNDECLARED = 256 << 20
WEIGHTS_SLACK = 16 << 20  # HDF5's own structures, names and the optimizer's scalars
MAX_ARCHIVE_MEMBERS = 64  # Keras writes config.json, metadata.json, model.weights.h5 (and assets/ for a few layers)
# The zip's list of members, read whole before they can be counted: Keras' take a few hundred bytes; 1 MiB holds
# at most ~22 000 entries (46 bytes each and a name), parsed in tens of milliseconds.
MAX_CENTRAL_DIRECTORY_BYTES = 1 << 20
_END, _ZIP64_LOCATOR = b"PK\x05\x06", b"PK\x06\x07"  # the signatures of the zip's end record and zip64 locator
_T = TypeVar("_T")
_U = TypeVar("_U")


def is_keras_archive(path: Path) -> bool:
    """Whether ``path`` is a zip (a ``.keras`` archive) rather than an HDF5 file.

    Raises:
        ModelFileError: it is both, so that two readers would see two different networks in it.
    """
    if not path.is_file():
        return False  # the HDF5 opener says what it is instead
    try:
        is_zip = zipfile.is_zipfile(path)
        is_h5 = is_zip and h5py.is_hdf5(str(path))
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read the file ({err})") from None
    if is_zip and is_h5:
        raise ModelFileError(f"{path}: is both an HDF5 file and a zip archive (a .keras appended to an h5, or the "
                             "other way round): h5py and Keras read the HDF5 network, a .keras reader the zip's; "
                             "refusing an ambiguous file (save the model again as one or the other)")
    return is_zip


def load_config_json(raw: Any, path: Path, what: str) -> Any:
    """A model config's JSON parsed: ``raw`` is what the file holds (``str``, ``bytes`` or a 0-d array of
    either, as h5py returns an attribute), ``what`` where the file keeps it (in every message, after ``path``).

    Raises:
        ModelFileError: ``raw`` is over :data:`MAX_CONFIG_BYTES`, not UTF-8 text, or not valid JSON.
    """
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, bytes):
        if len(raw) > MAX_CONFIG_BYTES:
            raise ModelFileError(f"{path}: {what} is over 1 MiB (a model config is far smaller)")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ModelFileError(f"{path}: {what} is not UTF-8 text ({err})") from None
    if not isinstance(raw, str) or len(raw) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path}: {what} is not a JSON string of at most 1 MiB")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: {what} is not valid JSON ({str(err)[:200]})") from None


def _member_key(name: str) -> str:
    """The name a lenient zip reader may take a member's for: ``./config.json``, ``CONFIG.JSON``,
    ``.\\config.json``, ``config.json/``, ``a/../config.json``, ``//config.json`` and ``config.json.`` (Windows
    drops a trailing dot or space) all read as ``config.json`` somewhere."""
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            parts = parts[:-1]
            continue
        part = part.rstrip(". ")
        if part:
            parts.append(part)
    return "/".join(parts).casefold()


def _end_record(fh: BinaryIO) -> tuple[int, bool] | None:
    """The size of the zip's list of members as its end record gives it, and whether a zip64 locator precedes
    that record (which a zip reader then follows, to a size of its own); None where there is no end record (the
    zip reader then says what is wrong itself)."""
    # zipfile's order: an end record of 22 bytes closing the file (no comment), else the last one in the file's
    # last 64 KiB and 22 bytes (a comment after it); then a zip64 locator (20 bytes) right before it. Where the
    # locator points differs between Python releases (right before it, or its own offset): so none is followed.
    search = (1 << 16) + 22
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - search - 20))
    tail = fh.read()
    end = len(tail) - 22
    if not (end >= 0 and tail[end:end + 4] == _END and tail[-2:] == b"\0\0"):
        end = tail.rfind(_END, max(0, len(tail) - search))
        if end < 0 or len(tail) - end < 22:
            return None
    zip64 = end >= 20 and tail[end - 20:end - 16] == _ZIP64_LOCATOR
    return int.from_bytes(tail[end + 12:end + 16], "little"), zip64


def _check_end_record(fh: BinaryIO, path: Path) -> None:
    """Refuse, from the zip's end record (:func:`_end_record`) and before the zip reader parses anything, zip64
    end records and a list of members over :data:`MAX_CENTRAL_DIRECTORY_BYTES`."""
    record = _end_record(fh)
    if record is None:
        return
    listed, zip64 = record
    if zip64:
        raise ModelFileError(f"{path}: the .keras archive has zip64 end records (for over 65 535 members or "
                             "4 GiB); Keras writes far smaller archives, and zip readers disagree on them")
    if listed > MAX_CENTRAL_DIRECTORY_BYTES:
        raise ModelFileError(f"{path}: the .keras archive's list of members takes {listed} bytes; Keras writes "
                             f"a few members (refusing more than {MAX_CENTRAL_DIRECTORY_BYTES} bytes of them)")


def read_archive(path: Path, parse_config: Callable[[bytes], _T],
                 declared_params: Callable[[_T], int] | None = None) -> tuple[_T, bytes]:
    """The parsed ``config.json`` and the raw ``model.weights.h5`` of a ``.keras`` zip.

    Before anything is decompressed: no zip64 end records, a list of members of at most
    :data:`MAX_CENTRAL_DIRECTORY_BYTES` (both checked before the zip reader parses it), at most
    :data:`MAX_ARCHIVE_MEMBERS` members, none stored twice (or under names a zip reader may take for one), none
    encrypted, each stored or deflated (what Keras writes; bzip2 and LZMA members decompress without a bound),
    each declaring at most its size in :data:`ARCHIVE_MEMBERS`. A member is then read up to its declared size
    only (a member holding more fails its CRC), and ``parse_config`` (which raises ModelFileError on a config
    it does not accept) runs before the weights are read. ``declared_params(config)``, if given, is the
    parameter count the parsed config declares: the weights member may then take at most
    :data:`WEIGHT_COPIES` float64 copies of them (the parameters and an optimizer's state) and
    :data:`WEIGHTS_SLACK`; without it, :data:`WEIGHTS_UNDECLARED`.

    Raises:
        ModelFileError: any of the above, or the zip or a member cannot be read.
    """
    # Only the zip's own calls are mapped: parse_config's errors are its own.
    zip_errors = (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError, EOFError, zlib.error)

    def zip_call(call: Callable[[], _U]) -> _U:
        try:
            return call()
        except zip_errors as err:
            raise ModelFileError(f"{path}: cannot read the .keras archive: {err} (truncated or corrupted?)") from None

    with zip_call(lambda: open(path, "rb")) as fh:  # one open file for the check and the zip reader
        zip_call(lambda: _check_end_record(fh, path))
        with zip_call(lambda: zipfile.ZipFile(fh)) as z:
            by_name = _checked_members(z, path)
            config = parse_config(zip_call(lambda: _read_member(z, by_name["config.json"])))
            weights = by_name["model.weights.h5"]
            if declared_params is None:
                if weights.file_size > WEIGHTS_UNDECLARED:
                    raise ModelFileError(f"{path}: archive member 'model.weights.h5' declares {weights.file_size} "
                                         f"bytes, more than {WEIGHTS_UNDECLARED} (a decompression bomb?)")
            else:
                n = declared_params(config)
                cap = WEIGHT_COPIES * 8 * n + WEIGHTS_SLACK
                if weights.file_size > cap:
                    raise ModelFileError(f"{path}: archive member 'model.weights.h5' declares {weights.file_size} "
                                         f"bytes, more than the {cap} that {WEIGHT_COPIES} float64 copies of the "
                                         f"{n} parameters its config declares take (a decompression bomb?)")
            return config, zip_call(lambda: _read_member(z, weights))


def _checked_members(z: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, refused as :func:`read_archive` says, before anything is decompressed."""
    infos = z.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise ModelFileError(f"{path}: the .keras archive holds {len(infos)} members; Keras writes a few "
                             f"(refusing more than {MAX_ARCHIVE_MEMBERS})")
    keys = collections.Counter(_member_key(i.filename) for i in infos)
    twice = sorted({i.filename for i in infos if keys[_member_key(i.filename)] > 1})
    if twice:
        # zip readers disagree on which copy of a duplicated member counts: refuse the ambiguity.
        raise ModelFileError(f"{path}: the .keras archive holds {twice} more than once (under one name, or "
                             "names a zip reader may take for one)")
    by_name = {i.filename: i for i in infos}
    for name in ("config.json", "model.weights.h5"):
        if name not in by_name:
            raise ModelFileError(f"{path}: a .keras archive without {name!r} (it holds {sorted(by_name)[:10]})")
    for name, info in by_name.items():
        if info.flag_bits & 0x1:
            raise ModelFileError(f"{path}: archive member {name!r} is encrypted; a .keras archive is not")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelFileError(f"{path}: archive member {name!r} uses compression method {info.compress_type}; "
                                 "Keras stores or deflates (other methods decompress without a bound)")
        if name in ARCHIVE_MEMBERS and info.file_size > ARCHIVE_MEMBERS[name]:
            raise ModelFileError(f"{path}: archive member {name!r} declares {info.file_size} bytes, more "
                                 f"than {ARCHIVE_MEMBERS[name]} (a decompression bomb?)")
    return by_name


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    # Read to the declared size and no further: deflate output beyond it is never produced.
    with z.open(info) as member:
        return member.read(info.file_size)


def read_array(ds: h5py.Dataset, layer: str, what: str, expected: tuple, path: Path) -> np.ndarray:
    """Dataset ``ds`` (layer ``layer``'s ``what``) as float32, refused unless it has shape ``expected`` and holds
    finite floating-point values of magnitude at most :data:`MAX_WEIGHT`; errors name ``path``."""
    if ds.dtype.kind != "f" or ds.dtype.itemsize > 8:
        raise ModelFileError(f"{path}: layer {layer!r} {what} has dtype {ds.dtype}, expected floating point")
    if tuple(ds.shape) != tuple(expected):
        raise ModelFileError(f"{path}: layer {layer!r} {what} has shape {tuple(ds.shape)}, expected {expected}")
    try:
        arr = np.asarray(ds[()], dtype=np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"{path}: cannot read layer {layer!r} {what}: {err} (truncated file?)") from None
    if not np.isfinite(arr).all():
        raise ModelFileError(f"{path}: layer {layer!r} {what} contains NaN or inf values")
    if arr.size and np.abs(arr).max() > MAX_WEIGHT:
        raise ModelFileError(f"{path}: layer {layer!r} {what} holds values up to {np.abs(arr).max():.3g}; a trained "
                             f"network's weights are far below {MAX_WEIGHT:g} (these would overflow the logits)")
    return arr


def recorded_input_scale(path: str | os.PathLike) -> str | None:
    """The input scale a badnet-jax-written Keras file records, or None (any other Keras file)."""
    path = Path(path)
    if is_keras_archive(path):
        return None  # a .keras archive written by Keras: no badnet-jax metadata
    with fileio.open_h5(path, ModelFileError) as f:
        try:
            raw = f.attrs.get(INPUT_SCALE_ATTR)
            if raw is None:
                return None
            scale = raw.decode() if isinstance(raw, bytes) else str(raw)
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:  # UnicodeDecodeError included
            raise ModelFileError(f"{path}: cannot read its attributes: {err} (truncated or corrupted?)") from None
    if scale not in INPUT_SCALES:
        raise ModelFileError(f"{path}: attribute {INPUT_SCALE_ATTR} is {scale!r}, expected one of {INPUT_SCALES}")
    return scale
