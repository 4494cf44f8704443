"""badnet_jax.models.graph: any CNN read from Keras, against independent references.

References: the float64 NumPy interpreter of the IR (tests/numpy_ref.py, no code shared with the JAX model),
Keras' own logits stored beside the real files, and Keras itself, pruning by multiplying the layer's output
by the mask (a Lambda layer in a model the test builds from the loaded Keras model's own layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax import sweep as sw
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.ir import Graph, Node
from tests import numpy_ref
from tests.conftest import asset

FILES = {"resnet_tiny": "models/other/resnet_tiny.h5", "vgg_tiny": "models/other/vgg_tiny.h5"}
DEFAULT = {"resnet_tiny": "b1_out", "vgg_tiny": "p2"}  # the last feature map before global pooling / flatten


def _load(name: str):
    graph, params = read_keras_graph(asset(FILES[name]))
    return graph, params


def _reference(name: str):
    z = np.load(asset(FILES[name].replace(".h5", "_reference.npz")))
    return z["images"], z["logits"]


@pytest.mark.parametrize("name", FILES)
def test_logits_are_keras_logits_and_the_float64_interpreters(name):
    graph, params = _load(name)
    model = GraphCNN.build(graph, params)
    images, keras_logits = _reference(name)
    got = np.asarray(model.logits(params, jnp.asarray(images, jnp.float32)))
    np.testing.assert_allclose(got, keras_logits, rtol=1e-5, atol=1e-5)
    want64 = numpy_ref.graph_logits64(graph, params, images.astype(np.float64) / 255)
    np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-5)
    with jax.enable_x64(True):  # the same code in float64 is the float64 network
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        got64 = np.asarray(model.logits(p64, jnp.asarray(images, jnp.float64)))
    np.testing.assert_allclose(got64, want64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FILES)
def test_default_layer_is_the_last_feature_map_every_path_passes(name):
    graph, params = _load(name)
    model = GraphCNN.build(graph, params)
    assert model.layer == DEFAULT[name] and model.layers()[-1] == DEFAULT[name]
    assert model.feature_hwc == {"resnet_tiny": (16, 16, 32), "vgg_tiny": (4, 4, 16)}[name]
    assert model.num_classes == {"resnet_tiny": 10, "vgg_tiny": 7}[name]
    assert model.input_hwc == {"resnet_tiny": (32, 32, 3), "vgg_tiny": (28, 28, 3)}[name]


def test_layers_that_cannot_be_pruned_are_refused_naming_why():
    graph, params = _load("resnet_tiny")
    with pytest.raises(ConfigError, match="no such layer in 'resnet_tiny'.*stem_conv"):
        GraphCNN.build(graph, params, layer="nope")
    vgg, vgg_params = _load("vgg_tiny")
    fused = [n.name for n in vgg.nodes if n.name.endswith("/pre")]
    assert "c1/pre" in fused and "p1/pre" not in fused  # /pre of a layer without one: said so, not "no such"
    with pytest.raises(ConfigError, match=r"layer=p1/pre: layer 'p1' has no fused activation.*c1/pre.*"
                                          r"prune 'p1' itself") as err:
        GraphCNN.build(vgg, vgg_params, layer="p1/pre")
    # The examples are the fused layers that may be pruned: feature maps, not a Dense layer's pre-activations.
    assert "fc/pre" in fused and "fc/pre" not in str(err.value)
    with pytest.raises(ConfigError, match=r"layer=gap: its output has shape \(32,\), not a feature map"):
        GraphCNN.build(graph, params, layer="gap")
    # b0_bn2 feeds the residual Add, which also reads stem_relu: pruning b0_bn2 leaves the skip path.
    with pytest.raises(ConfigError, match="layer=b0_bn2: not every path to the logits passes through it "
                                          r"\('b0_add' reads 'stem_relu'\)"):
        GraphCNN.build(graph, params, layer="b0_bn2")


def _masked_hidden64(graph, params, x64, layer, mask, given=None):
    """The hidden layer (the output layer's input) with ``layer``'s output multiplied by ``mask``, in float64;
    ``given``: the nodes no mask at ``layer`` changes, computed once (``numpy_ref.upstream_of``)."""
    hidden = next(n for n in graph.nodes if n.name == graph.logits_node()).inputs[0]
    return numpy_ref.graph_values64(graph, params, x64, upto=hidden, masks={layer: mask}, given=given)[hidden]


@pytest.mark.parametrize("name", FILES)
def test_the_affine_split_is_the_masked_head_at_every_layer(name, rng):
    graph, params = _load(name)
    images, _ = _reference(name)
    x = jnp.asarray(images[:8], jnp.float32)
    for layer in GraphCNN.build(graph, params).layers():
        model = GraphCNN.build(graph, params, layer=layer)
        feats = model.features(params, x)
        mask = (rng.random(model.num_channels) < 0.5).astype(np.float32)
        contribs = jax.vmap(lambda c: model.channel_contribution(params, feats, c))(jnp.arange(model.num_channels))
        pre = tuple(b[None] + jnp.tensordot(jnp.asarray(mask), c, axes=(0, 0))
                    for b, c in zip(model.preactivation_bias(params), contribs))
        got = np.asarray(model.tail_hidden(params, pre))
        want = _masked_hidden64(graph, params, images[:8].astype(np.float64) / 255, layer, mask)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=layer)
        np.testing.assert_allclose(np.asarray(model.hidden(params, feats, mask)), want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max(), err_msg=layer)


@pytest.mark.parametrize("name", FILES)
def test_channelwise_preactivations_hold_each_channels_contribution_in_its_own_slot(name, rng):
    graph, params = _load(name)
    images, _ = _reference(name)
    x = jnp.asarray(images[:8], jnp.float32)
    seen = 0
    for layer in GraphCNN.build(graph, params).layers():
        model = GraphCNN.build(graph, params, layer=layer)
        feats = model.features(params, x)
        channelwise = model.channelwise_preactivations(params, feats)
        if channelwise is None:
            continue
        seen += 1
        contribs = jax.vmap(lambda c: model.channel_contribution(params, feats, c))(jnp.arange(model.num_channels))
        for p, c in zip(channelwise, contribs):
            c = np.asarray(c)  # (C, N, ..., C): channel k's contribution, zero outside slot k
            slots = np.eye(model.num_channels, dtype=bool).reshape(c.shape[0], *(1,) * (c.ndim - 2), c.shape[-1])
            np.testing.assert_array_equal(np.where(slots, 0, c), 0, err_msg=layer)
            # the same terms, reduced over all channels at once: float32 rounding may differ in the last bit
            want = np.where(slots, c, 0).sum(axis=0)
            np.testing.assert_allclose(np.asarray(p), want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=layer)
    # resnet_tiny's last block reaches its global average pooling through per-channel ops only; every vgg_tiny
    # layer reaches the logits through a convolution or flatten -> dense
    assert bool(seen) == (name == "resnet_tiny")


def test_logits_affine_in_the_mask_is_the_head_without_a_nonlinearity():
    graph, params = _load("resnet_tiny")
    assert GraphCNN.build(graph, params).logits_affine  # b1_out -> global average pooling -> dense
    assert not GraphCNN.build(graph, params, layer="b0_out").logits_affine  # relu and batch norm after it
    graph, params = _load("vgg_tiny")
    assert not GraphCNN.build(graph, params).logits_affine  # flatten -> dense -> relu -> dense


def _steps64(graph, params, x_uint8, layer, order):
    """(C + 1, N) float64 predictions pruning ``order`` at ``layer``, step by step (NumPy interpreter)."""
    x64 = x_uint8.astype(np.float64) / 255
    wout = np.asarray(params[graph.logits_node().split("/")[0]]["kernel"], np.float64)
    bout = np.asarray(params[graph.logits_node().split("/")[0]]["bias"], np.float64)
    given = numpy_ref.upstream_of(graph, numpy_ref.graph_values64(graph, params, x64, upto=layer), layer)
    out = []
    for k in range(len(order) + 1):
        mask = np.ones(len(order))
        mask[order[:k]] = 0
        out.append((_masked_hidden64(graph, params, x64, layer, mask, given) @ wout + bout).argmax(-1))
    return np.stack(out)


@pytest.mark.parametrize("name,layer", [("resnet_tiny", None), ("resnet_tiny", "b0_out"), ("vgg_tiny", None),
                                        ("vgg_tiny", "c2"), ("vgg_tiny", "c2/pre")])
@pytest.mark.parametrize("options", [sw.PLAIN, sw.SweepOptions(dedupe=False, group=False, cumulative=False),
                                     sw.SweepOptions(cumulative=False), sw.SweepOptions(batch_steps=4, cumulative=False),
                                     sw.SweepOptions(cumulative=True), sw.SweepOptions()],
                         ids=["plain", "prefix", "dedupe", "batched", "cumulative", "default"])
def test_every_strategy_gives_the_float64_pruned_network_at_every_step(name, layer, options, rng):
    graph, params = _load(name)
    model = GraphCNN.build(graph, params, layer=layer)
    images, _ = _reference(name)
    x = np.concatenate([images, rng.integers(0, 256, (8, *model.input_hwc), dtype=np.uint8)])
    result = sw.rank_and_sweep(model, params, {"clean_valid": x}, options)
    feats64 = numpy_ref.graph_values64(graph, params, x.astype(np.float64) / 255, upto=model.layer)[model.layer]
    np.testing.assert_array_equal(result.order, np.argsort(feats64.mean(axis=(0, 1, 2)), kind="stable"))
    np.testing.assert_array_equal(result.preds["clean_valid"], _steps64(graph, params, x, model.layer, result.order))


def test_a_forward_refuses_images_of_another_size_and_a_mask_of_another_layer():
    graph, params = _load("vgg_tiny")
    model = GraphCNN.build(graph, params)
    from badnet_jax import DataFileError

    with pytest.raises(DataFileError, match=r"x_NxHxWxC: images of shape \(2, 55, 47, 3\), expected \(N, 28, 28, 3\)"):
        model.logits(params, jnp.zeros((2, 55, 47, 3)))
    with pytest.raises(ConfigError, match=r"mask: shape \(60,\), expected \(16,\): one entry per p2 channel"):
        model.logits(params, jnp.zeros((2, 28, 28, 3)), np.ones(60))
    with pytest.raises(ConfigError, match="layer=input_1: the model's input, not a layer's output; prune one of "
                                          "c1, c2, p1, c3, c4, p2") as err:
        GraphCNN.build(graph, params, layer="input_1")
    assert "/pre" not in str(err.value)  # the suggestions are Keras layers: c2/pre is badnet-jax's own node


@pytest.mark.parametrize("name", FILES)
def test_layer_stages_are_the_weight_ops_on_their_real_inputs_with_flops_from_their_shapes(name):
    graph, params = _load(name)
    model = GraphCNN.build(graph, params, input_scale="255")
    images, _ = _reference(name)
    want = numpy_ref.graph_values64(graph, params, images.astype(np.float64) / 255)
    weighted = [n for n in graph.nodes if n.op in ("conv", "depthwise_conv", "dense")]
    stages = model.layer_stages()
    assert [s.name for s in stages] == [n.weights for n in weighted]
    inputs = model.stage_inputs(params, jnp.asarray(images, jnp.float32))
    trunk = set(model.split.trunk)
    for stage, node in zip(stages, weighted):
        # FLOPs: 2 x the kernel's size at every output position (the reference's output shape), a dense
        # layer's kernel once.
        kernel = np.asarray(params[node.weights]["kernel"])
        out = want[node.name]
        positions = out.shape[1] * out.shape[2] if out.ndim == 4 else 1
        assert stage.flops == 2 * kernel.size * positions, stage.name
        assert stage.part == ("trunk" if node.name in trunk else "tail" if node.name == graph.logits_node()
                              else stage.part)
        assert stage.part in ("trunk", "affine", "tail")
        np.testing.assert_allclose(np.asarray(inputs[stage.name]), want[node.inputs[0]], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(stage.fn(params, inputs[stage.name])), out, rtol=1e-4, atol=1e-4)
    assert sum(s.flops for s in stages) == 2 * sum(model.multiply_adds().values())


@pytest.mark.parametrize("layer,stages", [
    ("p2", {"c2/pre": ("c2", "p1"), "c4/pre": ("c4", "p2")}),
    ("p1", {"c2/pre": ("c2", "p1")}),
    ("c4", {"c2/pre": ("c2", "p1")}),  # the pruned relu is read: c4's stage is not one call
    ("c2", {}),
])
def test_conv_relu_pool_stages_run_as_one_call_with_the_same_values(layer, stages):
    graph, params = _load("vgg_tiny")
    model = GraphCNN.build(graph, params, layer=layer)
    assert model._stages == stages
    images, _ = _reference("vgg_tiny")
    x = jnp.asarray(images, jnp.float32)
    trunk = model.split.trunk
    apart = model._run(params, {trunk[0]: x / 255}, trunk[1:])[layer]  # every op on its own
    np.testing.assert_array_equal(np.asarray(model.features(params, x)), np.asarray(apart))
    feats, margin, scale = model.features_with_margins(params, x)
    np.testing.assert_array_equal(np.asarray(feats), np.asarray(apart))
    assert np.isfinite(np.asarray(margin)).all() == (layer != "c4/pre")


@pytest.mark.parametrize("name", FILES)
def test_the_float64_feature_means_are_the_float64_networks(name, monkeypatch):
    """``feature_means64`` (the ranking's near-ties settled): each channel's mean over the images, summed on the
    device in blocks and calls (small here: 3 calls), equals the float64 NumPy interpreter's."""
    from badnet_jax.numerics import xla64

    monkeypatch.setattr(xla64, "SUM_BLOCK", 4)
    monkeypatch.setattr(xla64, "SUM_CALL_BLOCKS", 2)
    graph, params = _load(name)
    model = GraphCNN.build(graph, params)
    images, _ = _reference(name)
    x = np.concatenate([images] * 3)[:19].astype(np.uint8)
    got = model.feature_means64(params, x, 255.0)
    feats = numpy_ref.graph_values64(graph, params, x.astype(np.float64) / 255, upto=model.layer)[model.layer]
    np.testing.assert_allclose(got, feats.mean(axis=(0, 1, 2)), rtol=1e-12, atol=1e-14)
    assert model.feature_means64(params, x[:0], 255.0).shape == (model.num_channels,)


def test_the_float64_feature_means_leave_padding_out_even_where_a_blank_image_gives_nan(monkeypatch):
    """A Flax trunk that standardises each image by its own spread is NaN on the all-zero images that pad the
    last block; the means leave them out (selected, not multiplied by 0) and stay the images' own."""
    import flax.linen as nn

    from badnet_jax.models.flax_model import FlaxCNN
    from badnet_jax.numerics import xla64

    class Standardised(nn.Module):
        @nn.compact
        def features(self, x):
            x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / x.std(axis=(1, 2, 3), keepdims=True)  # 0/0 on blank
            return nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)

        @nn.compact
        def hidden(self, feats):
            return feats.reshape(feats.shape[0], -1)

        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="output")(self.hidden(self.features(x)))

    monkeypatch.setattr(xla64, "SUM_BLOCK", 4)
    monkeypatch.setattr(xla64, "SUM_CALL_BLOCKS", 2)
    module = Standardised()
    x = np.random.default_rng(0).integers(1, 256, (14, 6, 6, 3)).astype(np.uint8)  # calls of 8 and 6: 2 padded
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)))["params"]
    model = FlaxCNN.build(module, params, input_hwc=(6, 6, 3), input_scale="raw")
    got = model.feature_means64(params, x, 1.0)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        feats = np.asarray(model.features(p64, jnp.asarray(x, jnp.float64), 1.0))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, feats.mean(axis=(0, 1, 2)), rtol=1e-12)


