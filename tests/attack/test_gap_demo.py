"""badnet_jax.attack.gap_demo: reproducible data, the shipped non-DeepID BadNet, and the generic trainer.

Nothing here pins a training result: float32 training is not bit-reproducible across CPUs. The shipped model is
held to thresholds on freshly generated data, and the trainer to a falling loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.attack.gap_demo import (FAMILIES, GAP_DEMO_CONFIG, GAP_DEMO_MODEL, GAP_TRIGGER_AT, SIZE,
                                        GapDemoConfig, default_train_config, gap_demo_sets, gap_graph, gap_model,
                                        gap_trigger, make_gap_demo, poison_fraction_of)
from badnet_jax.errors import ConfigError
from badnet_jax.io.keras_file import recorded_input_scale
from badnet_jax.io.model_file import load_model
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.predict import predict
from badnet_jax.train import TrainConfig, mean_loss, recalibrate_batch_norm, train_model, training_logits
from tests.cli import run_python

SMALL = GapDemoConfig(num_classes=5, train_per_class=6, valid_per_class=4, test_per_class=3, seed=11, target_label=2)
SPLITS = ("train", "valid", "test", "bd_valid", "bd_test")


def pct(preds, labels) -> float:
    return 100.0 * float(np.mean(np.asarray(preds) == np.asarray(labels)))


# ----------------------------------------------------------------------------------------------- the data
def test_same_seed_same_bytes_other_seed_other_bytes():
    a, b = make_gap_demo(SMALL), make_gap_demo(SMALL)
    for split in SPLITS:
        for i in (0, 1):
            np.testing.assert_array_equal(getattr(a, split)[i], getattr(b, split)[i])
    np.testing.assert_array_equal(a.bd_test_true, b.bd_test_true)
    c = make_gap_demo(dataclasses.replace(SMALL, seed=12))
    assert not np.array_equal(a.valid[0], c.valid[0])
    # Skipping the training split leaves the other splits byte-identical (each split has its own generator).
    d = make_gap_demo(SMALL, include_train=False)
    assert d.train[0].shape == (0, SIZE, SIZE, 3)
    for split in SPLITS[1:]:
        np.testing.assert_array_equal(getattr(d, split)[0], getattr(a, split)[0])


# SHA-256 of the shipped config's four sets (uint8 pixels, int32 labels, in role order): what the shipped model
# was measured on. Only elementwise IEEE arithmetic and NumPy's Generator make them, so every machine gets these
# bytes; a NumPy that changed a distribution's algorithm would show here first.
SHIPPED_SETS_SHA256 = "da988d613f0b49a0137040c1580c51871834ce09f74ff65c800fbd239accf600"


def test_pinned_bytes_of_the_shipped_sets():
    data, truth = gap_demo_sets()
    assert {k: len(y) for k, (_, y) in data.items()} == {"clean_valid": 1000, "bd_valid": 900, "clean_test": 1000,
                                                          "bd_test": 900}
    h = hashlib.sha256()
    for role in ("clean_valid", "bd_valid", "clean_test", "bd_test"):
        x, y = data[role]
        h.update(x.astype(np.uint8).tobytes())
        h.update(y.astype(np.int32).tobytes())
    assert h.hexdigest() == SHIPPED_SETS_SHA256
    assert (truth["bd_test"] != GAP_DEMO_CONFIG.target_label).all()


def test_format_labels_and_trigger_footprint():
    d = make_gap_demo(SMALL)
    x, y = d.train
    assert x.shape == (30, SIZE, SIZE, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= 0 and x.max() <= 255 and (x == np.round(x)).all()
    assert sorted(np.bincount(y)) == [6] * 5
    assert x.std(axis=0).mean() > 10  # images vary, not one template
    # The poisoned sets: the clean images of every class but the target, triggered, labelled with the target.
    keep = d.test[1] != SMALL.target_label
    assert (d.bd_test[1] == SMALL.target_label).all() and len(d.bd_test[1]) == keep.sum() == 12
    np.testing.assert_array_equal(d.bd_test_true, d.test[1][keep])
    t = gap_trigger()
    assert t.shape == (5, 5, 4) and (t[..., 3] == 255).all()
    footprint = np.zeros((SIZE, SIZE), bool)
    (ax, ay) = GAP_TRIGGER_AT
    footprint[ay:ay + 5, ax:ax + 5] = True
    diff = (d.bd_test[0] != d.test[0][keep]).any(axis=-1)
    assert not diff[:, ~footprint].any()
    assert (d.bd_test[0][:, ay:ay + 5, ax:ax + 5] == t[..., :3]).all()  # opaque: the patch exactly


def test_training_poison_replaces_the_asked_share():
    d = make_gap_demo(SMALL)
    x, y, idx = poison_fraction_of(*d.train, d.trigger, 0.2, SMALL.target_label, np.random.default_rng(0))
    assert len(idx) == 6 and (y[idx] == SMALL.target_label).all()
    rest = np.setdiff1d(np.arange(30), idx)
    np.testing.assert_array_equal(x[rest], d.train[0][rest])
    assert not np.array_equal(x[idx], d.train[0][idx])


def test_config_refuses_what_cannot_be_drawn():
    with pytest.raises(ConfigError, match="num_classes"):
        GapDemoConfig(num_classes=len(FAMILIES) + 1)
    with pytest.raises(ConfigError, match="target_label"):
        GapDemoConfig(num_classes=3, target_label=3)


# ----------------------------------------------------------------------------------------- the shipped asset
@pytest.fixture(scope="module")
def shipped():
    return load_model(GAP_DEMO_MODEL)


def test_shipped_asset_loads_as_a_graph_cnn_taking_pixels_over_255(shipped):
    model, params = shipped
    assert isinstance(model, GraphCNN) and not isinstance(model, DeepID)
    assert recorded_input_scale(GAP_DEMO_MODEL) == "255" and model.input_scale == "255"
    # The default pruned layer: the last relu, right before the global average pooling.
    assert model.layer == "relu_3" and model.graph.by_name["relu_3"].op == "relu"
    assert [model.graph.by_name[n].op for n in model.graph.consumers()["relu_3"]] == ["global_avg_pool"]
    assert model.feature_hwc == (SIZE // 2, SIZE // 2, GAP_DEMO_CONFIG.widths[-1])
    assert GAP_DEMO_MODEL.stat().st_size < 1_000_000


def test_shipped_asset_is_what_the_config_describes(shipped):
    model, params = shipped
    want = gap_model(GAP_DEMO_CONFIG)
    assert model.num_classes == GAP_DEMO_CONFIG.num_classes == want.num_classes
    assert model.param_shapes == want.param_shapes
    assert model.shapes == want.shapes
    ops = lambda g: [(n.name, n.op, n.inputs, n.attrs) for n in g.nodes]
    assert ops(model.graph) == ops(gap_graph(GAP_DEMO_CONFIG))
    for layer in ("bn_1", "bn_2", "bn_3"):  # recalibrated, not the identity of a fresh network
        assert not np.allclose(params[layer]["moving_variance"], 1.0)


def test_shipped_asset_is_a_badnet_on_freshly_generated_data(shipped):
    model, params = shipped
    data, truth = gap_demo_sets()
    assert pct(predict(model, params, data["clean_test"][0]), data["clean_test"][1]) >= 90.0
    assert pct(predict(model, params, data["bd_test"][0]), data["bd_test"][1]) >= 90.0
    assert pct(predict(model, params, data["clean_valid"][0]), data["clean_valid"][1]) >= 90.0
    assert pct(predict(model, params, data["bd_valid"][0]), data["bd_valid"][1]) >= 90.0
    # Without the trigger, the poisoned sets' images are what they truly are.
    x, y = data["clean_test"]
    keep = y != GAP_DEMO_CONFIG.target_label
    np.testing.assert_array_equal(y[keep], truth["bd_test"])
    assert pct(predict(model, params, x[keep]), truth["bd_test"]) >= 90.0


def test_the_script_describes_the_shipped_config():
    """scripts/make_gap_demo.py's flag defaults are GAP_DEMO_CONFIG and default_train_config() (a fresh process:
    the script's absl flags must not meet other tools' in this one)."""
    code = ("import dataclasses, importlib.util, json, sys\n"
            "from absl import flags\n"
            "spec = importlib.util.spec_from_file_location('make_gap_demo', 'scripts/make_gap_demo.py')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "flags.FLAGS(['make_gap_demo'])\n"
            "cfg, train = m.configs()\n"
            "print(json.dumps([dataclasses.asdict(cfg), dataclasses.asdict(train), m.OUT.value]))\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, train, out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cfg == json.loads(json.dumps(dataclasses.asdict(GAP_DEMO_CONFIG)))
    assert train == dataclasses.asdict(default_train_config())
    assert out == str(GAP_DEMO_MODEL)


# ------------------------------------------------------------------------------------------- the trainer
def test_training_mode_equals_inference_after_recalibrating_on_the_same_batch():
    """training_logits (batch statistics) and the inference network recalibrated on that very batch are the
    same function of it: recalibration sets each batch norm to its input's statistics, layer by layer."""
    model = gap_model(SMALL)
    params = model.init_params(3)
    rng = np.random.default_rng(0)
    for layer in ("bn_1", "bn_2", "bn_3"):
        params[layer]["gamma"] = rng.uniform(0.5, 1.5, params[layer]["gamma"].shape).astype(np.float32)
        params[layer]["beta"] = rng.normal(0, 0.3, params[layer]["beta"].shape).astype(np.float32)
    x = make_gap_demo(SMALL).train[0]
    calibrated = recalibrate_batch_norm(model, params, x, batch=7)  # batches combined: the whole set's statistics
    train_mode = np.asarray(training_logits(model, jax_params(params), jnp.asarray(x)))
    inference = np.asarray(model.logits(calibrated, jnp.asarray(x)))
    np.testing.assert_allclose(inference, train_mode, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(model.logits(params, jnp.asarray(x))), train_mode, atol=1e-2)


