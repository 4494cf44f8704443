"""badnet_jax.defense.finetune: settings checked when made, the frozen mask stays exactly zero, and on the demo
BadNet fine-pruning lowers ASR within the drop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import BadNet, ConfigError, init_params, load_keras, prune_params
from badnet_jax.attack.demo import DEMO_CONFIG, DEMO_MODEL
from badnet_jax.attack.synthetic import make_demo
from badnet_jax.defense.finetune import FinetuneConfig, finetune, split_clean_valid
from badnet_jax.metrics import accuracy, first_crossing, hits
from badnet_jax.model import predict
from badnet_jax.sweep import rank_and_sweep


@pytest.mark.parametrize("kw", [dict(learning_rate=float("nan")), dict(learning_rate=0.0), dict(epochs=0),
                                dict(holdout_fraction=1.0)])
def test_fine_tuning_settings_are_checked_when_made(kw):
    with pytest.raises(ConfigError, match="fine-tuning"):
        FinetuneConfig(**kw)


def test_split_is_disjoint_and_complete():
    tr, ho = split_clean_valid(100, 0.2, seed=3)
    assert len(ho) == 20 and len(tr) == 80 and not set(tr) & set(ho) and set(tr) | set(ho) == set(range(100))


def test_pruned_channels_stay_exactly_zero(rng):
    params = init_params(num_classes=6, seed=0)
    mask = np.ones(60, np.float32)
    mask[rng.choice(60, 25, replace=False)] = 0
    x = rng.integers(0, 256, size=(48, 55, 47, 3)).astype(np.float32)
    y = rng.integers(0, 6, size=48)
    tuned, history = finetune(BadNet(6), params, mask, x, y,
                              FinetuneConfig(epochs=3, batch_size=8, learning_rate=1e-3, patience=5))
    pruned = mask == 0
    k3, b3 = np.asarray(tuned["conv_3"]["kernel"]), np.asarray(tuned["conv_3"]["bias"])
    assert (k3[..., pruned] == 0).all() and (b3[pruned] == 0).all()  # exactly, not approximately
    assert len(history) >= 1
    # ... while the kept channels and the other layers did train.
    start = prune_params(params, mask)
    assert not np.array_equal(k3[..., ~pruned], np.asarray(start["conv_3"]["kernel"])[..., ~pruned])


@pytest.mark.slow
def test_fine_pruning_lowers_demo_asr_and_recovers_accuracy_within_the_drop():
    """X = 30 on the demo BadNet: pruning alone leaves ASR at 100%; fine-pruning lowers it and brings clean
    accuracy back far inside the drop (with these 3 epochs ASR falls to ~92% and accuracy returns to ~93%;
    docs/benchmarks.md's "Fine-pruning" table, 8 epochs at lr 1e-3: ~85% / 93%)."""
    model, params = load_keras(DEMO_MODEL)
    d = make_demo(DEMO_CONFIG, include_train=False)
    sweep = rank_and_sweep(model, params, {"clean_valid": d.valid[0], "test": d.test[0], "bd_test": d.bd_test[0]})
    valid_hits = hits(sweep.preds["clean_valid"], d.valid[1])
    k, crossed = first_crossing(valid_hits, len(d.valid[1]), 0.30)
    assert crossed
    mask = sweep.masks[k]
    acc0 = float(accuracy(predict(model, params, d.test[0]), d.test[1]))
    acc_pruned = 100.0 * float(np.mean(sweep.preds["test"][k] == d.test[1]))
    asr_pruned = 100.0 * float(np.mean(sweep.preds["bd_test"][k] == d.bd_test[1]))
    tuned, _ = finetune(model, params, mask, *d.valid, FinetuneConfig(epochs=3, learning_rate=1e-3))
    pruned_predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x, mask=mask), -1))
    acc_ft = 100.0 * float(np.mean(np.asarray(pruned_predict(tuned, d.test[0])) == d.test[1]))
    asr_ft = 100.0 * float(np.mean(np.asarray(pruned_predict(tuned, d.bd_test[0])) == d.bd_test[1]))
    assert acc_pruned < acc0 - 30.0  # the cut itself lost more than the drop ...
    assert acc_ft >= acc0 - 30.0  # ... fine-tuning brought clean accuracy back within it ...
    assert asr_ft < asr_pruned - 5.0  # ... and lowered the attack success rate


def test_a_tuning_that_no_epoch_improves_keeps_b_prime_and_says_so(rng, caplog):
    """Labels that are B''s own answers: it starts at 100% early-stopping accuracy, which no epoch can beat, so
    the result is B' itself, and the log says the tuning changed nothing."""
    from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL
    from badnet_jax.io.model_file import load_model

    model, params = load_model(GAP_DEMO_MODEL)
    mask = np.ones(model.num_channels, np.float32)
    mask[:5] = 0
    x = rng.integers(0, 256, size=(40, *model.input_hwc)).astype(np.float32)
    y = np.asarray(model.logits(params, x, mask)).argmax(-1)
    with caplog.at_level("WARNING", logger="badnet_jax.defense.finetune"):
        tuned, history = finetune(model, params, mask, x, y, FinetuneConfig(epochs=2, batch_size=8, patience=5))
    assert len(history) == 2 and all(h["holdout_acc"] <= 100.0 for h in history)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "no epoch raised the early-stopping accuracy above its start (100.00%" in caplog.text
    assert "the fine-pruned B' is B' unchanged" in caplog.text


def test_a_tuning_that_improves_says_nothing_of_the_kind(rng, caplog):
    params = init_params(num_classes=6, seed=0)
    x = rng.integers(0, 256, size=(48, 55, 47, 3)).astype(np.float32)
    y = np.zeros(48, np.int64)  # one class: learned at once from a random start
    with caplog.at_level("WARNING", logger="badnet_jax.defense.finetune"):
        _, history = finetune(BadNet(6), params, np.ones(60, np.float32), x, y,
                              FinetuneConfig(epochs=2, batch_size=8, learning_rate=1e-3, patience=5))
    assert max(h["holdout_acc"] for h in history) == 100.0 and "no epoch raised" not in caplog.text
