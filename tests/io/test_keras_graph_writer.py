"""badnet_jax.io.keras_graph_writer: B' of any GraphCNN as a Keras full-model h5 that Keras itself loads.

Every saved file is opened by ``keras.models.load_model`` (Keras 3, JAX backend: a test-only oracle) and its
predictions compared with two references: badnet-jax's masked forward ``model.logits(params, x, mask)`` and the
independent float64 interpreter ``tests.numpy_ref.graph_values64`` run on the *original* graph with the pruned
layer's output multiplied by the mask (what pruning means: that layer's output channel is zero). Models: the
real tf_keras 2 files ``models/other/{resnet_tiny,vgg_tiny}.h5`` and two Keras 3 models built here whose
pruned layers are read by every kind of reader (convolutions, depthwise, Dense after Flatten or global pooling
and Concatenate, batch norm, a non-commuting ReLU).
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import pytest

from badnet_jax.errors import ConfigError, OutputError
from badnet_jax.io.keras_file import INPUT_SCALE_ATTR, recorded_input_scale
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.io.keras_graph_writer import (MASK_LAYER, PRUNE_METHOD_ATTR, PRUNED_CHANNELS_ATTR, PRUNED_LAYER_ATTR,
                                              ZEROED_READERS, prune_graph, save_keras_graph)
from badnet_jax.io.keras_model_config import keras_layer_order
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.ir import Graph, Node
from tests import numpy_ref
from tests.conftest import asset
from tests.keras_oracle import keras_load_model, keras_predict

keras = pytest.importorskip("keras")
layers = keras.layers

OTHER = {"resnet_tiny": "models/other/resnet_tiny.h5", "vgg_tiny": "models/other/vgg_tiny.h5"}

# (model, pruned layer) -> how B' must be made: the readers of the pruned channels decide.
CASES = {
    ("resnet_tiny", None): ZEROED_READERS,  # b1_out -> gap -> logits (Dense after global pooling)
    ("resnet_tiny", "stem_relu"): MASK_LAYER,  # read by a conv and by an Add
    ("resnet_tiny", "b0_out"): ZEROED_READERS,  # read by two convs (b1_conv1, b1_proj)
    ("resnet_tiny", "b1_out"): ZEROED_READERS,
    ("resnet_tiny", "stem_conv"): MASK_LAYER,  # read by a batch norm (zeroing its kernel would not be exact)
    ("resnet_tiny", "b0_add"): ZEROED_READERS,  # relu -> two convs
    ("vgg_tiny", None): ZEROED_READERS,  # p2 -> flatten -> Dense: rows in Keras' (h, w, c) order
    ("vgg_tiny", "c2"): ZEROED_READERS,  # c2 -> max pool -> conv
    ("vgg_tiny", "p1"): ZEROED_READERS,
    ("vgg_tiny", "c4"): ZEROED_READERS,  # c4 -> max pool -> flatten -> Dense
    ("vgg_tiny", "p2"): ZEROED_READERS,
    ("vgg_tiny", "c1/pre"): ZEROED_READERS,  # inside a fused relu Conv2D: the same as pruning c1
    ("branchy", None): ZEROED_READERS,  # drop -> global max + avg pooling -> Concatenate -> Dense
    ("branchy", "stem"): ZEROED_READERS,  # two parallel 1x1 convs
    ("branchy", "cat"): ZEROED_READERS,  # ReLU(max 6) -> padding -> DepthwiseConv2D
    ("branchy", "dw"): MASK_LAYER,  # BatchNormalization
    ("branchy", "lrelu"): ZEROED_READERS,  # average pooling (same) -> two convs
    ("seq", None): ZEROED_READERS,  # bn_noc -> max pool -> Dropout -> Flatten -> Dense
    ("seq", "c_s2"): ZEROED_READERS,  # a leaky, capped ReLU -> a DepthwiseConv2D
    ("seq", "dw/pre"): MASK_LAYER,  # inside a fused relu DepthwiseConv2D, read by a batch norm
    ("modern", None): MASK_LAYER,  # se_excite -> tanh -> global max pool (keepdims) -> Reshape
    ("modern", "c_swish/pre"): ZEROED_READERS,  # inside a fused swish Conv2D (0 -> 0): a DepthwiseConv2D reads it
    ("modern", "a_gelu"): MASK_LAYER,  # read by a global average pooling (keepdims) and a Multiply
    ("modern", "c_relu6"): ZEROED_READERS,  # a fused relu6 Conv2D read by a Conv2D
    ("modern", "dw_hard"): ZEROED_READERS,  # read by a SeparableConv2D: its depthwise kernel's entries zeroed
    ("modern", "sep"): MASK_LAYER,  # a fused elu SeparableConv2D, read by the gelu's global pooling and Multiply
    ("hourglass", None): ZEROED_READERS,  # c_out -> global average pooling -> Dense
    ("hourglass", "crop1"): ZEROED_READERS,  # a Cropping2D read by a Conv2D
    ("hourglass", "enc"): MASK_LAYER,  # read by a max pool, a 1x1 Conv2D and a Subtract
    ("hourglass", "min"): ZEROED_READERS,  # cropped (zeros kept) into a Conv2D
}
SLOW_CASES = {("resnet_tiny", "b1_out"), ("vgg_tiny", "p1"), ("vgg_tiny", "p2"), ("branchy", "lrelu")}


def _branchy_model():
    """Functional, pixels 0..255 in (a Rescaling inside): fused leaky_relu Conv2D, parallel 1x1 convs of equal
    kernel shapes (weights Keras would load into each other's place if the file's order were wrong), Concatenate,
    ReLU(max_value), ZeroPadding2D, DepthwiseConv2D, BatchNormalization without center, LeakyReLU, same
    AveragePooling2D, Add, Dropout, both global poolings concatenated, a fused relu Dense and a Softmax layer."""
    inp = keras.Input((16, 14, 3), name="img")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    stem = layers.Conv2D(8, 3, padding="same", activation="leaky_relu", name="stem")(x)
    br_b = layers.Conv2D(4, 1, name="br_b")(stem)
    br_a = layers.Conv2D(4, 1, name="br_a")(stem)
    cat = layers.Concatenate(name="cat")([br_a, br_b])
    r6 = layers.ReLU(max_value=6.0, name="relu6")(cat)
    pad = layers.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(r6)
    dw = layers.DepthwiseConv2D(2, depth_multiplier=2, name="dw")(pad)
    bn = layers.BatchNormalization(center=False, name="bn")(dw)
    lrelu = layers.LeakyReLU(negative_slope=0.1, name="lrelu")(bn)
    avg = layers.AveragePooling2D(3, strides=2, padding="same", name="avg")(lrelu)
    c2 = layers.Conv2D(8, 3, padding="same", name="c2")(avg)
    skip = layers.Conv2D(8, 1, name="skip")(avg)
    post = layers.Activation("relu", name="post")(layers.Add(name="add")([c2, skip]))
    drop = layers.Dropout(0.3, name="drop")(post)
    pooled = layers.Concatenate(name="pooled")([layers.GlobalMaxPooling2D(name="gmp")(drop),
                                                layers.GlobalAveragePooling2D(name="gap")(drop)])
    hid = layers.Dense(12, activation="relu", name="hid")(pooled)
    logits = layers.Dense(5, name="logits")(hid)
    return keras.Model(inp, layers.Softmax(name="probs")(logits), name="branchy")


def _seq_model():
    """Sequential, pixels / 255 in: strided same Conv2D, a leaky, capped ReLU, a fused relu DepthwiseConv2D
    without bias, BatchNormalization without center, max pooling, Dropout, Flatten, a fused relu Dense, a 1-D
    BatchNormalization without scale and a Dense with a fused softmax (its pre-activation is the logits)."""
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="c_s2"),
        layers.ReLU(max_value=2.0, negative_slope=0.1, name="relu_all"),
        layers.DepthwiseConv2D(2, padding="same", activation="relu", use_bias=False, name="dw"),
        layers.BatchNormalization(center=False, name="bn_noc"),
        layers.MaxPooling2D(2, name="mp"),
        layers.Dropout(0.5, name="drop"),
        layers.Flatten(name="flat"),
        layers.Dense(10, activation="relu", name="fc"),
        layers.BatchNormalization(scale=False, name="bn_1d"),
        layers.Dense(4, activation="softmax", name="out"),
    ], name="seq")


def _modern_model():
    """Functional, pixels 0..255 in, an adapted Normalization of them, activations by name (relu6, swish,
    hard_swish, elu, gelu, sigmoid, tanh), a SeparableConv2D, a squeeze-and-excitation block (GlobalAveragePooling2D
    with keepdims, 1x1 convolutions, a broadcast Multiply), a global max pooling with keepdims and a Reshape to the
    Dense."""
    inp = keras.Input((10, 9, 3), name="px")
    x = layers.Normalization(name="norm")(inp)
    x = layers.Conv2D(6, 3, padding="same", activation="relu6", name="c_relu6")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="swish", name="c_swish")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="hard_swish", name="dw_hard")(x)
    x = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, activation="elu", name="sep")(x)
    x = layers.Activation("gelu", name="a_gelu")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(layers.Conv2D(4, 1, activation="silu",
                                                                                   name="se_reduce")(s))
    x = layers.Activation("tanh", name="a_tanh")(layers.Multiply(name="se_excite")([x, s]))
    g = layers.Reshape((-1,), name="flat")(layers.GlobalMaxPooling2D(keepdims=True, name="gmp_keep")(x))
    return keras.Model(inp, layers.Dense(4, activation="softmax", name="out")(g), name="modern")


def _hourglass_model():
    """Functional, pixels 0..255 in: an encoder-decoder block (UpSampling2D, Cropping2D) and the merges Subtract,
    Average, Maximum and Minimum, a Cropping2D before the last Conv2D."""
    inp = keras.Input((8, 8, 3), name="px")
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="enc")(inp)
    d = layers.Conv2D(6, 3, padding="same", name="mid")(layers.MaxPooling2D(2, name="down")(x))
    u = layers.Cropping2D(((1, 3), (0, 0)), name="crop")(layers.UpSampling2D((3, 2), name="up")(d))
    a = layers.Subtract(name="sub")([x, u])
    b = layers.Conv2D(6, 1, name="side")(x)
    m = layers.Minimum(name="min")([layers.Maximum(name="max")([layers.Average(name="avg")([a, b, u]), b]), a])
    y = layers.Conv2D(8, 3, activation="relu", name="c_out")(layers.Cropping2D([1, 0], name="crop1")(m))
    g = layers.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(inp, layers.Dense(4, activation="softmax", name="out")(g), name="hourglass")


BUILDERS = {"branchy": (_branchy_model, "raw"), "seq": (_seq_model, "255"), "modern": (_modern_model, "raw"),
            "hourglass": (_hourglass_model, "raw")}


def _seed_weights(model, seed: int) -> None:
    """Seeded weights of a sensible scale, biases included; batch norms with non-trivial statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if isinstance(layer, layers.BatchNormalization):
            names = [w.path.rsplit("/", 1)[-1] for w in layer.weights]
            draw = {"gamma": lambda s: rng.uniform(0.5, 1.5, s), "beta": lambda s: rng.normal(0, 0.3, s),
                    "moving_mean": lambda s: rng.normal(0, 0.5, s), "moving_variance": lambda s: rng.uniform(0.3, 2, s)}
            layer.set_weights([draw[n](w.shape).astype(np.float32) for n, w in zip(names, ws)])
        elif isinstance(layer, layers.Normalization):  # adapt()'s pixel mean, variance and count
            c = ws[0].shape
            layer.set_weights([rng.uniform(60, 190, c).astype(np.float32), rng.uniform(900, 4000, c).astype(np.float32),
                               np.array(1000, ws[2].dtype)])
            layer.finalize_state()  # as adapt() ends: the layer computes with the statistics it holds from now on
        else:
            fan_in = lambda s: s[0] * s[1] if isinstance(layer, layers.DepthwiseConv2D) else int(np.prod(s[:-1]))
            layer.set_weights([(rng.normal(0, 1, w.shape) / np.sqrt(fan_in(w.shape)) if w.ndim > 1
                                else rng.normal(0, 0.2, w.shape)).astype(np.float32) for w in ws])


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each model: its file (the original B), IR graph and params, GraphCNN, images (uint8) and Keras' own output
    on them (the original file loaded by Keras)."""
    out = {}
    for name, rel in OTHER.items():
        path = asset(rel)
        graph, params = read_keras_graph(path)
        images = np.load(asset(rel.replace(".h5", "_reference.npz")))["images"]
        out[name] = {"path": path, "graph": graph, "params": params, "images": images,
                     "model": GraphCNN.build(graph, params, input_scale="255")}
    keras.utils.set_random_seed(0)
    for i, (name, (builder, scale)) in enumerate(BUILDERS.items()):
        km = builder()
        _seed_weights(km, seed=20 + i)
        path = tmp_path_factory.mktemp(name) / f"{name}.keras"
        km.save(path)
        graph, params = read_keras_graph(path)
        images = np.random.default_rng(200 + i).integers(0, 256, (12, *km.input_shape[1:]), dtype=np.uint8)
        out[name] = {"path": path, "graph": graph, "params": params, "images": images,
                     "model": GraphCNN.build(graph, params, input_scale=scale)}
    for net in out.values():
        net["keras_in"] = _keras_input(net["model"], net["images"])
        net["original_out"] = keras_predict(keras_load_model(net["path"]), net["keras_in"])
    return out


def _keras_input(model: GraphCNN, images: np.ndarray) -> np.ndarray:
    """What Keras is fed: the pixels the model takes (float32, divided as badnet-jax divides them)."""
    x = images.astype(np.float32)
    return x / np.float32(255) if model.input_scale == "255" else x


def _mask(model: GraphCNN, seed: int = 0) -> np.ndarray:
    """A seeded mask pruning about 40% of the channels, at least one, never all."""
    rng = np.random.default_rng(seed)
    c = model.num_channels
    m = np.ones(c, np.float32)
    m[rng.choice(c, size=max(1, int(0.4 * c)), replace=False)] = 0.0
    return m


def _close(ours: np.ndarray, theirs: np.ndarray, rel: float) -> None:
    theirs = np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=rel, atol=rel * max(np.abs(theirs).max(), 1e-6))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _keras_logits(kmodel, graph: Graph, x: np.ndarray) -> np.ndarray:
    """Keras' logits: its output when that is the logits layer, else the logits layer's output (a Softmax after
    it), else None (a Dense with a fused softmax: its pre-activation is not a Keras tensor)."""
    logits = graph.logits_node()
    if logits == graph.output:
        return keras_predict(kmodel, x)
    if "/" in logits:
        return None
    return keras_predict(keras.Model(kmodel.inputs, kmodel.get_layer(logits).output), x)


def _case_params():
    return [pytest.param(net, layer, id=f"{net}-{layer or 'default'}",
                         marks=[pytest.mark.slow] if (net, layer) in SLOW_CASES else [])
            for net, layer in CASES]


# ------------------------------------------------------------------------------------------------ B' itself


@pytest.mark.parametrize("net, layer", _case_params())
def test_b_prime_predicts_the_masked_network(nets, tmp_path, net, layer):
    """Keras' B' = badnet-jax's masked forward = float64 reference with the layer's output channels zeroed."""
    n = nets[net]
    model = n["model"] if layer is None else n["model"].with_layer(layer)
    params, graph, images = n["params"], n["graph"], n["images"]
    mask = _mask(model, seed=len(model.layer))
    pruned = prune_graph(model, params, mask)
    assert pruned.method == CASES[net, layer]
    path = save_keras_graph(model, params, tmp_path / "b_prime.h5", mask=mask)

    kmodel = keras_load_model(path)
    probs = keras_predict(kmodel, n["keras_in"])
    ours = np.asarray(model.logits(params, images.astype(np.float32), mask), np.float64)
    np.testing.assert_array_equal(probs.argmax(-1), ours.argmax(-1))
    theirs = _keras_logits(kmodel, graph, n["keras_in"])
    if theirs is not None:
        _close(ours, theirs, 1e-5)
    if graph.output != graph.logits_node():
        np.testing.assert_allclose(probs, _softmax(ours), atol=1e-5)

    # Independent: the original graph in float64 with the pruned layer's output multiplied by the mask.
    logits = graph.logits_node()
    x64 = images.astype(np.float64) / model.divisor
    ref = numpy_ref.graph_values64(graph, params, x64, upto=logits, masks={model.layer: mask})[logits]
    _close(theirs if theirs is not None else ours, ref, 1e-4)
    np.testing.assert_array_equal(probs.argmax(-1), ref.argmax(-1))
    # ...and pruning changed something: the unpruned network does not compute the same logits.
    full = numpy_ref.graph_logits64(graph, params, x64)
    assert np.abs(full - ref).max() > 1e-3 * np.abs(full).max()


def test_a_config_larger_than_an_hdf5_object_header_is_written(tmp_path):
    """A deep model's config passes the 64 KB an HDF5 object header holds (a DenseNet121's: 363 KB): B' stores it
    as Keras does, as a variable-length string, and Keras loads the file and predicts the masked network."""
    long = "x" * 900  # names are what make a config long; 40 layers of them take ~110 KB here
    km = keras.Sequential([keras.Input((6, 6, 3))]
                          + [layers.Conv2D(4, 1, activation="relu", name=f"c{i}_{long}") for i in range(40)]
                          + [layers.GlobalAveragePooling2D(name="gap"), layers.Dense(3, name="out")], name="deep")
    _seed_weights(km, seed=7)
    km.save(tmp_path / "deep.keras")
    graph, params = read_keras_graph(tmp_path / "deep.keras")
    model = GraphCNN.build(graph, params, input_scale="255")
    assert model.layer == f"c39_{long}"
    mask = _mask(model)
    path = save_keras_graph(model, params, tmp_path / "b_prime.h5", mask=mask)
    with h5py.File(path, "r") as f:
        assert len(f.attrs["model_config"]) > 65536
    images = np.random.default_rng(3).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    x64 = images.astype(np.float64) / 255
    ref = numpy_ref.graph_values64(graph, params, x64, upto="out", masks={model.layer: mask})["out"]
    _close(keras_predict(keras_load_model(path), _keras_input(model, images)), ref, 1e-4)


@pytest.mark.parametrize("net, layer", [("resnet_tiny", "b0_out"), ("vgg_tiny", None), ("branchy", "stem"),
                                        ("branchy", "dw"), ("seq", "dw/pre")])
def test_architecture_kept_or_one_mask_layer_added(nets, tmp_path, net, layer):
    """Zeroed readers keep every layer and name; a mask layer is one DepthwiseConv2D more whose kernel is the mask,
    read by every reader of the pruned layer; both files record the pruning."""
    n = nets[net]
    model = n["model"] if layer is None else n["model"].with_layer(layer)
    mask = _mask(model, seed=3)
    path = save_keras_graph(model, n["params"], tmp_path / "b.h5", mask=mask)
    # (a Sequential's model.layers leaves its InputLayer out; the file is Functional, whose layers hold it)
    names_of = lambda km: [l.name for l in km.layers if not isinstance(l, layers.InputLayer)]
    original = names_of(keras_load_model(n["path"]))
    kmodel = keras_load_model(path)
    names = names_of(kmodel)
    with h5py.File(path, "r") as f:
        assert f.attrs[PRUNED_LAYER_ATTR].decode() == model.layer
        np.testing.assert_array_equal(f.attrs[PRUNED_CHANNELS_ATTR], np.flatnonzero(mask == 0))
        method = f.attrs[PRUNE_METHOD_ATTR].decode()
    assert method == CASES[net, layer]
    if method == ZEROED_READERS:
        assert names == original
        # the pruned layer itself is untouched: its channels are removed where they are read
        for kl in keras_load_model(n["path"]).layers:
            if kl.name == model.layer.removesuffix("/pre"):
                for a, b in zip(kl.get_weights(), kmodel.get_layer(kl.name).get_weights()):
                    np.testing.assert_array_equal(a, b)
        return
    target = model.layer.removesuffix("/pre")
    mask_name = f"{target}_prune_mask"
    assert sorted(names) == sorted(original + [mask_name])
    mask_layer = kmodel.get_layer(mask_name)
    assert isinstance(mask_layer, layers.DepthwiseConv2D) and not mask_layer.use_bias
    assert tuple(mask_layer.kernel_size) == (1, 1)
    np.testing.assert_array_equal(mask_layer.get_weights()[0].reshape(-1), mask)
    graph, params = read_keras_graph(path)
    readers = {n_.name for n_ in graph.nodes if target in n_.inputs}
    assert readers == {mask_name}
    assert {c for c in graph.consumers()[mask_name]} == {c for c in n["graph"].consumers()[target]}
    # Keras' own view of the mask layer's output: the pruned channels are zero, the kept ones the layer's output.
    x = n["keras_in"]
    before = keras_predict(keras.Model(kmodel.inputs, kmodel.get_layer(target).output), x)
    after = keras_predict(keras.Model(kmodel.inputs, mask_layer.output), x)
    assert np.abs(before[..., mask == 0]).max() > 0
    np.testing.assert_array_equal(after, before * mask)


@pytest.mark.parametrize("net", ["resnet_tiny", "vgg_tiny", "branchy", "seq"])
def test_without_a_mask_the_file_predicts_what_the_original_predicts(nets, tmp_path, net):
    n = nets[net]
    path = save_keras_graph(n["model"], n["params"], tmp_path / "b.h5")
    kmodel = keras_load_model(path)
    np.testing.assert_array_equal(keras_predict(kmodel, n["keras_in"]), n["original_out"])
    # Its Dropout layers stay Dropouts of their rates, so the file trains further in Keras as the original does.
    dropouts = lambda km: [(l.name, l.rate) for l in km.layers if isinstance(l, layers.Dropout)]
    assert dropouts(kmodel) == dropouts(keras_load_model(n["path"])) and (net == "resnet_tiny") != bool(dropouts(kmodel))
    with h5py.File(path, "r") as f:
        assert PRUNED_LAYER_ATTR not in f.attrs and PRUNED_CHANNELS_ATTR not in f.attrs
        assert f.attrs[INPUT_SCALE_ATTR].decode() == n["model"].input_scale
    assert recorded_input_scale(path) == n["model"].input_scale


# ----------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("net, layer", [("resnet_tiny", "stem_relu"), ("resnet_tiny", "b0_out"), ("vgg_tiny", "c4"),
                                        ("branchy", "dw"), ("seq", None)])
def test_read_keras_graph_reads_b_prime_back(nets, tmp_path, net, layer):
    """The file reads back as B''s graph and params exactly: the model's own graph, or with the mask layer."""
    n = nets[net]
    model = n["model"] if layer is None else n["model"].with_layer(layer)
    mask = _mask(model, seed=5)
    pruned = prune_graph(model, n["params"], mask)
    path = save_keras_graph(model, n["params"], tmp_path / "b.h5", mask=mask)
    graph, params = read_keras_graph(path)
    assert graph == pruned.graph
    assert (graph == n["graph"]) == (pruned.method == ZEROED_READERS)
    assert graph.name == n["graph"].name
    assert set(params) == set(pruned.params)
    for lay, entries in pruned.params.items():
        assert set(params[lay]) == set(entries)
        for key, value in entries.items():
            np.testing.assert_array_equal(params[lay][key], value)
    # B' read back and run unmasked is the masked B.
    again = GraphCNN.build(graph, params, input_scale=model.input_scale)
    x = n["images"].astype(np.float32)
    np.testing.assert_allclose(np.asarray(again.logits(params, x)), np.asarray(model.logits(n["params"], x, mask)),
                               rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(model.logits(n["params"], x))).max()))


