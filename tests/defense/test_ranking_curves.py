"""badnet_jax.defense.ranking_curves: a defense run that compares rankings side by side, each ranking's curve and
cuts recomputed with the float64 NumPy network and the lab's stop rule by hand.
"""

from __future__ import annotations

import json
from fractions import Fraction

import h5py
import numpy as np
import pytest

from badnet_jax import load_keras
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from badnet_jax.defense.report import read_curve_json
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref
from tests.conftest import LAB_B, LAB_FILES, asset


def _cut(hits, total, drop):
    """The lab's rule by hand: first k with accuracy more than X points below k = 0's."""
    for k, h in enumerate(hits):
        if Fraction(int(hits[0]) - int(h), total) > Fraction(str(drop)):
            return k
    return len(hits) - 1


@pytest.mark.slow
def test_defense_compares_rankings_side_by_side(tmp_path, lab_b):
    files = {role: str(asset(rel)) for role, rel in LAB_FILES.items()}
    drops = (0.02, 0.30)
    rankings = RankingOptions(rank_by=("clp", "activation", "random"), random_orders=2, seed=3)
    curve = run_defense(DefenseConfig(drops=drops, model=str(asset(LAB_B)), out_dir=str(tmp_path / "out"),
                                      checkpoints=False, rankings=rankings, **files))
    assert list(curve.rankings) == ["clp", "activation", "random"]
    clp = curve.rankings["clp"]
    np.testing.assert_array_equal(curve.order, clp.orders[0])  # the first ranking is the defense's
    np.testing.assert_array_equal(curve.test_acc, clp.test_acc[0])
    assert [c.channels_pruned for c in curve.selected] == [c.channels_pruned[0] for c in clp.selected]
    _, params = lab_b
    data = {role: _read(path) for role, path in files.items()}
    feats = {role: numpy_ref.pool3(params, x) for role, (x, _) in data.items()}
    # The lab's ranking itself: increasing float64 mean activation on clean validation data, ties by index.
    np.testing.assert_array_equal(curve.rankings["activation"].orders[0],
                                  numpy_ref.activation_order(params, data["clean_valid"][0]))
    for name, r in curve.rankings.items():
        for i, order in enumerate(r.orders):
            hits = {}
            for role, (x, y) in data.items():
                preds = np.stack([numpy_ref.head(params, feats[role], numpy_ref.step_mask(order, k)).argmax(-1)
                                  for k in range(61)])
                hits[role] = (preds == y).sum(1)
                key = {"clean_valid": "valid_acc", "bd_valid": "valid_asr", "clean_test": "test_acc",
                       "bd_test": "test_asr"}[role]
                np.testing.assert_allclose(getattr(r, key)[i], 100 * hits[role] / len(y), err_msg=f"{name} {key}")
            for cut, drop in zip(r.selected, drops):
                assert cut.channels_pruned[i] == _cut(hits["clean_valid"], len(data["clean_valid"][1]), drop)
    written = read_curve_json(tmp_path / "out" / "curve.json")
    assert list(written.rankings) == ["clp", "activation", "random"]  # the order asked, though the file sorts keys
    for name, r in curve.rankings.items():
        np.testing.assert_array_equal(written.rankings[name].orders, r.orders)
        np.testing.assert_allclose(written.rankings[name].test_asr, r.test_asr)
        for got, want in zip(written.rankings[name].selected, r.selected):  # curve.json rounds to 6 decimals
            assert got.channels_pruned == want.channels_pruned
            np.testing.assert_allclose(np.array([got.valid_acc, got.test_acc, got.test_asr, got.test_der], float),
                                       np.array([want.valid_acc, want.test_acc, want.test_asr, want.test_der], float),
                                       atol=1e-6)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Rankings compared" in report and "| random (R=2) |" in report and "| clp |" in report
    assert (tmp_path / "out" / "rankings.png").stat().st_size > 10_000


def _read(path):
    """The lab h5 layout read by hand (not through badnet_jax): NHWC images and integer labels."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["data"]).transpose(0, 2, 3, 1), np.asarray(f["label"]).astype(int)


def test_one_ranking_writes_no_comparison(tmp_path):
    files = {role: str(asset(rel)) for role, rel in LAB_FILES.items()}
    run_defense(DefenseConfig(model=str(asset(LAB_B)), out_dir=str(tmp_path), checkpoints=False,
                              rankings=RankingOptions(rank_by=("l1",)), **files))
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert "rankings" not in curve and not (tmp_path / "rankings.png").exists()
    l1 = resolve_rankings(RankingOptions(rank_by=("l1",)), load_keras(asset(LAB_B))[1], DeepID()).given[0]
    assert curve["order"] == l1.tolist()
