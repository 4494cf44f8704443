"""Inputs that used to give silently wrong results (issue 13) are refused with the file and the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from badnet_jax import ConfigError, DataFileError, ModelFileError, init_params, load_keras, load_lab_h5, save_keras
from badnet_jax.io.lab_data import load_true_labels
from badnet_jax.defense.finetune import FinetuneConfig
from tests.conftest import REPO, asset


def _lab_file(path, data, label=None, **extra):
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=np.zeros(len(data)) if label is None else label)
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


def test_pixels_outside_0_255_or_already_divided_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    scaled = _lab_file(tmp_path / "s.h5", rng.random((4, 3, 55, 47)).astype(np.float32))  # pixels / 255
    with pytest.raises(DataFileError, match=r"s\.h5: every pixel is in 0..1"):
        load_lab_h5(scaled)
    wild = _lab_file(tmp_path / "w.h5", rng.uniform(-3000, 7200, (4, 3, 55, 47)).astype(np.float32))
    with pytest.raises(DataFileError, match=r"w\.h5: dataset 'data' holds pixel values from -\d+"):
        load_lab_h5(wild)
    fine = _lab_file(tmp_path / "ok.h5", rng.integers(0, 256, (4, 3, 55, 47)).astype(np.uint8))
    assert load_lab_h5(fine)[0].shape == (4, 55, 47, 3)


@pytest.mark.parametrize("bad", [np.nan, 0.5, -1.0])
def test_true_labels_that_are_not_classes_are_refused(tmp_path, bad):
    data = np.zeros((3, 3, 55, 47), np.uint8)
    p = _lab_file(tmp_path / "t.h5", data, true_label=np.array([1.0, bad, 2.0]))
    with pytest.raises(DataFileError, match=r"t\.h5: dataset 'true_label'"):
        load_true_labels(p)


def test_a_tiny_file_declaring_many_unwritten_images_is_refused(tmp_path):
    p = tmp_path / "fill.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", shape=(300_000, 3, 55, 47), dtype=np.uint8, chunks=(1, 3, 55, 47))
        f.create_dataset("label", data=np.zeros(300_000))
    assert p.stat().st_size < 3_000_000
    with pytest.raises(DataFileError, match="declares 300000 images but stores none"):
        load_lab_h5(p)


def test_finite_but_absurd_weights_are_refused(tmp_path):
    params = init_params(num_classes=3, seed=0)
    params["fc_2"]["kernel"] = np.full((960, 160), 3e38, np.float32)
    path = save_keras(params, tmp_path / "big.h5", full_model=False)
    with pytest.raises(ModelFileError, match=r"big\.h5: layer 'fc_2' kernel holds values up to 3e\+38"):
        load_keras(path)


@pytest.mark.parametrize("field,value", [("data_format", "channels_first"), ("dilation_rate", [2, 2]),
                                         ("filters", 21), ("kernel_size", [5, 5]), ("use_bias", False)])
def test_full_model_configs_the_model_would_not_honour_are_refused(tmp_path, field, value):
    path = save_keras(init_params(num_classes=3, seed=0), tmp_path / "full.h5")
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"]["layers"][1]["config"][field] = value  # conv_1
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ModelFileError, match=r"full\.h5: layer 'conv_1'"):
        load_keras(path)


@pytest.mark.parametrize("kw", [dict(learning_rate=float("nan")), dict(learning_rate=0.0), dict(epochs=0),
                                dict(holdout_fraction=1.0)])
def test_fine_tuning_settings_are_checked_when_made(kw):
    with pytest.raises(ConfigError, match="fine-tuning"):
        FinetuneConfig(**kw)


def test_cli_refuses_a_nan_learning_rate_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--finetune_epochs", "2",
                           "--finetune_lr", "nan", "--model", str(asset("models/lab3/bd_weights.h5")),
                           "--clean_valid", str(asset("faces/lab3/valid_subset.h5")),
                           "--clean_test", str(asset("faces/lab3/test_subset.h5")), "--out_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "learning rate must be a finite positive number" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
