"""badnet_jax.models.predict: single forwards of a model other than DeepID settled within the near-tie bound of the
weights at hand (the real tf_keras resnet_tiny), answers checked against float64 NumPy on its graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from badnet_jax.io.model_file import load_model
from badnet_jax.models.predict import predict_settled
from badnet_jax.numerics import tie_bound
from badnet_jax.numerics.ties import TIE_RTOL, U
from tests import numpy_ref
from tests.conftest import asset

RESNET = "models/other/resnet_tiny.h5"
# A bound of 4 S flags every prediction: a top-2 gap is never above 2 S.
FLAGS_ALL = 4 / (10 * U)


@pytest.fixture(scope="module")
def resnet():
    model, params = load_model(asset(RESNET), "255")
    x = np.load(asset(RESNET.replace(".h5", "_reference.npz")))["images"]
    return model, params, x


def _float64(model, params, x, mask=None) -> np.ndarray:
    masks = None if mask is None else {model.layer: mask}
    return numpy_ref.graph_values64(model.graph, params, x / 255.0, masks=masks)[model.graph.logits_node()].argmax(-1)


def test_an_unmeasured_bound_is_measured_on_the_weights_and_images_given(resnet, monkeypatch):
    model, params, x = resnet
    assert not model.tie_rtol_measured
    seen = []

    def measured(m, p, images, seed=0):  # a stand-in measurement, wide enough to flag every prediction
        seen.append((p, len(images)))
        return FLAGS_ALL

    monkeypatch.setattr(tie_bound, "measured_gap_error", measured)
    mask = np.ones(model.num_channels, np.float32)
    mask[::2] = 0
    preds, settled = predict_settled(model, params, x, mask)
    assert [(p is params, n) for p, n in seen] == [(True, len(x))]
    # Every prediction was flagged within the measured bound and settled: the float64 network's answers.
    assert settled == len(x)
    np.testing.assert_array_equal(preds, _float64(model, params, x, mask))


def test_a_measured_model_is_used_as_given(resnet, monkeypatch):
    model, params, x = resnet

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    given = dataclasses.replace(model, tie_rtol=TIE_RTOL, tie_rtol_measured=True)
    monkeypatch.setattr(tie_bound, "measured_gap_error", refuse)
    preds, _ = predict_settled(given, params, x)
    np.testing.assert_array_equal(preds, _float64(model, params, x))
