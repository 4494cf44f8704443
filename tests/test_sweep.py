"""The fused sweep against a plain sequential loop (zero the conv_3 channel, full forward, count)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from badnet_jax import BadNet, ConfigError, init_params, metrics, prune_params
from badnet_jax import sweep as sw
from badnet_jax.sweep import strategies
from badnet_jax.sweep.prefix import alive_groups
from tests import numpy_ref


def two_sets(model, params, x, xb, chunk, options=sw.SweepOptions(), **extra):
    """The sweep of a clean (ranking) and a poisoned set, plus named extra sets."""
    return sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb, **extra},
                             dataclasses.replace(options, chunk=chunk))


def plan(options, chunk):
    return sw.plan_sweep(dataclasses.replace(options, chunk=chunk))


def sequential_predictions(model, params, x, masks):
    """What the lab's Keras loop does: one pruned model and one full forward per step."""
    forward = jax.jit(lambda p, xb: model.apply({"params": p}, xb).argmax(-1))
    return np.stack([np.asarray(forward(prune_params(params, m), x)) for m in masks])


def test_prefix_masks():
    order = np.array([3, 0, 2, 1])
    expected = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    host = sw.prefix_masks(order)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_array_equal(host, expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(sw.prefix_masks)(order)), expected)  # traced


def test_sweep_equals_sequential_loop_on_real_b_and_faces(lab_b, lab_faces):
    model, params = lab_b
    (x, _), (xb, _) = lab_faces["valid_subset"], lab_faces["bd_valid_subset"]
    result = two_sets(model, params, x, xb, 16, sw.PLAIN)  # 47 and 53 images: clamped last chunks
    assert result.preds["clean_valid"].shape == (61, len(x)) and result.preds["bd_valid"].shape == (61, len(xb))
    np.testing.assert_array_equal(result.preds["clean_valid"], sequential_predictions(model, params, x, result.masks))
    np.testing.assert_array_equal(result.preds["bd_valid"], sequential_predictions(model, params, xb, result.masks))
    # The ranking: float64 means of the independent NumPy trunk, ascending, ties (exact zeros) by index.
    ref_mean = numpy_ref.pool3(params, x).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(result.mean_activation, ref_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.order, np.argsort(ref_mean, kind="stable"))
    dead = np.flatnonzero(ref_mean == 0)
    assert len(dead) > 20 and list(result.order[:len(dead)]) == sorted(dead)
    # Every k's mask prunes exactly order[:k].
    for k in (0, 1, 30, 60):
        assert set(np.flatnonzero(result.masks[k] == 0)) == set(result.order[:k])


def test_sweep_equals_sequential_loop_on_random_model_with_other_class_count(rng):
    params = init_params(num_classes=37, seed=11)
    model = BadNet(37)
    x = rng.integers(0, 256, size=(21, 55, 47, 3)).astype(np.float32)
    xb = rng.integers(0, 256, size=(9, 55, 47, 3)).astype(np.float32)
    result = two_sets(model, params, x, xb, 8, sw.PLAIN)
    np.testing.assert_array_equal(result.preds["clean_valid"], sequential_predictions(model, params, x, result.masks))
    np.testing.assert_array_equal(result.preds["bd_valid"], sequential_predictions(model, params, xb, result.masks))
    test_preds = sw.predict_steps(model, params, xb, result.order, dataclasses.replace(sw.PLAIN, chunk=4))
    np.testing.assert_array_equal(test_preds, sequential_predictions(model, params, xb, result.masks))


def test_second_sweep_of_same_shapes_does_not_recompile(rng):
    params = init_params(num_classes=5, seed=2)
    model = BadNet(5)
    make = lambda n: rng.integers(0, 256, size=(n, 55, 47, 3)).astype(np.float32)
    jitted = sw.run._rank_and_sweep
    two_sets(model, params, make(10), make(6), 4)
    size = jitted._cache_size()
    other = init_params(num_classes=5, seed=3)  # new values, same shapes
    two_sets(model, other, make(10), make(6), 4)
    assert jitted._cache_size() == size
    two_sets(model, other, make(11), make(6), 4)  # a new shape does compile
    assert jitted._cache_size() == size + 1


