"""badnet_jax.numerics.settling: what float32 cannot decide is decided in float64, so the curve does not depend on
summation order.

The reference is tests/numpy_ref.py (float64 NumPy, no badnet_jax code): the float64 logits, trunks and channel
means the settling uses are checked against it, the ranking tolerances against the float32 and float64 errors
measured here, and near-ties of the ranking (two channel means, in float32 or in float64) are ordered as the
NumPy network orders them.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from badnet_jax import load_keras
from badnet_jax import sweep as sw
from badnet_jax.model import BadNet
from badnet_jax.numerics import settling
from badnet_jax.numerics.settling import logits64, settle
from badnet_jax.numerics.ties import TIE_RTOL
from badnet_jax.sweep import prefix_masks
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref
from tests.conftest import asset


def test_ranking_near_tie_is_settled_in_float64(lab_b, lab_faces):
    """Two channels whose means float32 cannot tell apart: the order is float64's, and so is the curve."""
    model, params = lab_b
    x = lab_faces["valid_subset"][0]
    means = numpy_ref.pool3(params, x).mean(axis=(0, 1, 2))
    live = np.flatnonzero(means > 0)
    i, j = live[0], live[1]
    # Channel j becomes channel i scaled by (1 + 3e-9): its mean is larger by ~3e-9 relative, far below float32.
    k3 = np.array(params["conv_3"]["kernel"], np.float64)
    b3 = np.array(params["conv_3"]["bias"], np.float64)
    for sign in (1, -1):
        k3[..., j], b3[j] = k3[..., i] * (1 + sign * 3e-9), b3[i] * (1 + sign * 3e-9)
        # params hold float64 here: the float32 sweep rounds them to float32 (where i and j are equal), the
        # float64 settling and the reference keep the difference.
        tweaked = {**params, "conv_3": {"kernel": k3.copy(), "bias": b3.copy()}}
        got = sw.rank_and_sweep(model, tweaked, {"clean_valid": x}, sw.SweepOptions(chunk=16))
        want = numpy_ref.activation_order(tweaked, x)
        assert (list(want).index(j) > list(want).index(i)) == (sign > 0)
        np.testing.assert_array_equal(got.order, want)
        assert got.ranking_settled
        np.testing.assert_array_equal(got.preds["clean_valid"], numpy_ref.step_predictions(tweaked, x, want))


@pytest.mark.parametrize("model_file,scale,split", [("lab3/bd_weights.h5", "raw", "bd_test_subset"),
                                                    ("lab3/bd_weights.h5", "raw", "all"),
                                                    ("hackml2020/sunglasses_bd_weights.h5", "255", "bd_valid_subset"),
                                                    ("hackml2020/sunglasses_bd_weights.h5", "255", "all")])
def test_the_ranking_tolerance_is_ten_times_the_float32_error_of_the_means_on_this_machine(model_file, scale, split,
                                                                                             lab_faces):
    """The tolerance the ranking uses here (floor RANK_RTOL, raised by the run's own measurement on at most
    RANK_CHECK_IMAGES of its images) is at least 10x the relative error of every float32 channel mean over the
    whole set, measured against the independent NumPy network, on both means of a pair. Cases: the sets where
    float32 means err most (lab B's poisoned test faces, 13 images, all of them checked; the 2020 sunglasses
    BadNet's poisoned validation faces, 53 images, 32 checked) and all 126 real faces (32 checked)."""
    model, params = load_keras(asset(f"models/{model_file}"), input_scale=scale)
    divisor = 255.0 if scale == "255" else 1.0
    x = np.concatenate([x for x, _ in lab_faces.values()]) if split == "all" else lab_faces[split][0]
    feats32 = jax.jit(lambda p: model.apply({"params": p}, x.astype(np.float32), method=BadNet.trunk))(params)
    per_image32 = np.asarray(jax.numpy.sum(feats32, axis=(1, 2)), np.float64)  # as the sweep sums them
    sums64 = numpy_ref.pool3(params, x.astype(np.float64) / divisor).sum(axis=(0, 1, 2))
    alive = sums64 > 0
    worst = (np.abs(per_image32.sum(axis=0) - sums64)[alive] / sums64[alive]).max()
    rtol = settling.ranking_rtol(DeepID(input_scale=scale), params, x, per_image32)
    assert rtol >= settling.RANK_RTOL
    # Where every image is checked (and where the worst channel lives only on checked images: the 2020 BadNet's
    # channel 32 fires on one of the 53) the measured error is the whole set's, up to the two float64 networks'
    # difference: the run measures against XLA's float64 trunk, this test against NumPy's. RANK64_RTOL / 2 is 10x
    # the largest such difference measured in a channel's sum (219 u64; 80 u64 here on an AVX2 Zen 3, 0 on a Zen 5).
    assert 0 < worst <= rtol / 2 / 10 + settling.RANK64_RTOL / 2


