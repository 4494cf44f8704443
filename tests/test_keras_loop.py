"""scripts/keras_loop.py (the seed's loop in Keras) and scripts/versus_keras.py (both timed side by side).

The Keras loop is an independent oracle: Keras 3 (the test extra's, JAX backend) loads the lab's B, ranks
and prunes channel by channel with ``set_weights`` and ``model.predict``; its whole curve on the real lab
subsets must be what ``prune.py`` writes to curve.json for the same files, exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tests.keras_oracle  # noqa: F401 (sets KERAS_BACKEND=jax before keras is imported)
from badnet_jax import load_keras, mask_from_zeroed
from tests.cli import run_cli
from tests.conftest import LAB_B, LAB_FILES, asset

RATES = ("valid_acc", "valid_asr", "test_acc", "test_asr")
DROPS = "0.02,0.04,0.10,0.30"


def _files() -> list[str]:
    return [f"--model={asset(LAB_B)}", *(f"--{role}={asset(rel)}" for role, rel in LAB_FILES.items())]


def _keras_env() -> dict[str, str]:
    pytest.importorskip("keras")  # the test extra's Keras 3, run with its JAX backend
    return {**os.environ, "KERAS_BACKEND": "jax"}


@pytest.mark.slow
def test_keras_loop_gives_prune_py_curve_on_the_real_subsets(tmp_path):
    proc = run_cli("prune", "--drop", DROPS, "--nocheckpoints", "--out_dir", tmp_path / "results", *_files())
    assert proc.returncode == 0, proc.stderr[-2000:]
    curve = json.loads((tmp_path / "results/curve.json").read_text())
    proc = run_cli("keras_loop", "--drops", DROPS, "--save_dir", tmp_path / "keras", "--out", tmp_path / "k.json",
                   *_files(), env=_keras_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    keras = json.loads((tmp_path / "k.json").read_text())

    assert keras["backend"] == "jax" and keras["steps_run"] == 60
    assert keras["counts"] == curve["counts"]
    assert keras["order"] == curve["order"]
    np.testing.assert_allclose(keras["mean_activation"], curve["mean_activation"], rtol=1e-5, atol=1e-6)
    for key in RATES:  # curve.json prints rates to 6 decimals; a rate that differs does so by a whole image
        np.testing.assert_allclose(keras[key], curve[key], rtol=0, atol=1e-6, err_msg=key)
    cuts = {float(s["drop"]): s["channels_pruned"] for s in curve["selected"] if s["crossed"]}
    assert {float(d): k for d, k in keras["cuts"].items()} == cuts
    assert len(cuts) == 4  # the subsets cross every drop: the comparison covers the whole curve's tail
    # Each B' the Keras loop saved (a Keras h5, read here by badnet-jax) prunes exactly the order's first k.
    for drop, k in keras["cuts"].items():
        _, params = load_keras(keras["saved"][drop])
        pruned = np.flatnonzero(np.asarray(mask_from_zeroed(params)) == 0)
        assert sorted(pruned) == sorted(curve["order"][:k]), drop


def test_versus_keras_reports_both_runs_and_their_ratio(tmp_path):
    out = tmp_path / "versus.json"
    proc = run_cli("versus_keras", "--steps", "1", "--keras_backend", "jax", "--out", out, *_files(), env=_keras_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    jax_run, keras_run = result["badnet_jax"], result["keras"]
    assert result["machine"]["cpu"] and result["machine"]["logical_cpus"] >= 1
    assert result["counts"] == {"valid": 47, "bd_valid": 53, "test": 13, "bd_test": 13}
    assert result["repeats"] == 1 and len(jax_run["wall_s"]) == len(keras_run["wall_s"]) == 1
    assert keras_run["backend"] == "jax" and keras_run["steps_run"] == 1
    assert jax_run["median_s"] == jax_run["wall_s"][0] > 0
    # One step run: the other 59 cost what it cost.
    # Each run's own phases, in the order of wall_s.
    assert len(jax_run["timings"]) == len(keras_run["timings"]) == 1
    assert jax_run["timings"][0]["curve (one call)"] > 0
    step = keras_run["timings"][0]["step_s"][0]
    assert keras_run["median_scaled_60_s"] == pytest.approx(keras_run["wall_s"][0] + 59 * step)
    assert result["ratio"] == pytest.approx(keras_run["median_scaled_60_s"] / jax_run["median_s"])
    assert result["agreement"] == {"steps_compared": 1, "same_order": True, "rate_mismatches": [],
                                   "same_cuts": True, "agree": True}
    assert os.listdir(tmp_path) == ["versus.json"]  # written atomically: no temporary file left beside it
    assert f"ratio {result['ratio']:.1f}x" in proc.stdout


def test_versus_keras_refuses_missing_files_and_bad_drops_before_any_run(tmp_path):
    proc = run_cli("versus_keras", "--lab_dir", tmp_path, "--out", tmp_path / "v.json")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: model: {tmp_path}/models/bd_net.h5: file not found")
    proc = run_cli("versus_keras", "--drop", "4", "--out", tmp_path / "v.json", *_files())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: --drop 4 is not a fraction between 0 and 1 (0.04 = 4 "
                                                    "points); did you mean 0.04 (4 points)?")
    assert not (tmp_path / "v.json").exists()