def test_zeroed_readers_zero_exactly_the_pruned_entries(nets):
    """vgg c4: the Dense after flatten has its rows of pruned channels zeroed, at (h, w, c) positions; nothing else
    changes (the producer c4 and every bias kept)."""
    n = nets["vgg_tiny"]
    model = n["model"].with_layer("c4")
    mask = _mask(model, seed=7)
    pruned = prune_graph(model, n["params"], mask)
    assert pruned.zeroed == ("fc",)
    before, after = n["params"]["fc"]["kernel"], pruned.params["fc"]["kernel"]
    channel_of_row = np.arange(before.shape[0]) % model.num_channels  # p2 is (4, 4, 16): flatten puts c fastest
    gone = mask[channel_of_row] == 0
    assert (after[gone] == 0).all() and gone.any()
    np.testing.assert_array_equal(after[~gone], before[~gone])
    for lay in n["params"]:
        if lay != "fc":
            for key in n["params"][lay]:
                np.testing.assert_array_equal(pruned.params[lay][key], n["params"][lay][key])
    np.testing.assert_array_equal(pruned.params["fc"]["bias"], n["params"]["fc"]["bias"])


def test_concatenated_pooled_readers_zero_both_halves(nets):
    """branchy's default layer: global max and average pooling concatenated: Dense rows c and C + c are zeroed."""
    n = nets["branchy"]
    model = n["model"]
    assert model.layer == "drop"
    mask = _mask(model, seed=9)
    pruned = prune_graph(model, n["params"], mask)
    c = model.num_channels
    rows = np.concatenate([mask, mask]) == 0
    assert pruned.zeroed == ("hid",)
    assert (pruned.params["hid"]["kernel"][rows] == 0).all()
    np.testing.assert_array_equal(pruned.params["hid"]["kernel"][~rows], n["params"]["hid"]["kernel"][~rows])
    assert rows.sum() == 2 * int((mask == 0).sum()) and len(rows) == 2 * c


