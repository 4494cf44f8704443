"""badnet_jax.defense.report: curve.json round-trips to the very bytes written, and an interrupted write leaves the
previous file whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from badnet_jax.defense import report
from badnet_jax.defense.curve import Curve
from tests.cli import run_cli


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
