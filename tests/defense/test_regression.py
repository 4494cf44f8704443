"""Regression pin: run_defense's curve.json on the real lab subsets and on the two embedded examples, against
tests/golden/.

The golden files pin what a refactoring must not change: every rate, the order, the cuts, the input scale
and the fine-tuned numbers. Timings, versions and input paths are not results and are left out of the
comparison. The numbers themselves are checked against independent references elsewhere (test_pipeline.py,
tests/sweep/); this file guards against a change of behaviour. What is certified (the curve, the cuts, the
settled predictions) must match exactly; what training produces (the fine-tuned numbers) to 0.1%, and the
mean activations to 2e-6 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from tests.conftest import GOLDEN, LAB_B, LAB_FILES, asset


def _results(curve_json: Path) -> dict:
    curve = json.loads(curve_json.read_text())
    for key in ("timings", "versions", "inputs"):
        curve.pop(key, None)
    return _without_seconds(curve)


def _without_seconds(obj):
    """The structure without any ``seconds`` entry (fine-tuning reports wall time per epoch)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _same(got, want, path: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(set(got) ^ set(want))}"
        for key in want:
            _same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        # Mean activations are float64 sums printed to 6 decimals; their 7th significant digit may move
        # with the summation order, every rate must not.
        rel = 2e-6 if path.startswith(".mean_activation") else 0
        if ".finetuned." in path:
            # Fine-tuning is float32 training: its trajectory is not bit-reproducible across CPUs (XLA sums
            # in other orders per CPU), so its numbers hold to 0.1%; a rate differs by a whole image or not at all.
            rel = 1e-3
        assert got == pytest.approx(want, abs=1e-6, rel=rel, nan_ok=True), path
    else:
        assert got == want, path


def test_lab_subsets_curve_is_pinned(tmp_path):
    files = {role: str(asset(rel)) for role, rel in LAB_FILES.items()}
    run_defense(DefenseConfig(drops=(0.02, 0.04, 0.10, 0.30), model=str(asset(LAB_B)), out_dir=str(tmp_path),
                              finetune=_finetune(2), **files))
    _same(_results(tmp_path / "curve.json"), json.loads((GOLDEN / "lab_curve.json").read_text()))


def test_demo_curve_is_pinned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_defense(DefenseConfig(drops=(0.04, 0.30), out_dir="results"))
    _same(_results(tmp_path / "results" / "curve.json"), json.loads((GOLDEN / "demo_curve.json").read_text()))


def test_gapnet_example_curve_is_pinned(tmp_path):
    """The second embedded example (a 32x32 BatchNorm CNN with a global-average-pooling head, not DeepID)."""
    run_defense(DefenseConfig(drops=(0.02, 0.04, 0.10, 0.30), example="gapnet", out_dir=str(tmp_path)))
    got = _results(tmp_path / "curve.json")
    assert got["model"]["layer"] == "relu_3" and got["input_scale"] == "255"
    _same(got, json.loads((GOLDEN / "gapnet_curve.json").read_text()))


def _finetune(epochs: int):
    from badnet_jax.defense.finetune import FinetuneConfig

    return FinetuneConfig(epochs=epochs, learning_rate=1e-4)
