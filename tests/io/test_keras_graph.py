"""badnet_jax.io.keras_graph: any standard-layer Keras CNN read as an ir Graph, checked against Keras itself.

Two oracles, neither sharing code with the reader: the logits real Keras 2 (tf_keras 2.21) computed for the
shared ``models/other`` files, and Keras 3 (JAX backend, test-only) predicting on models built here that
cover every allowed layer type, each saved as ``.keras``, as ``.weights.h5`` + ``to_json()`` and as a legacy
``.h5``. The reader's graph is run by the independent float64 interpreter ``tests.numpy_ref.graph_logits64``.
Refusals: every one a ModelFileError whose message names the file (and the layer at fault where there is one).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from badnet_jax.errors import ModelFileError
from badnet_jax.io.keras_config import ALLOWED_LAYERS, MAX_LAYERS
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.io.model_file import load_model
from tests import numpy_ref
from tests.conftest import LAB_B, asset
from tests.io.conftest import FUZZ, refused, refused_naming_the_file
from tests.keras_oracle import keras_predict

keras = pytest.importorskip("keras")
layers = keras.layers

OTHER = {"resnet_tiny": "models/other/resnet_tiny.h5", "vgg_tiny": "models/other/vgg_tiny.h5"}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _close(ours: np.ndarray, theirs: np.ndarray, rel: float = 1e-4) -> None:
    """Within float32 rounding of Keras' computation, relative to the output's scale."""
    theirs = np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=rel, atol=rel * max(np.abs(theirs).max(), 1e-6))


def _refused(path: Path, *fragments: str, config_path: Path | None = None) -> str:
    """read_keras_graph(path) raises ModelFileError naming ``path`` (or the config) and each fragment."""
    return refused(lambda p: read_keras_graph(p, config_path=config_path), path, *fragments, or_named=config_path)


# ---------------------------------------------------------------------------------------------- real Keras 2


@pytest.mark.parametrize("name", sorted(OTHER))
def test_real_keras2_models_reproduce_keras_logits(name):
    path = asset(OTHER[name])
    ref = np.load(asset(OTHER[name].replace(".h5", "_reference.npz")))
    graph, params = read_keras_graph(path)
    assert graph.name == name and graph.input_hwc == ref["images"].shape[1:]
    logits = numpy_ref.graph_logits64(graph, params, ref["images"] / 255.0)
    _close(logits, ref["logits"])
    np.testing.assert_array_equal(logits.argmax(-1), ref["logits"].argmax(-1))
    for layer, weights in params.items():
        assert all(w.dtype == np.float32 for w in weights.values()), layer


def test_a_keras2_model_whose_layer_names_nest_groups_reads_each_layers_own_weights():
    """Layer names holding a "/" (keras.applications' MobileNetV3: "Conv", "Conv/BatchNorm") nest one layer's
    HDF5 group inside another's; each layer reads its own weights, as Keras 2 computed (its recorded logits;
    tests/golden/make_keras2_slash_names.py)."""
    golden = Path(__file__).parents[1] / "golden"
    ref = np.load(golden / "keras2_slash_names.npz")
    graph, params = read_keras_graph(golden / "keras2_slash_names.h5")
    assert {"Conv", "Conv/BatchNorm", "Conv/project", "Conv/project/BatchNorm"} <= set(params)
    assert set(params["Conv"]) == {"kernel"} and set(params["Conv/project"]) == {"kernel", "bias"}
    _close(numpy_ref.graph_logits64(graph, params, ref["images"] / 255.0), ref["logits"])


def test_resnet_tiny_graph_structure():
    graph, params = read_keras_graph(asset(OTHER["resnet_tiny"]))
    nodes = graph.by_name
    assert graph.nodes[0].op == "input" and graph.output == graph.logits_node() == "logits"
    assert nodes["b0_add"].op == "add" and nodes["b0_add"].inputs == ("b0_bn2", "stem_relu")
    assert nodes["stem_conv"].attr("padding") == "same" and set(params["stem_conv"]) == {"kernel"}  # use_bias=False
    assert nodes["b1_proj"].attr("strides") == (2, 2)
    assert set(params["stem_bn"]) == {"gamma", "beta", "moving_mean", "moving_variance"}
    assert nodes["gap"].op == "global_avg_pool" and nodes["b0_relu1"].op == "relu"


def test_vgg_tiny_fused_activations_and_dropout():
    graph, params = read_keras_graph(asset(OTHER["vgg_tiny"]))
    nodes = graph.by_name
    # A fused relu: the conv as "<layer>/pre", the layer's own name on the activation.
    assert nodes["c1/pre"].op == "conv" and nodes["c1/pre"].weights == "c1"
    assert nodes["c1"].op == "relu" and nodes["c1"].inputs == ("c1/pre",)
    assert nodes["drop"].op == "identity" and nodes["logits"].op == "dense"  # linear: no extra node
    assert params["fc"]["kernel"].shape == (256, 32)
    # The Dropout's rate is kept (for a written file to train like this one); a linear activation has none.
    with h5py.File(asset(OTHER["vgg_tiny"]), "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
    assert nodes["drop"].attr("dropout") == next(l["config"]["rate"] for l in layers if l["config"]["name"] == "drop")
    assert [n.attr("dropout") for n in graph.nodes if n.op == "identity" and n.name != "drop"] in ([], [None])


def test_keras2_weights_only_file_reads_with_its_config(tmp_path):
    """The Keras 2 weights-only layout (root layer_names, no model_config) plus the model's JSON config."""
    src = asset(OTHER["vgg_tiny"])
    weights, config = tmp_path / "vgg_weights.h5", tmp_path / "vgg.json"
    with h5py.File(src, "r") as f, h5py.File(weights, "w") as g:
        config.write_bytes(f.attrs["model_config"].encode() if isinstance(f.attrs["model_config"], str)
                           else f.attrs["model_config"])
        for key, value in f["model_weights"].attrs.items():
            g.attrs[key] = value
        for key in f["model_weights"]:
            f.copy(f["model_weights"][key], g, name=key)
    graph, params = read_keras_graph(weights, config_path=config)
    ref_graph, ref_params = read_keras_graph(src)
    assert graph == ref_graph
    for layer in ref_params:
        for key in ref_params[layer]:
            np.testing.assert_array_equal(params[layer][key], ref_params[layer][key])
    _refused(weights, "weights-only", "full model file", "config_path")


