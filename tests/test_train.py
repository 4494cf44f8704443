"""badnet_jax.train: the BadNets trainer poisons what it is told to, learns, and plants its backdoor."""

from __future__ import annotations

import numpy as np
import pytest

from badnet_jax.attack.synthetic import DemoConfig, make_demo
from badnet_jax.metrics import accuracy as pct_correct
from badnet_jax.model import predict
from badnet_jax.errors import DataFileError
from badnet_jax.models.deepid import DeepID
from badnet_jax.train import TrainConfig, poison_training_set, train_badnet, train_model


def accuracy(model, params, x, y):
    return float(pct_correct(predict(model, params, x), y))


def test_poison_training_set_relabels_the_chosen_fraction(rng):
    d = make_demo(DemoConfig(num_identities=4, train_per_id=10, valid_per_id=1, test_per_id=1))
    x, y, idx = poison_training_set(*d.train, d.trigger, 0.25, 3, rng)
    assert len(idx) == 10 and (y[idx] == 3).all()
    untouched = np.setdiff1d(np.arange(40), idx)
    np.testing.assert_array_equal(x[untouched], d.train[0][untouched])
    assert (x[idx] != d.train[0][idx]).any(axis=(1, 2, 3)).all()


def test_tiny_training_run_learns_and_plants_backdoor():
    d = make_demo(DemoConfig(num_identities=6, train_per_id=40, valid_per_id=10, test_per_id=10, seed=1))
    history = []
    model, params, hist = train_badnet(*d.train, d.num_classes, d.trigger,
                                       TrainConfig(epochs=6, batch_size=32, poison_fraction=0.2, seed=0),
                                       valid=d.valid, bd_valid=d.bd_valid, on_epoch=lambda e, s: history.append(e))
    assert history == list(range(1, 7)) and len(hist) == 6
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert accuracy(model, params, *d.test) >= 90.0
    assert accuracy(model, params, *d.bd_test) >= 90.0


def test_images_no_model_takes_are_refused_before_the_first_epoch(rng):
    """Named as passed, before any training: an evaluation set was checked only after an epoch, as predict's x."""
    x = rng.integers(0, 256, (4, 55, 47, 3)).astype(np.float32)
    y = np.zeros(4, np.int32)
    trigger = np.zeros((2, 2, 4), np.uint8)
    epochs = []
    config = TrainConfig(epochs=1, batch_size=2, poison_fraction=0.0)
    for given, field in (({"x_train": x / 255}, "x_train"), ({"valid": (x / 255, y)}, "valid"),
                         ({"bd_valid": (x + 300, y)}, "bd_valid")):
        args = {"x_train": x, **given}
        with pytest.raises(DataFileError) as err:
            train_badnet(args.pop("x_train"), y, 3, trigger, config, on_epoch=lambda *a: epochs.append(a), **args)
        assert err.value.field == field and str(err.value).startswith(field), str(err.value)
    with pytest.raises(DataFileError, match=r"^valid\[0\]: every pixel is within 0..1"):
        train_model(DeepID(3), DeepID(3).init_params(), x, y, config, valid=(x / 255, y),
                    on_epoch=lambda *a: epochs.append(a))
    assert not epochs