def _tiny(units: int, after: str = "", filters: int = 4):
    """input 8x8x3 -> conv (``filters`` channels) -> global average pooling -> Dense(units) [-> after]."""
    rng = np.random.default_rng(0)
    nodes = [Node.make("img", "input"), Node.make("c", "conv", ("img",), "c"),
             Node.make("g", "global_avg_pool", ("c",))]
    if after == "relu":  # a Dense with activation="relu": the layer's op as out/pre, its activation as out
        nodes += [Node.make("out/pre", "dense", ("g",), "out"), Node.make("out", "relu", ("out/pre",))]
    else:
        nodes.append(Node.make("out", "dense", ("g",), "out"))
    if after == "dropout":
        nodes.append(Node.make("drop", "identity", ("out",), dropout=0.5))
    graph = Graph(nodes=tuple(nodes), input_hwc=(8, 8, 3), output=nodes[-1].name, name="tiny")
    params = {"c": {"kernel": rng.standard_normal((3, 3, 3, filters)).astype(np.float32),
                    "bias": np.zeros(filters, np.float32)},
              "out": {"kernel": rng.standard_normal((filters, units)).astype(np.float32),
                      "bias": np.zeros(units, np.float32)}}
    return graph, params


def test_the_description_counts_the_pruned_layers_channels():
    assert GraphCNN.build(*_tiny(3)).describe() == "tiny (8x8x3 input, 3 classes), pruning c (4 channels)"
    assert GraphCNN.build(*_tiny(3, filters=1)).describe() == "tiny (8x8x3 input, 3 classes), pruning c (1 channel)"