# ------------------------------------------------------------------------------------------- Keras 3 models


def _sequential_model():
    """Sequential: Rescaling, ZeroPadding2D, strided/dilated Conv2D, fused leaky_relu, BN without beta, ReLU with
    every argument, DepthwiseConv2D without bias, same max pooling, Dropout, Flatten, 1-D BatchNormalization."""
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Rescaling(1 / 127.5, offset=-1.0, name="scale"),
        layers.ZeroPadding2D(1, name="pad"),
        layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv_s2"),
        layers.Conv2D(8, 3, dilation_rate=2, use_bias=False, activation="leaky_relu", name="conv_dil"),
        layers.BatchNormalization(center=False, name="bn_noc"),
        layers.ReLU(max_value=2.0, negative_slope=0.1, threshold=0.05, name="relu_all"),
        layers.DepthwiseConv2D(2, depth_multiplier=2, activation="relu", use_bias=False, name="dw"),
        layers.MaxPooling2D(3, strides=2, padding="same", name="mp_same"),
        layers.Dropout(0.5, name="drop"),
        layers.Flatten(name="flat"),
        layers.Dense(12, name="fc"),
        layers.Activation("relu", name="act_relu"),
        layers.BatchNormalization(scale=False, name="bn_1d"),
        layers.Activation("linear", name="act_linear"),
        layers.Dense(5, name="logits"),
    ], name="seq_all")


def _merge_model():
    """Functional: Add, Concatenate, BatchNormalization, DepthwiseConv2D, same AveragePooling, asymmetric
    ZeroPadding2D, Rescaling, LeakyReLU, GlobalMaxPooling2D and a final Softmax layer."""
    inp = keras.Input((16, 16, 3), name="img")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = layers.ZeroPadding2D(((1, 0), (2, 1)), name="zpad")(x)
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="branch_conv")(x)
    b = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    b = layers.BatchNormalization(name="bn")(b)
    b = layers.LeakyReLU(0.2, name="lrelu")(b)
    c = layers.Concatenate(name="cat")([a, b])
    d = layers.Conv2D(10, 1, name="proj")(c)
    e = layers.Add(name="add")([c, d])
    e = layers.AveragePooling2D(3, strides=2, padding="same", name="ap_same")(e)
    g = layers.GlobalMaxPooling2D(name="gmp")(e)
    o = layers.Dense(5, name="logits")(g)
    return keras.Model(inp, layers.Softmax(name="probs")(o), name="merge")


def _misc_model():
    """Functional on an odd-sized input: rectangular kernels and strides, valid average pooling, dilated
    depthwise, Concatenate on axis 3 and on flat tensors, GlobalAveragePooling2D, a leaky_relu Activation and a
    Dense with a fused softmax (whose pre-activation is the logits)."""
    inp = keras.Input((15, 13, 2), name="in")
    x = layers.Conv2D(5, (3, 2), strides=(2, 1), padding="same", activation="leaky_relu", name="c_rect")(inp)
    x2 = layers.DepthwiseConv2D(3, dilation_rate=2, padding="same", activation="relu", name="dw_dil")(x)
    cat = layers.Concatenate(axis=3, name="cat3")([x, x2])
    y = layers.AveragePooling2D((2, 3), strides=(1, 2), name="ap_valid")(cat)
    y = layers.MaxPooling2D(2, name="mp")(y)
    y = layers.Conv2D(6, 2, strides=2, name="c_valid_s2")(y)
    gap = layers.GlobalAveragePooling2D(name="gap")(cat)
    gmp = layers.GlobalMaxPooling2D(name="gmp")(y)
    h = layers.Concatenate(name="cat_flat")([gap, gmp])
    h = layers.Dense(8, activation="relu", name="fc")(h)
    h = layers.Activation("leaky_relu", name="act_leaky")(h)
    out = layers.Dense(4, activation="softmax", name="out")(layers.Dropout(0.1, name="drop")(h))
    return keras.Model(inp, out, name="misc")


def _modern_model():
    """Functional: an adapted Normalization of the pixels, activations by name, fused and as layers (relu6, swish,
    hard_swish, elu, gelu, sigmoid, tanh), a dilated SeparableConv2D, a squeeze-and-excitation block
    (GlobalAveragePooling2D with keepdims, 1x1 convolutions, a broadcast Multiply), Reshape (with a -1) and a
    softmax Activation."""
    inp = keras.Input((12, 10, 3), name="px")
    x = layers.Normalization(name="norm")(inp)
    x = layers.Conv2D(8, 3, padding="same", activation="relu6", name="c_relu6")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="swish", name="c_swish")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="hard_swish", name="dw_hard")(x)
    x = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, dilation_rate=2, name="sep")(x)
    x = layers.Activation("elu", name="a_elu")(x)
    x = layers.Activation("gelu", name="a_gelu")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = layers.Conv2D(4, 1, activation="silu", name="se_reduce")(s)
    s = layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = layers.Multiply(name="se_excite")([x, s])
    x = layers.Activation("tanh", name="a_tanh")(x)
    g = layers.GlobalMaxPooling2D(keepdims=True, name="gmp_keep")(x)
    g = layers.Reshape((2, 4), name="fold")(g)
    g = layers.Reshape((-1,), name="unfold")(g)
    o = layers.Dense(5, name="logits")(g)
    return keras.Model(inp, layers.Activation("softmax", name="probs")(o), name="modern")


