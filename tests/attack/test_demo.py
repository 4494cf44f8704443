"""badnet_jax.attack.demo: the shipped demo BadNet meets the accuracy and attack success rate it states."""

from __future__ import annotations

from badnet_jax import load_keras
from badnet_jax.attack.demo import DEMO_CONFIG, DEMO_MODEL
from badnet_jax.attack.synthetic import make_demo
from badnet_jax.metrics import accuracy as pct_correct
from badnet_jax.model import predict


def accuracy(model, params, x, y):
    return float(pct_correct(predict(model, params, x), y))


def test_shipped_demo_badnet_meets_its_stated_accuracy_and_asr():
    model, params = load_keras(DEMO_MODEL)
    assert model.num_classes == DEMO_CONFIG.num_identities
    d = make_demo(DEMO_CONFIG, include_train=False)
    assert accuracy(model, params, *d.test) >= 95.0
    assert accuracy(model, params, *d.bd_test) >= 99.0