def test_an_output_layer_that_gives_no_logits_per_class_is_refused_in_keras_terms():
    assert GraphCNN.build(*_tiny(2)).num_classes == 2
    with pytest.raises(ConfigError, match="output layer 'out' has 1 unit; the defense needs one logit per class, at "
                                          "least 2"):
        GraphCNN.build(*_tiny(1))
    with pytest.raises(ConfigError, match="output layer 'drop' is a Dropout or a linear Activation, not a linear "
                                          "Dense layer on a vector"):
        GraphCNN.build(*_tiny(3, after="dropout"))
    with pytest.raises(ConfigError, match="output layer 'out' is a Dense layer with activation 'relu' fused, not a "
                                          "linear Dense"):
        GraphCNN.build(*_tiny(3, after="relu"))


def _conv_head(kernel=(1, 1), pool: str = "global", target=None, between: str = ""):
    """input 8x8x3 -> conv 3x3 (4 channels) -> relu -> global average pooling with keepdims (or a 4x4 average
    pooling: a 2 x 2 map) -> a conv of ``kernel`` 'same' with 3 filters [-> ``between``: a dropout, or a softmax
    fused into the conv] -> flatten (or a reshape to ``target``) -> softmax: keras.applications' MobileNet head,
    logits from a 1 x 1 convolution."""
    rng = np.random.default_rng(2)
    pooled = (Node.make("g", "global_avg_pool", ("r",), keepdims=True) if pool == "global"
              else Node.make("g", "avg_pool", ("r",), window=(3, 3), strides=(3, 3), padding="valid"))
    conv = [Node.make("out", "conv", ("g",), "out", padding="same")]
    if between == "dropout":
        conv.append(Node.make("drop", "identity", ("out",), dropout=0.5))
    elif between == "softmax":
        conv = [Node.make("out/pre", "conv", ("g",), "out", padding="same"), Node.make("out", "softmax", ("out/pre",))]
    last = conv[-1].name
    nodes = [Node.make("img", "input"), Node.make("c", "conv", ("img",), "c"), Node.make("r", "relu", ("c",)), pooled,
             *conv, Node.make("flat", "flatten", (last,)) if target is None
             else Node.make("flat", "reshape", (last,), target=target),
             Node.make("probs", "softmax", ("flat",))]
    graph = Graph(nodes=tuple(nodes), input_hwc=(8, 8, 3), output="probs", name="conv_head")
    params = {"c": {"kernel": rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
                    "bias": rng.standard_normal(4).astype(np.float32)},
              "out": {"kernel": rng.standard_normal((*kernel, 4, 3)).astype(np.float32),
                      "bias": rng.standard_normal(3).astype(np.float32)}}
    return graph, params


