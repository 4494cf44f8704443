"""badnet_jax.sweep.strategies: every shortcut gives the plain sweep's predictions, image for image, and the
head evaluations are counted as the sweep does them (by hand, against the definition, and by counting calls).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from badnet_jax import BadNet, init_params, metrics
from badnet_jax import sweep as sw
from badnet_jax.defense.inputs import EXAMPLES
from badnet_jax.io.model_file import load_model
from badnet_jax.models.deepid import DeepID
from badnet_jax.sweep.prefix import alive_groups
from tests import numpy_ref
from tests.sweep.conftest import plan, two_sets


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
    real = DeepID.tail_top2

    def counting(self, params, pre, impl, platform):
        jax.debug.callback(lambda r: rows.append(int(r)), pre[0].shape[0] * pre[0].shape[1])
        return real(self, params, pre, impl=impl, platform=platform)

    monkeypatch.setattr(DeepID, "tail_top2", counting)
    chunk = 11 + group + batch_steps  # shapes not compiled before in this session: the counting head gets traced
    the_plan = plan(sw.SweepOptions(group=group, impl="reference", batch_steps=batch_steps), chunk)
    order = np.random.default_rng(0).permutation(60)
    preds = sw.predict_steps(model, params, x[:50], order, the_plan)
    jax.block_until_ready(preds)
    jax.effects_barrier()
    feats = np.asarray(jax.jit(lambda a: sw.trunk_features(model, params, a, chunk))(x[:50]))
    assert sum(rows) == sw.head_evaluations(feats, the_plan) < 50 * 61


SHORTCUTS = [sw.SweepOptions(prefix_sums=True, dedupe=False, group=False, impl="reference"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=False, impl="reference"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="reference"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="reference", batch_steps=3),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="pallas"),
             sw.SweepOptions(prefix_sums=True, dedupe=True, group=True, impl="pallas", batch_steps=8),
             sw.SweepOptions(prefix_sums=True, cumulative=True, impl="reference")]
_name = lambda o: (f"prefix{int(o.prefix_sums)}-dedupe{int(o.dedupe)}-group{int(o.group)}-batch{o.batch_steps}"
                   f"-{o.impl}" + ("-cumulative" if o.cumulative else ""))


@pytest.mark.parametrize("options", SHORTCUTS, ids=_name)
def test_every_shortcut_gives_the_plain_sweep_on_real_b(options, lab_b, lab_faces):
    model, params = lab_b
    (x, _), (xb, _) = lab_faces["valid_subset"], lab_faces["bd_valid_subset"]
    plain = two_sets(model, params, x, xb, 16, sw.PLAIN)
    fast = two_sets(model, params, x, xb, 16, options)
    np.testing.assert_array_equal(fast.order, plain.order)
    np.testing.assert_array_equal(fast.preds["clean_valid"], plain.preds["clean_valid"])
    np.testing.assert_array_equal(fast.preds["bd_valid"], plain.preds["bd_valid"])


@pytest.mark.parametrize("options", SHORTCUTS[:4] + SHORTCUTS[-1:], ids=_name)
def test_every_shortcut_gives_the_same_counts_on_a_random_model(options, rng):
    params = init_params(num_classes=29, seed=21)
    model = BadNet(29)
    x = rng.integers(0, 256, size=(40, 55, 47, 3)).astype(np.float32)
    labels = rng.integers(0, 29, size=40)
    order = rng.permutation(60)
    plain = sw.predict_steps(model, params, x, order, dataclasses.replace(sw.PLAIN, chunk=16))
    fast = sw.predict_steps(model, params, x, order, dataclasses.replace(options, chunk=16))
    np.testing.assert_array_equal(metrics.hits(fast, labels), metrics.hits(plain, labels))
    np.testing.assert_array_equal(fast, plain)  # and image for image: near-ties are settled in float64


@pytest.mark.slow
def test_what_reaches_the_head_is_the_float64_preactivation(lab_b, lab_faces, monkeypatch):
    """Every strategy's fc_1 / conv_4 pre-activations, as fed to the head, at every step of random orders.

    Poisoned faces light up channels that clean faces leave dead, so a shortcut that decided "dead" from the
    wrong images would add a wrong contribution here (predictions far from a boundary would not show it). The
    head is not told which step a row is: each row must be some step's float64 pre-activations, and every
    distinct effective mask of the chunk (the all-pruned one, and one more per alive channel) must reach it.
    """
    model, params = lab_b
    xb = lab_faces["bd_valid_subset"][0]
    x = lab_faces["valid_subset"][0]
    feats = numpy_ref.pool3(params, xb)
    alive = feats.max(axis=(0, 1, 2)) > 0
    records = []
    real = DeepID.tail_top2

    def recording(self, p, pre, **kwargs):
        jax.debug.callback(lambda *a: records.append([np.asarray(v) for v in a]), *pre)
        return real(self, p, pre, **kwargs)

    monkeypatch.setattr(DeepID, "tail_top2", recording)
    orders = np.stack([np.random.default_rng(s).permutation(60) for s in range(2)])
    for options in (sw.SweepOptions(dedupe=False, group=False), sw.SweepOptions(group=False),
                    sw.SweepOptions(group=False, batch_steps=4)):
        for order in orders:
            records.clear()
            # One chunk per set (53 + 47 images, chunks of 53 + 1 odd size): shapes not traced before.
            sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb},
                              dataclasses.replace(options, chunk=len(xb) + (options.batch_steps or 0) + 1), order=order)
            jax.effects_barrier()
            want = [numpy_ref.head_preactivations(params, feats, numpy_ref.step_mask(order, k)) for k in range(61)]
            kept = [frozenset(c for c in order[k:] if alive[c]) for k in range(61)]  # step k's effective mask
            masks_seen = set()
            for fc1, c4 in records:
                if fc1.shape[1] != len(xb):
                    continue  # the clean set's chunk
                for row in range(len(fc1)):
                    k = int(np.argmin([np.abs(fc1[row] - f).max() + np.abs(c4[row] - c).max() for f, c in want]))
                    np.testing.assert_allclose(fc1[row], want[k][0], atol=2e-3, rtol=1e-4, err_msg=f"k={k}")
                    np.testing.assert_allclose(c4[row], want[k][1], atol=2e-3, rtol=1e-4, err_msg=f"k={k}")
                    masks_seen.add(kept[k])
            assert masks_seen == set(kept)  # 1 + the alive channels' count of distinct masks, each evaluated


def test_the_cumulative_sweep_with_its_trunk_fused_gives_the_plain_sweep_on_every_set():
    # The GAP example: logits affine in the mask, so the planner sums cumulatively and runs the trunk of every set
    # after the ranking set chunk by chunk beside its heads (strategies.sweep_images).
    model, params = load_model(EXAMPLES["gapnet"][0], "255")
    data, _ = EXAMPLES["gapnet"][1]()
    sets = {name: data[name][0][:n] for name, n in (("clean_valid", 300), ("bd_valid", 200), ("clean_test", 100))}
    fast_plan = sw.plan_sweep(sw.SweepOptions(chunk=64), list(sets.values()), model)
    assert fast_plan.strategy == "cumulative" and fast_plan.fuses_trunk
    fast = sw.rank_and_sweep(model, params, sets, fast_plan)
    plain = sw.rank_and_sweep(model, params, sets, dataclasses.replace(sw.PLAIN, chunk=64))
    assert not plain.plan.fuses_trunk
    np.testing.assert_array_equal(fast.order, plain.order)
    for name in sets:
        np.testing.assert_array_equal(fast.preds[name], plain.preds[name], err_msg=name)
