"""badnet_jax.io.checkpoint for models other than the lab's DeepID: B' and GoodNet checkpoints carry a GraphCNN's
architecture (badnet_jax.io.graph_json) and restore the same network, bit for bit; a tampered architecture entry
is refused naming the checkpoint; a FlaxCNN (code, not data) is refused at save; checkpoints of the lab's DeepID
keep their old layout (no architecture entry).

Networks: the embedded GAP demo and the two real tf_keras files models/other/{resnet_tiny,vgg_tiny}.h5, whose
restored models are also checked against Keras' own logits (the *_reference.npz beside them).
"""

from __future__ import annotations

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL
from badnet_jax.errors import CheckpointError, ConfigError
from badnet_jax.goodnet import make_goodnet
from badnet_jax.io import checkpoint
from badnet_jax.io.graph_json import model_to_json
from badnet_jax.io.model_file import load_model
from badnet_jax.model import init_params
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.flax_model import FlaxCNN
from tests import numpy_ref
from tests.conftest import asset

OTHER = {"resnet_tiny": "models/other/resnet_tiny.h5", "vgg_tiny": "models/other/vgg_tiny.h5"}


def _load(name: str, layer=None):
    if name == "gap_demo":
        return load_model(GAP_DEMO_MODEL, layer=layer)
    return load_model(asset(OTHER[name]), "255", layer)


