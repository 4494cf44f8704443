"""The stop rule (against the lab's published curve) and GoodNet rates (against hand-counted cases)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from badnet_jax import ConfigError, metrics
from tests.conftest import asset

LAB_VALID_N = 11547


def test_published_lab_curve_gives_published_cuts():
    with open(asset("reference/lab3_prune_curve.csv")) as f:
        rows = [r for r in csv.reader(line for line in f if not line.startswith("#"))][1:]
    acc = [98.64899974019225] + [float(r[3]) for r in rows]  # k = 0 is the unpruned B
    hits = np.rint(np.array(acc) * LAB_VALID_N / 100).astype(int)
    np.testing.assert_allclose(100 * hits / LAB_VALID_N, acc, atol=1e-9)  # the counts behind the curve
    cuts = {x: metrics.first_crossing(hits, LAB_VALID_N, x)[0] for x in (0.02, 0.04, 0.10, 0.30)}
    assert cuts == {0.02: 45, 0.04: 48, 0.10: 52, 0.30: 54}


def test_exactly_x_points_is_not_a_crossing():
    hits = np.array([100, 97, 96, 95, 10])
    assert metrics.first_crossing(hits, 100, 0.04) == (3, True)  # 96 is exactly 4 points down: not crossed
    assert metrics.first_crossing(hits, 100, 0.03) == (2, True)
    assert metrics.first_crossing(hits, 100, 0.0) == (1, True)  # any loss at all
    assert metrics.first_crossing(hits, 100, 0.95) == (4, False)  # never crossed: last k, flagged


def test_relative_rule():
    hits = np.array([50, 45, 44, 30])  # original accuracy 50%
    assert metrics.first_crossing(hits, 100, 0.10, "relative") == (2, True)  # 10% of 50 = 5 hits
    assert metrics.first_crossing(hits, 100, 0.10, "absolute") == (3, True)  # 10 points = 10 hits
    with pytest.raises(ValueError):
        metrics.first_crossing(hits, 100, 0.1, "sideways")


def test_goodnet_rates_by_hand():
    n = 10
    pred_b_clean, pred_p_clean = np.array([1, 2, 3, 4]), np.array([1, 2, 9, 4])
    pred_b_bd, pred_p_bd = np.array([0, 0, 0, 5]), np.array([7, 0, 8, 5])
    g_clean = metrics.goodnet_predictions(pred_b_clean, pred_p_clean, n)
    g_bd = metrics.goodnet_predictions(pred_b_bd, pred_p_bd, n)
    np.testing.assert_array_equal(g_clean, [1, 2, 10, 4])
    np.testing.assert_array_equal(g_bd, [10, 0, 10, 5])
    r = metrics.goodnet_rates(g_clean, np.array([1, 2, 3, 5]), g_bd, np.zeros(4, int), n)
    assert (r.acc, r.asr, r.detection_rate, r.false_alarm_rate) == (50.0, 25.0, 50.0, 25.0)


def test_der_by_hand():
    # ASR 100 -> 10 (dASR 0.9), accuracy 98 -> 94 (dACC 0.04): (0.9 - 0.04 + 1) / 2 = 0.93
    assert metrics.der(98.0, 100.0, 94.0, 10.0) == pytest.approx(0.93)
    assert metrics.der(98.0, 100.0, 99.0, 100.0) == pytest.approx(0.5)  # nothing gained, nothing lost
    np.testing.assert_allclose(metrics.der(90.0, 80.0, np.array([90.0, 0.0]), np.array([0.0, 0.0])), [0.9, 0.45])


def test_asr_excluding_target_and_by_target():
    preds = np.array([[0, 0, 4, 4], [1, 0, 4, 2]])
    y_bd = np.array([0, 0, 4, 4])
    y_true = np.array([0, 7, 4, 9])  # images 0 and 2 already belong to their target class
    np.testing.assert_allclose(metrics.asr_excluding_target(preds, y_bd, y_true), [100.0, 50.0])
    assert metrics.asr_by_target(preds[1], y_bd) == {0: 50.0, 4: 50.0}
    assert metrics.asr_excluding_target(preds, y_bd, y_bd) is None  # no such input: no number (JSON has no NaN)


def test_hits_and_accuracy_per_row_and_for_one_row():
    preds = np.array([[0, 1, 2], [0, 0, 0]])
    labels = np.array([0, 1, 1])
    np.testing.assert_array_equal(metrics.hits(preds, labels), [2, 1])
    np.testing.assert_allclose(metrics.accuracy(preds, labels), [200 / 3, 100 / 3])
    assert metrics.hits(preds[0], labels) == 2 and metrics.accuracy(preds[1], labels) == 100 / 3
    assert metrics.accuracy(np.zeros((0,), int), np.zeros((0,), int)) == 0.0  # an empty set, not a crash


def test_labels_that_are_not_one_per_prediction_are_refused():
    with pytest.raises(ConfigError, match=r"labels: shape \(4,\) for predictions of shape \(5,\)") as err:
        metrics.accuracy(np.arange(5), np.arange(4))
    assert err.value.field == "labels"
    with pytest.raises(ConfigError, match=r"labels: shape \(2, 5\) for predictions of shape \(3, 5\)"):
        metrics.accuracy(np.zeros((3, 5), int), np.zeros((2, 5), int))
    np.testing.assert_array_equal(metrics.accuracy(np.array([[1, 2], [1, 0]]), np.array([1, 2])), [100.0, 50.0])