def test_logits_from_a_1x1_convolution_on_a_1x1_map_are_a_dense_layers(rng):
    """A 1 x 1 convolution on the pooled 1 x 1 map, flattened, is the output layer: its (1, 1, H, K) kernel is the
    Dense kernel, its input the hidden layer; the model's logits under a mask are the float64 interpreter's."""
    graph, params = _conv_head()
    model = GraphCNN.build(graph, params)
    assert (model.layer, model.num_classes, model.hidden_size) == ("r", 3, 4)
    assert model.split.output == "out" and model.split.hidden == "g"
    w, b = model.output_layer(params)
    np.testing.assert_array_equal(w, params["out"]["kernel"][0, 0])
    x = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.float32)
    mask = np.array([1, 0, 1, 1], np.float32)
    want = numpy_ref.graph_values64(graph, params, x / 255.0, upto="flat", masks={"r": mask})["flat"]
    got = np.asarray(model.logits(params, jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert model.layers() == ["c", "r", "g"]  # the 1 x 1 pooled map may be pruned too; the logits' map not
    # A reshape to the vector of logits is the same head.
    assert GraphCNN.build(*_conv_head(target=(3,))).split.output == "out"


def test_logits_from_any_other_convolution_are_refused():
    with pytest.raises(ConfigError, match=r"'out', a Conv2D with a \(3, 3\) kernel on a map of shape \(1, 1, 4\)"):
        GraphCNN.build(*_conv_head(kernel=(3, 3)))
    with pytest.raises(ConfigError, match=r"a \(1, 1\) kernel on a map of shape \(2, 2, 4\).*1 x 1 convolution"):
        GraphCNN.build(*_conv_head(pool="window"))
    with pytest.raises(ConfigError, match=r"its logits 'flat' have shape \(3, 1\)"):
        GraphCNN.build(*_conv_head(target=(3, 1)))
    for layer in ("out", "out/pre"):  # the output layer, and the input of an activation it does not have
        with pytest.raises(ConfigError, match=f"layer={layer}: the output layer, whose channels are the logits; prune "
                                              "one of c, r, g"):
            GraphCNN.build(*_conv_head(), layer=layer)
    # Something between the convolution and the Flatten: named, with what to do.
    with pytest.raises(ConfigError, match="logits are a Flatten 'flat' of 'drop', a Dropout or a linear Activation; "
                                          ".* with the Flatten or Reshape directly after it"):
        GraphCNN.build(*_conv_head(between="dropout"))
    with pytest.raises(ConfigError, match="of 'out', a Conv2D with activation 'softmax' fused; .* a linear 1 x 1 "
                                          "Conv2D"):
        GraphCNN.build(*_conv_head(between="softmax"))


@pytest.mark.slow
@pytest.mark.parametrize("app", ["MobileNet", "MobileNetV3Small"])
def test_keras_applications_mobilenets_read_with_their_1x1_convolution_logits(app, tmp_path, rng):
    """keras.applications' MobileNet (logits: a 1 x 1 convolution reshaped) and MobileNetV3Small (minimalistic:
    a 1 x 1 convolution flattened), untrained, saved and read: Keras' own logits, pruned by default at the map
    before the global pooling."""
    from tests.keras_oracle import keras_predict  # first: it selects Keras' JAX backend

    keras = pytest.importorskip("keras")
    from badnet_jax.io.model_file import load_model

    keras.utils.set_random_seed(0)
    kwargs = {"minimalistic": True, "include_preprocessing": False} if app == "MobileNetV3Small" else {"alpha": 0.25}
    built = getattr(keras.applications, app)(input_shape=(32, 32, 3), weights=None, classes=6, **kwargs)
    built.save(tmp_path / "m.keras")
    model, params = load_model(tmp_path / "m.keras", input_scale="255")
    logits_layer = built.layers[-2]  # the Reshape or Flatten before the softmax
    assert type(logits_layer).__name__ in ("Reshape", "Flatten")
    assert type(built.get_layer(model.split.output)).__name__ == "Conv2D"
    assert type(built.layers[built.layers.index(built.get_layer(model.layer)) + 1]).__name__ == \
        "GlobalAveragePooling2D"
    x = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    want = keras_predict(keras.Model(built.input, logits_layer.output), x / 255.0)
    got = np.asarray(model.logits(params, jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _cropped_and_up_sampled():
    """input 10x10x3 -> conv 3x3 'same' -> relu -> crop ((1, 2), (3, 0)) -> up-sample (2, 1) -> global average
    pooling -> Dense(3); the conv's bias pushes channel 0 below zero at most positions, so its features are dead
    there and the margins decide."""
    rng = np.random.default_rng(4)
    nodes = [Node.make("img", "input"), Node.make("c/pre", "conv", ("img",), "c", padding="same"),
             Node.make("c", "relu", ("c/pre",)), Node.make("crop", "crop", ("c",), crop=((1, 2), (3, 0))),
             Node.make("up", "upsample", ("crop",), size=(2, 1)), Node.make("g", "global_avg_pool", ("up",)),
             Node.make("out", "dense", ("g",), "out")]
    graph = Graph(nodes=tuple(nodes), input_hwc=(10, 10, 3), output="out", name="crop_up")
    params = {"c": {"kernel": rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
                    "bias": np.array([-2.5, 0.1, 0.0, -0.3], np.float32)},
              "out": {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}
    return graph, params


@pytest.mark.parametrize("layer", ["crop", "up"])
def test_a_cropped_or_up_sampled_relu_keeps_its_dead_channel_margins_and_its_convolution(layer):
    """Pruned after a crop or an up-sampling of a relu's output, the features are dead where the relu's input is
    <= 0 at the positions the crop keeps: the margins are the float64 maxima of the pre-activations there, so the
    float64 settling can decide a channel float32 calls dead; and the clp and l1 rankings read the convolution
    that produces the channels."""
    graph, params = _cropped_and_up_sampled()
    model = GraphCNN.build(graph, params, layer=layer)
    x = np.random.default_rng(5).uniform(-1, 1, (6, 10, 10, 3)).astype(np.float32)
    feats, margin, scale = model.features_with_margins(params, jnp.asarray(x), 1.0)
    pre = numpy_ref.graph_values64(graph, params, x.astype(np.float64), upto="c/pre")["c/pre"]
    np.testing.assert_allclose(np.asarray(margin), pre[:, 1:-2, 3:, :].max(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scale), np.abs(pre).max(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    want = numpy_ref.graph_values64(graph, params, x.astype(np.float64), upto=layer)[layer]
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-5, atol=1e-5)
    producer = model.producer(params)
    assert producer is not None and producer.conv == "c/pre"
    np.testing.assert_array_equal(producer.kernel, np.asarray(params["c"]["kernel"], np.float64))


@pytest.mark.parametrize("pool", ["global_avg_pool", "global_max_pool"])
def test_the_default_layer_is_the_map_before_a_global_pooling_that_keeps_its_dims(pool):
    """A global pooling with keepdims outputs a 1 x 1 map, 4-D like a feature map: the default (the paper's
    layer before flatten or global pooling) is still the map it pools, here the relu of the last convolution."""
    rng = np.random.default_rng(6)
    nodes = (Node.make("img", "input"), Node.make("c/pre", "conv", ("img",), "c"), Node.make("c", "relu", ("c/pre",)),
             Node.make("g", pool, ("c",), keepdims=True), Node.make("flat", "reshape", ("g",), target=(4,)),
             Node.make("out", "dense", ("flat",), "out"))
    graph = Graph(nodes=nodes, input_hwc=(8, 8, 3), output="out", name="keep")
    params = {"c": {"kernel": rng.standard_normal((3, 3, 3, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
              "out": {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}
    model = GraphCNN.build(graph, params)
    assert model.layer == "c"
    assert "g" in model.layers()  # the pooled map may still be pruned when asked for
