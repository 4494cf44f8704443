"""Rankings side by side (issue 16): each order against an independent computation, one shared sweep.

The data-free scores are recomputed here another way (power iteration, plain loops); every ranking's
curve is checked against the float64 NumPy forward of the pruned network (tests/numpy_ref.py); ANP's
shortcut (scaling cached pool_3 features) is checked against the paper's form (scaling conv_3's weights
in the full network).
"""

from __future__ import annotations

import json
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import BadNet, ConfigError, prune_params
from badnet_jax import sweep as sw
from badnet_jax.sweep.anp import ANPConfig, anp_mask
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from badnet_jax.sweep.rankings import (RankingOptions, clp_scores, l1_scores, random_orders, read_order_file,
                                 resolve_rankings)
from badnet_jax.defense.report import read_curve_json
from tests import numpy_ref
from tests.conftest import LAB_B, asset
from tests.test_regression import LAB_FILES


def _largest_singular_value(a: np.ndarray, iters: int = 500) -> float:
    v = np.ones(a.shape[1])
    for _ in range(iters):
        v = a.T @ (a @ v)
        v /= np.linalg.norm(v)
    return float(np.linalg.norm(a @ v))


def test_clp_and_l1_scores_by_hand(lab_b):
    _, params = lab_b
    k = np.asarray(params["conv_3"]["kernel"], np.float64)  # (3, 3, 40, 60)
    for c in (0, 7, 59):
        per_channel = np.stack([k[i, j, :, c] for i in range(3) for j in range(3)], axis=1)  # (in=40, kh*kw=9)
        assert clp_scores(params)[c] == pytest.approx(_largest_singular_value(per_channel), rel=1e-9)
        assert l1_scores(params)[c] == pytest.approx(sum(abs(float(v)) for v in k[..., c].ravel()), rel=1e-12)
    plan = resolve_rankings(RankingOptions(rank_by=("clp", "l1")), params)
    clp, l1 = plan.given
    assert np.all(np.diff(clp_scores(params)[clp]) <= 0)  # highest bound pruned first
    assert np.all(np.diff(l1_scores(params)[l1]) >= 0)  # smallest norm pruned first


