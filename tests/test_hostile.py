"""Hostile and broken inputs (property-based): every case ends in the project's own error, never a crash,
a hang, a huge allocation or code execution.

The number of cases tried is the sum of the ``max_examples`` below plus the fixed cases (BUILD_NOTES.md).
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badnet_jax import (BadNetError, DataFileError, ModelFileError, init_params, load_image, load_keras,
                        load_lab_h5, save_keras, save_lab_h5)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    return save_keras(init_params(num_classes=3, seed=0), tmp_path_factory.mktemp("m") / "m.h5",
                      full_model=False).read_bytes()


@pytest.fixture(scope="module")
def data_bytes(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    path = save_lab_h5(tmp_path_factory.mktemp("d") / "d.h5", rng.integers(0, 256, (20, 55, 47, 3)), np.arange(20) % 3)
    return path.read_bytes()


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(tmp_path, data):
    p = _write(tmp_path, "r.h5", data)
    with pytest.raises(ModelFileError):
        load_keras(p)
    with pytest.raises(DataFileError):
        load_lab_h5(p)
    q = _write(tmp_path, "r.png", data)
    with pytest.raises(DataFileError):
        load_image(q)


@FUZZ
@given(frac=st.floats(0.0, 0.999))
def test_truncated_model(tmp_path, model_bytes, frac):
    p = _write(tmp_path, "t.h5", model_bytes[: int(frac * len(model_bytes))])
    with pytest.raises(ModelFileError):
        load_keras(p)


@FUZZ
@given(frac=st.floats(0.0, 0.999))
def test_truncated_data(tmp_path, data_bytes, frac):
    p = _write(tmp_path, "t.h5", data_bytes[: int(frac * len(data_bytes))])
    with pytest.raises(DataFileError):
        load_lab_h5(p)


@FUZZ
@given(pos=st.integers(0, 10**9), value=st.integers(0, 255))
def test_flipped_byte_in_model_never_crashes(tmp_path, model_bytes, pos, value):
    data = bytearray(model_bytes)
    data[pos % len(data)] = value
    p = _write(tmp_path, "f.h5", bytes(data))
    try:
        _, params = load_keras(p)
    except ModelFileError:
        return
    for layer in params.values():  # if it loads, what it loaded is valid
        assert all(np.isfinite(np.asarray(v)).all() for v in layer.values())


def test_written_models_keep_no_string_in_the_global_heap(tmp_path):
    """Every attribute save_keras writes is a fixed-length string (as Keras 2 writes them): a variable-length
    string lives in HDF5's global heap, and a flipped byte there made HDF5 loop forever inside
    ``attrs.get`` (the byte-flip test above hung once, 10+ minutes, uninterruptible from Python)."""
    for full_model in (False, True):
        path = save_keras(init_params(num_classes=3, seed=0), tmp_path / f"m{full_model}.h5", full_model=full_model)
        attrs = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: attrs.extend(obj.attrs.values()))
            attrs.extend(f.attrs.values())
        strings = [a for a in attrs if h5py.check_string_dtype(np.asarray(a).dtype) or isinstance(a, (str, bytes))]
        assert len(strings) >= 4 and all(np.asarray(a).dtype.kind == "S" for a in strings)
        assert b"GCOL" not in path.read_bytes()  # no global heap collection in the file at all


def test_an_input_scale_attribute_that_is_not_utf8_is_a_model_error(tmp_path):
    path = save_keras(init_params(num_classes=3, seed=0), tmp_path / "m.h5", full_model=False)
    with h5py.File(path, "r+") as f:
        f.attrs["badnet_jax_input_scale"] = np.bytes_(b"\x80\x81")
    with pytest.raises(ModelFileError, match="m.h5: cannot read its attributes"):
        load_keras(path)


WEIRD_ARRAYS = st.sampled_from([
    np.array([b"abc", b"de"]), np.array(["x", "y"], dtype=h5py.string_dtype()), np.zeros((2, 2), np.complex64),
    np.zeros((0,), np.float32), np.zeros((3, 0, 7), np.float32), np.full((4,), np.nan, np.float32),
    np.full((4,), np.inf, np.float64), np.zeros((), np.float32), np.zeros((5, 5), np.int8), np.zeros(3, bool),
])


@FUZZ
@given(layer=st.sampled_from(["conv_1", "conv_3", "fc_1", "output"]), what=st.sampled_from(["kernel", "bias"]),
       arr=WEIRD_ARRAYS)
def test_weird_weight_datasets(tmp_path, model_bytes, layer, what, arr):
    p = _write(tmp_path, "w.h5", model_bytes)
    with h5py.File(p, "r+") as f:
        del f[f"{layer}/{layer}/{what}:0"]
        f[f"{layer}/{layer}"].create_dataset(f"{what}:0", data=arr)
    with pytest.raises(ModelFileError, match=layer):
        load_keras(p)


@FUZZ
@given(data=WEIRD_ARRAYS, labels=WEIRD_ARRAYS)
def test_weird_data_datasets(tmp_path, data, labels):
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=labels)
    with pytest.raises(DataFileError):
        load_lab_h5(p)


@FUZZ
@given(labels=st.lists(st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True)),
                       min_size=3, max_size=3))
def test_labels_negative_huge_or_not_integers(tmp_path, labels):
    p = tmp_path / "l.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.zeros((3, 3, 55, 47), np.uint8))
        f.create_dataset("label", data=np.array(labels, np.float64))
    arr = np.array(labels, np.float64)
    valid = np.isfinite(arr).all() and (arr == np.round(arr)).all() and (arr >= 0).all() and (arr < 1283).all()
    if valid:
        assert load_lab_h5(p, num_classes=1283)[1].tolist() == arr.astype(int).tolist()
    else:
        with pytest.raises(DataFileError):
            load_lab_h5(p, num_classes=1283)


def test_billion_declared_rows_are_refused_without_allocating(tmp_path):
    p = tmp_path / "huge.h5"
    with h5py.File(p, "w") as f:  # chunked and never written: a few KB on disk, 10^9 rows declared
        f.create_dataset("data", shape=(10**9, 3, 55, 47), dtype=np.uint8, chunks=(1, 3, 55, 47))
        f.create_dataset("label", shape=(10**9,), dtype=np.float32, chunks=(1024,))
    with pytest.raises(DataFileError, match="declares 1000000000 images"):
        load_lab_h5(p)


def test_zero_images_and_one_dimensional_data(tmp_path):
    p = tmp_path / "z.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.zeros((0, 3, 55, 47), np.uint8))
        f.create_dataset("label", data=np.zeros((0,)))
    x, y = load_lab_h5(p)
    assert x.shape == (0, 55, 47, 3) and y.shape == (0,)
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.zeros((7,), np.uint8))
        f.create_dataset("label", data=np.zeros((7,)))
    with pytest.raises(DataFileError, match="expected"):
        load_lab_h5(p)


@FUZZ
@given(depth=st.integers(1, 100_000), kind=st.sampled_from(["Lambda", "MyCustomLayer", "TFOpLambda"]))
def test_hostile_model_config(tmp_path, model_bytes, depth, kind):
    p = _write(tmp_path, "c.h5", model_bytes)
    with h5py.File(p, "r+") as f:
        weights = f.create_group("model_weights")
        for key in list(f.keys()):
            if key != "model_weights":
                f.move(key, f"model_weights/{key}")
        for a in ("layer_names", "backend", "keras_version"):
            weights.attrs[a] = f.attrs[a]
        if depth > 50_000:  # deeply nested JSON
            cfg = "[" * (depth - 50_000) + "]" * (depth - 50_000)
        else:
            cfg = json.dumps({"class_name": "Functional", "config": {"layers": [
                {"class_name": kind, "name": "conv_1", "config": {"name": "conv_1", "function": "__import__('os')"}}]}})
        f.attrs["model_config"] = cfg
    with pytest.raises(ModelFileError):
        load_keras(p)


def test_external_links_and_virtual_datasets_are_refused(tmp_path, model_bytes, data_bytes):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("kernel", data=np.zeros((4, 4, 3, 20), np.float32))
        f.create_dataset("data", data=np.zeros((2, 3, 55, 47), np.uint8))
    p = _write(tmp_path, "ext.h5", model_bytes)
    with h5py.File(p, "r+") as f:
        del f["conv_1/conv_1/kernel:0"]
        f["conv_1/conv_1/kernel:0"] = h5py.ExternalLink(str(outside), "/kernel")
    with pytest.raises(ModelFileError, match="external link"):
        load_keras(p)
    q = _write(tmp_path, "vds.h5", data_bytes)
    with h5py.File(q, "r+") as f:
        del f["data"]
        layout = h5py.VirtualLayout(shape=(2, 3, 55, 47), dtype=np.uint8)
        layout[:] = h5py.VirtualSource(str(outside), "data", shape=(2, 3, 55, 47))
        f.create_virtual_dataset("data", layout)
    with pytest.raises(DataFileError, match="virtual dataset"):
        load_lab_h5(q)


def test_decompression_bomb_png_is_refused(tmp_path):
    from PIL import Image

    p = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(p)  # 400 megapixels of zeros: a few hundred KB compressed
    with pytest.raises(DataFileError, match="20000x20000|decompression bomb"):
        load_image(p)


def test_all_errors_share_one_family():
    assert issubclass(ModelFileError, BadNetError) and issubclass(DataFileError, BadNetError)


def _huge_png(path, width, height):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def _declared(path, shapes):
    """An h5 whose datasets declare ``shapes`` (chunked, never written: a few KB on disk)."""
    with h5py.File(path, "w") as f:
        for name, (shape, dtype) in shapes.items():
            if np.prod(shape, dtype=float) < 1e6:
                f.create_dataset(name, data=np.zeros(shape, dtype))
            else:
                f.create_dataset(name, shape=shape, dtype=dtype, chunks=tuple(min(s, 64) for s in shape))
    return path


HUGE = 10**10


@pytest.mark.parametrize("case", ["images", "labels", "true_labels", "output_layer", "keras_config", "png", "trigger"])
def test_a_huge_declared_size_is_refused_naming_the_file(tmp_path, model_bytes, case):
    """Headers that declare far more than the file holds: refused from the header, the message names the file."""
    import signal
    import zipfile

    from badnet_jax.io.lab_data import load_trigger, load_true_labels

    img = (3, 3, 55, 47), np.uint8
    if case == "images":
        path, read = _declared(tmp_path / "d.h5", {"data": ((HUGE, 3, 55, 47), np.uint8),
                                                   "label": ((HUGE,), np.float32)}), load_lab_h5
    elif case == "labels":
        path, read = _declared(tmp_path / "d.h5", {"data": img, "label": ((HUGE,), np.float32)}), load_lab_h5
    elif case == "true_labels":
        path = _declared(tmp_path / "d.h5", {"data": img, "label": ((3,), np.float32),
                                             "true_label": ((HUGE,), np.int64)})
        read = load_true_labels
    elif case == "output_layer":
        path, read = _write(tmp_path, "m.h5", model_bytes), load_keras
        with h5py.File(path, "r+") as f:
            for name, shape in (("output/output/kernel:0", (160, HUGE)), ("output/output/bias:0", (HUGE,))):
                del f[name]
                f.create_dataset(name, shape=shape, dtype=np.float32, chunks=tuple(min(s, 64) for s in shape))
    elif case == "keras_config":
        path, read = tmp_path / "m.keras", load_keras
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("config.json", b" " * (64 << 20))  # 64 MiB of spaces: ~64 KB compressed
            z.writestr("model.weights.h5", model_bytes)
    else:
        path = _huge_png(tmp_path / "x.png", 200_000, 200_000)
        read = load_image if case == "png" else load_trigger

    def alarm(signum, frame):
        raise TimeoutError("reading a huge declared size took over 20 s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        with pytest.raises(BadNetError) as err:
            read(path)
    finally:
        signal.alarm(0)
    assert str(path) in str(err.value)
