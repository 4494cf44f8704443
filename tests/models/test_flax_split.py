"""badnet_jax.models.flax_split: a Flax module's head split at its first affine layers, swept against the
module's own float64 masked forward (which does not use the split), and the splits that are not refused."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax import sweep as sw
from badnet_jax.models import flax_split
from badnet_jax.models.flax_model import FlaxCNN
from tests.models.test_flax_model import Net


class Trunk(Net):
    """test_flax_model's Net: two convolutions to 8x8x12 features; the heads below replace its hidden."""


class FlattenNet(Trunk):
    """Flatten -> dense (affine) | ReLU."""

    @nn.compact
    def pre(self, feats):
        return nn.Dense(16, name="fc")(feats.reshape(feats.shape[0], -1))

    def post(self, pre):
        return nn.relu(pre)

    def hidden(self, feats):
        return self.post(self.pre(feats))


class ConvNet(Trunk):
    """A 2x2 convolution without activation (affine, pre-activations 7x7x6) | ReLU -> flatten -> dense -> ReLU."""

    @nn.compact
    def pre(self, feats):
        return nn.Conv(6, (2, 2), padding="VALID", name="conv3")(feats)

    @nn.compact
    def post(self, pre):
        return nn.relu(nn.Dense(16, name="fc")(nn.relu(pre).reshape(pre.shape[0], -1)))

    def hidden(self, feats):
        return self.post(self.pre(feats))


class WideNet(ConvNet):
    """ConvNet with a 1x1 convolution that widens 12 -> 32 channels as its pre (pre-activations 8x8x32: more than
    the 768 features, so its linear map is read one feature at a time)."""

    @nn.compact
    def pre(self, feats):
        return nn.Conv(32, (1, 1), name="conv3")(feats)


class GapNet(Trunk):
    """Global average pooling: the whole hidden part is affine."""

    def hidden(self, feats):
        return jnp.mean(feats, axis=(1, 2))


NETS = {"flatten": (FlattenNet, ("pre", "post")), "conv": (ConvNet, ("pre", "post")),
        "wide": (WideNet, ("pre", "post")), "gap": (GapNet, ("hidden", None))}


def _model(kind):
    net, split = NETS[kind]
    params = net().init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
    return FlaxCNN.build(net(), params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2",
                         head_split=split), params


