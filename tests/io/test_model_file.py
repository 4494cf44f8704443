"""badnet_jax.io.model_file.load_model: any model file to the right model, its scale and its pruned layer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from badnet_jax import ConfigError, ModelFileError, save_keras_graph
from badnet_jax.io.model_file import load_model
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.graph import GraphCNN
from tests.conftest import LAB_B, asset


def test_the_lab_files_load_as_deepid_and_other_layers_as_its_graph():
    model, params = load_model(asset(LAB_B))
    assert model == DeepID(1283, "raw")
    other, _ = load_model(asset(LAB_B), layer="pool_2")
    assert isinstance(other, GraphCNN) and other.layer == "pool_2" and other.feature_hwc == (12, 10, 40)
    assert other.input_scale == "raw" and other.num_classes == 1283
    full, _ = load_model(asset("models/lab3_repaired/full_model_drop2.h5"), input_scale="255")
    assert full == DeepID(1283, "255")


def test_another_cnn_needs_its_input_scale_unless_its_file_records_one(tmp_path):
    path = asset("models/other/vgg_tiny.h5")
    with pytest.raises(ConfigError, match="does not say whether the model takes raw pixels 0..255 or pixels / 255"):
        load_model(path)
    model, params = load_model(path, input_scale="255")
    assert (model.name, model.layer, model.input_scale) == ("vgg_tiny", "p2", "255")
    written = save_keras_graph(model, params, tmp_path / "v.h5")  # badnet-jax records the scale
    again, params2 = load_model(written)
    assert again.input_scale == "255" and again.layer == "p2"
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again.logits(params2, x)), np.asarray(model.logits(params, x)))


def test_unreadable_files_say_why_naming_the_file(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ModelFileError, match=str(bad)):
        load_model(bad, input_scale="255")
    with pytest.raises(ConfigError, match="input_scale=1/255: expected one of raw, 255"):
        load_model(asset(LAB_B), input_scale="1/255")


def test_a_relu_with_a_threshold_is_refused_naming_the_layer(tmp_path):
    # ReLU(threshold=t) steps from 0 to t at t: two float32 sums one rounding apart around t differ by t in the
    # activation, not by a rounding error, so no near-tie bound covers it.
    import tests.keras_oracle  # noqa: F401 - Keras on its JAX backend

    keras = pytest.importorskip("keras")
    layers = keras.layers
    net = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="c"),
                            layers.ReLU(threshold=0.1, negative_slope=0.05, name="thr"), layers.Flatten(),
                            layers.Dense(3, name="o")], name="stepped")
    path = tmp_path / "stepped.keras"
    net.save(str(path))
    with pytest.raises(ConfigError, match="model 'stepped': layer 'thr' is a ReLU with threshold 0.1, a step"):
        load_model(path, input_scale="255")
    # The step itself, in the network Keras runs: inputs two float32 roundings apart around 0.1 map 0.1 apart.
    below, above = np.nextafter(np.float32(0.1), np.float32(0)), np.nextafter(np.float32(0.1), np.float32(1))
    with jax.numpy_rank_promotion("allow"):  # Keras' JAX code relies on it
        out = np.asarray(layers.ReLU(threshold=0.1, negative_slope=0.05)(np.array([below, above], np.float32)))
    assert out[1] - out[0] > 0.09