def _mask(model, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.ones(model.num_channels, np.float32)
    mask[rng.choice(model.num_channels, model.num_channels // 3, replace=False)] = 0
    return mask


def _images(model, n: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *model.input_hwc)).astype(np.float32)


@pytest.mark.parametrize("name,layer", [("gap_demo", None), ("resnet_tiny", None), ("resnet_tiny", "stem_relu"),
                                        ("vgg_tiny", None), ("vgg_tiny", "c1/pre")])
def test_a_b_prime_checkpoint_restores_the_same_network_bit_for_bit(tmp_path, name, layer):
    model, params = _load(name, layer)
    mask = _mask(model)
    path = checkpoint.save_badnet(tmp_path / "b_prime_ckpt", model, params, mask)
    got, got_params, got_mask = checkpoint.restore_badnet(path)
    assert got == model  # graph, pruned layer, input scale, shapes, near-tie bound
    np.testing.assert_array_equal(np.asarray(got_mask), mask)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = _images(model)
    np.testing.assert_array_equal(np.asarray(got.logits(got_params, x, got_mask)),
                                  np.asarray(model.logits(params, x, mask)))
    np.testing.assert_array_equal(np.asarray(got.logits(got_params, x)), np.asarray(model.logits(params, x)))
    # Independent: the restored network is the file's, as float64 NumPy interprets the original graph.
    ref = numpy_ref.graph_values64(model.graph, params, x / 255.0, masks={model.layer: mask})[model.graph.logits_node()]
    np.testing.assert_allclose(np.asarray(got.logits(got_params, x, got_mask)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(OTHER))
def test_the_restored_real_keras_models_give_keras_logits(tmp_path, name):
    model, params = _load(name)
    ref = np.load(asset(OTHER[name].replace(".h5", "_reference.npz")))
    images, logits = ref[ref.files[0]], ref[ref.files[1]]
    if images.dtype != np.uint8:  # the archive's order: the uint8 images and Keras' float logits
        images, logits = logits, images
    got, got_params, _ = checkpoint.restore_badnet(checkpoint.save_badnet(tmp_path / "ck", model, params))
    np.testing.assert_allclose(np.asarray(got.logits(got_params, images.astype(np.float32))), logits, rtol=1e-4,
                               atol=1e-4)


def test_a_goodnet_checkpoint_of_a_graph_restores_g_and_its_answers(tmp_path):
    model, params = _load("resnet_tiny", "b0_out")
    mask = _mask(model, 3)
    goodnet, variables = make_goodnet(model, params, mask=mask)
    path = checkpoint.save_goodnet(tmp_path / "goodnet_ckpt", goodnet, variables)
    assert checkpoint.is_goodnet_checkpoint(path)
    got, got_vars = checkpoint.restore_goodnet(path)
    assert got.model == model and got.num_classes == model.num_classes
    for a, b in zip(jax.tree.leaves(got_vars), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = _images(model, 16)
    preds = np.asarray(got.apply(got_vars, x))
    # Independent: G = B's class where B and B' (the layer's output masked) agree, else N; float64 NumPy.
    vals = lambda masks: numpy_ref.graph_values64(model.graph, params, x / 255.0, masks=masks)[
        model.graph.logits_node()]
    pb, pp = vals(None).argmax(-1), vals({model.layer: mask}).argmax(-1)
    np.testing.assert_array_equal(preds, np.where(pb == pp, pb, model.num_classes))
    # A fine-tuned B' beside B: both restored.
    tuned = jax.tree.map(lambda a: np.asarray(a) * np.float32(1.5), params)
    goodnet, variables = make_goodnet(model, params, tuned, mask)
    _, got_vars = checkpoint.restore_goodnet(checkpoint.save_goodnet(tmp_path / "g2", goodnet, variables))
    out = model.graph.by_name[model.split.output].weights
    np.testing.assert_array_equal(np.asarray(got_vars["params"]["pruned"][out]["kernel"]),
                                  np.asarray(tuned[out]["kernel"]))


def test_a_measured_near_tie_bound_and_the_input_scale_travel(tmp_path):
    model, params = _load("gap_demo")
    model = dataclasses.replace(model.with_input_scale("raw"), tie_rtol=3.5e-5, tie_rtol_measured=True)
    got, _, _ = checkpoint.restore_badnet(checkpoint.save_badnet(tmp_path / "ck", model, params))
    assert (got.input_scale, got.tie_rtol, got.tie_rtol_measured) == ("raw", 3.5e-5, True)


def test_a_graph_checkpoint_without_its_architecture_says_it_was_read_as_deepid(tmp_path):
    model, params = _load("gap_demo")
    path = tmp_path / "no_architecture"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.resolve(), {"params": jax.tree.map(np.asarray, params), "input_divisor": np.float32(255.0),
                                    "mask": np.ones(model.num_channels, np.float32)})
    with pytest.raises(CheckpointError, match="holds no architecture entry, so it is read as the lab's DeepID, whose "
                                              "params these are not"):
        checkpoint.restore_badnet(path)


def test_deepid_checkpoints_keep_their_layout_and_old_ones_restore_as_deepid(tmp_path):
    params = init_params(num_classes=5, seed=0)
    mask = np.ones(60, np.float32)
    mask[:7] = 0
    new = checkpoint.save_badnet(tmp_path / "new", DeepID(5, input_scale="255"), params, mask)
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(new.resolve())
    assert set(tree) == {"params", "mask", "input_divisor"}  # the lab's layout: no architecture entry
    assert float(tree["input_divisor"]) == 255.0
    np.testing.assert_array_equal(tree["mask"], mask)
    for a, b in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    # A checkpoint as the first badnet-jax versions wrote it (no input divisor): DeepID, raw pixels.
    old = tmp_path / "old"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(old.resolve(), {"params": jax.tree.map(np.asarray, params), "mask": mask})
    model, got_params, got_mask = checkpoint.restore_badnet(old)
    assert model == DeepID(5, input_scale="raw")
    np.testing.assert_array_equal(np.asarray(got_mask), mask)
    model, _, _ = checkpoint.restore_badnet(new)
    assert model == DeepID(5, input_scale="255")
    goodnet, variables = make_goodnet(DeepID(5, input_scale="255"), params, mask=mask)
    g, _ = checkpoint.restore_goodnet(checkpoint.save_goodnet(tmp_path / "g", goodnet, variables))
    assert g.model == DeepID(5, input_scale="255")


def test_params_without_their_model_or_not_fitting_it_are_refused(tmp_path):
    model, params = _load("gap_demo")
    with pytest.raises(ConfigError, match=r"model: got a params dict; the model comes first"):
        checkpoint.save_badnet(tmp_path / "ck", params, np.ones(32))
    with pytest.raises(ConfigError, match=r"model: got a params dict; the model comes first"):
        checkpoint.save_goodnet(tmp_path / "g", make_goodnet(model, params, mask=np.ones(32))[1])
    with pytest.raises(ConfigError, match=r"params: layer 'conv_1' holds nothing"):
        checkpoint.save_badnet(tmp_path / "ck", model, {k: v for k, v in params.items() if k != "conv_1"})
    with pytest.raises(ConfigError, match=r"mask: shape \(60,\), expected \(32,\)"):
        checkpoint.save_badnet(tmp_path / "ck", model, params, np.ones(60))
    assert not list(tmp_path.iterdir())


class _Net(nn.Module):
    @nn.compact
    def features(self, x):
        return nn.relu(nn.Conv(6, (3, 3), name="conv")(x))

    @nn.compact
    def hidden(self, feats):
        return jnp.mean(feats, axis=(1, 2))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="output")(self.hidden(self.features(x)))


def test_a_flax_model_is_refused_saying_how_to_save_it(tmp_path):
    params = _Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    model = FlaxCNN.build(_Net(), params, input_hwc=(8, 8, 3), input_scale="255", layer="conv")
    with pytest.raises(ConfigError, match=r"a FlaxCNN cannot be saved .*StandardCheckpointer\(\)\.save\(path, "
                                          r"params\)\) and rebuild the model with FlaxCNN\.build"):
        checkpoint.save_badnet(tmp_path / "ck", model, params, np.ones(6))
    with pytest.raises(ConfigError, match="a FlaxCNN cannot be saved"):
        checkpoint.save_goodnet(tmp_path / "g", *make_goodnet(model, params, mask=np.ones(6)))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- a tampered architecture


def _tampered(tmp_path, edit, params_edit=None):
    """A B' checkpoint of the GAP demo whose architecture JSON (and params) ``edit`` changed, written as
    save_badnet writes its entries."""
    model, params = _load("gap_demo")
    doc = json.loads(model_to_json(model))
    edit(doc)
    params = {k: dict(v) for k, v in params.items()}
    if params_edit is not None:
        params_edit(params)
    text = json.dumps(doc).encode()
    state = {"params": params, "mask": np.ones(model.num_channels, np.float32),
             "input_divisor": np.float32(255.0), checkpoint.ARCHITECTURE: np.frombuffer(text, np.uint8).copy()}
    path = tmp_path / f"ck{len(list(tmp_path.iterdir()))}"
    checkpoint._save(path, state)
    return path


def _node(doc, op):
    return next(n for n in doc["graph"]["nodes"] if n["op"] == op)


TAMPERED = {
    "unknown op": (lambda d: _node(d, "conv").update(op="conv3d"), None,
                   "operation 'conv3d', which badnet-jax does not know"),
    "code as an op": (lambda d: _node(d, "relu").update(op="__import__('os').system"), None,
                      "which badnet-jax does not know"),
    "strides of a string": (lambda d: _node(d, "conv")["attrs"].update(strides="2"), None,
                            "strides is '2', expected two integers >= 1"),
    "strides of floats": (lambda d: _node(d, "conv")["attrs"].update(strides=[1.5, 1]), None,
                          "strides is 1.5, expected an integer"),
    "padding unknown": (lambda d: _node(d, "conv")["attrs"].update(padding="causal"), None,
                        "padding is 'causal', expected 'valid' or 'same'"),
    "epsilon of a bool": (lambda d: _node(d, "batch_norm")["attrs"].update(epsilon=True), None,
                          "epsilon is true, expected a finite number > 0"),
    "an epsilon beyond float32": (lambda d: _node(d, "batch_norm")["attrs"].update(epsilon=1e300), None,
                                  "epsilon is 1e+300, expected a number > 0 that float32 holds"),
    "an extra attribute": (lambda d: _node(d, "relu")["attrs"].update(code="x"), None,
                           "has attributes ['code', 'max_value', 'negative_slope', 'threshold'], expected"),
    "a missing attribute": (lambda d: _node(d, "conv")["attrs"].pop("padding"), None,
                            "has attributes ['dilation', 'strides'], expected ['dilation', 'padding', 'strides']"),
    "an unknown entry": (lambda d: d.update(module="pickle"), None, "unknown entries ['module']"),
    "a later input": (lambda d: d["graph"]["nodes"][1].update(inputs=[d["graph"]["nodes"][3]["name"]]), None,
                      "which is not an earlier layer"),
    "two inputs to a conv": (lambda d: _node(d, "conv").update(inputs=["input", "input"]), None,
                             "reads 2 node(s), expected one"),
    "weights on a relu": (lambda d: _node(d, "relu").update(weights="conv_1"), None,
                          "names weights 'conv_1'; the operation 'relu' has none"),
    "a name with a newline": (lambda d: _node(d, "relu").update(name="relu\n_1"), None, "expected a printable name"),
    "a kernel not fitting": (lambda d: None, lambda p: p.update(conv_2={"kernel": np.zeros((3, 3, 5, 16), np.float32)}),
                             "its layers do not fit together"),
    "a batch norm broadcast": (lambda d: None, lambda p: p.update(
        bn_1={**p["bn_1"], "moving_mean": np.zeros((1,), np.float32)}), "moving_mean have shape (1,)"),
    "params no node reads": (lambda d: None, lambda p: p.update(extra={"kernel": np.zeros((1, 1), np.float32)}),
                             "the params hold layers no node reads: 'extra'"),
    "NaN weights": (lambda d: None, lambda p: p.update(output={**p["output"],
                                                             "bias": np.full_like(p["output"]["bias"], np.nan)}),
                    "weights 'output' bias hold NaN or infinite values"),
    "another version": (lambda d: d.update(version=2), None, "version 2; this badnet-jax reads version 1"),
    "a near-tie bound below the least measured": (lambda d: d.update(tie_rtol=1e-300, tie_rtol_measured=True), None,
                                                  "tie_rtol is 1e-300, expected a relative error bound from"),
    "a pruned layer that is none": (lambda d: d.update(layer="nowhere"), None, "layer=nowhere: no such layer"),
    "a dense output on an image": (lambda d: _node(d, "global_avg_pool").update(op="identity", attrs={}), None,
                                   "is a Dense layer on an image tensor, not a linear Dense layer on a vector"),
    "a subtract of three": (lambda d: _node(d, "relu").update(op="subtract", inputs=[_node(d, "conv")["name"]] * 3),
                            None, "(subtract) reads 3 node(s), expected two"),
    "an up-sampling by 0": (lambda d: _node(d, "relu").update(op="upsample", attrs={"size": [0, 2]}), None,
                            "size is 0, expected an integer from 1"),
    "a crop of every row": (lambda d: _node(d, "relu").update(op="crop", attrs={"crop": [[60, 60], [0, 0]]}), None,
                            "do not fit together: layer 'relu_1' (crop) on input(s) of shape"),
    "a crop past the far edge": (lambda d: _node(d, "relu").update(op="crop", attrs={"crop": [[0, 60], [2, 2]]}),
                                 None, "do not fit together: layer 'relu_1' (crop)"),
    "a dropout rate of 1": (lambda d: _node(d, "global_avg_pool").update(op="identity", attrs={"dropout": 1}), None,
                            "dropout is 1, expected null or a rate from 0 to below 1"),
}


def test_a_checkpoint_written_before_dropout_rates_were_kept_restores_the_same_network(tmp_path):
    """Its identity nodes carry no dropout entry: they read as no Dropout, and the network is the same."""
    model, params = _load("vgg_tiny")
    doc = json.loads(model_to_json(model))
    identities = [n for n in doc["graph"]["nodes"] if n["op"] == "identity"]
    assert [n["attrs"] for n in identities if n["name"] == "drop"] == [{"dropout": 0.3}]  # the file's Dropout(0.3)
    for n in identities:
        del n["attrs"]["dropout"]
    state = {"params": params, "mask": np.ones(model.num_channels, np.float32), "input_divisor": np.float32(255.0),
             checkpoint.ARCHITECTURE: np.frombuffer(json.dumps(doc).encode(), np.uint8).copy()}
    checkpoint._save(tmp_path / "old", state)
    got, got_params, _ = checkpoint.restore_badnet(tmp_path / "old")
    assert got.graph.by_name["drop"].attr("dropout") is None
    x = _images(model)
    np.testing.assert_array_equal(np.asarray(got.logits(got_params, x)), np.asarray(model.logits(params, x)))


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_architecture_is_refused_naming_the_checkpoint(tmp_path, case):
    edit, params_edit, message = TAMPERED[case]
    path = _tampered(tmp_path, edit, params_edit)
    with pytest.raises(CheckpointError) as err:
        checkpoint.restore_badnet(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text, text
    assert len(text) < 800


def test_an_architecture_entry_that_is_not_json_text_is_refused(tmp_path):
    model, params = _load("gap_demo")
    base = {"params": params, "mask": np.ones(model.num_channels, np.float32), "input_divisor": np.float32(255.0)}
    for i, (entry, message) in enumerate([
            (np.frombuffer(b"{not json", np.uint8).copy(), "is not valid JSON"),
            (np.frombuffer(b"\xff\xfe", np.uint8).copy(), "is not UTF-8 text"),
            (np.frombuffer(re.sub(r'"tie_rtol":[^,]*', '"tie_rtol":NaN', model_to_json(model)).encode(),
                           np.uint8).copy(), "holds NaN, which is no number"),
            (np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8).copy(), "nested too deeply"),
            (np.zeros((3, 2), np.float32), "expected the bytes of a JSON document")]):
        path = checkpoint._save(tmp_path / f"c{i}", {**base, checkpoint.ARCHITECTURE: entry})
        with pytest.raises(CheckpointError, match=message) as err:
            checkpoint.restore_badnet(path)
        assert str(err.value).startswith(f"{path}: ")


def test_a_goodnet_whose_b_prime_does_not_fit_the_graph_is_refused(tmp_path):
    model, params = _load("gap_demo")
    goodnet, variables = make_goodnet(model, params, mask=np.ones(model.num_channels))
    path = checkpoint.save_goodnet(tmp_path / "g", goodnet, variables)
    state = checkpoint._restore(path)
    state["params"]["pruned"]["output"]["kernel"] = np.zeros((5, 10), np.float32)
    bad = checkpoint._save(tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"\(B'\): .*'output'.*kernel") as err:
        checkpoint.restore_goodnet(bad)
    assert str(bad) in str(err.value)