def test_random_orders_are_seeded_permutations():
    a, b, c = random_orders(4, seed=1), random_orders(4, seed=1), random_orders(4, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert all(sorted(o.tolist()) == list(range(60)) for o in a)
    assert len({tuple(o) for o in a}) == 4


def test_order_files_in_three_forms_and_refusals(tmp_path):
    order = np.random.default_rng(5).permutation(60)
    (tmp_path / "a.json").write_text(json.dumps(order.tolist()))
    (tmp_path / "b.txt").write_text("\n".join(", ".join(map(str, order[i:i + 10])) for i in range(0, 60, 10)))
    (tmp_path / "curve.json").write_text(json.dumps({"order": order.tolist(), "valid_acc": [1.0]}))
    for name in ("a.json", "b.txt", "curve.json"):
        np.testing.assert_array_equal(read_order_file(tmp_path / name), order)
    bad = {"missing.txt": None, "repeat.txt": " ".join(["0"] + [str(i) for i in range(59)]),
           "short.txt": " ".join(map(str, range(59))), "words.txt": "first second", "obj.json": '{"k": 1}',
           "big.txt": " ".join(map(str, range(1, 61))), "float.json": json.dumps([0.5] * 60)}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            read_order_file(tmp_path / name)


@pytest.mark.parametrize("options, complaint", [
    (RankingOptions(rank_by=("activation", "magic")), "unknown ranking 'magic'"),
    (RankingOptions(rank_by=("l1", "l1")), "given twice"),
    (RankingOptions(rank_by=("random",), random_orders=0), "random_orders must be >= 1"),
    (RankingOptions(rank_by=("order_file",)), "needs --order_file"),
    (RankingOptions(rank_by=("anp",), anp=ANPConfig(steps=0)), "anp_steps must be >= 1"),
    (RankingOptions(rank_by=()), "at least one"),
])
def test_ranking_options_that_cannot_work_are_refused(options, complaint, lab_b):
    with pytest.raises(ConfigError, match=complaint):
        resolve_rankings(options, lab_b[1])


def test_every_ranking_in_one_sweep_equals_each_order_alone(lab_b, lab_faces, tmp_path):
    """Several orders in one call: each row is the masked network of that order, not a mix."""
    model, params = lab_b
    x, y = lab_faces["valid_subset"]
    xb, _ = lab_faces["bd_valid_subset"]
    own = np.random.default_rng(9).permutation(60)
    (tmp_path / "own.txt").write_text(" ".join(map(str, own)))
    plan = resolve_rankings(RankingOptions(rank_by=("activation", "clp", "l1", "random", "anp"), random_orders=2,
                                           order_file=str(tmp_path / "own.txt"), anp=ANPConfig(steps=4, batch=16)),
                            params)
    assert plan.labels == ("activation", "clp", "l1", "random/0", "random/1", "anp", "order_file")
    options = sw.SweepOptions(chunk=16)
    got = sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb}, options, rankings=plan,
                            rank_labels=y)
    alone = sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb}, options)
    np.testing.assert_array_equal(got.orders[0], alone.order)
    np.testing.assert_array_equal(got.orders[[1, 2, 3, 4, 6]], plan.given)
    np.testing.assert_array_equal(got.mean_activation, alone.mean_activation)
    for i, label in enumerate(plan.labels):
        order = got.orders[i]
        for name, imgs in (("clean_valid", x), ("bd_valid", xb)):
            np.testing.assert_array_equal(got.preds_of(label)[name],
                                          sw.predict_steps(model, params, imgs, order, options), err_msg=label)
        # Against the float64 NumPy network with conv_3 channels zeroed, at a few steps.
        for k in (0, 30, 45, 55):
            mask = np.ones(60)
            mask[order[:k]] = 0
            np.testing.assert_array_equal(got.all_preds["bd_valid"][i, k],
                                          numpy_ref.forward(params, xb, mask).argmax(-1), err_msg=f"{label} k={k}")


@pytest.mark.parametrize("orders_per_call", [2, 4])  # 5 orders: groups of 2+2+1(padded), of 4+1(padded)
def test_orders_vmapped_in_groups_give_each_order_alone(orders_per_call, lab_b, lab_faces):
    """``orders_per_call`` G > 1 (several orders' steps in the same head calls, for accelerators) changes no
    prediction: every row equals the order swept alone."""
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    xb, _ = lab_faces["bd_valid_subset"]
    plan = resolve_rankings(RankingOptions(rank_by=("activation", "clp", "l1", "random"), random_orders=2), params)
    options = sw.SweepOptions(chunk=16, batch_steps=4, orders_per_call=orders_per_call)
    sweep_plan = sw.plan_sweep(options, [x, xb], 1283)
    assert sweep_plan.orders_per_call == orders_per_call and "orders per call" in sweep_plan.describe()
    got = sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb}, sweep_plan, rankings=plan)
    one = sw.SweepOptions(chunk=16, batch_steps=4)
    for i, label in enumerate(plan.labels):
        np.testing.assert_array_equal(got.all_preds["bd_valid"][i],
                                      sw.predict_steps(model, params, xb, got.orders[i], one), err_msg=label)


def test_orders_per_call_needs_batched_steps():
    with pytest.raises(ConfigError, match="orders_per_call > 1 needs batch_steps > 0"):
        sw.plan_sweep(sw.SweepOptions(batch_steps=0, orders_per_call=2))
    with pytest.raises(ConfigError, match="orders_per_call must be >= 1"):
        sw.plan_sweep(sw.SweepOptions(orders_per_call=0))