def test_weights_follow_keras_layer_order_whatever_the_graph_order(nets, tmp_path):
    """Keras loads a legacy h5 file's weights by position in its own layer order. The same network with its nodes
    in another topological order (parallel convs of equal kernel shape swapped) still loads exactly."""
    n = nets["branchy"]
    graph = n["graph"]
    nodes = _other_topological_order(graph)
    reordered = Graph(nodes, graph.input_hwc, graph.output, graph.name)
    weighted = lambda names: [x for x in names if x in n["params"]]
    assert weighted([x.name for x in nodes]) != weighted(keras_layer_order(graph))
    model = GraphCNN.build(reordered, n["params"], input_scale=n["model"].input_scale)
    path = save_keras_graph(model, n["params"], tmp_path / "r.h5")
    np.testing.assert_array_equal(keras_predict(keras_load_model(path), n["keras_in"]), n["original_out"])
    with h5py.File(path, "r") as f:
        assert [s.decode() for s in f["model_weights"].attrs["layer_names"]] == keras_layer_order(graph)


def _other_topological_order(graph: Graph) -> tuple[Node, ...]:
    """Kahn's order taking the latest ready node first (the input stays first: it alone reads nothing)."""
    pending = {node.name: len(set(node.inputs)) for node in graph.nodes}
    readers = graph.consumers()
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    ready, out = [graph.nodes[0].name], []
    while ready:
        ready.sort(key=index.get)
        name = ready.pop()
        out.append(graph.by_name[name])
        for reader in dict.fromkeys(readers[name]):
            pending[reader] -= 1
            if pending[reader] == 0:
                ready.append(reader)
    assert len(out) == len(graph.nodes)
    return tuple(out)