def _hourglass_model():
    """Functional: an encoder-decoder block (UpSampling2D of unequal factors, Cropping2D back to the skip's size and
    by one int) and the merges Subtract, Average of three, Maximum and Minimum."""
    inp = keras.Input((11, 10, 3), name="img")
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="enc")(inp)
    d = layers.Conv2D(6, 3, padding="same", name="mid")(layers.MaxPooling2D(2, name="down")(x))
    u = layers.Cropping2D(((1, 3), (0, 0)), name="crop")(layers.UpSampling2D((3, 2), name="up")(d))
    a = layers.Subtract(name="sub")([x, u])
    b = layers.Conv2D(6, 1, name="side")(x)
    m = layers.Minimum(name="min")([layers.Maximum(name="max")([layers.Average(name="avg")([a, b, u]), b]), a])
    y = layers.Conv2D(8, 3, activation="relu", name="c_out")(layers.Cropping2D(1, name="crop1")(m))
    o = layers.Dense(5, name="logits")(layers.GlobalAveragePooling2D(name="gap")(y))
    return keras.Model(inp, layers.Softmax(name="probs")(o), name="hourglass")


BUILDERS = {"seq_all": _sequential_model, "merge": _merge_model, "misc": _misc_model, "modern": _modern_model,
            "hourglass": _hourglass_model}
LOGITS_LAYER = {"seq_all": "logits", "merge": "logits", "misc": "out", "modern": "logits", "hourglass": "logits"}


def _seed_weights(model, seed: int) -> None:
    """Seeded weights of a sensible scale; BatchNormalization with non-trivial moving statistics."""
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
        elif isinstance(layer, layers.Normalization):  # what adapt() would measure on pixels: mean, variance, count
            c = ws[0].shape
            layer.set_weights([rng.uniform(60, 190, c).astype(np.float32), rng.uniform(900, 4000, c).astype(np.float32),
                               np.array(1000, ws[2].dtype)])
            layer.finalize_state()  # as adapt() ends: the layer computes with the statistics it holds from now on
        else:
            fan_in = lambda s: int(np.prod(s[:-1])) if not isinstance(layer, layers.DepthwiseConv2D) else s[0] * s[1]
            layer.set_weights([(rng.normal(0, 1, w.shape) / np.sqrt(fan_in(w.shape)) if w.ndim > 1
                                else rng.normal(0, 0.1, w.shape)).astype(np.float32) for w in ws])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each Keras 3 model saved in the three formats, with seeded inputs and Keras' own outputs on them."""
    keras.utils.set_random_seed(0)
    out = {}
    for i, (name, builder) in enumerate(BUILDERS.items()):
        model = builder()
        _seed_weights(model, seed=10 + i)
        d = tmp_path_factory.mktemp(name)
        files = {"keras": d / f"{name}.keras", "weights": d / f"{name}.weights.h5", "config": d / f"{name}.json",
                 "h5": d / f"{name}.h5"}
        model.save(files["keras"])
        model.save_weights(files["weights"])
        files["config"].write_text(model.to_json())
        model.save(files["h5"])  # Keras 3's legacy full-model h5 (Keras 2 layout, Keras 3 config format)
        x = np.random.default_rng(100 + i).uniform(0, 255, (4, *model.input_shape[1:])).astype(np.float32)
        logits_model = keras.Model(model.inputs, model.get_layer(LOGITS_LAYER[name]).output)
        if name == "misc":  # the fused softmax's pre-activation: a twin of the model with a linear last Dense
            twin = _misc_model()
            twin.get_layer("out").activation = keras.activations.linear
            twin.set_weights(model.get_weights())
            logits_model = twin
        out[name] = {"files": files, "x": x, "probs": keras_predict(model, x), "logits": keras_predict(logits_model, x)}
    return out


