"""badnet_jax.io.lab_data, images and poisoning: lab h5 / image readers and the trigger paste, on the real faces and
on bad files.

Broken and hostile files (property-based where a space of them exists) end in DataFileError naming the file:
never a crash, a hang or a huge allocation, and never silently wrong pixels or labels. Checks every reader
shares (any bytes, odd paths, links out of the file) are in test_fileio.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from badnet_jax import (ConfigError, DataFileError, load_image, load_images, load_lab_h5, load_trigger, poison,
                        save_lab_h5)
from badnet_jax.model import INPUT_HWC
from badnet_jax.io.keras import load_keras
from badnet_jax.io.lab_data import load_true_labels, peek_lab_h5
from tests.conftest import LAB_B, asset
from tests.io.conftest import FUZZ, HUGE, WEIRD_ARRAYS, declared_h5, refused_naming_the_file, write_bytes


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
    x = load_images(paths, INPUT_HWC)
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


def test_groups_where_datasets_belong_are_named_as_groups(tmp_path):
    p = tmp_path / "g.h5"
    with h5py.File(p, "w") as f:
        f.create_group("data")
        f.create_dataset("label", data=np.zeros(2))
    with pytest.raises(DataFileError, match=f"^{p}: 'data' is a group, not a dataset \\(the lab layout"):
        load_lab_h5(p)
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.zeros((2, 3, 55, 47), np.uint8))
        f.create_group("label")
    with pytest.raises(DataFileError, match=f"^{p}: 'label' is a group, not a dataset$"):
        load_lab_h5(p)


def test_another_models_images_are_refused_by_default_with_the_way_to_read_them(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    path = _write(tmp_path / "cifar.h5", data=x, label=np.arange(3.0))
    with pytest.raises(DataFileError, match=r"expected \(N, 3, 55, 47\): the lab's 55x47 RGB faces.*hwc=") as info:
        load_lab_h5(path)
    assert str(path) in str(info.value)
    images, labels = load_lab_h5(path, hwc=(32, 32, 3))  # the way the message names
    np.testing.assert_array_equal(images, x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(labels, [0, 1, 2])


def test_labels_may_be_absent_where_the_caller_needs_none(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 55, 47), dtype=np.uint8)
    images, labels = load_lab_h5(_write(tmp_path / "unlabelled.h5", data=x), require_labels=False)
    np.testing.assert_array_equal(images, x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(labels, [-1, -1, -1, -1])
    assert labels.dtype == np.int32
    # a label the file has is still checked
    with pytest.raises(DataFileError, match="'label' has shape \\(3,\\)"):
        load_lab_h5(_write(tmp_path / "bad.h5", data=x, label=np.zeros(3)), require_labels=False)
    with pytest.raises(DataFileError, match="label -2 is negative"):
        load_lab_h5(_write(tmp_path / "neg.h5", data=x, label=np.array([0, 1, -2, 3.0])), require_labels=False)


@pytest.mark.parametrize("labels,fragment", [
    ([-1, 0], "label -1 is negative"),
    ([0, 2.0 ** 40], "label 1.09951e+12 is beyond int32"),
])
def test_labels_without_a_class_count_are_refused_for_what_no_label_can_be(tmp_path, labels, fragment):
    path = _write(tmp_path / "bad.h5", data=np.zeros((2, 3, 55, 47), np.uint8), label=np.array(labels, np.float64))
    with pytest.raises(DataFileError) as info:
        load_lab_h5(path)
    assert str(info.value) == f"{path}: {fragment}; labels are class indices 0, 1, 2, ..."


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
        load_image(p, INPUT_HWC)
    q = tmp_path / "notimage.png"
    q.write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="not a readable image"):
        load_image(q, INPUT_HWC)


def test_rgba_image_drops_alpha(tmp_path, rng):
    arr = rng.integers(0, 256, size=(55, 47, 4), dtype=np.uint8)
    p = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(p)
    np.testing.assert_array_equal(load_image(p, INPUT_HWC), arr[..., :3].astype(np.float32))


def test_reading_only_the_first_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 55, 47, 3)).astype(np.float32)
    y = rng.integers(0, 9, size=30)
    path = save_lab_h5(tmp_path / "d.h5", x, y)
    for rows, chunk in ((7, 4), (7, 100), (30, 8), (50, 8)):
        xs, ys = load_lab_h5(path, rows=rows, chunk=chunk)
        np.testing.assert_array_equal(xs, x[:rows])
        np.testing.assert_array_equal(ys, y[:rows])


def test_pixels_outside_0_255_or_already_divided_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    scaled = _lab_file(tmp_path / "s.h5", rng.random((4, 3, 55, 47)).astype(np.float32))  # pixels / 255
    with pytest.raises(DataFileError, match=r"s\.h5: every pixel is in 0..1 and some are fractions"):
        load_lab_h5(scaled)
    # Pixels of 0 and 1 alone are a near-black image, as float32 as it is as uint8 (the in-memory check agrees).
    dark = rng.integers(0, 2, (4, 3, 55, 47))
    for dtype in (np.float32, np.uint8):
        assert load_lab_h5(_lab_file(tmp_path / f"dark_{np.dtype(dtype).name}.h5", dark.astype(dtype)))[0].max() == 1
    wild = _lab_file(tmp_path / "w.h5", rng.uniform(-3000, 7200, (4, 3, 55, 47)).astype(np.float32))
    with pytest.raises(DataFileError, match=r"w\.h5: dataset 'data' holds pixel values from -\d+"):
        load_lab_h5(wild)
    fine = _lab_file(tmp_path / "ok.h5", rng.integers(0, 256, (4, 3, 55, 47)).astype(np.uint8))
    assert load_lab_h5(fine)[0].shape == (4, 55, 47, 3)


def _lab_file(path, data, label=None, **extra):
    return _write(path, data=data, label=np.zeros(len(data)) if label is None else label, **extra)


@pytest.mark.parametrize("bad", [np.nan, 0.5, -1.0])
def test_true_labels_that_are_not_classes_are_refused(tmp_path, bad):
    data = np.zeros((3, 3, 55, 47), np.uint8)
    p = _lab_file(tmp_path / "t.h5", data, true_label=np.array([1.0, bad, 2.0]))
    with pytest.raises(DataFileError, match=r"t\.h5: dataset 'true_label'"):
        load_true_labels(p)


def test_true_labels_beyond_the_models_classes_are_refused_as_labels_are(tmp_path):
    p = _lab_file(tmp_path / "t.h5", np.zeros((3, 3, 55, 47), np.uint8), true_label=np.array([1, 99, 2]))
    with pytest.raises(DataFileError, match=r"t\.h5: dataset 'true_label' holds class 99, outside \[0, 4\) for a "
                                            "4-class model"):
        load_true_labels(p, num_classes=4)
    np.testing.assert_array_equal(load_true_labels(p, num_classes=100), [1, 99, 2])
    np.testing.assert_array_equal(load_true_labels(p), [1, 99, 2])  # no model to compare with


# ---------------------------------------------------------------- hostile files ---------------------------

@FUZZ
@given(frac=st.floats(0.0, 0.999))
def test_truncated_data(tmp_path, data_bytes, frac):
    p = write_bytes(tmp_path, "t.h5", data_bytes[: int(frac * len(data_bytes))])
    with pytest.raises(DataFileError):
        load_lab_h5(p)


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
    with h5py.File(p, "a") as f:  # a few rows stored: the header alone still tells, before anything is read
        f["data"][:400] = 1
    with pytest.raises(DataFileError, match=f"{p}: declares 1000000000 images"):
        peek_lab_h5(p)


def test_a_tiny_file_declaring_many_unwritten_images_is_refused(tmp_path):
    p = tmp_path / "fill.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", shape=(300_000, 3, 55, 47), dtype=np.uint8, chunks=(1, 3, 55, 47))
        f.create_dataset("label", data=np.zeros(300_000))
    assert p.stat().st_size < 3_000_000
    with pytest.raises(DataFileError, match="declares 300000 images but stores none"):
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


def test_decompression_bomb_png_is_refused(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(p)  # 400 megapixels of zeros: a few hundred KB compressed
    with pytest.raises(DataFileError, match="20000x20000|decompression bomb"):
        load_image(p, INPUT_HWC)


def _huge_png(path, width, height):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("case", ["images", "labels", "true_labels", "png", "trigger"])
def test_a_huge_declared_size_is_refused_naming_the_file(tmp_path, case):
    """Headers that declare far more than the file holds: refused from the header, the message names the file."""
    img = (3, 3, 55, 47), np.uint8
    if case == "images":
        path, read = declared_h5(tmp_path / "d.h5", {"data": ((HUGE, 3, 55, 47), np.uint8),
                                                     "label": ((HUGE,), np.float32)}), load_lab_h5
    elif case == "labels":
        path, read = declared_h5(tmp_path / "d.h5", {"data": img, "label": ((HUGE,), np.float32)}), load_lab_h5
    elif case == "true_labels":
        path = declared_h5(tmp_path / "d.h5", {"data": img, "label": ((3,), np.float32),
                                               "true_label": ((HUGE,), np.int64)})
        read = load_true_labels
    else:
        path = _huge_png(tmp_path / "x.png", 200_000, 200_000)
        read = (lambda p: load_image(p, INPUT_HWC)) if case == "png" else load_trigger
    refused_naming_the_file(read, path)


@pytest.mark.parametrize("kwargs,named", [({"chunk": 0}, "chunk=0"), ({"chunk": -3}, "chunk=-3"),
                                          ({"chunk": 2.5}, "chunk=2.5"), ({"rows": -1}, "rows=-1")])
def test_a_bad_chunk_or_rows_is_the_callers_mistake_not_the_files(kwargs, named):
    with pytest.raises(ConfigError, match=f"{named} must be a whole number") as err:
        load_lab_h5(asset("faces/lab3/test_subset.h5"), **kwargs)
    assert err.value.field == next(iter(kwargs))
    assert "faces/lab3" not in str(err.value)  # the file is not blamed


def _png16(path, rgba16):
    """A 16-bit RGBA PNG, written by hand (PIL writes none)."""
    import struct
    import zlib

    h, w, _ = rgba16.shape
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + rgba16[i].astype(">u2").tobytes() for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_triggers_that_are_not_8_bit_are_refused_not_flattened_or_darkened(tmp_path, caplog):
    grey16 = tmp_path / "grey16.png"
    Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(np.uint16)).save(grey16)
    assert Image.open(grey16).mode == "I;16"  # PIL would clip it to white
    as_float = tmp_path / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20)).save(as_float)  # PIL: near black
    rgba16 = _png16(tmp_path / "rgba16.png", np.full((10, 20, 4), 40000, np.uint16))
    assert Image.open(rgba16).mode == "RGBA"  # PIL reads it as 8 bits without a word
    for path, said in ((grey16, "mode 'I;16'"), (as_float, "mode 'F'"), (rgba16, "16-bit PNG")):
        with pytest.raises(DataFileError, match=f"{path}: trigger .*{said}.*save it as an 8-bit RGBA PNG"):
            load_trigger(path)
    # 8-bit triggers read as before; one without alpha says it is a solid rectangle.
    np.testing.assert_array_equal(load_trigger(asset("triggers/sun_glass_trigger.png")),
                                  np.asarray(Image.open(asset("triggers/sun_glass_trigger.png"))))
    assert "no alpha" not in caplog.text
    rgb = tmp_path / "rgb.png"
    Image.open(asset("triggers/sun_glass_trigger.png")).convert("RGB").save(rgb)
    assert (load_trigger(rgb)[..., 3] == 255).all()
    assert f"{rgb}: the trigger has no alpha channel: it is pasted as a solid 47x20 rectangle" in caplog.text


def test_images_of_any_size_read_at_the_size_asked_for(tmp_path, rng):
    rgb = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # 24 high, 40 wide
    grey = rng.integers(0, 256, size=(24, 40), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png", hwc=(24, 40, 3)), rgb.astype(np.float32))
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png", hwc=(24, 40, 3)),  # grey as RGB: replicated
                                  np.repeat(grey[..., None], 3, axis=-1).astype(np.float32))
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png", hwc=(24, 40, 1)), grey[..., None])
    batch = load_images([tmp_path / "rgb.png", tmp_path / "grey.png"], hwc=(24, 40, 3))
    assert batch.shape == (2, 24, 40, 3) and batch.dtype == np.float32
    assert load_images([], hwc=(32, 32, 3)).shape == (0, 32, 32, 3)
    with pytest.raises(DataFileError) as err:
        load_image(tmp_path / "rgb.png", hwc=(40, 24, 3))  # height and width swapped
    assert str(err.value) == f"{tmp_path / 'rgb.png'}: image is 40x24 (width x height), expected 24x40"
    with pytest.raises(DataFileError, match=r"rgb.png: image is 40x24 \(width x height\), expected 32x32"):
        load_images([tmp_path / "rgb.png"], hwc=(32, 32, 3))
    for bad in ((24, 40), (24, 40, 2), (0, 40, 3), (24.5, 40, 3), "24x40"):
        with pytest.raises(ConfigError, match="must be \\(height, width, channels\\)"):
            load_image(tmp_path / "rgb.png", hwc=bad)


@pytest.mark.parametrize("pixels,fragment", [
    (np.full((2, 4, 5, 3), 0.5), "24 of 120 pixel values are not whole numbers (e.g. 0.5)"),
    (np.full((2, 4, 5, 3), 256.0), "pixel values from 256 to 256"),
    (np.full((2, 4, 5, 3), -1, np.int64), "pixel values from -1 to -1"),
    (np.full((2, 4, 5, 3), np.nan, np.float32), "NaN or inf"),
    (np.full((2, 4, 5, 3), 1 + 1j), "dtype complex128"),
])
def test_save_lab_h5_refuses_pixels_uint8_cannot_hold_exactly(tmp_path, pixels, fragment):
    """No silent rounding or clipping: what is written reads back as what was given, or nothing is written."""
    x = pixels.copy()
    if "whole numbers" in fragment:
        x[1] = 7  # half the images fine: the count is of the others' pixels
        fragment = "60 of 120 pixel values are not whole numbers (e.g. 0.5)"
    path = tmp_path / "d.h5"
    with pytest.raises(DataFileError) as err:
        save_lab_h5(path, x, np.zeros(2))
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value), str(err.value)
    assert not path.exists()
    for ok in (np.arange(120).reshape(2, 4, 5, 3) * 2, np.full((2, 4, 5, 3), 255.0, np.float32)):
        save_lab_h5(path, ok, np.zeros(2))
        np.testing.assert_array_equal(load_lab_h5(path, hwc=(4, 5, 3))[0], ok)


def test_a_16_bit_png_face_is_refused_not_read_as_its_high_bytes(tmp_path):
    """PIL reads a 16-bit RGB(A) PNG as 8 bits (the high byte of each value) without a word; a face read so
    would reach the model as other pixels. The 8-bit face of the same size still reads."""
    face16 = _png16(tmp_path / "face16.png", np.full((55, 47, 4), 40000, np.uint16))
    assert Image.open(face16).mode == "RGBA"
    with pytest.raises(DataFileError, match=f"{face16}: a 16-bit PNG, which would be read as its high bytes"):
        load_image(face16, (55, 47, 3))
    face8 = tmp_path / "face8.png"
    Image.fromarray(np.full((55, 47, 3), 156, np.uint8)).save(face8)
    assert (load_image(face8, (55, 47, 3)) == 156).all()