# -------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad, fragment", [
    (np.ones(5, np.float32), "shape (5,)"),
    (np.ones((2, 16), np.float32), "shape (2, 16)"),
    (np.r_[np.ones(15), 0.5].astype(np.float32), "neither 0 nor 1"),
    (np.r_[np.ones(15), -1.0].astype(np.float32), "neither 0 nor 1"),
])
def test_bad_masks_are_refused_naming_mask_and_nothing_is_written(nets, tmp_path, bad, fragment):
    n = nets["vgg_tiny"]
    assert n["model"].num_channels == 16
    path = tmp_path / "b.h5"
    path.write_bytes(b"the file that was there")
    with pytest.raises(ConfigError) as err:
        save_keras_graph(n["model"], n["params"], path, mask=bad)
    assert err.value.field == "mask" and "mask" in str(err.value) and fragment in str(err.value), str(err.value)
    assert path.read_bytes() == b"the file that was there"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5"]


def test_params_of_another_model_are_refused(nets, tmp_path):
    n = nets["vgg_tiny"]
    with pytest.raises(ConfigError) as err:
        save_keras_graph(n["model"], nets["resnet_tiny"]["params"], tmp_path / "b.h5")
    assert err.value.field == "params"
    assert not (tmp_path / "b.h5").exists()


