"""badnet_jax.numerics.ties: which float32 answers are trusted; images on a decision boundary get float64's.

The reference is tests/numpy_ref.py (float64 NumPy, no badnet_jax code). Boundary images are bisected
between two real faces over float32 pixel values until B' (at a given step) sits on its decision boundary;
every sweep option, a sweep sharded over devices and GoodNet's screening must then give the float64
network's answer at all 61 steps. The bounds themselves (TIE_RTOL for a top-2 gap, the same bound for a
channel on the edge of dead) are checked against the float32 error measured on the real faces.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from badnet_jax import load_keras
from badnet_jax import sweep as sw
from badnet_jax.models import deepid
from badnet_jax.numerics import settling
from badnet_jax.numerics.ties import TIE_RTOL
from tests import numpy_ref
from tests.cli import run_python
from tests.conftest import LAB_B, asset


def _boundary(params, a, b, mask):
    """The float32 image between faces a and b (different classes under ``mask``) with the smallest top-2 gap."""
    f = lambda x: numpy_ref.forward(params, x[None], mask)[0]
    ca = f(a).argmax()
    lo, hi = 0.0, 1.0
    point = lambda t: (a + t * (b - a)).astype(np.float32)
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.array_equal(point(mid), point(lo)) or np.array_equal(point(mid), point(hi)):
            break  # float32 pixels cannot get closer
        lo, hi = (mid, hi) if f(point(mid)).argmax() == ca else (lo, mid)
    gap = lambda x: np.diff(np.sort(f(x))[-2:])[0]
    return min((point(lo), point(hi)), key=gap), min(gap(point(lo)), gap(point(hi)))


BOUNDARY_STEPS = {"clean_valid": (0, 48), "bd_valid": (30, 54), "clean_test": (48, 54), "bd_test": (0, 45)}
POOLS = {"clean_valid": "valid_subset", "bd_valid": "bd_valid_subset", "clean_test": "test_subset",
         "bd_test": "bd_test_subset"}


@pytest.fixture(scope="module")
def boundary_sets(lab_b, lab_faces):
    """Each set: its real faces plus two images on B's decision boundary at two steps of the float64 order."""
    _, params = lab_b
    order = numpy_ref.activation_order(params, lab_faces["valid_subset"][0])
    clean = np.concatenate([lab_faces["valid_subset"][0], lab_faces["test_subset"][0]])
    sets, gaps = {}, []
    for name, steps in BOUNDARY_STEPS.items():
        own = lab_faces[POOLS[name]][0].astype(np.float32)
        extra = []
        for j, k in enumerate(steps):
            mask = numpy_ref.step_mask(order, k)
            a = own[j]
            pa = numpy_ref.forward(params, a[None], mask).argmax()
            b = next(c for c in clean if numpy_ref.forward(params, c[None], mask).argmax() != pa)
            x, gap = _boundary(params, a, b, mask)
            extra.append(x)
            gaps.append(gap)
        sets[name] = np.concatenate([own, np.stack(extra)])
    return order, sets, np.array(gaps)


@pytest.mark.parametrize("options", [
    dataclasses.replace(sw.PLAIN, chunk=5),
    sw.SweepOptions(dedupe=False, group=False, chunk=64),
    sw.SweepOptions(group=False, chunk=7),
    sw.SweepOptions(chunk=16),
    sw.SweepOptions(batch_steps=4, chunk=16),
], ids=["plain", "prefix", "dedupe", "grouped", "batched"])
def test_boundary_images_get_the_float64_answer_at_every_step_whatever_the_option(options, lab_b, boundary_sets):
    model, params = lab_b
    order, sets, gaps = boundary_sets
    assert np.all(gaps < 1e-3), gaps  # they really sit on the boundary (float32 pixels allow about 1e-5)
    got = sw.rank_and_sweep(model, params, sets, options, order=order)
    for name, x in sets.items():
        np.testing.assert_array_equal(got.preds[name], numpy_ref.step_predictions(params, x, order), err_msg=name)
    assert sum(got.settled.values()) >= len(gaps)  # each boundary image was a near-tie at its step


_SHARDED = r"""
import json, sys
import numpy as np
import badnet_jax as b
from badnet_jax import sweep as sw
data = np.load(sys.argv[1])
model, params = b.load_keras(sys.argv[2])
sets = {k: data[k] for k in data.files if k != "order"}
got = sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=4, devices=3), order=data["order"])
np.savez(sys.argv[3], **got.preds)
print(json.dumps({"settled": int(sum(got.settled.values()))}))
"""


