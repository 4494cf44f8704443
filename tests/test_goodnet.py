"""GoodNet on real faces, against predictions of B and B' computed separately."""

from __future__ import annotations

import jax
import numpy as np

from badnet_jax import load_keras, make_goodnet, mask_from_zeroed
from tests import numpy_ref
from tests.conftest import asset


def test_goodnet_flags_sunglasses_with_strongly_pruned_b_prime(lab_b, lab_faces):
    model, params = lab_b
    _, params30 = load_keras(asset("models/lab3_repaired/full_model_drop30.h5"))
    for goodnet, variables in (make_goodnet(params, pruned_params=params30),
                               make_goodnet(params, mask=mask_from_zeroed(params30))):
        apply = jax.jit(goodnet.apply)
        for name in ("bd_valid_subset", "bd_test_subset", "valid_subset", "test_subset"):
            x, y = lab_faces[name]
            pred = np.asarray(apply(variables, x))
            pb = numpy_ref.forward(params, x).argmax(-1)
            pp = numpy_ref.forward(params30, x).argmax(-1)
            np.testing.assert_array_equal(pred, np.where(pb == pp, pb, 1283))
            if name.startswith("bd_"):
                assert (pb == 0).all()  # B is fooled by every sunglasses face ...
                assert (pred == 1283).mean() > 0.9  # ... and G flags (nearly) all of them
            assert pred.min() >= 0 and pred.max() <= 1283


def test_goodnet_scores_are_a_distribution_with_argmax_equal_prediction(lab_b, lab_faces):
    _, params = lab_b
    _, params30 = load_keras(asset("models/lab3_repaired/full_model_drop30.h5"))
    goodnet, variables = make_goodnet(params, pruned_params=params30)
    x = np.concatenate([lab_faces["test_subset"][0], lab_faces["bd_test_subset"][0]])
    scores = np.asarray(goodnet.apply(variables, x, method=goodnet.scores))
    assert scores.shape == (len(x), 1284)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(scores.argmax(-1), np.asarray(goodnet.apply(variables, x)))


def test_identical_b_and_b_prime_never_flag(lab_b, lab_faces):
    _, params = lab_b
    goodnet, variables = make_goodnet(params, pruned_params=params)
    x, y = lab_faces["valid_subset"]
    np.testing.assert_array_equal(np.asarray(goodnet.apply(variables, x)), y)
