"""badnet_jax.sweep.rankings: each order against an independent computation, and every order in one shared sweep.

The data-free scores are recomputed here another way (power iteration, plain loops); every ranking's predictions
are checked against the float64 NumPy forward of the pruned network (tests/numpy_ref.py) and against each order
swept alone. ANP's own order: test_anp.py; the per-ranking curves of a defense run:
tests/defense/test_ranking_curves.py.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax import sweep as sw
from badnet_jax.sweep.anp import ANPConfig
from badnet_jax.sweep.rankings import (RankingOptions, check_order, clp_scores, l1_scores, random_orders,
                                       read_order_file, resolve_rankings)
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.graph import GraphCNN
from tests import numpy_ref
from tests.conftest import asset


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
        assert clp_scores(DeepID(), params)[c] == pytest.approx(_largest_singular_value(per_channel), rel=1e-9)
        assert l1_scores(DeepID(), params)[c] == pytest.approx(sum(abs(float(v)) for v in k[..., c].ravel()), rel=1e-12)
    plan = resolve_rankings(RankingOptions(rank_by=("clp", "l1")), params, DeepID())
    clp, l1 = plan.given
    assert np.all(np.diff(clp_scores(DeepID(), params)[clp]) <= 0)  # highest bound pruned first
    assert np.all(np.diff(l1_scores(DeepID(), params)[l1]) >= 0)  # smallest norm pruned first


def test_clp_and_l1_read_another_cnns_producing_convolution_scaled_by_its_batch_norm():
    # resnet_tiny's stem: conv -> batch norm -> relu. Pruning stem_relu's channels, the rankings read stem_conv's
    # kernel with each output channel scaled by the batch norm's |gamma| / sqrt(variance + epsilon), the
    # epsilon read from the file's own Keras config.
    path = asset("models/other/resnet_tiny.h5")
    graph, params = read_keras_graph(path)
    model = GraphCNN.build(graph, params, "stem_relu", "raw")
    with h5py.File(path, "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
    eps = next(layer["config"]["epsilon"] for layer in layers if layer["config"]["name"] == "stem_bn")
    bn = {k: np.asarray(v, np.float64) for k, v in params["stem_bn"].items()}
    scale = np.abs(bn["gamma"]) / np.sqrt(bn["moving_variance"] + eps)
    k = np.asarray(params["stem_conv"]["kernel"], np.float64)
    clp, l1 = clp_scores(model, params), l1_scores(model, params)
    for c in range(k.shape[-1]):
        per_channel = [[float(k[dy, dx, i, c]) * scale[c] for dy in range(k.shape[0]) for dx in range(k.shape[1])]
                       for i in range(k.shape[2])]
        assert clp[c] == pytest.approx(_largest_singular_value(np.asarray(per_channel)), rel=1e-9)
        assert l1[c] == pytest.approx(sum(abs(v) for row in per_channel for v in row), rel=1e-12)


def test_random_orders_are_seeded_permutations():
    a, b, c = random_orders(4, seed=1, channels=60), random_orders(4, seed=1, channels=60), random_orders(4, seed=2, channels=60)
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
        np.testing.assert_array_equal(read_order_file(tmp_path / name, 60, "pool_3"), order)
    bad = {"missing.txt": None, "repeat.txt": " ".join(["0"] + [str(i) for i in range(59)]),
           "short.txt": " ".join(map(str, range(59))), "words.txt": "first second", "obj.json": '{"k": 1}',
           "big.txt": " ".join(map(str, range(1, 61))), "float.json": json.dumps([0.5] * 60)}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            read_order_file(tmp_path / name, 60, "pool_3")


@pytest.mark.parametrize("order, says", [
    (list(range(60)), "(shape (60,), dtype int64, 44 outside 0..15: [16, 17, 18, 19, 20]...)"),
    ([*range(15), 3], "(shape (16,), dtype int64, 1 missing: [15], 1 repeated: [3])"),
    ([*range(14), 20, -1], "(shape (16,), dtype int64, 2 outside 0..15: [-1, 20], 2 missing: [14, 15])"),
])
def test_an_order_that_is_no_permutation_is_refused_saying_what_is_wrong(order, says):
    # An order for another layer's 60 channels given to a 16-channel layer repeats none: it runs past the end.
    with pytest.raises(ConfigError) as info:
        check_order(np.asarray(order, np.int64), "order", 16, "p2")
    assert str(info.value).endswith(says), str(info.value)


@pytest.mark.parametrize("options, complaint", [
    (RankingOptions(rank_by=("activation", "magic")), "unknown ranking 'magic'"),
    (RankingOptions(rank_by=("l1", "l1")), "given twice"),
    (RankingOptions(rank_by=("random",), random_orders=0), "random_orders must be >= 1"),
    (RankingOptions(rank_by=("order_file",)), "needs order_file"),
    (RankingOptions(rank_by=("anp",), anp=ANPConfig(steps=0)), r"anp\.steps must be >= 1"),
    (RankingOptions(rank_by=()), "at least one"),
])
def test_ranking_options_that_cannot_work_are_refused(options, complaint, lab_b):
    with pytest.raises(ConfigError, match=complaint):
        resolve_rankings(options, lab_b[1], DeepID())


@pytest.mark.slow
def test_every_ranking_in_one_sweep_equals_each_order_alone(lab_b, lab_faces, tmp_path):
    """Several orders in one call: each row is the masked network of that order, not a mix."""
    model, params = lab_b
    x, y = lab_faces["valid_subset"]
    xb, _ = lab_faces["bd_valid_subset"]
    own = np.random.default_rng(9).permutation(60)
    (tmp_path / "own.txt").write_text(" ".join(map(str, own)))
    plan = resolve_rankings(RankingOptions(rank_by=("activation", "clp", "l1", "random", "anp"), random_orders=2,
                                           order_file=str(tmp_path / "own.txt"), anp=ANPConfig(steps=4, batch=16)),
                            params, DeepID())
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
            np.testing.assert_array_equal(got.all_preds["bd_valid"][i, k],
                                          numpy_ref.forward(params, xb, numpy_ref.step_mask(order, k)).argmax(-1),
                                          err_msg=f"{label} k={k}")


@pytest.mark.parametrize("orders_per_call", [2, 4])  # 5 orders: groups of 2+2+1(padded), of 4+1(padded)
def test_orders_vmapped_in_groups_give_each_order_alone(orders_per_call, lab_b, lab_faces):
    """``orders_per_call`` G > 1 (several orders' steps in the same head calls, for accelerators) changes no
    prediction: every row equals the order swept alone."""
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    xb, _ = lab_faces["bd_valid_subset"]
    plan = resolve_rankings(RankingOptions(rank_by=("activation", "clp", "l1", "random"), random_orders=2), params, DeepID())
    options = sw.SweepOptions(chunk=16, batch_steps=4, orders_per_call=orders_per_call)
    sweep_plan = sw.plan_sweep(options, [x, xb], DeepID(1283))
    assert sweep_plan.orders_per_call == orders_per_call and "orders per call" in sweep_plan.describe()
    got = sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb}, sweep_plan, rankings=plan)
    one = sw.SweepOptions(chunk=16, batch_steps=4)
    for i, label in enumerate(plan.labels):
        np.testing.assert_array_equal(got.all_preds["bd_valid"][i],
                                      sw.predict_steps(model, params, xb, got.orders[i], one), err_msg=label)


def test_an_order_file_of_another_layer_is_refused(tmp_path):
    (tmp_path / "curve.json").write_text(json.dumps({"order": list(range(16)), "model": {"layer": "c4"}}))
    with pytest.raises(ConfigError, match="a curve.json of layer 'c4', but 'p2' is pruned here"):
        read_order_file(tmp_path / "curve.json", 16, "p2")
    np.testing.assert_array_equal(read_order_file(tmp_path / "curve.json", 16, "c4"), np.arange(16))
    (tmp_path / "lab.json").write_text(json.dumps({"order": list(range(60))}))  # the lab's curve.json: pool_3
    with pytest.raises(ConfigError, match="a curve.json of layer 'pool_3', but 'pool_2' is pruned here"):
        read_order_file(tmp_path / "lab.json", 60, "pool_2")