def test_compile_ahead_then_the_sweep_runs_without_compiling(rng, backend_compiles):
    params = init_params(num_classes=7, seed=4)
    model = BadNet(7)
    x = rng.integers(0, 256, size=(13, 55, 47, 3)).astype(np.uint8)
    xb = rng.integers(0, 256, size=(5, 55, 47, 3)).astype(np.uint8)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    options = sw.SweepOptions(impl="reference", chunk=3)
    sw.compile_sweep(model, params, {"clean_valid": spec(x), "bd_valid": spec(xb), "again": spec(x)}, options)
    assert [f for f in backend_compiles if "_rank_and_sweep" in f] == ["jit(_rank_and_sweep)"]
    got = sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb, "again": x}, options)
    assert [f for f in backend_compiles if "_rank_and_sweep" in f] == ["jit(_rank_and_sweep)"]  # no second compile
    plain = two_sets(model, params, x, xb, 3, sw.PLAIN, again=x)
    np.testing.assert_array_equal(got.preds["clean_valid"], plain.preds["clean_valid"])
    np.testing.assert_array_equal(got.preds["again"], plain.preds["clean_valid"])


def test_head_evaluations_by_hand():
    pool3 = np.zeros((4, 5, 4, 60), np.float32)
    pool3[:, 0, 0, 0] = 1.0  # channel 0 alive everywhere
    pool3[[0, 2], 1, 1, 5] = 2.0  # channel 5 on images 0 and 2
    pool3[[1, 3], 2, 2, 7] = 3.0  # channel 7 on images 1 and 3
    assert sw.head_evaluations(pool3, plan(sw.PLAIN, 2)) == 2 * 2 * 61
    # Chunks {0, 1} and {2, 3} each see channels 0, 5, 7 alive: the all-pruned step + 3 steps, per image.
    assert sw.head_evaluations(pool3, plan(sw.SweepOptions(group=False), 2)) == 4 * (1 + 3)
    # Grouped, the chunks are {0, 2} (channels 0, 5) and {1, 3} (channels 0, 7).
    assert sw.head_evaluations(pool3, plan(sw.SweepOptions(group=True), 2)) == 4 * (1 + 2)
    assert sw.head_evaluations(pool3, plan(sw.SweepOptions(group=True), 3)) == 2 * 3 * (1 + 3)  # last chunk clamped
    # Steps evaluated 2 per head call: 3 distinct steps round up to 4.
    assert sw.head_evaluations(pool3, plan(sw.SweepOptions(group=True, batch_steps=2), 2)) == 4 * 4


def test_shared_evaluations_by_hand():
    pool3 = np.zeros((2, 5, 4, 60), np.float32)
    pool3[:, 0, 0, [3, 5, 7]] = 1.0  # channels 3, 5, 7 alive on both images, the rest dead
    ahead = np.r_[3, 5, 7, np.arange(8, 60), 0, 1, 2, 4, 6]  # alive channels first: masks {}, {3}, {3,5}, all
    one = plan(sw.SweepOptions(group=False), 2)
    assert sw.shared_evaluations(pool3, ahead[None], one) == sw.head_evaluations(pool3, one) == 2 * 4
    assert sw.shared_evaluations(pool3, np.stack([ahead, ahead]), one) == 2 * 4  # the same order again is free
    behind = np.r_[7, 5, 3, np.arange(8, 60), 0, 1, 2, 4, 6]  # {}, {7}, {5,7}, all: two new masks
    assert sw.shared_evaluations(pool3, np.stack([ahead, behind]), one) == 2 * 6


def test_shared_evaluations_counts_distinct_masked_features(lab_b, lab_faces):
    """Against the definition: the distinct masked pool_3 features of each chunk over every order and step."""
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    feats = np.asarray(jax.jit(lambda a: sw.trunk_features(model, params, a, 16))(x))
    rng = np.random.default_rng(1)
    base = np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable")
    orders = np.stack([base, base[::-1], rng.permutation(60), base, np.r_[base[1::-1], base[2:]]])
    for group in (False, True):
        the_plan = plan(sw.SweepOptions(group=group), 16)
        rows = feats[np.asarray(alive_groups(jax.numpy.asarray(feats)))] if group else feats
        want = 0
        for s in range(0, len(rows), 16):
            part = rows[min(s, len(rows) - 16):][:16]  # the last chunk is clamped to end at the last image
            masked = {(part * m).tobytes() for o in orders for m in sw.prefix_masks(o)}
            want += len(part) * len(masked)
        got = sw.shared_evaluations(feats, orders, the_plan)
        assert got == want < 5 * sw.head_evaluations(feats, the_plan)


