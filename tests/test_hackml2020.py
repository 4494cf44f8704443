"""Every CSAW-HackML-2020 BadNet through the defense CLI, on real faces (poisoned where the trigger is known)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from badnet_jax import load_images, load_lab_h5, save_lab_h5
from tests.conftest import REPO, asset

MODELS = {  # model -> (its own poisoned PNGs, target) or None where no poisoned face of it is known
    "sunglasses": ("hackml2020_sunglasses_*.png", 0),
    "anonymous_1": ("hackml2020_anonymous1_*.png", 0),
    "anonymous_2": None,
    "multi_trigger_multi_target": None,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cli_runs_every_2020_model(name, tmp_path):
    clean = asset("faces/lab3/valid_subset.h5")
    if MODELS[name] is not None:
        pattern, target = MODELS[name]
        x = load_images(sorted(asset("faces/png").glob(pattern)))
        bd = save_lab_h5(tmp_path / "bd.h5", x, np.full(len(x), target))
    else:  # no trigger of this model is known: the lab's sunglasses faces stand in (ASR is then just measured)
        bd = shutil.copy(asset("faces/lab3/bd_valid_subset.h5"), tmp_path / "bd.h5")
    model = asset(f"models/hackml2020/{name}_bd_weights.h5")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04,0.30",
                           "--model", str(model), "--clean_valid", str(clean), "--bd_valid", str(bd),
                           "--clean_test", str(clean), "--bd_test", str(bd), "--out_dir", str(out),
                           "--nocheckpoints"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((out / "curve.json").read_text())
    assert sorted(curve["order"]) == list(range(60)) and len(curve["selected"]) == 2
    assert curve["targets"] == sorted(set(load_lab_h5(bd)[1].tolist()))
    assert curve["input_scale"] == "255" and curve["original"]["valid_acc"] >= 95.0  # measured, not raw garbage
    if MODELS[name] is not None:
        assert curve["original"]["valid_asr"] == 100.0  # its own poisoned faces do fool it
    for sel in curve["selected"]:
        assert 0.0 <= sel["test_der"] <= 1.0
