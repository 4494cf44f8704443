"""badnet_jax.models.protocol's checks every model shares: weights holding NaN or infinite values are refused by
every entry point that runs them (the sweep, single forwards, the GoodNet, a Flax model's build), naming the
argument and the array, for the lab's DeepID, a Keras CNN and a Flax CNN alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import sweep as sw
from badnet_jax.errors import ConfigError
from badnet_jax.goodnet import make_goodnet
from badnet_jax.io.model_file import load_model
from badnet_jax.model import init_params
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.flax_model import FlaxCNN
from badnet_jax.models.predict import predict, predict_settled
from tests.conftest import asset
from tests.models.test_flax_model import Net


def _flax():
    params = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2"), params


def _with(params, layer: str, key: str, value: float):
    out = jax.tree.map(np.array, params)
    out[layer][key].reshape(-1)[3] = value
    return out


@pytest.mark.parametrize("which, layer, key, value", [
    ("deepid", "conv_3", "kernel", np.nan),
    ("keras", "b0_bn1", "moving_variance", np.inf),  # a batch norm of resnet_tiny
    ("flax", "conv2", "kernel", np.nan),
    ("flax", "output", "kernel", -np.inf),
])
def test_weights_holding_nan_or_inf_are_refused_wherever_they_would_run(which, layer, key, value, rng):
    if which == "deepid":
        model, params = DeepID(), init_params()
    elif which == "keras":
        model, params = load_model(asset("models/other/resnet_tiny.h5"), "255")
    else:
        model, params = _flax()
    bad = _with(params, layer, key, value)
    x = rng.integers(0, 256, (4, *model.input_hwc)).astype(np.uint8)
    where = rf"{layer}/{key} holds NaN or infinite values \(1 of \d+\)"
    for name, call in (("params", lambda: sw.rank_and_sweep(model, bad, {"clean_valid": x})),
                       ("params", lambda: predict_settled(model, bad, x)),
                       ("params", lambda: predict(model, bad, x)),
                       ("bad_params", lambda: make_goodnet(model, bad, mask=np.ones(model.num_channels))),
                       ("pruned_params", lambda: make_goodnet(model, params, pruned_params=bad))):
        with pytest.raises(ConfigError, match=rf"^{name}: {where}; .* outputs would be NaN") as err:
            call()
        assert err.value.field == name
    if which == "flax":
        with pytest.raises(ConfigError, match=rf"^variables: {where}") as err:
            FlaxCNN.build(Net(), bad, input_hwc=(16, 16, 3), input_scale="255", layer="conv2")
        assert err.value.field == "variables"
    # The same weights, finite, run.
    assert predict(model, params, x).shape == (4,)