@pytest.mark.parametrize("group,batch_steps", [(False, 0), (True, 0), (True, 4)])
def test_head_evaluations_counts_what_the_sweep_evaluates(group, batch_steps, lab_b, lab_faces, monkeypatch):
    model, params = lab_b
    x, _ = lab_faces["bd_valid_subset"]
    rows = []
    real = strategies.head_top2

    def counting(fc1, c4, *tail, impl, platform):
        jax.debug.callback(lambda r: rows.append(int(r)), fc1.shape[0] * fc1.shape[1])
        return real(fc1, c4, *tail, impl=impl, platform=platform)

    monkeypatch.setattr(strategies, "head_top2", counting)
    chunk = 11 + group + batch_steps  # shapes not compiled before in this session: the counting head gets traced
    the_plan = plan(sw.SweepOptions(group=group, impl="reference", batch_steps=batch_steps), chunk)
    order = np.random.default_rng(0).permutation(60)
    preds = sw.predict_steps(model, params, x[:50], order, the_plan)
    jax.block_until_ready(preds)
    jax.effects_barrier()
    feats = np.asarray(jax.jit(lambda a: sw.trunk_features(model, params, a, chunk))(x[:50]))
    assert sum(rows) == sw.head_evaluations(feats, the_plan) < 50 * 61


@pytest.mark.parametrize("options,complaint", [
    (sw.SweepOptions(prefix_sums=False, group=False), "dedupe needs prefix_sums"),
    (sw.SweepOptions(dedupe=False), "group needs dedupe"),
    (sw.SweepOptions(dedupe=False, group=False, batch_steps=4), "batch_steps > 0 needs dedupe"),
    (dataclasses.replace(sw.PLAIN, impl="pallas"), "impl='pallas' needs prefix_sums"),
    (sw.SweepOptions(impl="fast"), "impl must be"),
    (sw.SweepOptions(chunk=0), "chunk must be"),
    (sw.SweepOptions(devices=99), "asked for 99 devices"),
    (sw.SweepOptions(memory_budget=float("nan")), "memory budget must be"),
])
def test_options_that_would_do_nothing_are_refused(options, complaint):
    with pytest.raises(ConfigError, match=complaint):
        sw.plan_sweep(options)


def test_plan_resolves_each_strategy_once():
    assert sw.plan_sweep(sw.PLAIN).strategy == "plain"
    assert sw.plan_sweep(sw.SweepOptions(dedupe=False, group=False)).strategy == "prefix"
    cpu = sw.plan_sweep(sw.SweepOptions())
    assert (cpu.strategy, cpu.batch_steps, cpu.chunk, cpu.impl, cpu.devices) == ("prefix_dedupe", 0, 256, "reference", 1)
    batched = sw.plan_sweep(sw.SweepOptions(batch_steps=8, chunk=100))
    assert (batched.strategy, batched.batch_steps, batched.chunk) == ("prefix_batched", 8, 100)
    # The batched path holds a batch of logits: its working memory grows with the class count.
    assert (sw.plan_sweep(sw.SweepOptions(batch_steps=8)).bytes_per_image
            > sw.plan_sweep(sw.SweepOptions(batch_steps=8), num_classes=200).bytes_per_image)


def test_memory_budget_shrinks_the_chunk_and_refuses_what_cannot_fit():
    x = jax.ShapeDtypeStruct((10000, 55, 47, 3), np.uint8)
    fast = sw.SweepOptions(memory_budget=10 * 2**30)
    assert sw.plan_sweep(fast, [x, x]).chunk == 256
    small = sw.plan_sweep(dataclasses.replace(fast, memory_budget=500 * 2**20), [x, x]).chunk
    assert 1 <= small < 256
    plain = sw.plan_sweep(dataclasses.replace(sw.PLAIN, memory_budget=500 * 2**20), [x, x]).chunk
    batched = sw.plan_sweep(dataclasses.replace(fast, memory_budget=500 * 2**20, batch_steps=8), [x, x]).chunk
    assert plain < small and batched < small  # both need more memory per image in flight
    with pytest.raises(ConfigError, match="memory budget"):
        sw.plan_sweep(dataclasses.replace(fast, memory_budget=2**20), [x, x])