def test_anp_on_features_is_anp_on_conv3_weights(lab_b, lab_faces):
    """The shortcut: scaling pool_3 channel c by s >= 0 is scaling conv_3's kernel and bias for c by s.

    Reference: ANP as the paper states it (perturbed weights, the full network on the images, SGD with
    momentum written out), a few steps with eps small enough that every scale stays positive.
    """
    model, params = lab_b
    x, y = lab_faces["valid_subset"]
    config = ANPConfig(eps=0.1, steps=4, batch=8, seed=4)
    feats = model.apply({"params": params}, jnp.asarray(x, jnp.float32), method=BadNet.trunk)
    got = np.asarray(jax.jit(anp_mask, static_argnums=(0, 4))(model, params, feats, jnp.asarray(y), config))

    def loss(scale, xb, yb):
        scaled = prune_params(params, scale)  # conv_3 kernel and bias times the scale, channel by channel
        logits = model.apply({"params": scaled}, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    mask, velocity = jnp.ones(60), jnp.zeros(60)
    for key in jax.random.split(jax.random.PRNGKey(config.seed), config.steps):
        k_batch, k_noise = jax.random.split(key)
        idx = jax.random.randint(k_batch, (config.batch,), 0, len(x))
        xb, yb = jnp.asarray(x, jnp.float32)[idx], jnp.asarray(y)[idx]
        delta = jax.random.uniform(k_noise, (60,), minval=-config.eps, maxval=config.eps)
        delta = jnp.clip(delta + config.eps * jnp.sign(jax.grad(loss)(mask + delta, xb, yb)), -config.eps, config.eps)
        grad = jax.grad(lambda m: config.alpha * loss(m, xb, yb) + (1 - config.alpha) * loss(m + delta, xb, yb))(mask)
        velocity = grad + config.momentum * velocity
        mask = jnp.clip(mask - config.learning_rate * velocity, 0, 1)
    assert np.all(np.asarray(mask) > config.eps)  # the premise: every scale stayed positive
    np.testing.assert_allclose(got, np.asarray(mask), atol=1e-5)
    assert np.abs(got - 1).max() > 1e-3  # it moved


def _cut(hits, total, drop):
    """The lab's rule by hand: first k with accuracy more than X points below k = 0's."""
    for k, h in enumerate(hits):
        if Fraction(int(hits[0]) - int(h), total) > Fraction(str(drop)):
            return k
    return len(hits) - 1


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
                                  np.argsort(feats["clean_valid"].mean(axis=(0, 1, 2)), kind="stable"))
    for name, r in curve.rankings.items():
        for i, order in enumerate(r.orders):
            hits = {}
            for role, (x, y) in data.items():
                preds = np.stack([numpy_ref.head(params, feats[role], _mask(order, k)).argmax(-1) for k in range(61)])
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


def _mask(order, k):
    mask = np.ones(60)
    mask[order[:k]] = 0
    return mask


def _read(path):
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f["data"]).transpose(0, 2, 3, 1), np.asarray(f["label"]).astype(int)


def test_one_ranking_writes_no_comparison(tmp_path):
    files = {role: str(asset(rel)) for role, rel in LAB_FILES.items()}
    run_defense(DefenseConfig(model=str(asset(LAB_B)), out_dir=str(tmp_path), checkpoints=False,
                              rankings=RankingOptions(rank_by=("l1",)), **files))
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert "rankings" not in curve and not (tmp_path / "rankings.png").exists()
    assert curve["order"] == resolve_rankings(RankingOptions(rank_by=("l1",)), _lab_params()).given[0].tolist()


def _lab_params():
    from badnet_jax import load_keras

    return load_keras(asset(LAB_B))[1]


def test_anp_needs_labels_and_a_ranking_set(lab_b, lab_faces):
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    plan = resolve_rankings(RankingOptions(rank_by=("anp",), anp=ANPConfig(steps=1)), params)
    with pytest.raises(ConfigError, match="labels"):
        sw.rank_and_sweep(model, params, {"clean_valid": x}, rankings=plan)
    with pytest.raises(ConfigError, match="ranking set"):
        sw.rank_and_sweep(model, params, {"clean_valid": x}, rankings=plan, rank_on=None)
    with pytest.raises(ConfigError, match="either an order or"):
        sw.rank_and_sweep(model, params, {"clean_valid": x}, rankings=plan, order=np.arange(60))
