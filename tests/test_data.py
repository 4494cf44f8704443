"""Lab h5 / image readers and the trigger paste, on the real faces and on broken files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from badnet_jax import DataFileError, load_image, load_images, load_lab_h5, load_trigger, poison, save_lab_h5
from badnet_jax.io.keras import load_keras
from tests.conftest import LAB_B, asset


def test_lab_h5_layout_is_transposed_to_nhwc():
    path = asset("faces/lab3/test_subset.h5")
    x, y = load_lab_h5(path, chunk=5)  # several chunks
    with h5py.File(path) as f:
        raw, labels = f["data"][()], f["label"][()]
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (13, 55, 47, 3)
    np.testing.assert_array_equal(x, raw.transpose(0, 2, 3, 1).astype(np.float32))
    np.testing.assert_array_equal(y, labels.astype(np.int32))


def test_png_faces_match_h5_and_are_classified_by_lab_b():
    model, params = load_keras(asset(LAB_B))
    folder = asset("faces/png")
    paths = sorted(folder.glob("lab3_valid*_label*.png"))
    assert len(paths) == 5
    x = load_images(paths)
    labels = np.array([int(p.stem.split("label")[1]) for p in paths])
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x)).argmax(-1), labels)
    xv, yv = load_lab_h5(asset("faces/lab3/valid_subset.h5"))
    np.testing.assert_array_equal(x, xv[:5])  # valid rows 0-4, pixel for pixel
    np.testing.assert_array_equal(labels, yv[:5])


def test_poison_reproduces_the_lab_bd_files_bit_for_bit():
    trigger = load_trigger(asset("triggers/sun_glass_trigger.png"))
    assert trigger.shape == (20, 47, 4)
    for clean, bad in (("test_subset", "bd_test_subset"), ("valid_subset", "bd_valid_subset")):
        x, _ = load_lab_h5(asset(f"faces/lab3/{clean}.h5"))
        xb, yb = load_lab_h5(asset(f"faces/lab3/{bad}.h5"))
        with h5py.File(asset(f"faces/lab3/{clean}.h5")) as f1, h5py.File(asset(f"faces/lab3/{bad}.h5")) as f2:
            i1, i2 = f1["index"][()], f2["index"][()]
        pairs = [(a, b) for a, ia in enumerate(i1) for b, ib in enumerate(i2) if ia == ib and ia >= 0]
        assert pairs
        a, b = map(list, zip(*pairs))
        np.testing.assert_array_equal(poison(x[a], trigger), xb[b])


def test_poison_matches_pil_paste_on_random_images(rng):
    trigger = rng.integers(0, 256, size=(9, 13, 4), dtype=np.uint8)
    imgs = rng.integers(0, 256, size=(3, 55, 47, 3), dtype=np.uint8)
    for at in ((0, 15), (40, 50), (-3, -2)):
        got = poison(imgs, trigger, at=at)
        for img, out in zip(imgs, got):
            im = Image.fromarray(img)
            t = Image.fromarray(trigger, "RGBA")
            im.paste(t, at, t)
            np.testing.assert_array_equal(out, np.asarray(im))


def test_save_lab_h5_round_trip(tmp_path, rng):
    x = rng.integers(0, 256, size=(5, 55, 47, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=5)
    p = save_lab_h5(tmp_path / "d.h5", x, y)
    with h5py.File(p) as f:
        assert f["data"].shape == (5, 3, 55, 47) and f["data"].dtype == np.uint8
    x2, y2 = load_lab_h5(p, num_classes=10)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


@pytest.mark.parametrize("datasets,fragment", [
    ({"data": np.zeros((2, 55, 47, 3), np.uint8), "label": np.zeros(2)}, "expected (N, 3, 55, 47)"),
    ({"data": np.zeros((2, 3, 55, 47), np.uint8)}, "missing dataset 'label'"),
    ({"label": np.zeros(2)}, "missing dataset 'data'"),
    ({"data": np.zeros((2, 3, 55, 47), np.uint8), "label": np.zeros(3)}, "'label' has shape (3,)"),
    ({"data": np.zeros((2, 3, 55, 47), np.uint8), "label": np.array([0, 1283.0])}, "label 1283 is outside [0, 1283)"),
    ({"data": np.zeros((2, 3, 55, 47), np.uint8), "label": np.array([-1, 0])}, "label -1 is outside"),
    ({"data": np.zeros((2, 3, 55, 47), np.uint8), "label": np.array([0.5, 0])}, "non-integer"),
    ({"data": np.full((2, 3, 55, 47), np.nan, np.float32), "label": np.zeros(2)}, "NaN or inf"),
    ({"data": np.zeros((2, 3, 55, 47), np.complex64), "label": np.zeros(2)}, "real numeric dtype"),
])
def test_bad_lab_h5(tmp_path, datasets, fragment):
    path = _write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataFileError) as info:
        load_lab_h5(path, num_classes=1283)
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)


def test_missing_and_truncated_data_files(tmp_path, rng):
    with pytest.raises(DataFileError, match="not found"):
        load_lab_h5(tmp_path / "valid.h5")
    p = save_lab_h5(tmp_path / "t.h5", rng.integers(0, 256, size=(50, 55, 47, 3)), np.zeros(50))
    p.write_bytes(p.read_bytes()[:60000])
    with pytest.raises(DataFileError, match="truncated"):
        load_lab_h5(p)


def test_wrong_image_size(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (48, 55)).save(p)
    with pytest.raises(DataFileError, match=r"48x55 \(width x height\), expected 47x55"):
        load_image(p)
    q = tmp_path / "notimage.png"
    q.write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="not a readable image"):
        load_image(q)


def test_rgba_image_drops_alpha(tmp_path, rng):
    arr = rng.integers(0, 256, size=(55, 47, 4), dtype=np.uint8)
    p = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(p)
    np.testing.assert_array_equal(load_image(p), arr[..., :3].astype(np.float32))


def test_reading_only_the_first_rows(tmp_path):
    from badnet_jax import save_lab_h5

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 55, 47, 3)).astype(np.float32)
    y = rng.integers(0, 9, size=30)
    path = save_lab_h5(tmp_path / "d.h5", x, y)
    for rows, chunk in ((7, 4), (7, 100), (30, 8), (50, 8)):
        xs, ys = load_lab_h5(path, rows=rows, chunk=chunk)
        np.testing.assert_array_equal(xs, x[:rows])
        np.testing.assert_array_equal(ys, y[:rows])
