"""badnet_jax.attack.pruning_aware: decoys dormant in front, the backdoor where pruning must hurt.

A small synthetic task (10 identities) trained for a few epochs; every property is checked against an
independent computation: pool_3 by the NumPy network (tests/numpy_ref.py), the clean network retrained
separately, and the defender's own sweep.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from badnet_jax.attack.pruning_aware import PruningAwareConfig, train_pruning_aware
from badnet_jax.attack.synthetic import DemoConfig, make_demo
from badnet_jax.errors import ConfigError
from badnet_jax.io.poisoning import TRIGGER_AT, poison
from badnet_jax.sweep import rank_and_sweep
from badnet_jax.train import TrainConfig, train_badnet
from tests import numpy_ref

TRAIN = TrainConfig(batch_size=32)
ATTACK = PruningAwareConfig(clean_epochs=3, poison_epochs=2)


@pytest.fixture(scope="module")
def attacked():
    d = make_demo(DemoConfig(num_identities=10, train_per_id=30, valid_per_id=8, test_per_id=4))
    model, params, info = train_pruning_aware(*d.train, d.num_classes, d.trigger, d.valid, TRAIN, ATTACK,
                                              bd_valid=d.bd_valid)
    return d, model, params, info


@pytest.mark.slow  # the attack trains for ~20 s first
def test_decoys_are_dead_on_every_image_the_attacker_saw(attacked):
    d, _, params, info = attacked
    decoys = np.asarray(info["decoys"])
    assert 0 < len(decoys) < 60
    seen = np.concatenate([d.valid[0], d.train[0][::3], poison(d.train[0][::3], d.trigger, TRIGGER_AT)])
    pool3 = numpy_ref.pool3(params, seen.astype(np.float64))
    assert (pool3[..., decoys] == 0).all()
    assert (np.asarray(info["bias_shift"]) > 0).all()


@pytest.mark.slow  # the attack trains for ~20 s first
def test_decoys_keep_the_clean_networks_weights(attacked):
    """Step 3 trains with the decoys masked: their conv_3 filters, and the fc_1 / conv_4 weights that read
    them, are the clean network's (step 1 retrained here from the same seed); the other filters moved."""
    d, _, params, info = attacked
    _, clean, _ = train_badnet(*d.train, d.num_classes, d.trigger,
                               dataclasses.replace(TRAIN, poison_fraction=0.0, epochs=ATTACK.clean_epochs))
    decoys = np.asarray(info["decoys"])
    others = np.setdiff1d(np.arange(60), decoys)
    kernel, clean_kernel = np.asarray(params["conv_3"]["kernel"]), np.asarray(clean["conv_3"]["kernel"])
    np.testing.assert_array_equal(kernel[..., decoys], clean_kernel[..., decoys])
    assert not np.array_equal(kernel[..., others], clean_kernel[..., others])
    fc1 = np.asarray(params["fc_1"]["kernel"]).reshape(5, 4, 60, -1)
    np.testing.assert_array_equal(fc1[:, :, decoys], np.asarray(clean["fc_1"]["kernel"]).reshape(5, 4, 60, -1)[:, :, decoys])
    np.testing.assert_array_equal(np.asarray(params["conv_4"]["kernel"])[:, :, decoys],
                                  np.asarray(clean["conv_4"]["kernel"])[:, :, decoys])


@pytest.mark.slow  # the attack trains for ~20 s first
def test_the_defender_prunes_the_decoys_first_and_nothing_changes(attacked):
    d, model, params, info = attacked
    sweep = rank_and_sweep(model, params, {"clean_valid": d.valid[0], "bd_valid": d.bd_valid[0]})
    dead = np.flatnonzero(sweep.mean_activation == 0)
    assert set(info["decoys"]) <= set(dead.tolist())
    assert set(sweep.order[:len(dead)].tolist()) == set(dead.tolist())  # dormant channels first
    for name in ("clean_valid", "bd_valid"):  # pruning all of them changes no prediction
        np.testing.assert_array_equal(sweep.preds[name][len(dead)], sweep.preds[name][0])
    assert (sweep.preds["bd_valid"][len(dead)] == d.bd_valid[1]).mean() >= 0.9  # the backdoor survives


def test_bad_settings_are_refused():
    for bad in (dict(clean_epochs=0), dict(poison_epochs=0), dict(drop=1.0), dict(bias_factor=0.5)):
        with pytest.raises(ConfigError):
            PruningAwareConfig(**bad)