@pytest.mark.parametrize("kind", ["under a file", "a folder"])
def test_unwritable_path_is_an_output_error_naming_it(nets, tmp_path, kind):
    n = nets["vgg_tiny"]
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    if kind == "under a file":
        path = blocker / "b.h5"
    else:
        path = tmp_path / "folder"
        (path / "inside").mkdir(parents=True)
    listing = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    before = listing()
    with pytest.raises(OutputError) as err:
        save_keras_graph(n["model"], n["params"], path, mask=_mask(n["model"]))
    assert err.value.field == "path" and str(path) in str(err.value), str(err.value)
    assert listing() == before  # no temporary file left behind
    assert blocker.read_text() == "x"


def test_pruning_inside_a_layer_whose_activation_moves_zero_is_refused(tmp_path):
    """A mask between a Conv2D and its fused softmax cannot be a Keras file (softmax(0) is not 0)."""
    nodes = (Node.make("in", "input"), Node.make("c/pre", "conv", ("in",), "c"), Node.make("c", "softmax", ("c/pre",)),
             Node.make("flat", "flatten", ("c",)), Node.make("logits", "dense", ("flat",), "logits"))
    graph = Graph(nodes, (4, 4, 1), "logits", "tiny")
    rng = np.random.default_rng(0)
    params = {"c": {"kernel": rng.normal(size=(3, 3, 1, 2)).astype(np.float32)},
              "logits": {"kernel": rng.normal(size=(8, 3)).astype(np.float32)}}
    model = GraphCNN.build(graph, params, layer="c/pre")
    with pytest.raises(ConfigError) as err:
        save_keras_graph(model, params, tmp_path / "b.h5", mask=np.array([1, 0], np.float32))
    assert err.value.field == "model" and "'c/pre'" in str(err.value)
    assert not (tmp_path / "b.h5").exists()
    # Unpruned, the same graph is a Conv2D with a softmax activation, which Keras reads.
    path = save_keras_graph(model, params, tmp_path / "b.h5")
    x = rng.uniform(0, 255, (3, 4, 4, 1)).astype(np.float32)
    out = keras_predict(keras_load_model(path), x / np.float32(255))
    _close(np.asarray(model.logits(params, x), np.float64), out, 1e-5)


def test_input_scale_attribute_can_be_left_out(nets, tmp_path):
    n = nets["vgg_tiny"]
    path = save_keras_graph(n["model"], n["params"], tmp_path / "b.h5", input_scale_attr=False)
    with h5py.File(path, "r") as f:
        assert INPUT_SCALE_ATTR not in f.attrs
    assert recorded_input_scale(path) is None
