"""badnet_jax.defense.report: curve.json round-trips to the very bytes written, and an interrupted write leaves the
previous file whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from badnet_jax.defense import report
from badnet_jax.defense.curve import Curve
from tests.cli import run_cli
from tests.conftest import asset


def _flat_curve() -> Curve:
    ones = np.ones(61)
    return Curve(title="t", num_classes=3, input_scale="raw", rule="absolute", demo=False, order=np.arange(60),
                 mean_activation=np.zeros(60), counts={}, valid_acc=ones, valid_asr=ones, test_acc=ones,
                 test_asr=ones, goodnet_test_acc=ones, goodnet_test_asr=ones, goodnet_detection_rate=ones,
                 goodnet_false_alarm_rate=ones, test_der=ones, targets=(0,))


def test_curve_json_round_trips(lab_dir):
    proc = run_cli("prune", "--drop", "0.04,0.30", "--nocheckpoints", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr
    path = lab_dir / "results" / "curve.json"
    assert report.curve_json_text(report.read_curve_json(path)) == path.read_text()
    assert report.curve_json_text(_flat_curve()) == report.curve_json_text(
        Curve.from_json(json.loads(report.curve_json_text(_flat_curve()))))


def test_interrupted_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    curve = _flat_curve()
    report.write_curve_json(tmp_path / "curve.json", curve)
    before = (tmp_path / "curve.json").read_bytes()
    import matplotlib.figure

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(KeyboardInterrupt):
        report.plot_curve(tmp_path / "curve.png", curve)
    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        report.write_curve_json(tmp_path / "curve.json", curve)
    assert (tmp_path / "curve.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.json"]


@pytest.mark.slow
def test_report_of_odd_inputs_reads_right(lab_dir):
    """A newline in an input's name keeps report.md's table whole; a clean file given as poisoned data is called
    out; 47 validation images (2.13 points each) are called coarse; curve.csv is the lab's CSV layout."""
    odd = lab_dir / "models" / "bd\nweights.h5"
    (lab_dir / "models" / "bd_weights.h5").rename(odd)
    proc = run_cli("prune", "--drop", "0.04,0.30", "--nocheckpoints", "--model", odd,
                   "--clean_valid", "data/cl/valid.h5", "--bd_valid", "data/bd/bd_valid.h5",
                   "--clean_test", "data/cl/test.h5", "--bd_test", "data/cl/test.h5", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "13 of 13 images of the poisoned set bd_test are pixel for pixel clean images" in proc.stderr
    assert "bd_valid are pixel" not in proc.stderr  # the real poisoned set is not accused
    assert "one validation image is 2.13 points of accuracy (47 clean validation images)" in proc.stderr
    out = lab_dir / "results"
    md = (out / "report.md").read_text()
    warnings = md.split("## Warnings\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(warnings) == 2 and "bd_test" in warnings[0] and "2.13 points" in warnings[1], warnings
    inputs = md.split("## Inputs\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = [inputs[0], *inputs[2:]]
    assert len(rows) == 1 + 5 and all(line.startswith("| ") and line.count(" | ") == 3 for line in rows), inputs
    assert "/models/bd\\nweights.h5`" in inputs[2]
    curve = json.loads((out / "curve.json").read_text())
    lab_csv = [line for line in asset("reference/lab3_prune_curve.csv").read_text().splitlines()
               if not line.startswith("#")]
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0] == lab_csv[0] and len(rows) == len(lab_csv) == 61
    for k, row in enumerate(rows[1:], 1):
        cells = row.split(",")
        assert int(cells[0]) == k and int(cells[1]) == curve["order"][k - 1]
        assert float(cells[2]) == pytest.approx(curve["mean_activation"][curve["order"][k - 1]], rel=1e-6, abs=1e-6)
        for cell, key in zip(cells[3:], ("valid_acc", "valid_asr", "test_acc", "test_asr")):
            assert float(cell) == pytest.approx(curve[key][k], abs=1e-6)


@pytest.mark.slow
def test_curve_csv_leaves_absent_sets_empty(lab_dir):
    proc = run_cli("prune", "--drop", "0.04", "--nocheckpoints", "--model", "models/bd_weights.h5",
                   "--clean_valid", "data/cl/valid.h5", "--clean_test", "data/cl/test.h5", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r.split(",") for r in (lab_dir / "results" / "curve.csv").read_text().splitlines()[1:]]
    assert len(rows) == 60 and all(r[4] == "" and r[6] == "" and r[3] and r[5] for r in rows)


@pytest.mark.parametrize("backend,imported", [(None, "True"), ("invalid", "False")])
def test_plotting_is_preloaded_unless_mplbackend_is_set(backend, imported):
    # The defense imports matplotlib in a worker thread during the sweep; with MPLBACKEND set it leaves that to
    # the plot itself, which sets the variable aside (a second thread must not touch the environment).
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    if backend:
        env["MPLBACKEND"] = backend
    code = ("import sys; from badnet_jax.defense.report import preload_plotting; preload_plotting(); "
            "print('matplotlib.figure' in sys.modules, 'matplotlib.backends.backend_agg' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [imported, imported]