def test_a_machine_with_larger_float32_errors_raises_the_ranking_tolerance(lab_b, lab_faces, monkeypatch):
    """Where float32 means err more than RANK_RTOL allows for (another CPU, other summation orders), the
    run's own measurement widens the tolerance, and means that close are settled in float64. Stand-in: the
    float64 trunk the check compares against sits 1e-4 relative away from the float32 sums."""
    _, params = lab_b
    x = lab_faces["valid_subset"][0]
    feats = settling.pool3_64(params, x, 1.0)
    i, j = np.argsort(feats.sum(axis=(0, 1, 2)))[-2:]

    def trunk(factor):  # channel j 5e-4 relative above channel i: told apart at RANK_RTOL
        def run(p, images, d):
            f = settling.pool3_64(p, images, d)
            f[..., j] = f[..., i] * (1 + 5e-4)
            return f * factor
        return run

    sums = trunk(1.0)(params, x, 1.0).sum(axis=(1, 2))
    assert 5e-4 > settling.RANK_RTOL
    monkeypatch.setattr(settling, "pool3_64_xla", trunk(1.0))
    assert settling.ranking_rtol(DeepID(), params, x, sums) == settling.RANK_RTOL
    assert not settling.settle_ranking(DeepID(), params, x, sums, np.full(60, 1e3), np.float64(1.0))[2]
    monkeypatch.setattr(settling, "pool3_64_xla", trunk(1 + 1e-4))
    assert settling.ranking_rtol(DeepID(), params, x, sums) == pytest.approx(2 * 10 * 1e-4, rel=1e-3)
    assert settling.settle_ranking(DeepID(), params, x, sums, np.full(60, 1e3), np.float64(1.0))[2]


def test_float64_channel_means_are_the_numpy_networks(lab_faces):
    """XLA's float64 means (what the ranking settles with) against NumPy's: a tenth of RANK64_RTOL on the
    BadNet where they differ most."""
    _, params = load_keras(asset("models/hackml2020/anonymous_1_bd_weights.h5"))
    x = lab_faces["valid_subset"][0]
    want = numpy_ref.pool3(params, x.astype(np.float64) / 255.0).mean(axis=(0, 1, 2))
    got = settling.pool3_means64(params, x, 255.0)
    alive = want > 0
    assert 0 < (np.abs(got - want)[alive] / want[alive]).max() <= settling.RANK64_RTOL / 2 / 10
    np.testing.assert_array_equal(got[~alive], 0.0)


def test_float64_means_too_close_for_two_networks_are_summed_by_numpy(lab_b, lab_faces, monkeypatch):
    """Two channels whose float64 means the two float64 trunks could order either way: NumPy's order wins. Stand-in
    trunks put channel j a hair above channel i for NumPy and a hair below for XLA."""
    _, params = lab_b
    x = lab_faces["valid_subset"][0][:6]
    feats = settling.pool3_64(params, x, 1.0)
    i, j = np.flatnonzero(feats.max(axis=(0, 1, 2)) > 0)[:2]

    def with_j(factor):
        f = feats.copy()
        f[..., j] = f[..., i] * factor
        return f

    monkeypatch.setattr(settling, "pool3_64", lambda p, images, d: with_j(1 + 1e-14)[:len(images)])
    monkeypatch.setattr(settling, "pool3_64_xla", lambda p, images, d: with_j(1 - 1e-14)[:len(images)])
    mean = settling.pool3_means64(params, x, 1.0)
    assert mean[j] > mean[i]
    monkeypatch.setattr(settling, "RANK64_RTOL", 0.0)  # without the check: the XLA stand-in's order
    assert settling.pool3_means64(params, x, 1.0)[j] < mean[i]


def test_logits64_is_the_float64_network(lab_b, lab_faces):
    _, params = lab_b
    x = lab_faces["bd_test_subset"][0]
    mask = numpy_ref.step_mask(np.random.default_rng(1).permutation(60), 40)
    np.testing.assert_allclose(logits64(params, x, 1.0, mask), numpy_ref.forward(params, x, mask), rtol=1e-12,
                               atol=1e-9)
    np.testing.assert_allclose(logits64(params, x, 255.0), numpy_ref.forward(params, x.astype(np.float64) / 255), rtol=1e-12,
                               atol=1e-9)


def test_settle_replaces_only_flagged_predictions(lab_b, lab_faces):
    _, params = lab_b
    x = lab_faces["test_subset"][0][:4]
    orders = np.stack([np.arange(60), np.arange(60)[::-1]])
    preds = np.full((2, 61, 4), -1, np.int32)
    near = np.zeros((2, 61, 4), bool)
    near[1, 7, 2] = near[0, 60, 0] = True
    out, count = settle(DeepID(), params, x, orders, preds, near)
    assert count == 2 and (out[~near] == -1).all()
    assert out[1, 7, 2] == numpy_ref.forward(params, x[2:3], numpy_ref.step_mask(orders[1], 7)).argmax()
    assert out[0, 60, 0] == numpy_ref.forward(params, x[0:1], np.zeros(60)).argmax()
    assert TIE_RTOL < 1e-4


