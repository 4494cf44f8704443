"""badnet_jax.io.keras_file's archive and config readers, through both readers that use them: hostile ``.keras``
zips, and configs that are not UTF-8 JSON.

A real archive that Keras 3 saved (the test-only oracle) is rewritten member by member into each hostile form;
the lab's DeepID reader (``load_keras``) and any CNN's (``read_keras_graph``) must both refuse it with a
ModelFileError that names the file and says what is wrong, within seconds.
"""

from __future__ import annotations

import contextlib
import json
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from badnet_jax import init_params, load_keras, save_keras
from badnet_jax.io.keras_file import (ARCHIVE_MEMBERS, MAX_ARCHIVE_MEMBERS, MAX_CENTRAL_DIRECTORY_BYTES,
                                     _end_record)
from badnet_jax.io.keras_graph import read_keras_graph
from tests.io.conftest import refused, refused_naming_the_file
from tests.keras_oracle import build_keras_deepid

keras = pytest.importorskip("keras")

READERS = {"deepid": load_keras, "graph": read_keras_graph}


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, bytes]:
    """The members of a .keras archive Keras 3 saved (a 13-class DeepID)."""
    path = tmp_path_factory.mktemp("archive") / "model.keras"
    build_keras_deepid(num_classes=13).save(str(path))
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _write(path: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data, compression in entries:
            z.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _data_start(raw: bytes, info: zipfile.ZipInfo) -> int:
    """Where member ``info``'s compressed data starts (after its local header's name and extra field)."""
    header = info.header_offset
    return header + 30 + int.from_bytes(raw[header + 26:header + 28], "little") + \
        int.from_bytes(raw[header + 28:header + 30], "little")


def _corrupt_member(path: Path, name: str) -> Path:
    """Member ``name``'s data damaged, the zip's directory intact: a deflate stream's first byte made an invalid
    block type (a zlib error), a stored member's bytes flipped (a CRC mismatch)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    raw = bytearray(path.read_bytes())
    start = _data_start(raw, info)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        raw[start] = 0xFF
    else:
        middle = start + info.compress_size // 2
        raw[middle:middle + 16] = bytes(b ^ 0xA5 for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))
    return path


def _patch_directory(path: Path, name: str, offset: int, value: int, width: int) -> Path:
    """Field ``offset`` (``width`` bytes) of member ``name``'s central directory entry set to ``value``."""
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        length = int.from_bytes(raw[at + 28:at + 30], "little")
        if raw[at + 46:at + 46 + length] == name.encode():
            raw[at + offset:at + offset + width] = value.to_bytes(width, "little")
            path.write_bytes(bytes(raw))
            return path
        at = raw.find(b"PK\x01\x02", at + 46 + length)
    raise AssertionError(f"no central directory entry {name}")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_the_saved_archive_reads(members, tmp_path, reader):
    # The rewriting itself keeps a readable archive: the refusals below come from what each case changes.
    READERS[reader](_write(tmp_path / "ok.keras", [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]))


def test_weights_beyond_what_the_config_declares_are_refused_unread(members, tmp_path):
    """Any CNN's reader caps the weights member by the parameters its config declares (four float64 copies: the
    parameters and an optimizer's state, and 16 MiB): a member declaring more is refused before it is
    decompressed, naming the count."""
    import io

    from badnet_jax.io.keras_file import WEIGHT_COPIES, WEIGHTS_SLACK

    with h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as f:  # the saved weights' values, counted
        sizes = []
        f.visititems(lambda _, obj: sizes.append(obj.size) if isinstance(obj, h5py.Dataset) else None)
    n = sum(sizes)
    padded = members["model.weights.h5"] + bytes(WEIGHT_COPIES * 8 * n + WEIGHTS_SLACK)  # zeros: ~50 KB deflated
    entries = [(name, padded if name == "model.weights.h5" else d, zipfile.ZIP_DEFLATED) for name, d in members.items()]
    path = _write(tmp_path / "padded.keras", entries)
    tracemalloc.start()
    try:
        refused(read_keras_graph, path, "parameters its config declares", f"{n} parameters", "'model.weights.h5'")
        assert tracemalloc.get_traced_memory()[1] < (WEIGHT_COPIES * 8 * n + WEIGHTS_SLACK) // 4  # never read
    finally:
        tracemalloc.stop()


def test_the_deepid_readers_weights_stay_capped_at_256_mib(members, tmp_path):
    """The lab's DeepID reader declares no parameter count: its weights member keeps the 256 MiB cap (checked before
    anything is decompressed), not the 2 GiB any reader's member may declare before its config is read."""
    from badnet_jax.io.keras_file import WEIGHTS_UNDECLARED

    path = _write(tmp_path / "big.keras", [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()])
    _patch_directory(path, "model.weights.h5", 24, WEIGHTS_UNDECLARED + 1, 4)  # the declared uncompressed size
    refused(load_keras, path, f"declares {WEIGHTS_UNDECLARED + 1} bytes, more than {WEIGHTS_UNDECLARED}")


def test_a_trained_models_archive_with_its_optimizer_state_is_read(tmp_path):
    """``model.save`` after training stores Adam's two moments beside the weights: three float32 copies, under the
    cap's four float64 ones, and the graph reader reads the weights alone."""
    km = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3, activation="relu", name="c"),
                           keras.layers.Flatten(name="f"), keras.layers.Dense(512, activation="relu", name="d"),
                           keras.layers.Dense(4, name="out")])
    km.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    with jax.numpy_rank_promotion("allow"):  # Keras' JAX code relies on it; the tests forbid it
        km.fit(rng.random((8, 8, 8, 3), np.float32), rng.integers(0, 4, 8), epochs=1, verbose=0)
    km.save(tmp_path / "trained.keras")
    n = km.count_params()
    with zipfile.ZipFile(tmp_path / "trained.keras") as z:
        assert z.getinfo("model.weights.h5").file_size > 3 * 4 * n  # the weights and Adam's moments
    graph, params = read_keras_graph(tmp_path / "trained.keras")
    for layer in km.layers:
        for w, key in zip(layer.get_weights(), ("kernel", "bias")):
            np.testing.assert_array_equal(params[layer.name][key], w)


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("alias", ["config.json", "./config.json", "CONFIG.JSON", ".\\config.json", "config.json/",
                                   "a/../config.json", "//config.json", "config.json.", "config.json "])