def _float64_steps(model, params, x, order):
    """(C + 1, N) predictions of the module in float64 with the features masked: its hidden(), not the split."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        feats = model.module.apply({"params": p64}, jnp.asarray(x, jnp.float64) / 255, method="features")
        out = []
        for k in range(len(order) + 1):
            mask = np.ones(len(order))
            mask[order[:k]] = 0
            hidden = model.module.apply({"params": p64}, feats * mask[None, None, None, :], method="hidden")
            out.append((np.asarray(hidden) @ p64["output"]["kernel"] + p64["output"]["bias"]).argmax(-1))
    return np.stack(out)


@pytest.mark.parametrize("options", [sw.SweepOptions(dedupe=False, group=False), sw.SweepOptions(),
                                     sw.SweepOptions(batch_steps=4)], ids=["prefix", "default", "batched"])
@pytest.mark.parametrize("kind", NETS)
def test_a_split_flax_head_sweeps_as_its_float64_masked_forward(kind, options, rng):
    model, params = _model(kind)
    x = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    result = sw.rank_and_sweep(model, params, {"clean_valid": x}, options)
    np.testing.assert_array_equal(result.preds["clean_valid"], _float64_steps(model, params, x, result.order))
    # The float32 split is close to the float64 network: its measured near-tie bound flags few predictions (a
    # wrong split still gives the right curve, every prediction then settled in float64, but slowly).
    assert result.settled["clean_valid"] < 0.25 * result.preds["clean_valid"].size
    assert result.seconds["tie_bound"] > 0  # measured on the model's own images, and reported
    if kind == "gap" and options == sw.SweepOptions():
        assert result.plan.strategy == "cumulative"  # the logits are affine in the mask: every step at once


@pytest.mark.parametrize("kind", NETS)
def test_the_channel_contributions_add_up_to_the_modules_pre_activations(kind, rng):
    model, params = _model(kind)
    assert model.logits_affine == (kind == "gap")
    feats = jnp.asarray(rng.random((4, 8, 8, 12)), jnp.float32)
    mask = (rng.random(12) < 0.5).astype(np.float32)
    pre = model.preactivation_bias(params)[None] + sum(
        mask[c] * model.channel_contribution(params, feats, jnp.int32(c)) for c in range(12))
    method = NETS[kind][1][0]
    want = model.module.apply({"params": params}, feats * mask[None, None, None, :], method=method)
    assert pre.shape == want.shape and model.preactivation_size == int(np.prod(want.shape[1:]))
    np.testing.assert_allclose(np.asarray(pre), np.asarray(want), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("units", [300, 2000])
def test_the_linear_map_of_a_dense_layer_is_its_kernel_from_either_side(units, rng):
    """Read through the transposed map where there are fewer pre-activations than the 768 features (300), through
    the map itself where there are more (2000): either way each entry is the dense kernel's own, bit for bit."""
    kernel = jnp.asarray(rng.standard_normal((768, units)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(units), jnp.float32)
    pre = lambda f: f.reshape(f.shape[0], -1) @ kernel + bias[None, :]
    matrix = jax.jit(lambda: flax_split.linear_map(pre, (8, 8, 12), jnp.float32))()
    assert matrix.shape == (units, 8, 8, 12)
    np.testing.assert_array_equal(np.asarray(matrix).reshape(units, 768), np.asarray(kernel).T)
    # No value it computes is larger than the map (a basis of one row per pre-activation would be 2000 x 2000).
    jaxpr = jax.make_jaxpr(lambda: flax_split.linear_map(pre, (8, 8, 12), jnp.float32))()
    assert max(int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars) <= units * 768


class ReluInPre(FlattenNet):
    @nn.compact
    def pre(self, feats):
        return nn.relu(nn.Dense(16, name="fc")(feats.reshape(feats.shape[0], -1)))


class OtherHidden(FlattenNet):
    def hidden(self, feats):  # not post(pre(feats)): twice that
        return nn.relu(self.pre(feats)) * 2.0


class ClipNet(FlattenNet):
    """Affine below 10: the check's large feature maps cross the clip."""

    @nn.compact
    def pre(self, feats):
        return nn.Dense(16, name="fc")(jnp.minimum(feats, 10.0).reshape(feats.shape[0], -1))


class BranchNet(FlattenNet):
    """A ReLU branch beside a branch a billion times larger."""

    @nn.compact
    def pre(self, feats):
        flat = feats.reshape(feats.shape[0], -1)
        return jnp.concatenate([nn.Dense(8, name="fc")(flat) * 1e9, nn.relu(nn.Dense(8, name="fc2")(flat))], axis=1)


class CenteredNet(FlattenNet):
    """``pre`` centres the features over the batch: affine, but each image's value depends on the others. Its
    ``hidden`` does not (a module whose hidden mixes the images is refused before its split is looked at)."""

    @nn.compact
    def pre(self, feats):
        return nn.Dense(16, name="fc")((feats - feats.mean(axis=0, keepdims=True)).reshape(feats.shape[0], -1))

    @nn.compact
    def hidden(self, feats):
        return self.post(nn.Dense(16, name="fc")(feats.reshape(feats.shape[0], -1)))


class DictNet(FlattenNet):
    @nn.compact
    def pre(self, feats):
        return {"fc": nn.Dense(16, name="fc")(feats.reshape(feats.shape[0], -1))}

    def hidden(self, feats):
        return nn.relu(self.pre(feats)["fc"])


class WideConvNet(Trunk):
    """A 'same' convolution on 16x16x3 features to 12 channels: its linear map is (16x16x12) x (16x16x3)."""

    @nn.compact
    def features(self, x):
        return nn.relu(nn.Conv(3, (3, 3), name="conv1")(x))

    @nn.compact
    def pre(self, feats):
        return nn.Conv(12, (3, 3), name="conv3")(feats)

    @nn.compact
    def post(self, pre):
        return nn.relu(nn.Dense(16, name="fc")(pre.reshape(pre.shape[0], -1)))

    def hidden(self, feats):
        return self.post(self.pre(feats))


@pytest.mark.parametrize("net, split, complaint", [
    (ReluInPre, ("pre", "post"), r"head_split=\('pre', 'post'\): ReluInPre.pre is not affine in the features"),
    (FlattenNet, ("hidden", None), r"FlattenNet.hidden is not affine in the features"),
    (OtherHidden, ("pre", "post"), r"OtherHidden: post\(pre\(f\)\) differs from hidden\(f\) by 0.5 of its size"),
    (FlattenNet, ("pre", "after"), r"head_split=\('pre', 'after'\): FlattenNet has no after\(\) method"),
    (ConvNet, ("pre", None), r"ConvNet: pre\(f\) gives shape \(8, 294\) for 8 feature maps, but the output layer "
                             r"takes \(8, 16\)"),
    (ClipNet, ("pre", "post"), r"ClipNet.pre is not affine in the features: on feature maps of magnitudes 0.001 to "
                               r"1e\+06"),
    (BranchNet, ("pre", "post"), r"BranchNet.pre is not affine"),
    (CenteredNet, ("pre", "post"), r"CenteredNet.pre gives an image another value in a batch than alone"),
    (DictNet, ("pre", "post"), r"DictNet.pre gives dict for 8 feature maps, not one array with a row per image"),
    (FlattenNet, "pre", r"head_split=pre: expected two method names, \(pre, post\)"),
    (FlattenNet, ("pre", "post", "x"), r"expected two method names"),
    (FlattenNet, ("", None), r"expected two method names"),
    (FlattenNet, ("features", None), r"FlattenNet.features does not run on feature maps of shape \(8, 8, 8, 12\)"),
    (WideConvNet, ("pre", "post"), r"WideConvNet.pre's linear map would hold 3072 pre-activations x 768 features"),
])
def test_a_head_split_that_is_not_one_is_refused(net, split, complaint, monkeypatch):
    params = net().init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
    layer = "conv1" if net is WideConvNet else "conv2"
    if net is WideConvNet:  # a small map for the test: the limit lowered to its size less one byte
        monkeypatch.setattr(flax_split, "LINEAR_MAP_BYTES", 4 * 3072 * 768 - 1)
    with pytest.raises(ConfigError, match=complaint) as err:
        FlaxCNN.build(net(), params, input_hwc=(16, 16, 3), input_scale="255", layer=layer, head_split=split)
    assert err.value.field == "head_split"


class Float32Net(FlattenNet):
    """A dense layer that computes in float32 whatever its input, in ``pre`` alone (``hidden`` is float64)."""

    @nn.compact
    def pre(self, feats):
        return nn.Dense(16, dtype=jnp.float32, name="fc")(feats.reshape(feats.shape[0], -1))

    @nn.compact
    def hidden(self, feats):
        return self.post(nn.Dense(16, name="fc")(feats.reshape(feats.shape[0], -1)))


def test_a_split_that_computes_in_float32_is_refused():
    # Near-ties are settled by the module in float64: a split method that computes in float32 is not that network.
    params = Float32Net().init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
    with pytest.raises(ConfigError, match=r"module: Float32Net.pre computes in float32 \(\w+\) when given float64 "
                                          r"inputs and weights") as err:
        FlaxCNN.build(Float32Net(), params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2",
                      head_split=("pre", "post"))
    assert err.value.field == "module"


def test_the_sweeps_memory_model_counts_the_linear_map_on_each_device(monkeypatch):
    """The split's linear map, and as much again while it is read, is held by each device's call whatever its
    chunk: the planner leaves it out of the room for chunks (two CPU devices: twice)."""
    model, params = _model("wide")
    matrix = flax_split.linear_map(lambda f: model._pre(params, f), model.feature_hwc, jnp.float32)
    assert model.call_bytes() == 2 * matrix.nbytes == 2 * 4 * 2048 * 768
    x = np.zeros((2000, 16, 16, 3), np.uint8)
    options = sw.SweepOptions(memory_budget=40 * 2**20, devices=2, platform="cpu")  # chunks under 256
    counted = sw.plan_sweep(options, [x], model)
    monkeypatch.setattr(FlaxCNN, "call_bytes", lambda self: 0)
    uncounted = sw.plan_sweep(options, [x], model)
    room = (uncounted.chunk - counted.chunk) * counted.bytes_per_image * 2  # two devices' chunks
    assert room == pytest.approx(2 * 2 * matrix.nbytes, abs=2 * counted.bytes_per_image)


def test_a_budget_the_linear_map_fills_is_refused_naming_it():
    model, _ = _model("wide")  # each of two devices holds 12 MiB for the map, whatever its images
    x = np.zeros((10, 16, 16, 3), np.uint8)
    with pytest.raises(ConfigError, match=r"0.0234 GiB of it the model's own working memory, held by each device's "
                                          r"call whatever its images: a head split's linear map\).*fewer devices"):
        sw.plan_sweep(sw.SweepOptions(memory_budget=15 * 2**20, devices=2, platform="cpu"), [x], model)
