"""badnet_jax.defense.curve: the drop thresholds a curve is cut at, checked before any work; the ASR excluding the
target class, and none where no poisoned input is of another class."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax.defense.curve import LabeledPreds, check_drops, evaluate_curve, select_cuts
from badnet_jax.defense.report import curve_json_text


@pytest.mark.parametrize("drops,complaint", [
    ((4.0,), "did you mean 0.04 (4 points)?"),
    ((0.0,), "not a fraction between 0 and 1"),
    ((-0.1,), "not a fraction between 0 and 1"),
    ((1.0,), "did you mean 0.01 (1 point)?"),
    ((float("nan"),), "not a finite number"),
    ((float("inf"),), "not a finite number"),
    ((0.04, 0.04), "is given twice"),
    ((0.041, 0.0410000001), "would share drop_4.1/"),
    ((), "no drop threshold given"),
])
def test_drops_are_checked(drops, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        check_drops(drops)


def test_good_drops_pass():
    assert check_drops((0.02, 0.04, 0.1, 0.3)) == (0.02, 0.04, 0.1, 0.3)


def _curve(true_labels):
    rng = np.random.default_rng(0)
    preds = lambda n: rng.integers(0, 4, (61, n))
    valid, test = (LabeledPreds(preds(20), rng.integers(0, 4, 20)) for _ in range(2))
    bd_valid, bd_test = (LabeledPreds(preds(10), np.zeros(10, np.int64)) for _ in range(2))
    curve = evaluate_curve(valid, bd_valid, test, bd_test, np.arange(60), np.zeros(60), 4, "absolute", "t",
                           bd_test_true_labels=true_labels)
    return dataclasses.replace(curve, selected=select_cuts(curve, (0.04,), valid, test, bd_test)), bd_test


def test_asr_excluding_the_target_is_absent_when_every_poisoned_input_is_of_the_target_class():
    # Some true classes differ from the target: the ASR over those, at every k and at the cut.
    true = np.array([0, 1, 2, 3] * 2 + [0, 0])
    curve, bd_test = _curve(true)
    keep = true != 0
    np.testing.assert_allclose(curve.test_asr_excluding_target, 100 * (bd_test.preds[:, keep] == 0).mean(1))
    assert json.loads(curve_json_text(curve))["selected"][0]["test_asr_excluding_target"] is not None
    # None differ: no number (not NaN, which is not JSON); the text is strict JSON without the key.
    curve, _ = _curve(np.zeros(10, np.int64))
    text = curve_json_text(curve)
    assert "NaN" not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in curve.json"))
    assert "test_asr_excluding_target" not in doc and "test_asr_excluding_target" not in doc["selected"][0]