def test_a_users_own_order_is_swept_and_must_be_a_permutation(lab_b, lab_faces):
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    order = np.random.default_rng(3).permutation(60)
    result = sw.rank_and_sweep(model, params, {"clean_valid": x}, sw.SweepOptions(chunk=16), order=order)
    np.testing.assert_array_equal(result.order, order)
    np.testing.assert_array_equal(result.preds["clean_valid"], sequential_predictions(model, params, x, result.masks))
    assert result.mean_activation is not None  # still measured on the ranking set
    with pytest.raises(ConfigError, match="permutation"):
        sw.rank_and_sweep(model, params, {"clean_valid": x}, order=np.zeros(60, int))


SHORTCUTS = [sw.SweepOptions(prefix_sums=True, dedupe=False, group=False, impl="reference"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=False, impl="reference"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="reference"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="reference", batch_steps=3),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="pallas"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="pallas", batch_steps=8)]
_name = lambda o: (f"prefix{int(o.prefix_sums)}-dedupe{int(o.dedupe)}-group{int(o.group)}-batch{o.batch_steps}"
                   f"-{o.impl}")


@pytest.mark.parametrize("options", SHORTCUTS, ids=_name)
def test_every_shortcut_gives_the_plain_sweep_on_real_b(options, lab_b, lab_faces):
    model, params = lab_b
    (x, _), (xb, _) = lab_faces["valid_subset"], lab_faces["bd_valid_subset"]
    plain = two_sets(model, params, x, xb, 16, sw.PLAIN)
    fast = two_sets(model, params, x, xb, 16, options)
    np.testing.assert_array_equal(fast.order, plain.order)
    np.testing.assert_array_equal(fast.preds["clean_valid"], plain.preds["clean_valid"])
    np.testing.assert_array_equal(fast.preds["bd_valid"], plain.preds["bd_valid"])


@pytest.mark.parametrize("options", SHORTCUTS[:4], ids=_name)
def test_every_shortcut_gives_the_same_counts_on_a_random_model(options, rng):
    params = init_params(num_classes=29, seed=21)
    model = BadNet(29)
    x = rng.integers(0, 256, size=(40, 55, 47, 3)).astype(np.float32)
    labels = rng.integers(0, 29, size=40)
    order = rng.permutation(60)
    plain = sw.predict_steps(model, params, x, order, dataclasses.replace(sw.PLAIN, chunk=16))
    fast = sw.predict_steps(model, params, x, order, dataclasses.replace(options, chunk=16))
    np.testing.assert_array_equal(metrics.hits(fast, labels), metrics.hits(plain, labels))
    assert (fast == plain).mean() > 0.999  # and image for image (ties aside)


def test_one_compiled_sweep_serves_both_input_scales(lab_b, lab_faces):
    """The input scale is a traced divisor: the /255 model reuses the raw model's program, bit for bit right."""
    from badnet_jax.model import predict

    model, params = lab_b
    raw, scaled = model.clone(input_scale="raw"), model.clone(input_scale="255")
    x, _ = lab_faces["valid_subset"]
    xb, _ = lab_faces["bd_test_subset"]
    jitted = sw.run._rank_and_sweep
    a = two_sets(raw, params, x, xb, 19, sw.PLAIN)  # a chunk no other test uses: compiled here
    size = jitted._cache_size()
    b = two_sets(scaled, params, x, xb, 19, sw.PLAIN)
    assert jitted._cache_size() == size  # no second compile for the other scale
    for result, m in ((a, raw), (b, scaled)):
        for k in (0, 30, 50):
            np.testing.assert_array_equal(result.preds["clean_valid"][k], predict(m, params, x, result.masks[k]))
    assert not np.array_equal(a.preds["clean_valid"][0], b.preds["clean_valid"][0])  # the scale does matter