def test_the_fast_float64_trunk_is_the_float64_network(lab_b, lab_faces):
    """XLA's float64 trunk (what settles predictions) against the independent NumPy network, both scales."""
    _, params = lab_b
    faces = lab_faces["valid_subset"][0]
    x = np.concatenate([faces, faces[::-1], faces, faces[::-1], faces, faces[::-1]])[:260]  # 4 full calls + 4 padded
    for divisor, n in ((1.0, 260), (255.0, 40), (1.0, 3)):  # 40 and 3: one padded call each
        want = numpy_ref.pool3(params, x[:n].astype(np.float64) / divisor)
        np.testing.assert_allclose(settling.pool3_64_xla(params, x[:n], divisor), want, rtol=1e-13, atol=1e-12)
    assert settling.pool3_64_xla(params, x[:0], 1.0).shape == (0, 5, 4, 60)


@pytest.mark.parametrize("model_file,divisor", [("lab3/bd_weights.h5", 1.0),
                                                ("hackml2020/anonymous_1_bd_weights.h5", 1.0)])
def test_the_two_float64_networks_differ_by_a_tenth_of_the_float64_tie_bound(model_file, divisor, lab_faces):
    """TIE64_RTOL is 10x the largest XLA-vs-NumPy float64 logit difference measured on the real faces at every
    step; here lab B, and the 2020 BadNet that comes closest (fed raw pixels, its wrong scale). Where XLA's
    float64 convolution sums in the NumPy network's order (on an AMD EPYC: both are one 2-D product over the
    (i, j, c) patches) the difference is 0; a GPU's differs (``scripts/device_check.sh`` runs this test there)."""
    _, params = load_keras(asset(f"models/{model_file}"))
    x = np.concatenate([x for x, _ in lab_faces.values()])
    feats_numpy, feats_xla = settling.pool3_64(params, x, divisor), settling.pool3_64_xla(params, x, divisor)
    masks = prefix_masks(np.argsort(feats_numpy.mean(axis=(0, 1, 2)), kind="stable")).astype(np.float64)
    worst = 0.0
    for mask in masks:
        want, scale = numpy_ref.head(params, feats_numpy, mask), numpy_ref.output_scale(params, feats_numpy, mask)
        got = numpy_ref.head(params, feats_xla, mask)
        worst = max(worst, float((np.abs(got - want).max(axis=1) / scale).max()))
    assert worst <= settling.TIE64_RTOL / 2 / 10, worst


def test_a_tie_at_float64_precision_is_the_numpy_networks_answer(lab_b, lab_faces, monkeypatch):
    """Two float64 trunks that sum in different orders can disagree on a float64 near-tie: there the NumPy
    network decides. A stand-in for the fast trunk is off by float64 roundings (256 u64 per feature: the two
    trunks' top-2 gaps then differ by tens of ulps of the logits, so the rounding of the output layer itself,
    which varies with the CPU's BLAS, cannot close it; still far inside TIE64_RTOL x S); an output bias puts
    one image's top two classes midway between the two trunks' logits."""
    _, params = lab_b
    x = lab_faces["test_subset"][0][:3]
    feats = settling.pool3_64(params, x, 1.0)
    other = feats * (1 + 256 * settling.U64 * np.random.default_rng(0).choice([-1.0, 1.0], feats.shape))
    monkeypatch.setattr(settling, "pool3_64_xla", lambda p, images, d: other[:len(images)])
    logits, scale = numpy_ref.head(params, feats), numpy_ref.output_scale(params, feats)
    logits_other = numpy_ref.head(params, other)
    a, b = np.argsort(logits[0])[-2:][::-1]
    d, d_other = logits[0, a] - logits[0, b], logits_other[0, a] - logits_other[0, b]
    assert d != d_other and abs(d - d_other) < settling.TIE64_RTOL * scale[0]
    params = jax.tree.map(np.asarray, params)
    params["output"]["bias"] = params["output"]["bias"].astype(np.float64)
    params["output"]["bias"][b] += (d + d_other) / 2  # the two trunks now disagree on image 0's class
    want = numpy_ref.forward(params, x).argmax(-1)
    np.testing.assert_array_equal(settling.argmax64(params, x, 1.0), want)
    monkeypatch.setattr(settling, "TIE64_RTOL", 0.0)  # without the float64 tie check: the other trunk's answer
    assert settling.argmax64(params, x, 1.0)[0] != want[0]




def test_the_float64_trunk_lowers_for_a_gpu_with_its_exact_division():
    """What settles near-ties on a GPU (uint8 images in, divided there behind a barrier) lowers for CUDA."""
    init = BadNet(7).init(jax.random.key(0), np.zeros((1, 55, 47, 3), np.float32))["params"]
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float64), init)
    with jax.enable_x64(True):
        exported = jax.export.export(settling._trunk64_fn(7), platforms=["cuda"])(
            params, jax.ShapeDtypeStruct((128, 55, 47, 3), np.uint8), jax.ShapeDtypeStruct((), np.float64))
    assert exported.platforms == ("cuda",)
    assert "optimization_barrier" in exported.mlir_module()
    assert exported.out_avals[0].shape == (128, 5, 4, 60) and exported.out_avals[0].dtype == np.float64
