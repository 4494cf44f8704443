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