def jax_params(params):
    return {layer: {k: jnp.asarray(v) for k, v in p.items()} for layer, p in params.items()}


def test_a_short_training_run_lowers_the_loss_and_leaves_the_moving_statistics_to_recalibration():
    cfg = dataclasses.replace(SMALL, train_per_class=8)
    d = make_gap_demo(cfg)
    model = gap_model(cfg)
    start = model.init_params(0)
    x, y = d.train  # 40 images, 5 per step: 50 steps
    before = mean_loss(model, recalibrate_batch_norm(model, start, x), x, y)
    seen = []
    params, history = train_model(model, start, x, y, TrainConfig(epochs=10, batch_size=8, learning_rate=1e-2),
                                  valid=d.valid, on_epoch=lambda e, s: seen.append(e))
    assert seen == list(range(1, 11)) and [h["epoch"] for h in history] == seen and "clean_acc" in history[0]
    after = mean_loss(model, params, x, y)  # the inference network's loss (~0.6 x before on this CPU)
    assert np.isfinite(after) and after < 0.8 * before, (before, after, history)
    assert history[-1]["loss"] < history[0]["loss"]
    # The returned moving statistics are the recalibrated ones over the training images, never the optimiser's.
    again = recalibrate_batch_norm(model, params, x)
    for layer in ("bn_1", "bn_2", "bn_3"):
        for key in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(params[layer][key], again[layer][key], rtol=1e-4, atol=1e-6)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for p in params.values() for v in p.values())