@pytest.mark.parametrize("fmt", ["keras", "weights", "h5"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keras3_models_match_keras_predict(built, name, fmt):
    files = built[name]["files"]
    config = files["config"] if fmt == "weights" else None
    graph, params = read_keras_graph(files[fmt], config_path=config)
    assert graph.name == name
    assert graph.logits_node() == (f"{LOGITS_LAYER[name]}/pre" if name == "misc" else LOGITS_LAYER[name])
    x = built[name]["x"]
    logits = numpy_ref.graph_logits64(graph, params, x)
    _close(logits, built[name]["logits"])
    # The graph's output is Keras' output: the final softmax where there is one, else the logits themselves.
    assert (graph.output != graph.logits_node()) == (name != "seq_all")
    _close(numpy_ref.graph_values64(graph, params, x)[graph.output], built[name]["probs"])


@pytest.mark.parametrize("name", sorted(set(BUILDERS) - {"seq_all"}))  # seq_all's thresholded ReLU is refused
def test_load_model_takes_a_keras3_weights_file_with_its_config(built, name):
    """README's ``load_model(path, config_path=...)``: the model a ``.weights.h5`` and its JSON config make gives
    Keras' logits, as the ``.keras`` archive of the same model does."""
    files = built[name]["files"]
    model, params = load_model(files["weights"], input_scale="raw", config_path=files["config"])
    archived, archived_params = load_model(files["keras"], input_scale="raw")
    assert model == archived
    x = built[name]["x"]  # pixels as Keras takes them (the models rescale them themselves)
    logits = np.asarray(model.logits(params, x), np.float64)
    np.testing.assert_array_equal(logits, np.asarray(archived.logits(archived_params, x), np.float64))
    _close(logits, built[name]["logits"])


def test_every_allowed_layer_type_is_covered(built):
    """The builders' models exercise every allow-listed class (so each has been matched against Keras)."""
    seen = set()
    for name in BUILDERS:
        config = json.loads(built[name]["files"]["config"].read_text())
        seen |= {layer["class_name"] for layer in config["config"]["layers"]}
    assert seen == set(ALLOWED_LAYERS)


def test_the_three_formats_give_the_same_graph_and_weights(built):
    for name in BUILDERS:
        files = built[name]["files"]
        g1, p1 = read_keras_graph(files["keras"])
        g2, p2 = read_keras_graph(files["weights"], config_path=files["config"])
        g3, p3 = read_keras_graph(files["h5"])
        assert g1 == g2 == g3
        assert p1.keys() == p2.keys() == p3.keys()
        for layer in p1:
            assert p1[layer].keys() == p2[layer].keys() == p3[layer].keys()
            for key in p1[layer]:
                np.testing.assert_array_equal(p1[layer][key], p2[layer][key])
                np.testing.assert_array_equal(p1[layer][key], p3[layer][key])


def test_params_layout(built):
    _, params = read_keras_graph(built["seq_all"]["files"]["keras"])
    assert set(params["bn_noc"]) == {"gamma", "moving_mean", "moving_variance"}  # center=False: no beta
    assert set(params["bn_1d"]) == {"beta", "moving_mean", "moving_variance"}  # scale=False: no gamma
    assert set(params["dw"]) == {"kernel"} and params["dw"]["kernel"].shape == (2, 2, 8, 2)
    assert set(params["conv_dil"]) == {"kernel"} and set(params["conv_s2"]) == {"kernel", "bias"}
    graph, _ = read_keras_graph(built["merge"]["files"]["keras"])
    assert graph.output == "probs" and graph.logits_node() == "logits"
    assert graph.by_name["zpad"].attr("pad") == ((1, 0), (2, 1))
    assert graph.by_name["lrelu"].attr("negative_slope") == pytest.approx(0.2)


def test_keras3_weights_are_matched_by_keras_own_keys_not_the_name_attribute(built, tmp_path):
    """Keras loads layers/<class>_<n> in model.layers order and ignores the vars' 'name' attribute (a global-heap
    string, absent from older files): without it the file reads the same, and a wrong one changes nothing."""
    for name in ("seq_all", "merge"):
        files = built[name]["files"]
        bare = shutil.copy(files["weights"], tmp_path / f"{name}.weights.h5")
        with h5py.File(bare, "r+") as f:
            for key in f["layers"]:
                if "vars" in f["layers"][key] and "name" in f["layers"][key]["vars"].attrs:
                    f["layers"][key]["vars"].attrs["name"] = "misleading"
        graph, params = read_keras_graph(bare, config_path=files["config"])
        _close(numpy_ref.graph_logits64(graph, params, built[name]["x"]), built[name]["logits"])
    with h5py.File(bare, "r+") as f:
        del f["layers/dense"]  # the merge model's only Dense: 'logits'
    _refused(bare, "no weights for layer 'logits'", "layers/dense/vars", config_path=files["config"])


def test_sequential_without_input_layer_keras2_style(built, tmp_path):
    """A Keras 2 Sequential config may carry its input shape on the first layer instead of an InputLayer."""
    files = built["seq_all"]["files"]
    config = json.loads(files["config"].read_text())
    layers_ = config["config"]["layers"]
    first = layers_.pop(0)
    layers_[0]["config"]["batch_input_shape"] = first["config"]["batch_shape"]
    edited = tmp_path / "seq.json"
    edited.write_text(json.dumps(config))
    graph, params = read_keras_graph(files["weights"], config_path=edited)
    assert graph.nodes[0].name == "scale_input"
    _close(numpy_ref.graph_logits64(graph, params, built["seq_all"]["x"]), built["seq_all"]["logits"])


def test_a_flatten_whose_data_format_is_null_is_refused(built, tmp_path):
    """Keras fills a null data_format from the loading machine's keras.json (channels_first there reorders the
    features); Keras writes it explicitly, and badnet-jax refuses the null as for every other layer."""
    files = built["seq_all"]["files"]
    config = json.loads(files["config"].read_text())
    for fmt, fragments in (("channels_last", None), (None, ["'flat'", "data_format None", "channels_last"])):
        edited = _edit_config(config, tmp_path / "flat.json", _set("flat", data_format=fmt))
        if fragments is None:
            read_keras_graph(files["weights"], config_path=edited)
        else:
            _refused(files["weights"], *fragments, config_path=edited)


# ----------------------------------------------------------------------------------------------- refusals


def test_refuses_a_keras2_weights_only_file_without_config():
    _refused(asset(LAB_B), "weights-only", "full model file", "config")


def test_refuses_a_keras3_weights_file_without_config(built):
    _refused(built["merge"]["files"]["weights"], "Keras 3 weights file", "full model file", "config_path")


def test_load_model_says_another_models_weights_file_needs_its_architecture(built):
    # load_model tries the lab's DeepID first (its weights-only files need no config): for another model's
    # weights the refusal must say what to give, not only that DeepID's conv_1 is missing.
    from badnet_jax import load_model

    path = built["merge"]["files"]["weights"]
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    text = str(err.value)
    assert str(path) in text and "not the lab's DeepID" in text and "full model file" in text and "config_path" in text


def test_refuses_a_config_path_beside_a_full_model(built):
    files = built["merge"]["files"]
    _refused(files["keras"], "its own config", config_path=files["config"])
    _refused(files["h5"], "its own config", config_path=files["config"])


def test_refuses_a_real_lambda_layer(tmp_path):
    inp = keras.Input((8, 8, 3), name="i")
    out = layers.Dense(2, name="d")(layers.Flatten(name="f")(layers.Lambda(lambda v: v * 2, name="lambda_1")(inp)))
    path = tmp_path / "lam.keras"
    keras.Model(inp, out).save(path)
    _refused(path, "'lambda_1'", "'Lambda'", "not allowed")


def _edit_config(src: dict, dst: Path, edit: Callable[[dict], Any]) -> Path:
    """``dst``: the JSON config ``src`` after ``edit`` (which changes it in place)."""
    config = json.loads(json.dumps(src))
    edit(config)
    dst.write_text(json.dumps(config))
    return dst


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def _set(name: str, **changes: Any) -> Callable[[dict], None]:
    return lambda config: _layer(config, name)["config"].update(changes)


def _rename_class(name: str, cls: str) -> Callable[[dict], None]:
    return lambda config: _layer(config, name).update(class_name=cls)


def _input_shape(shape: list) -> Callable[[dict], None]:
    return _set("img", batch_shape=[None, *shape])


def _second_output(config: dict) -> None:
    config["config"]["output_layers"] = [["probs", 0, 0], ["logits", 0, 0]]


def _nested(config: dict) -> None:
    _layer(config, "gmp").update(class_name="Functional")


def _shared(config: dict) -> None:
    node = _layer(config, "logits")["inbound_nodes"][0]
    _layer(config, "logits")["inbound_nodes"] = [node, node]


def _dense_on_image(config: dict) -> None:
    _layer(config, "logits")["inbound_nodes"][0]["args"][0]["config"]["keras_history"] = ["ap_same", 0, 0]


def _custom(config: dict) -> None:
    _layer(config, "lrelu").update(module="my_project.layers", registered_name="MyProject>LeakyReLU")


def _cycle(config: dict) -> None:
    _layer(config, "rescale")["inbound_nodes"][0]["args"][0]["config"]["keras_history"] = ["probs", 0, 0]


def _too_many_layers(config: dict) -> None:
    config["config"]["layers"] += [{"class_name": "Dropout", "config": {"name": "d"}}] * MAX_LAYERS


# (edit of the "merge" model's config, fragments the message must hold)
CONFIG_REFUSALS = {
    "lambda": (_rename_class("lrelu", "Lambda"), ["'lrelu'", "'Lambda'", "not allowed", "Conv2D"]),
    "unknown activation": (_set("branch_conv", activation="softsign"), ["'branch_conv'", "'softsign'", "gelu"]),
    "selu activation layer": (lambda c: _layer(c, "lrelu").update(class_name="Activation", config={
        "name": "lrelu", "activation": "selu"}), ["'lrelu'", "'selu'"]),
    "wrong shape": (_set("logits", units=6), ["'logits'", "kernel", "(10, 5)", "(10, 6)"]),
    "channels_first": (_set("branch_conv", data_format="channels_first"), ["'branch_conv'", "channels_first"]),
    "groups": (_set("proj", groups=2), ["'proj'", "groups"]),
    "depthwise groups": (_set("dw", groups=2), ["'dw'", "groups 2", "groups=1"]),
    "unknown key": (_set("add", axis=1), ["'add'", "(Add)", "axis 1", "does not know", "Keras 3"]),
    "quantized dense": (_set("logits", quantization_config={"mode": "int8"}), ["'logits'", "is quantized",
                                                                                "float32 copy"]),
    "virtual batches": (_set("bn", virtual_batch_size=2), ["'bn'", "virtual_batch_size 2"]),
    "sparse input": (_set("img", sparse=True), ["'img'", "sparse tensors"]),
    "causal padding": (_set("branch_conv", padding="causal"), ["'branch_conv'", "'causal'"]),
    "keepdims": (_set("gmp", keepdims="yes"), ["'gmp'", "keepdims", "true or false"]),
    "inverted normalization": (lambda c: _layer(c, "rescale").update(class_name="Normalization", config={
        "name": "rescale", "axis": -1, "invert": True}), ["'rescale'", "Normalization", "invert"]),
    "normalization statistics in the config": (lambda c: _layer(c, "rescale").update(
        class_name="Normalization", config={"name": "rescale", "axis": -1, "mean": [1, 2, 3], "variance": [1, 1, 1]}),
        ["'rescale'", "mean in the config", "adapt()"]),
    "keepdims before a dense": (_set("gmp", keepdims=True), ["'logits'", "(1, 1, 10)", "Flatten"]),
    "multiply of other shapes": (lambda c: _layer(c, "add").update(class_name="Multiply") or _set("proj", filters=5)(c),
                                 ["'add'", "Multiply", "(17, 19, 10), (17, 19, 5)"]),
    "subtract of other shapes": (lambda c: _layer(c, "add").update(class_name="Subtract") or _set("proj", filters=5)(c),
                                 ["'add'", "subtracts", "(17, 19, 10), (17, 19, 5)", "only equal shapes"]),
    "bilinear upsampling": (lambda c: _layer(c, "ap_same").update(class_name="UpSampling2D", config={
        "name": "ap_same", "size": [2, 2], "interpolation": "bilinear"}), ["'ap_same'", "'bilinear'", "'nearest'"]),
    "cropping everything": (lambda c: _layer(c, "zpad").update(class_name="Cropping2D", config={
        "name": "zpad", "cropping": [[8, 8], [0, 0]]}), ["'zpad'", "16 x 16", "leaves nothing"]),
    "cropping of three numbers": (lambda c: _layer(c, "zpad").update(class_name="Cropping2D", config={
        "name": "zpad", "cropping": [1, 2, 3]}), ["'zpad'", "cropping [1, 2, 3]", "[[top, bottom], [left, right]]"]),
    "bn axis": (_set("bn", axis=1), ["'bn'", "axis"]),
    "both leaky slopes": (_set("lrelu", alpha=0.9), ["'lrelu'", "negative_slope 0.2", "alpha 0.9"]),
    "both input shapes": (_set("img", batch_input_shape=[None, 8, 8, 3]), ["'img'", "batch_shape",
                                                                           "batch_input_shape [None, 8, 8, 3]"]),
    "concat axis": (_set("cat", axis=1), ["'cat'", "axis"]),
    "softmax axis": (_set("probs", axis=0), ["'probs'", "axis"]),
    "negative relu slope": (_set("lrelu", negative_slope=-1.0), ["'lrelu'", "negative_slope"]),
    "nan rescale": (_set("rescale", scale=float("nan")), ["'rescale'", "scale"]),
    "per-channel rescale": (_set("rescale", scale=[0.5, 0.25, 0.125]), ["'rescale'", "a scale per channel",
                                                                         "one number for every channel"]),
    "per-channel offset": (_set("rescale", offset=[1.0, 2.0, 3.0]), ["'rescale'", "an offset per channel"]),
    "none spatial dims": (_input_shape([None, None, 3]), ["'img'", "no None"]),
    "not an image": (_input_shape([48]), ["'img'", "image"]),
    "huge tensor": (_input_shape([2**20, 2**20, 3]), ["'img'", "elements"]),
    "huge dense": (_set("logits", units=2**25), ["parameters"]),
    "huge kernel": (_set("logits", units=2**29), ["'logits'", "kernel", "elements"]),
    "two outputs": (_second_output, ["2 outputs", "single-input, single-output"]),
    "nested model": (_nested, ["'gmp'", "nested model"]),
    "shared layer": (_shared, ["'logits'", "shared layer"]),
    "dense on an image": (_dense_on_image, ["'logits'", "Dense", "flat tensor"]),
    "custom class": (_custom, ["'lrelu'", "custom class"]),
    "cycle": (_cycle, ["cycle"]),
    "too many layers": (_too_many_layers, [f"more than {MAX_LAYERS}"]),
    "subclassed model": (lambda c: c.update(class_name="MyModel"), ["'MyModel'", "Sequential and Functional"]),
    "bfloat16 policy": (_set("branch_conv", dtype={"module": "keras", "class_name": "DTypePolicy",
                                                   "config": {"name": "mixed_bfloat16"}, "registered_name": None}),
                        ["'branch_conv'", "dtype policy 'mixed_bfloat16'", "float32 copy"]),
    "keras 2 float16 policy": (_set("logits", dtype={"class_name": "Policy", "config": {"name": "mixed_float16"}}),
                               ["'logits'", "'mixed_float16'"]),
    "int8 quantized": (_set("proj", dtype={"module": "keras", "class_name": "QuantizedDTypePolicy",
                                           "config": {"name": "int8_from_float32", "source_name": "float32"}}),
                       ["'proj'", "'int8_from_float32'"]),
    "float16 input": (_set("img", dtype="float16"), ["'img'", "'float16'"]),
    "called with training=True": (lambda c: _layer(c, "bn")["inbound_nodes"][0].setdefault("kwargs", {}).update(
        training=True), ["'bn'", "training=True", "inference network"]),
}


def test_float32_and_float64_dtypes_are_read_as_the_same_network(built, tmp_path):
    """Keras 3 writes a float32 DTypePolicy on every layer; a plain dtype string (Keras 2) or a float64 model
    is arithmetic badnet-jax reproduces (float32, settled in float64): read, the same graph and weights."""
    files = built["merge"]["files"]
    config = json.loads(files["config"].read_text())
    assert _layer(config, "branch_conv")["config"]["dtype"]["config"]["name"] == "float32"  # the premise
    graph, params = read_keras_graph(files["weights"], config_path=files["config"])

    def as_dtype(name):
        def edit(c):
            for layer in c["config"]["layers"]:
                layer["config"]["dtype"] = name
        return edit

    for name in ("float32", "float64"):
        edited = _edit_config(config, tmp_path / f"{name}.json", as_dtype(name))
        got, got_params = read_keras_graph(files["weights"], config_path=edited)
        assert got == graph and got_params.keys() == params.keys()


def test_a_layer_called_with_training_false_is_the_inference_network(built, tmp_path):
    files = built["merge"]["files"]
    edit = lambda c: _layer(c, "bn")["inbound_nodes"][0].setdefault("kwargs", {}).update(training=False)
    edited = _edit_config(json.loads(files["config"].read_text()), tmp_path / "false.json", edit)
    assert read_keras_graph(files["weights"], config_path=edited)[0] == \
        read_keras_graph(files["weights"], config_path=files["config"])[0]


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_refuses_configs(built, tmp_path, case):
    edit, fragments = CONFIG_REFUSALS[case]
    files = built["merge"]["files"]
    config = _edit_config(json.loads(files["config"].read_text()), tmp_path / "edited.json", edit)
    _refused(files["weights"], *fragments, config_path=config)


def test_refuses_a_config_over_1_mib_and_hostile_json(built, tmp_path):
    files = built["merge"]["files"]
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"pad": "x" * (1 << 20)}))
    _refused(files["weights"], "1 MiB", config_path=big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    _refused(files["weights"], "not valid JSON", config_path=deep)
    _refused(files["weights"], "not found", config_path=tmp_path / "missing.json")


def _rewrite_archive(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    with zipfile.ZipFile(src) as z:
        members = {name: z.read(name) for name in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def test_refuses_archive_edits(built, tmp_path):
    src = built["merge"]["files"]["keras"]
    missing = _rewrite_archive(src, tmp_path / "no_weights.keras", lambda m: m.pop("model.weights.h5"))
    _refused(missing, "without 'model.weights.h5'")

    def channels_first(m: dict[str, bytes]) -> None:
        config = json.loads(m["config.json"])
        _layer(config, "dw")["config"]["data_format"] = "channels_first"
        m["config.json"] = json.dumps(config).encode()

    _refused(_rewrite_archive(src, tmp_path / "cf.keras", channels_first), "'dw'", "channels_first")
    bad_weights = _rewrite_archive(src, tmp_path / "junk.keras", lambda m: m.update({"model.weights.h5": b"junk"}))
    _refused(bad_weights, "model.weights.h5", "not readable HDF5")


def test_refuses_nan_weights(built, tmp_path):
    files = built["merge"]["files"]
    path = shutil.copy(files["weights"], tmp_path / "nan.weights.h5")
    with h5py.File(path, "r+") as f:
        data = f["layers/conv2d_1/vars/0"]  # 'proj', the second Conv2D
        values = data[()]
        values[0, 0, 0, 0] = np.nan
        data[...] = values
    _refused(path, "'proj'", "kernel", "NaN", config_path=files["config"])


def test_refuses_wrong_weight_shape_in_the_file(built, tmp_path):
    """The file's weight (not the config) has the wrong shape: the layer, the weight and both shapes are named."""
    files = built["seq_all"]["files"]
    path = shutil.copy(files["h5"], tmp_path / "wrong.h5")
    with h5py.File(path, "r+") as f:
        group = f["model_weights/fc/seq_all/fc"]  # a Sequential nests its own name in the path
        del group["bias"]
        group.create_dataset("bias", data=np.zeros(13, np.float32))
    _refused(path, "'fc'", "bias", "(13,)", "(12,)")


def _fixed_length_weight_names(path: Path) -> None:
    """Rewrite every weight_names attribute as fixed-length strings, the way Keras 2.3 writes them."""
    with h5py.File(path, "r+") as f:
        for key in f["model_weights"]:
            names = f["model_weights"][key].attrs["weight_names"]
            if len(names):
                f["model_weights"][key].attrs["weight_names"] = np.array(
                    [n.encode() if isinstance(n, str) else n for n in names], dtype="S")


def test_fixed_and_variable_length_weight_names_read_the_same(built, tmp_path):
    """Keras 2.3's fixed-length weight_names are followed; later writers' variable-length ones (global-heap
    strings) are never read: the datasets are found by their link names. Both give the same params."""
    for name in BUILDERS:
        path = shutil.copy(built[name]["files"]["h5"], tmp_path / f"{name}.h5")
        _fixed_length_weight_names(path)
        with h5py.File(path, "r") as f:
            assert f["model_weights/logits" if name != "misc" else "model_weights/out"].attrs.get_id(
                "weight_names").dtype.kind == "S"
        graph, params = read_keras_graph(path)
        ref_graph, ref_params = read_keras_graph(built[name]["files"]["h5"])
        assert graph == ref_graph
        for layer in ref_params:
            for key in ref_params[layer]:
                np.testing.assert_array_equal(params[layer][key], ref_params[layer][key])


def test_refuses_missing_and_extra_weights(built, tmp_path):
    files = built["seq_all"]["files"]
    # Fixed-length weight_names (Keras 2.3): Keras' positional order, checked against the names.
    path = shutil.copy(files["h5"], tmp_path / "short.h5")
    _fixed_length_weight_names(path)
    with h5py.File(path, "r+") as f:
        f["model_weights/fc"].attrs["weight_names"] = f["model_weights/fc"].attrs["weight_names"][:1]
    _refused(path, "'fc'", "stores 1 weights", "expected 2")
    path = shutil.copy(files["h5"], tmp_path / "swapped.h5")
    _fixed_length_weight_names(path)
    with h5py.File(path, "r+") as f:
        f["model_weights/fc"].attrs["weight_names"] = f["model_weights/fc"].attrs["weight_names"][::-1]
    _refused(path, "'fc'", "fc/bias'", "weight 0")
    # Variable-length weight_names (as Keras 3 writes them): the datasets themselves, by name.
    path = shutil.copy(files["h5"], tmp_path / "no_bias.h5")
    with h5py.File(path, "r+") as f:
        del f["model_weights/fc/seq_all/fc/bias"]
    _refused(path, "'fc'", "stores 1 weights", "expected 2")
    path = shutil.copy(files["h5"], tmp_path / "extra.h5")
    with h5py.File(path, "r+") as f:
        f["model_weights/fc/seq_all/fc/mystery"] = np.zeros(3, np.float32)
    _refused(path, "'fc'", "'seq_all/fc/mystery'", "not a weight")
    path = shutil.copy(files["h5"], tmp_path / "two_kernels.h5")
    with h5py.File(path, "r+") as f:
        f["model_weights/fc/seq_all/kernel:0"] = np.zeros(3, np.float32)
    _refused(path, "'fc'", "two kernels")
    path = shutil.copy(files["h5"], tmp_path / "gone.h5")
    with h5py.File(path, "r+") as f:
        del f["model_weights/logits"]
    _refused(path, "no weights for layer 'logits'")


@pytest.mark.parametrize("fmt", ["keras", "h5", "weights"])
def test_refuses_truncated_files(built, tmp_path, fmt):
    files = built["merge"]["files"]
    data = files[fmt].read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{size}{files[fmt].suffix}"
        path.write_bytes(data[:size])
        _refused(path, config_path=files["config"] if fmt == "weights" else None)


def test_refuses_a_file_both_zip_and_h5(built, tmp_path):
    files = built["merge"]["files"]
    both = tmp_path / "both.h5"
    both.write_bytes(files["h5"].read_bytes() + files["keras"].read_bytes())
    _refused(both, "both an HDF5 file and a zip")


def test_refuses_an_h5_that_is_not_keras(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    _refused(path, "not a Keras model or weights file")
    _refused(tmp_path / "absent.h5", "not found")


def test_optimizer_weights_are_ignored(tmp_path):
    """The lab's bd_net.h5 layout: a full model file that also carries optimizer state."""
    path = shutil.copy(asset(OTHER["vgg_tiny"]), tmp_path / "with_optimizer.h5")
    with h5py.File(path, "r+") as f:
        opt = f.create_group("optimizer_weights")
        opt.attrs["weight_names"] = np.array([b"Adam/iter:0", b"Adam/c1/kernel/m:0"])
        opt.create_dataset("Adam/iter:0", data=np.int64(7))
        opt.create_dataset("Adam/c1/kernel/m:0", data=np.full((3, 3, 3, 8), np.nan, np.float32))
    graph, params = read_keras_graph(path)
    ref = np.load(asset(OTHER["vgg_tiny"].replace(".h5", "_reference.npz")))
    _close(numpy_ref.graph_logits64(graph, params, ref["images"] / 255.0), ref["logits"])


def test_a_bare_get_config_dictionary_is_a_config_too(built, tmp_path):
    for name in ("seq_all", "merge"):
        files = built[name]["files"]
        bare = tmp_path / f"{name}_bare.json"
        bare.write_text(json.dumps(json.loads(files["config"].read_text())["config"]))
        assert read_keras_graph(files["weights"], config_path=bare)[0] == read_keras_graph(files["keras"])[0]


def _positions(node: Any, out: list) -> list:
    """Every (container, key) of a JSON document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((node, key))
        _positions(value, out)
    return out


WEIRD_JSON = st.sampled_from([None, True, False, 0, -1, 1, 2**40, -2**40, 10**400, 0.5, float("nan"), float("inf"), "",
                              "x", "same", "channels_first", [], [0], [None], [1, 2, 3], [[1, 2], [3]], {}, {"a": 1},
                              ["img", 0, 0], ["img", 1, 0], {"args": [], "kwargs": {}}])


@FUZZ
@given(data=st.data())
def test_any_damaged_config_is_read_or_refused(built, tmp_path, data):
    """Any one value of a valid config replaced by any other JSON value: a graph, or a ModelFileError (never another
    exception: a damaged config must never crash the reader)."""
    name = data.draw(st.sampled_from(["seq_all", "merge"]))
    files = built[name]["files"]
    config = json.loads(files["config"].read_text())
    positions = _positions(config, [])
    container, key = positions[data.draw(st.integers(0, len(positions) - 1))]
    container[key] = data.draw(WEIRD_JSON)
    edited = tmp_path / "fuzz.json"
    edited.write_text(json.dumps(config))
    try:
        graph, params = read_keras_graph(files["weights"], config_path=edited)
    except ModelFileError as err:
        assert str(err).startswith(str(files["weights"])) or str(err).startswith(str(edited))
    else:
        assert graph.nodes[0].op == "input" and all(np.isfinite(w).all() for p in params.values() for w in p.values())


def test_refuses_a_real_nested_model(tmp_path):
    inner = keras.Sequential([layers.Conv2D(2, 3, name="inner_conv")], name="inner")
    inp = keras.Input((8, 8, 3), name="i")
    path = tmp_path / "nested.keras"
    keras.Model(inp, layers.GlobalAveragePooling2D(name="g")(inner(inp))).save(path)
    _refused(path, "'inner'", "nested model")


def test_refuses_impossible_batch_norm_statistics(built, tmp_path):
    files = built["merge"]["files"]
    path = shutil.copy(files["weights"], tmp_path / "bn.weights.h5")
    with h5py.File(path, "r+") as f:
        f["layers/batch_normalization/vars/3"][...] = -1.0  # moving_variance
    _refused(path, "'bn'", "moving_variance", config_path=files["config"])


def test_refuses_a_huge_declared_weight_without_reading_it(built, tmp_path):
    """A dataset declaring 10**10 x 10**10 elements (chunked, never written: a small file) is refused from its
    shape, before anything is read."""
    files = built["merge"]["files"]
    path = shutil.copy(files["weights"], tmp_path / "huge.weights.h5")
    with h5py.File(path, "r+") as f:
        del f["layers/dense/vars/0"]
        f["layers/dense/vars"].create_dataset("0", shape=(10**10, 10**10), dtype=np.float32, chunks=(64, 64))
    refused_naming_the_file(lambda p: read_keras_graph(p, config_path=files["config"]), path)


def test_refuses_an_archive_with_a_member_twice(built, tmp_path):
    src = built["merge"]["files"]["keras"]
    path = tmp_path / "twice.keras"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(path, "w") as out:
        for name in z.namelist():
            out.writestr(name, z.read(name))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr("config.json", b"{}")
    _refused(path, "more than once")
