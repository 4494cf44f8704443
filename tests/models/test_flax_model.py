"""badnet_jax.models.flax_model: a user's own Flax CNN through the protocol, every sweep strategy against the
same module's float64 forward with the features masked (the README's example)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax import sweep as sw
from badnet_jax.goodnet import make_goodnet, predict_goodnet
from badnet_jax.kernels.conv2d import conv2d
from badnet_jax.models.flax_model import FlaxCNN


class Net(nn.Module):
    """A small CNN split at its second convolution: BatchNorm-free, a GAP head with one hidden layer."""

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        return nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))

    @nn.compact
    def hidden(self, feats):
        return nn.relu(nn.Dense(16, name="fc")(jnp.mean(feats, axis=(1, 2))))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="output")(self.hidden(self.features(x)))


def _model():
    params = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2"), params


def _float64_steps(model, params, x, order):
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        out = []
        for k in range(len(order) + 1):
            mask = np.ones(len(order))
            mask[order[:k]] = 0
            logits = Net().apply({"params": p64}, jnp.asarray(x, jnp.float64) / 255, method=lambda m, x: m.features(x))
            logits = Net().apply({"params": p64}, logits * mask[None, None, None, :], method=lambda m, f: m.hidden(f))
            out.append((np.asarray(logits) @ p64["output"]["kernel"] + p64["output"]["bias"]).argmax(-1))
    return np.stack(out)


@pytest.mark.parametrize("options", [sw.PLAIN, sw.SweepOptions(dedupe=False, group=False), sw.SweepOptions(),
                                     sw.SweepOptions(batch_steps=4)], ids=["plain", "prefix", "dedupe", "batched"])
def test_a_flax_module_sweeps_as_its_float64_masked_forward(options, rng):
    model, params = _model()
    assert (model.feature_hwc, model.num_classes, model.layer) == ((8, 8, 12), 5, "conv2")
    x = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    result = sw.rank_and_sweep(model, params, {"clean_valid": x}, options)
    feats = np.asarray(model.features(params, jnp.asarray(x, jnp.float32)))
    np.testing.assert_array_equal(result.order, np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable"))
    np.testing.assert_array_equal(result.preds["clean_valid"], _float64_steps(model, params, x, result.order))


def test_a_goodnet_of_a_flax_module(rng):
    model, params = _model()
    x = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    mask = np.ones(12, np.float32)
    mask[:6] = 0
    goodnet, variables = make_goodnet(model, params, mask=mask)
    got, _ = predict_goodnet(goodnet, variables, x)
    b = _float64_steps(model, params, x, np.arange(12))[0]
    b_prime = _float64_steps(model, params, x, np.arange(12))[6]
    np.testing.assert_array_equal(got, np.where(b == b_prime, b, 5))
    np.testing.assert_array_equal(np.asarray(goodnet.apply(variables, x)), got)


def test_a_module_without_the_split_is_refused():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="output")(x.reshape(len(x), -1))

    params = Plain().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))["params"]
    with pytest.raises(ConfigError, match="module: Plain has no features\\(\\) method"):
        FlaxCNN.build(Plain(), params, input_hwc=(4, 4, 3), input_scale="raw")


class FastNet(Net):
    """The same CNN with its first convolution through badnet_jax.kernels.conv2d (the README's advice)."""

    @nn.compact
    def features(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 3, 8))
        bias = self.param("bias", nn.initializers.zeros_init(), (8,))
        x = nn.relu(conv2d(x, kernel, padding="SAME", bias=bias))
        return nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))


def test_a_flax_module_may_run_its_first_convolution_through_conv2d(rng):
    # Integer weights and pixels: every summation order is exact, so the two modules agree bit for bit
    # (FastNet's conv1 is width-blocked on a CPU, Net's is XLA's).
    _, params = _model()
    params = jax.tree.map(lambda a: jnp.asarray(rng.integers(-3, 4, a.shape), jnp.float32), params)
    fast = {**{k: v for k, v in params.items() if k != "conv1"}, **params["conv1"]}
    x = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.float32)
    slow_model = FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale="raw", layer="conv2")
    fast_model = FlaxCNN.build(FastNet(), fast, input_hwc=(16, 16, 3), input_scale="raw", layer="conv2")
    np.testing.assert_array_equal(np.asarray(fast_model.features(fast, jnp.asarray(x))),
                                  np.asarray(slow_model.features(params, jnp.asarray(x))))
