"""GoodNet on real faces, against predictions of B and B' computed separately."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from badnet_jax import (ConfigError, DataFileError, init_params, load_keras, make_goodnet, mask_from_zeroed,
                        predict_goodnet)
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref
from tests.conftest import asset


def test_goodnet_flags_sunglasses_with_strongly_pruned_b_prime(lab_b, lab_faces):
    model, params = lab_b
    _, params30 = load_keras(asset("models/lab3_repaired/full_model_drop30.h5"))
    for goodnet, variables in (make_goodnet(model, params, pruned_params=params30),
                               make_goodnet(model, params, mask=mask_from_zeroed(params30))):
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
    model, params = lab_b
    _, params30 = load_keras(asset("models/lab3_repaired/full_model_drop30.h5"))
    goodnet, variables = make_goodnet(model, params, pruned_params=params30)
    x = np.concatenate([lab_faces["test_subset"][0], lab_faces["bd_test_subset"][0]])
    scores = np.asarray(goodnet.apply(variables, x, method=goodnet.scores))
    assert scores.shape == (len(x), 1284)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(scores.argmax(-1), np.asarray(goodnet.apply(variables, x)))


def test_identical_b_and_b_prime_never_flag(lab_b, lab_faces):
    model, params = lab_b
    goodnet, variables = make_goodnet(model, params, pruned_params=params)
    x, y = lab_faces["valid_subset"]
    np.testing.assert_array_equal(np.asarray(goodnet.apply(variables, x)), y)


def test_make_goodnet_refuses_a_mask_that_scales_or_has_another_shape():
    params = init_params(num_classes=6, seed=1)
    model = DeepID(6)
    mask = np.ones(60, np.float32)
    mask[7] = 2.0
    with pytest.raises(ConfigError, match=r"mask: channel 7 is 2 \(1 of 60 entries are neither 0 nor 1\); expected 0 "
                                          r"\(pruned\) or 1 \(kept\): a mask prunes, it does not scale") as err:
        make_goodnet(model, params, mask=mask)
    assert err.value.field == "mask"
    with pytest.raises(ConfigError, match=r"mask: shape \(59,\), expected \(60,\)"):
        make_goodnet(model, params, mask=np.ones(59))
    with pytest.raises(ConfigError, match=r"make_goodnet needs pruned_params, a mask, or both"):
        make_goodnet(model, params)
    with pytest.raises(ConfigError, match=r"pruned_params: 5 classes, expected the model's 6"):
        make_goodnet(model, params, pruned_params=init_params(num_classes=5))
    with pytest.raises(ConfigError, match=r"make_goodnet takes B's model first: make_goodnet\(model, params, mask=...\)"):
        make_goodnet(params, mask=np.ones(60))  # params first: the model (its input scale) has no default


def test_predict_goodnet_refuses_variables_of_another_class_count(rng):
    goodnet5, _ = make_goodnet(DeepID(5), init_params(num_classes=5), mask=np.ones(60))
    _, variables6 = make_goodnet(DeepID(6), init_params(num_classes=6), mask=np.ones(60))
    x = rng.integers(0, 256, size=(3, 55, 47, 3)).astype(np.uint8)
    # G's "poisoned" answer 5 would be B's real class 5.
    with pytest.raises(ConfigError, match=r"variables: B has 6 classes but the GoodNet \(goodnet\) has 5: its "
                                          r"\"poisoned\" answer 5 is a real class of B"):
        predict_goodnet(goodnet5, variables6, x)
    goodnet6, _ = make_goodnet(DeepID(6), init_params(num_classes=6), mask=np.ones(60))
    with pytest.raises(DataFileError, match=r"x_NxHxWxC: images of shape \(3, 47, 55, 3\), expected \(N, 55, 47, 3\)"):
        predict_goodnet(goodnet6, variables6, np.swapaxes(x, 1, 2))
    with pytest.raises(ConfigError, match=r"variables: expected a GoodNet's variables"):
        predict_goodnet(goodnet6, variables6["params"], x)
    preds, _ = predict_goodnet(goodnet6, variables6, x)  # B' = B: G answers B's class
    assert preds.shape == (3,) and preds.max() < 6


def test_b_and_a_fine_pruned_b_prime_of_any_cnn_settle_within_the_bounds_of_their_own_weights(monkeypatch):
    """A model other than DeepID: predict_goodnet settles B within the bound measured on B's weights and a B' with
    its own weights within the bound measured on those (here made to differ per weights: B' errs as its weights
    do); B' as B under a mask is measured once, as B. Answers checked against float64 NumPy on B's graph."""
    from badnet_jax.io.model_file import load_model
    from badnet_jax.models import predict as predict_module
    from badnet_jax.numerics import tie_bound
    from badnet_jax.numerics.ties import U

    resnet = "models/other/resnet_tiny.h5"
    model, params = load_model(asset(resnet), "255")
    x = np.load(asset(resnet.replace(".h5", "_reference.npz")))["images"]
    tuned = jax.tree.map(lambda a: np.asarray(a) * np.float32(1.01), params)

    def error_of(p):  # 100 to 200 roundings, told apart by the weights
        return 100.0 + float(sum(np.abs(np.asarray(a, np.float64)).sum() for a in jax.tree.leaves(p))) % 100

    measured, flagged_with = [], []
    monkeypatch.setattr(tie_bound, "measured_gap_error", lambda m, p, xs, seed=0: measured.append(p) or error_of(p))
    real_top2 = predict_module._top2_fn  # the float32 forward that flags near-ties, built for the model it flags with
    monkeypatch.setattr(predict_module, "_top2_fn", lambda m: flagged_with.append(m) or real_top2(m))
    logits = lambda p: numpy_ref.graph_logits64(model.graph, p, x / 255.0)
    preds, _ = predict_goodnet(*make_goodnet(model, params, pruned_params=tuned), x)
    pb, pp = logits(params).argmax(-1), logits(tuned).argmax(-1)
    np.testing.assert_array_equal(preds, np.where(pb == pp, pb, model.num_classes))
    # B, then B', each flagged within the bound of its own weights.
    bounds = [m.tie_rtol for m in flagged_with]
    assert bounds == [pytest.approx(10 * error_of(params) * U), pytest.approx(10 * error_of(tuned) * U)]
    assert bounds[0] != pytest.approx(bounds[1])
    measured.clear()
    predict_goodnet(*make_goodnet(model, params, mask=np.ones(model.num_channels)), x)
    assert len(measured) == 1 and measured[0] is params