@pytest.mark.slow
def test_boundary_images_get_the_float64_answer_on_three_devices(lab_b, boundary_sets, tmp_path):
    """The same boundary images through a sweep sharded over 3 forced CPU devices (another summation layout)."""
    _, params = lab_b
    order, sets, gaps = boundary_sets
    np.savez(tmp_path / "in.npz", order=order, **sets)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}
    proc = run_python(_SHARDED, tmp_path / "in.npz", asset(LAB_B), tmp_path / "out.npz", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for name, x in sets.items():
        np.testing.assert_array_equal(got[name], numpy_ref.step_predictions(params, x, order), err_msg=name)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["settled"] >= len(gaps)


def test_goodnet_screening_settles_near_ties_like_the_curve(lab_b, boundary_sets):
    """G on boundary images (as goodnet_eval.py screens): B's and B''s classes are the float64 network's."""
    from badnet_jax.goodnet import make_goodnet, predict_goodnet

    _, params = lab_b
    order, sets, _ = boundary_sets
    x = np.concatenate(list(sets.values()))
    settled_any = 0
    for k in (0, 30, 48):
        mask = numpy_ref.step_mask(order, k)
        goodnet, variables = make_goodnet(lab_b[0], params, mask=mask)
        got, settled = predict_goodnet(goodnet, variables, x)
        b, b_prime = (numpy_ref.forward(params, x, m).argmax(-1) for m in (None, mask))
        np.testing.assert_array_equal(got, np.where(b == b_prime, b, 1283))
        settled_any += settled
    assert settled_any > 0


@pytest.mark.slow
@pytest.mark.parametrize("model_file,seed,margin", [("lab3/bd_weights.h5", None, 10),
                                                    ("hackml2020/multi_trigger_multi_target_bd_weights.h5", 2, 2)])
def test_float32_top2_gaps_stay_within_the_tie_bound(model_file, seed, margin, lab_faces):
    """The near-tie test bounds the float32 error of the top-2 gap by TIE_RTOL * S. Measured on the real faces at
    every step of the activation order and 3 random ones: lab B uses a tenth of it (activation order here); the
    worst case over the five real BadNets at both input scales, multi_trigger_multi_target fed raw pixels
    (its wrong scale: activations cancel in the trunk) along random order 2, a third (38 u S; its single
    logits err by up to 59 u S, the gap's two errors partly cancel)."""
    model, params = load_keras(asset(f"models/{model_file}"), input_scale="raw")
    x = np.concatenate([x for x, _ in lab_faces.values()])
    feats = numpy_ref.pool3(params, x.astype(np.float64))
    forward = jax.jit(lambda p, m: model.apply({"params": p}, x.astype(np.float32), m))
    top2 = lambda logits: np.diff(np.sort(logits, axis=-1)[:, -2:], axis=-1)[:, 0]
    worst = 0.0
    order = (np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable") if seed is None
             else np.random.default_rng(seed).permutation(60))
    for k in range(61):
        mask = numpy_ref.step_mask(order, k)
        want = numpy_ref.head(params, feats, mask)
        scale = numpy_ref.output_scale(params, feats, mask)
        got = np.asarray(forward(params, mask.astype(np.float32)), np.float64)
        worst = max(worst, float((np.abs(top2(got) - top2(want)) / scale).max()))
    assert 0 < worst <= TIE_RTOL / margin


def test_channels_on_the_edge_of_dead_are_ranked_as_float64_ranks_them(lab_b, lab_faces, monkeypatch):
    """Channels whose largest pre-activation is +-1e-9 of its scale from 0: float64 calls the + ones alive (a
    tiny positive mean, ranked just after the dead channels) and the - ones dead (tied at 0, by index); float32
    cannot tell. The order, and so the curve, is float64's."""
    model, params = lab_b
    x = lab_faces["valid_subset"][0]
    pre, conv3_input = numpy_ref.conv3_preactivation(params, x)
    pre_max, in_max = pre.max(axis=(0, 1, 2)), conv3_input.max()
    k3 = np.array(params["conv_3"]["kernel"], np.float64)
    b3 = np.array(params["conv_3"]["bias"], np.float64)
    scale = np.abs(k3).reshape(-1, 60).sum(axis=0) * in_max + np.abs(b3)
    edge = {3: 1, 17: -1, 29: 1, 41: -1, 52: 1, 58: -1}  # channel -> side of 0 its largest pre-activation lands on
    for c, side in edge.items():
        b3[c] += -pre_max[c] + side * 1e-9 * scale[c]
    # float64 params: the float32 sweep rounds them (and cannot resolve the margin); float64 keeps it.
    tweaked = {**params, "conv_3": {"kernel": k3, "bias": b3}}
    want = numpy_ref.activation_order(tweaked, x)
    means64 = numpy_ref.pool3(tweaked, x).mean(axis=(0, 1, 2))
    assert all((means64[c] > 0) == (side > 0) for c, side in edge.items())
    got = sw.rank_and_sweep(model, tweaked, {"clean_valid": x}, sw.SweepOptions(chunk=16))
    np.testing.assert_array_equal(got.order, want)
    assert got.ranking_settled
    np.testing.assert_array_equal(got.preds["clean_valid"], numpy_ref.step_predictions(tweaked, x, want))
    # Without the dead-channel check (and without the run's own error measurement, which sees float32 call
    # these channels dead where float64 does not), float32's verdicts stand and the order is not float64's.
    monkeypatch.setattr(deepid, "undecided_channels", lambda *args: np.zeros(60, bool))
    monkeypatch.setattr(settling, "ranking_rtol", lambda *args: settling.RANK_RTOL)
    unchecked = sw.rank_and_sweep(model, tweaked, {"clean_valid": x}, sw.SweepOptions(chunk=16))
    assert not np.array_equal(unchecked.order, want)


def test_top2_gap_gives_numpys_argmax_and_gap_on_ties_and_non_finite_logits():
    """The traced top-2 (plain reductions) against NumPy's argmax: first index on exact ties, the first NaN
    where there is one, infinities, a gap of 0 on a tie; the same bits on random logits. (XLA:CPU flushes
    float32 subnormals to zero, as ``jnp.argmax`` sees them too: logits that differ only there tie, gap 0, and
    a zero gap is a near-tie, settled in float64.)"""
    from badnet_jax.numerics.ties import top2_gap
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((64, 1283)).astype(np.float32)
    rows[1, [5, 900]] = 50.0  # exact tie: the first index, gap 0
    rows[2, [0, 1282]] = 50.0
    rows[3, 1282] = 50.0  # the last class
    rows[4, [7, 11]] = np.nan  # NaN: the first NaN, as np.argmax
    rows[5, 3] = np.inf
    rows[6, [3, 4]] = np.inf
    rows[7] = -np.inf
    rows[8, 9] = np.nan
    rows[8, 2] = np.inf
    rows[9] = np.nan
    rows[10, :] = 1.0
    arg, gap = jax.jit(top2_gap)(rows)
    want = rows.argmax(-1)
    np.testing.assert_array_equal(np.asarray(arg), want)
    others = np.where(np.arange(rows.shape[1]) == want[:, None], -np.inf, rows)
    with np.errstate(invalid="ignore"):
        want_gap = rows.max(-1) - others.max(-1)
    np.testing.assert_array_equal(np.asarray(gap), want_gap.astype(np.float32))
    assert gap[1] == 0 and gap[2] == 0 and gap[10] == 0 and gap[3] > 0
    # Class-major logits (the output layer's layout) give the same answers along axis 0.
    arg0, gap0 = jax.jit(lambda l: top2_gap(l, axis=0))(rows.T.copy())
    np.testing.assert_array_equal(np.asarray(arg0), want)
    np.testing.assert_array_equal(np.asarray(gap0), want_gap.astype(np.float32))


def test_output_top2_is_the_float64_output_layers_argmax_and_gap():
    """The output layer computed class-major: NumPy float64's argmax wherever the gap is clear of float32's
    error, and the gap within it, for hidden layers with one and two leading axes."""
    from badnet_jax.numerics.ties import output_scale, output_top2
    rng = np.random.default_rng(4)
    hidden = np.abs(rng.standard_normal((3, 50, 160))).astype(np.float32)
    w = (rng.standard_normal((160, 1283)) * 0.1).astype(np.float32)
    b = rng.standard_normal(1283).astype(np.float32)
    logits64 = hidden.astype(np.float64) @ w.astype(np.float64) + b
    want = logits64.argmax(-1)
    top2 = np.sort(logits64, axis=-1)[..., -2:]
    scale = np.asarray(output_scale(hidden.astype(np.float64), w.astype(np.float64), b.astype(np.float64)))
    for h, idx in ((hidden, np.s_[:]), (hidden[1], np.s_[1])):
        arg, gap = jax.jit(output_top2)(h, w, b)
        clear = (top2[idx][..., 1] - top2[idx][..., 0]) > TIE_RTOL * scale[idx]
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(np.asarray(arg)[clear], want[idx][clear])
        np.testing.assert_allclose(np.asarray(gap), top2[idx][..., 1] - top2[idx][..., 0],
                                   atol=float(TIE_RTOL * scale.max() / 2))
