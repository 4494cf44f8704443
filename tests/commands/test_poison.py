"""badnet-poison (scripts/poison.py, badnet_jax.commands.poison) and the library call behind it,
badnet_jax.io.poisoning.make_poisoned_h5, against the lab's own poisoned files, bit for bit."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from PIL import Image

from badnet_jax import DataFileError, load_images, load_lab_h5, save_lab_h5
from badnet_jax.model import INPUT_HWC
from badnet_jax.io.lab_data import load_true_labels
from badnet_jax.io.poisoning import make_poisoned_h5
from tests.cli import run_cli
from tests.conftest import asset

TRIGGER = "triggers/sun_glass_trigger.png"


def _rows(name):
    with h5py.File(asset(f"faces/lab3/{name}.h5")) as f:
        return np.asarray(f["index"][()]), np.asarray(f["data"][()]), np.asarray(f["label"][()])


@pytest.mark.parametrize("split,reproduced", [("test", 13), ("valid", 29)])
def test_cli_reproduces_the_labs_sunglasses_files(split, reproduced, tmp_path):
    """Test subsets: the same 13 faces in the same rows. Valid subsets: 47 clean faces, 53 poisoned ones of
    which 29 are poisoned versions of those 47 (found by content: the subsets' rows are not aligned)."""
    out = tmp_path / "bd.h5"
    proc = run_cli("poison", "--source", str(asset(f"faces/lab3/{split}_subset.h5")), "--trigger", str(asset(TRIGGER)),
                   "--target", "0", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, _, clean_labels = _rows(f"{split}_subset")
    _, bd_data, _ = _rows(f"bd_{split}_subset")
    with h5py.File(out) as f:
        data, label = np.asarray(f["data"][()]), np.asarray(f["label"][()])
    mine = {row.tobytes() for row in data}
    assert sum(row.tobytes() in mine for row in bd_data) == reproduced  # the lab's rows, byte for byte
    if split == "test":
        np.testing.assert_array_equal(data, bd_data)
    assert data.dtype == np.uint8 and (label == 0).all()
    np.testing.assert_array_equal(load_true_labels(out), clean_labels.astype(np.int32))  # each face's own class


def test_a_folder_of_pngs_takes_true_labels_from_the_names(tmp_path):
    clean = sorted(asset("faces/lab3/test/clean").glob("*.png"))
    path = make_poisoned_h5(asset("faces/lab3/test/clean"), asset(TRIGGER), tmp_path / "bd.h5", target=7)
    x, y = load_lab_h5(path)
    want = load_images(sorted(asset("faces/lab3/test/sunglasses").glob("*.png")), INPUT_HWC)  # the lab's renderings
    np.testing.assert_array_equal(x, want)
    assert (y == 7).all()
    np.testing.assert_array_equal(load_true_labels(path), [int(p.stem.split("label")[1]) for p in clean])


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(DataFileError, match="holds no .png/.jpg/.jpeg faces"):
        make_poisoned_h5(tmp_path, asset(TRIGGER), tmp_path / "o.h5", target=0)
    with pytest.raises(DataFileError, match="target label 5000 is outside"):
        make_poisoned_h5(asset("faces/lab3/test_subset.h5"), asset(TRIGGER), tmp_path / "o.h5", 5000, num_classes=1283)
    with pytest.raises(DataFileError, match=r"target=-1: target label -1 is negative; labels are class indices"):
        make_poisoned_h5(asset("faces/lab3/test_subset.h5"), asset(TRIGGER), tmp_path / "o.h5", -1)
    with pytest.raises(DataFileError, match="trigger file not found"):
        make_poisoned_h5(asset("faces/lab3/test_subset.h5"), tmp_path / "none.png", tmp_path / "o.h5", target=0)
    assert not (tmp_path / "o.h5").exists()
    proc = run_cli("poison", "--source", "x.h5", "--trigger", "t.png", "--target", "0", "--out", "o.h5", "--at",
                   "1,2,3", timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "--at must be two integers" in proc.stderr


def _poison(tmp_path, *args, source="faces/lab3/test_subset.h5", trigger=TRIGGER, out="bd.h5"):
    return run_cli("poison", "--source", asset(source) if isinstance(source, str) else source, "--trigger",
                   asset(trigger) if isinstance(trigger, str) else trigger, "--out", out, *args, cwd=tmp_path,
                   timeout=300)


def _errors(proc):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_trigger_without_alpha_or_clipped_is_pasted_with_a_warning(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.open(asset(TRIGGER)).convert("RGB").save(rgb)
    proc = _poison(tmp_path, "--target", "0", trigger=rgb)
    assert proc.returncode == 0, proc.stderr
    assert f"{rgb}: the trigger has no alpha channel: it is pasted as a solid 47x20 rectangle" in proc.stderr
    x, _ = load_lab_h5(tmp_path / "bd.h5")
    np.testing.assert_array_equal(x[:, 15:35, :, :], np.broadcast_to(np.asarray(Image.open(rgb), np.float32),
                                                                     (13, 20, 47, 3)))  # solid, as it says
    small = tmp_path / "small.png"
    Image.new("RGBA", (10, 10), (255, 0, 0, 255)).save(small)
    proc = _poison(tmp_path, "--target", "0", "--at", "40,50", trigger=small, out="clipped.h5")
    assert proc.returncode == 0, proc.stderr
    assert "The 10x10 trigger at (40, 50) is clipped by the 47x55 image to 35 of its 100 pixels." in proc.stderr
    clean, _ = load_lab_h5(asset("faces/lab3/test_subset.h5"))
    changed = (load_lab_h5(tmp_path / "clipped.h5")[0] != clean).any(-1)
    assert changed[:, 50:, 40:].all() and changed.sum(axis=(1, 2)).max() == 35
    proc = _poison(tmp_path, "--target", "0", out="lab.h5")  # the lab's own trigger and place: no warning
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_trigger_that_changes_no_pixel_is_refused(tmp_path):
    line = _errors(_poison(tmp_path, "--target", "0", "--at", "47,0"))
    assert line == (f"error: the 47x20 trigger {asset(TRIGGER)} at --at 47,0 lies entirely outside the 47x55 "
                    "image: it would change no pixel")
    line = _errors(_poison(tmp_path, "--target", "0", "--at", "-47,-20"))
    assert "at --at -47,-20 lies entirely outside" in line
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (47, 20), (0, 0, 0, 0)).save(clear)
    line = _errors(_poison(tmp_path, "--target", "0", trigger=clear))
    assert line == (f"error: the 47x20 trigger {clear} at --at 0,15 has alpha 0 on every pixel inside the image: "
                    "it would change no pixel")
    half = tmp_path / "half.png"  # opaque only where it falls outside the image
    rgba = np.zeros((20, 47, 4), np.uint8)
    rgba[:10, :, 3] = 255
    Image.fromarray(rgba).save(half)
    assert "has alpha 0 on every pixel inside" in _errors(_poison(tmp_path, "--target", "0", "--at", "0,-10",
                                                                  trigger=half))
    assert not (tmp_path / "bd.h5").exists()


def test_a_target_outside_the_models_classes_is_refused(tmp_path):
    model = asset("models/lab3/bd_weights.h5")
    line = _errors(_poison(tmp_path, "--target", "1283", "--model", model))
    assert line == (f"error: --target 1283: target label 1283 is outside [0, 1283) for the 1283-class model "
                    f"{model}")
    line = _errors(_poison(tmp_path, "--target", "0", "--model", model, "--num_classes", "10"))
    assert line == f"error: --num_classes 10 but --model {model} has 1283 classes"
    proc = _poison(tmp_path, "--target", "1282", "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert (load_lab_h5(tmp_path / "bd.h5")[1] == 1282).all()
    assert "classes are unknown" not in proc.stderr  # the model knows them
    # Without a model nothing bounds the target: written, with a warning when no clean image has a class that high.
    source = asset("faces/lab3/test_subset.h5")
    true = load_lab_h5(source)[1]
    proc = _poison(tmp_path, "--target", "5000", out="typo.h5")
    assert proc.returncode == 0, proc.stderr
    assert (f"Target 5000 is above every true label of {source} ({true.min()}..{true.max()}), and without a model "
            "or num_classes the classes are unknown: check that 5000 is one of the model's classes.") in proc.stderr
    assert (load_lab_h5(tmp_path / "typo.h5")[1] == 5000).all()
    proc = _poison(tmp_path, "--target", str(true.max()), out="ok.h5")
    assert proc.returncode == 0 and "classes are unknown" not in proc.stderr, proc.stderr


def test_face_names_without_labels_warn_that_the_file_has_no_true_label(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, p in enumerate(sorted(asset("faces/png").glob("lab3_valid*.png"))[:3]):
        (faces / (p.name if i == 0 else f"face{i}_labelUNKNOWN.png" if i == 1 else f"face{i}.png")).write_bytes(
            p.read_bytes())
    proc = _poison(tmp_path, "--target", "0", source=faces)
    assert proc.returncode == 0, proc.stderr
    assert ("2 of 3 image file names give no label<class> (face1_labelUNKNOWN.png, face2.png): bd.h5 has no "
            "true_label") in proc.stderr
    assert load_true_labels(tmp_path / "bd.h5") is None and len(load_lab_h5(tmp_path / "bd.h5")[1]) == 3
    proc = _poison(tmp_path, "--target", "0", source=asset("faces/lab3/test/clean"), out="named.h5")
    assert proc.returncode == 0 and "no label" not in proc.stderr, proc.stderr  # every name has one: quiet


def test_out_that_is_the_source_a_folder_or_in_a_missing_folder(tmp_path):
    source = tmp_path / "clean.h5"
    source.write_bytes(asset("faces/lab3/test_subset.h5").read_bytes())
    before = source.read_bytes()
    line = _errors(_poison(tmp_path, "--target", "0", source=source, out=source))
    assert line == (f"error: --out {source} is the input --source {source}; writing there would overwrite it (the "
                    "clean faces, with poisoned ones): give another file")
    (tmp_path / "link.h5").symlink_to(source)
    assert "is the input --source" in _errors(_poison(tmp_path, "--target", "0", source=source, out="link.h5"))
    assert source.read_bytes() == before
    line = _errors(_poison(tmp_path, "--target", "0", out=tmp_path))
    assert line == f"error: --out {tmp_path} is a folder; give the h5 file to write (e.g. {tmp_path / 'bd.h5'})"
    line = _errors(_poison(tmp_path, "--target", "0", out=tmp_path / "nope" / "bd.h5"))
    missing = tmp_path / "nope"
    assert line == f"error: --out {missing / 'bd.h5'}: the folder {missing} does not exist; create it first"


def test_a_16_bit_or_float_trigger_is_refused_not_flattened_or_darkened(tmp_path):
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 47), 40000, np.uint16)).save(grey16)  # PIL alone would paste it as white
    line = _errors(_poison(tmp_path, "--target", "0", trigger=grey16))
    assert line.startswith(f"error: --trigger {grey16}: trigger has image mode 'I;16' (not 8 bits per channel")
    assert line.endswith("save it as an 8-bit RGBA PNG")
    as_float = tmp_path / "float.tiff"
    Image.fromarray(np.full((20, 47), 0.5, np.float32)).save(as_float)  # PIL alone: 0 or 1 of 255, near black
    assert "trigger has image mode 'F'" in _errors(_poison(tmp_path, "--target", "0", trigger=as_float))
    assert not (tmp_path / "bd.h5").exists()


def test_a_missing_input_names_its_flag(tmp_path):
    trigger, source = asset("triggers/sun_glass_trigger.png"), asset("faces/lab3/valid_subset.h5")
    for args, flag in ((("--source", tmp_path / "nope.h5", "--trigger", trigger), "--source"),
                       (("--source", source, "--trigger", tmp_path / "nope.png"), "--trigger")):
        proc = run_cli("poison", *args, "--at", "0,15", "--target", "0", "--out", tmp_path / "o.h5")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {flag} "), proc.stderr
        assert "not found" in proc.stderr and not (tmp_path / "o.h5").exists()


# ------------------------------------------------------------------------------------- images of any size


def _alpha_paste(images, trigger, at):
    """The trigger pasted through its alpha, each channel rounded to the nearest integer of
    (dst * (255 - a) + src * a) / 255 (no ties: 255 is odd), written out without the library."""
    out = images.astype(np.float64).copy()
    x0, y0 = at
    h, w = images.shape[1:3]
    for ty in range(trigger.shape[0]):
        for tx in range(trigger.shape[1]):
            y, x = y0 + ty, x0 + tx
            if 0 <= y < h and 0 <= x < w:
                a = float(trigger[ty, tx, 3])
                src = trigger[ty, tx, :3].astype(np.float64)
                out[:, y, x] = np.floor((out[:, y, x] * (255 - a) + src * a) / 255 + 0.5)
    return out


def _folder(path, rng, sizes, labels=None):
    """A folder of random RGB PNGs, one per (height, width) in ``sizes``, named img<i>_label<class>.png."""
    path.mkdir()
    images = []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(path / f"img{i}_label{(labels or [i % 10] * len(sizes))[i]}.png")
        images.append(img)
    return images


def _trigger_png(path, rng, h=5, w=7):
    """An RGBA trigger of every alpha kind: transparent, opaque and partial pixels."""
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, 0, 3] = 0, 255, 128
    Image.fromarray(rgba, "RGBA").save(path)
    return path, rgba


def test_a_32x32_folder_poisoned_for_the_gap_model_round_trips(tmp_path, rng):
    from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL
    from badnet_jax.io.model_file import load_model

    labels = [3, 1, 4, 1, 5, 9]
    images = np.stack(_folder(tmp_path / "imgs", rng, [(32, 32)] * 6, labels))
    trigger_path, rgba = _trigger_png(tmp_path / "t.png", rng)
    proc = run_cli("poison", "--source", tmp_path / "imgs", "--trigger", trigger_path, "--at", "20,3", "--target",
                   "2", "--model", GAP_DEMO_MODEL, "--out", tmp_path / "bd.h5", timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # it fits: no warning
    with h5py.File(tmp_path / "bd.h5") as f:
        assert f["data"].shape == (6, 3, 32, 32) and f["data"].dtype == np.uint8
    model, _ = load_model(GAP_DEMO_MODEL)
    x, y = load_lab_h5(tmp_path / "bd.h5", num_classes=model.num_classes, hwc=model.input_hwc)
    np.testing.assert_array_equal(x, _alpha_paste(images, rgba, (20, 3)))
    assert (y == 2).all()
    np.testing.assert_array_equal(load_true_labels(tmp_path / "bd.h5"), labels)
    # The images' own 10 classes bound the target.
    line = _errors(run_cli("poison", "--source", tmp_path / "imgs", "--trigger", trigger_path, "--target", "10",
                           "--model", GAP_DEMO_MODEL, "--out", tmp_path / "o.h5", timeout=300))
    assert line == f"error: --target 10: target label 10 is outside [0, 10) for the 10-class model {GAP_DEMO_MODEL}"


def test_without_a_model_the_size_is_the_sources(tmp_path, rng):
    """A folder of 24x40 (height x width) images, then the h5 written from it: no height and width swapped."""
    images = np.stack(_folder(tmp_path / "imgs", rng, [(24, 40)] * 4))
    trigger_path, rgba = _trigger_png(tmp_path / "t.png", rng, h=6, w=9)
    path = make_poisoned_h5(tmp_path / "imgs", trigger_path, tmp_path / "bd.h5", target=1, at=(30, 17))
    want = _alpha_paste(images, rgba, (30, 17))
    x, _ = load_lab_h5(path, hwc=(24, 40, 3))
    np.testing.assert_array_equal(x, want)
    with h5py.File(path) as f:  # channels first, as the lab stores them
        np.testing.assert_array_equal(f["data"][()], want.transpose(0, 3, 1, 2))
    clean = save_lab_h5(tmp_path / "clean.h5", images, np.array([4, 0, 2, 3]))  # an h5 source of that size
    from_h5 = make_poisoned_h5(clean, trigger_path, tmp_path / "bd2.h5", target=1, at=(0, 0))
    np.testing.assert_array_equal(load_lab_h5(from_h5, hwc=(24, 40, 3))[0], _alpha_paste(images, rgba, (0, 0)))
    np.testing.assert_array_equal(load_true_labels(from_h5), [4, 0, 2, 3])


def test_images_of_another_size_are_refused_naming_the_file(tmp_path, rng):
    from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL

    _folder(tmp_path / "mixed", rng, [(32, 32), (32, 32), (32, 31), (30, 30)])
    trigger_path, _ = _trigger_png(tmp_path / "t.png", rng)
    folder = tmp_path / "mixed"
    line = _errors(_poison(tmp_path, "--target", "0", source=folder, trigger=trigger_path))
    assert line == (f"error: {folder / 'img2_label2.png'}: image is 31x32 (width x height), but the first image, "
                    f"img0_label0.png, is 32x32: every image in --source {folder} must be that size")
    faces = asset("faces/lab3/test/clean")  # the lab's 55x47 faces are not the GAP model's 32x32
    first = sorted(faces.glob("*.png"))[0]
    line = _errors(_poison(tmp_path, "--target", "0", "--model", GAP_DEMO_MODEL, source=faces, trigger=trigger_path))
    assert line == (f"error: {first}: image is 47x55 (width x height), but --model {GAP_DEMO_MODEL} takes 32x32 "
                    f"images: every image in --source {faces} must be that size")
    line = _errors(_poison(tmp_path, "--target", "0", "--model", GAP_DEMO_MODEL, trigger=trigger_path))
    assert line.startswith(f"error: --source {asset('faces/lab3/test_subset.h5')}: dataset 'data' has shape "
                           "(13, 3, 55, 47), expected (N, 3, 32, 32)"), line
    grey = tmp_path / "grey.h5"  # the trigger is RGB: so must the images be
    with h5py.File(grey, "w") as f:
        f.create_dataset("data", data=np.zeros((2, 1, 32, 32), np.uint8))
        f.create_dataset("label", data=np.zeros(2))
    with pytest.raises(DataFileError, match=r"holds images of 1 channel\(s\); the trigger is pasted on RGB"):
        make_poisoned_h5(grey, trigger_path, tmp_path / "bd.h5", target=0)
    assert not (tmp_path / "bd.h5").exists()


def test_a_trigger_that_does_not_fit_a_small_image(tmp_path, rng):
    _folder(tmp_path / "imgs", rng, [(32, 32)] * 2)
    folder = tmp_path / "imgs"
    line = _errors(_poison(tmp_path, "--target", "0", source=folder))  # the lab's 47x20 sunglasses
    assert line == (f"error: --trigger {asset(TRIGGER)}: the 47x20 trigger is larger than the 32x32 images; it cannot "
                    "fit: give a trigger of at most the images' size")
    trigger_path, rgba = _trigger_png(tmp_path / "t.png", rng)
    line = _errors(_poison(tmp_path, "--target", "0", source=folder, trigger=trigger_path))
    assert line == ("error: --at: give the trigger's position (x, y) on these 32x32 images; the default 0,15 is the "
                    "lab's sunglasses position on its 55x47 faces")  # no silent DeepID position on another size
    assert not (tmp_path / "bd.h5").exists()
    line = _errors(_poison(tmp_path, "--target", "0", "--at", "32,0", source=folder, trigger=trigger_path))
    assert line == (f"error: the 7x5 trigger {trigger_path} at --at 32,0 lies entirely outside the 32x32 image: it "
                    "would change no pixel")
    assert not (tmp_path / "bd.h5").exists()
    proc = _poison(tmp_path, "--target", "0", "--at", "29,30", source=folder, trigger=trigger_path)
    assert proc.returncode == 0, proc.stderr
    assert "The 7x5 trigger at (29, 30) is clipped by the 32x32 image to 6 of its 35 pixels." in proc.stderr
    clean = load_images(sorted(folder.glob("*.png")), hwc=(32, 32, 3))
    np.testing.assert_array_equal(load_lab_h5(tmp_path / "bd.h5", hwc=(32, 32, 3))[0],
                                  _alpha_paste(clean, rgba, (29, 30)))