def test_a_member_under_two_names_a_zip_reader_may_take_for_one(members, tmp_path, reader, alias):
    entries = [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    entries.append((alias, b"{}", zipfile.ZIP_STORED))
    with pytest.warns(UserWarning, match="Duplicate name") if alias == "config.json" else contextlib.nullcontext():
        path = _write(tmp_path / "twice.keras", entries)
    refused(READERS[reader], path, "more than once")


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("member,compression", [("config.json", zipfile.ZIP_DEFLATED),
                                                ("model.weights.h5", zipfile.ZIP_DEFLATED),
                                                ("model.weights.h5", zipfile.ZIP_STORED)])
def test_a_corrupted_member(members, tmp_path, reader, member, compression):
    entries = [(n, d, compression if n == member else zipfile.ZIP_DEFLATED) for n, d in members.items()]
    path = _corrupt_member(_write(tmp_path / "corrupt.keras", entries), member)
    refused(READERS[reader], path, "cannot read the .keras archive")


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_member_of_an_unbounded_compression_method_is_refused(members, tmp_path, reader, compression):
    entries = [(n, d, compression if n == "model.weights.h5" else zipfile.ZIP_DEFLATED) for n, d in members.items()]
    refused(READERS[reader], _write(tmp_path / "method.keras", entries), "'model.weights.h5' uses compression method")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_encrypted_member_is_refused(members, tmp_path, reader):
    path = _write(tmp_path / "locked.keras", [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()])
    refused(READERS[reader], _patch_directory(path, "config.json", 8, 0x1, 2), "'config.json' is encrypted")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_member_holding_more_than_it_declares_is_read_no_further(members, tmp_path, reader):
    # 64 MiB of spaces deflate to ~64 KB; the directory says 100 bytes. Read to the declared size, the member
    # fails its CRC: the 64 MiB are never produced.
    entries = [(n, b" " * (64 << 20) if n == "config.json" else d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    path = _patch_directory(_write(tmp_path / "bomb.keras", entries), "config.json", 24, 100, 4)
    tracemalloc.start()
    try:
        refused(READERS[reader], path, "cannot read the .keras archive")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("reader", sorted(READERS))
def test_the_config_is_refused_before_the_weights_are_decompressed(members, tmp_path, reader):
    entries = [(n, b"not json" if n == "config.json" else d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    path = _corrupt_member(_write(tmp_path / "bad_config.keras", entries), "model.weights.h5")
    message = refused(READERS[reader], path, "JSON")
    assert "cannot read the .keras archive" not in message


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_member_declaring_more_than_its_cap_is_refused_unread(members, tmp_path, reader):
    huge = b" " * (ARCHIVE_MEMBERS["config.json"] + 1) + b"{}"  # compresses to a few KB
    entries = [(n, huge if n == "config.json" else d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    path = _write(tmp_path / "bomb.keras", entries)
    with zipfile.ZipFile(path) as z:  # what the reader sees before decompressing: a small member declaring more
        info = z.getinfo("config.json")
        assert info.compress_size < 10_000 < ARCHIVE_MEMBERS["config.json"] < info.file_size
    refused_naming_the_file(READERS[reader], path)
    refused(READERS[reader], path, "'config.json' declares", "decompression bomb")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_archive_of_too_many_members_is_refused(members, tmp_path, reader):
    entries = [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    entries += [(f"assets/{i}", b"", zipfile.ZIP_STORED) for i in range(MAX_ARCHIVE_MEMBERS)]
    refused(READERS[reader], _write(tmp_path / "many.keras", entries), f"{MAX_ARCHIVE_MEMBERS + len(members)} members")


def test_many_members_are_counted_fast(members, tmp_path):
    # 20 000 empty members: refused from the count, not after a pass quadratic in the members.
    entries = [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    entries += [(f"assets/{i}", b"", zipfile.ZIP_STORED) for i in range(20_000)]
    path = _write(tmp_path / "20k.keras", entries)
    refused_naming_the_file(load_keras, path, seconds=5)


@pytest.mark.parametrize("extra,complaint", [(30_000, "list of members takes"), (70_000, "zip64 end records")])
def test_a_long_list_of_members_is_refused_before_it_is_parsed(members, tmp_path, extra, complaint):
    # A zip reader parses the whole list of members (~0.5 KB of memory per entry) before they can be counted.
    # Over 65 535 members zipfile writes zip64 end records, which are refused whatever size they give.
    entries = [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    entries += [(f"assets/{i}", b"", zipfile.ZIP_STORED) for i in range(extra)]
    path = _write(tmp_path / "long.keras", entries)
    with zipfile.ZipFile(path) as z:
        assert len(z.infolist()) == extra + len(members)
    tracemalloc.start()
    try:
        message = refused(READERS["deepid"], path, complaint)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, (peak, message)
    assert complaint != "list of members takes" or f"{MAX_CENTRAL_DIRECTORY_BYTES} bytes" in message


def test_a_zip64_locator_is_refused_wherever_its_record_is(members, tmp_path):
    # Python releases differ on where a zip64 locator's record is (right before it, or at its own offset, past
    # "extensible data"): a 32-bit end record saying 0 bytes beside a locator could hide a long list from one
    # reading and not the other. Any locator is refused; Keras never writes one.
    path = _write(tmp_path / "ok.keras", [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()])
    raw = path.read_bytes()
    end = raw.rfind(b"PK\x05\x06")
    locator = b"PK\x06\x07" + (0).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(4, "little")
    path.write_bytes(raw[:end] + locator + raw[end:])
    refused(READERS["graph"], path, "zip64 end records")


def _zip_with(tmp_path: Path, name: str, members: int, comment: bytes = b"", prefix: bytes = b"") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        for i in range(members):
            z.writestr(f"m/{i}", bytes(i % 7))
        z.comment = comment
    path.write_bytes(prefix + path.read_bytes())
    return path


@pytest.mark.parametrize("case", ["plain", "comment", "signature in comment", "prefixed", "zip64", "no end"])
def test_the_list_size_is_the_one_the_zip_reader_takes(tmp_path, case):
    # A zip64 archive is refused (its size is read as zipfile reads it only where it has no locator).
    # zipfile's own reader of the end records is the reference (private: skipped where a Python drops it).
    end_records = getattr(zipfile, "_EndRecData", None)
    if end_records is None:
        pytest.skip("this Python's zipfile has no _EndRecData")
    path = {
        "plain": lambda: _zip_with(tmp_path, "a.zip", 5),
        "comment": lambda: _zip_with(tmp_path, "a.zip", 5, comment=b"x" * 60_000),
        "signature in comment": lambda: _zip_with(tmp_path, "a.zip", 5, comment=b"PK\x05\x06" + b"\0" * 18),
        "prefixed": lambda: _zip_with(tmp_path, "a.zip", 5, prefix=b"\0" * 100),
        "zip64": lambda: _zip_with(tmp_path, "a.zip", 0x10000),
        "no end": lambda: Path(tmp_path / "a.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100) and tmp_path / "a.zip",
    }[case]()
    with open(path, "rb") as fh:
        record = end_records(fh)
    with open(path, "rb") as fh:
        got = _end_record(fh)
    if case == "no end":
        assert record is None and got is None
    elif case == "zip64":
        assert got is not None and got[1] and record[zipfile._ECD_SIGNATURE] == b"PK\x06\x06"
    else:
        assert got == (record[zipfile._ECD_SIZE], False)


@pytest.mark.parametrize("field,value", [("class_name", ["Conv2D"]), ("kernel_size", 4)])
def test_a_config_field_of_another_json_type_is_refused(members, tmp_path, field, value):
    # DeepID's reader allow-lists the config's layers; a list where Keras writes a string (unhashable) or a number
    # where it writes a list is refused like any other config it does not accept, never a TypeError.
    config = json.loads(members["config.json"])
    conv = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
    (conv if field == "class_name" else conv["config"])[field] = value
    entries = [(n, json.dumps(config).encode() if n == "config.json" else d, zipfile.ZIP_DEFLATED)
               for n, d in members.items()]
    refused(READERS["deepid"], _write(tmp_path / "types.keras", entries), "the archive's config.json")


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("container", ["archive", "h5"])
def test_a_config_that_is_not_utf8_is_refused(members, tmp_path, reader, container):
    # Valid JSON but for one byte in a field no reader looks at: one decoder refuses it for both readers, whether
    # the config is an archive's member or a full-model h5's attribute (bytes replaced by U+FFFD would pass).
    config = b'{"note": "\xff", ' + members["config.json"].lstrip()[1:]
    if container == "archive":
        entries = [(n, config if n == "config.json" else d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
        path, where = _write(tmp_path / "latin1.keras", entries), "the archive's config.json"
    else:
        path, where = save_keras(init_params(num_classes=13, seed=0), tmp_path / "latin1.h5"), "'model_config'"
        with h5py.File(path, "a") as f:
            f.attrs["model_config"] = np.bytes_(b'{"note": "\xff", ' + bytes(f.attrs["model_config"])[1:])
    refused(READERS[reader], path, where, "is not UTF-8 text")
