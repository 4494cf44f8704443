"""badnet-poison (scripts/poison.py, badnet_jax.commands.poison) and the library call behind it,
badnet_jax.io.lab_data.make_poisoned_h5, against the lab's own poisoned files, bit for bit."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from badnet_jax import DataFileError, load_images, load_lab_h5
from badnet_jax.io.lab_data import load_true_labels, make_poisoned_h5
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
    want = load_images(sorted(asset("faces/lab3/test/sunglasses").glob("*.png")))  # the lab's renderings
    np.testing.assert_array_equal(x, want)
    assert (y == 7).all()
    np.testing.assert_array_equal(load_true_labels(path), [int(p.stem.split("label")[1]) for p in clean])


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(DataFileError, match="holds no .png"):
        make_poisoned_h5(tmp_path, asset(TRIGGER), tmp_path / "o.h5", target=0)
    with pytest.raises(DataFileError, match="target label 5000 is outside"):
        make_poisoned_h5(asset("faces/lab3/test_subset.h5"), asset(TRIGGER), tmp_path / "o.h5", 5000, num_classes=1283)
    with pytest.raises(DataFileError, match="trigger file not found"):
        make_poisoned_h5(asset("faces/lab3/test_subset.h5"), tmp_path / "none.png", tmp_path / "o.h5", target=0)
    assert not (tmp_path / "o.h5").exists()
    proc = run_cli("poison", "--source", "x.h5", "--trigger", "t.png", "--target", "0", "--out", "o.h5", "--at",
                   "1,2,3", timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "--at must be two integers" in proc.stderr
