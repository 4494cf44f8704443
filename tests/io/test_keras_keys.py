"""badnet_jax.io.keras_keys: every key Keras 2 and Keras 3 write for an allowed layer is known; any other key, and
a known one at a value that changes the layer, is refused with the file, the layer, its class and the key."""

import json
import pathlib

import pytest

from tests import keras_oracle  # noqa: F401  (sets KERAS_BACKEND before Keras is imported)

from badnet_jax.errors import ModelFileError
from badnet_jax.io.keras_config import ALLOWED_LAYERS, ConfigLayer
from badnet_jax.io.keras_fields import ConfigFields
from badnet_jax.io.keras_keys import check_keys

keras = pytest.importorskip("keras")
L = keras.layers

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "keras2_layer_configs.json"


def _check(cls: str, cfg: dict, path: str = "m.keras") -> None:
    check_keys(ConfigFields(path), ConfigLayer(cfg.get("name", "x"), cls, cfg, ()))


def _keras3_layers() -> dict[str, list]:
    """Each allowed class as Keras 3 builds it, with the options that make it write its conditional keys."""
    return {
        "InputLayer": [L.InputLayer(shape=(8, 8, 3))],
        "Conv2D": [L.Conv2D(4, 3), L.Conv2D(4, 3, activity_regularizer="l2", lora_rank=2)],
        "DepthwiseConv2D": [L.DepthwiseConv2D(3)],
        "SeparableConv2D": [L.SeparableConv2D(4, 3)],
        "Dense": [L.Dense(3), L.Dense(3, lora_rank=2)],
        "MaxPooling2D": [L.MaxPooling2D()], "AveragePooling2D": [L.AveragePooling2D(2)],
        "GlobalAveragePooling2D": [L.GlobalAveragePooling2D(keepdims=True)],
        "GlobalMaxPooling2D": [L.GlobalMaxPooling2D()],
        "BatchNormalization": [L.BatchNormalization(), L.BatchNormalization(renorm=True)],
        "Normalization": [L.Normalization(), L.Normalization(mean=1.0, variance=2.0, invert=True)],
        "Activation": [L.Activation("relu")], "ReLU": [L.ReLU(6.0)], "LeakyReLU": [L.LeakyReLU()],
        "Softmax": [L.Softmax()],
        "Add": [L.Add()], "Subtract": [L.Subtract()], "Average": [L.Average()], "Maximum": [L.Maximum()],
        "Minimum": [L.Minimum()], "Multiply": [L.Multiply()], "Concatenate": [L.Concatenate()],
        "Reshape": [L.Reshape((4, 4))], "Flatten": [L.Flatten()], "Dropout": [L.Dropout(0.1, seed=3)],
        "ZeroPadding2D": [L.ZeroPadding2D()], "Cropping2D": [L.Cropping2D()], "UpSampling2D": [L.UpSampling2D()],
        "Rescaling": [L.Rescaling(1 / 255)],
    }


def test_every_key_keras3_writes_is_known():
    built = _keras3_layers()
    assert sorted(built) == sorted(ALLOWED_LAYERS)
    for cls, layers in built.items():
        for layer in layers:
            _check(cls, layer.get_config())  # would raise on a key badnet-jax does not know


def test_every_key_keras2_writes_is_known():
    recorded = json.loads(GOLDEN.read_text())
    assert recorded["tf_keras"].startswith("2.")
    assert sorted(recorded["configs"]) == sorted(ALLOWED_LAYERS)
    for cls, cfg in recorded["configs"].items():
        _check(cls, cfg)


def test_keras_itself_refuses_a_key_its_layer_does_not_take():
    """The premise of refusing unknown keys: such a config is not one Keras writes or reads."""
    with pytest.raises((TypeError, ValueError)):
        L.Maximum.from_config({"name": "m", "axis": 1})


def test_refuses_an_unknown_key_naming_the_file_layer_class_and_key():
    cfg = L.Conv2D(4, 3, name="c1").get_config()
    with pytest.raises(ModelFileError) as err:
        _check("Conv2D", {**cfg, "sharpen": 2}, path="/data/m.keras")
    text = str(err.value)
    for fragment in ("/data/m.keras", "'c1'", "(Conv2D)", "sharpen 2", "does not know"):
        assert fragment in text
    # A key of another class is not known here either: Dense's units on a pooling layer.
    with pytest.raises(ModelFileError, match="units 3"):
        _check("MaxPooling2D", {**L.MaxPooling2D(name="p").get_config(), "units": 3})


@pytest.mark.parametrize("cls, key, value, fragment", [
    ("Dense", "quantization_config", {"mode": "int8"}, "is quantized"),
    ("BatchNormalization", "virtual_batch_size", 2, "virtual_batch_size 2"),
    ("InputLayer", "sparse", True, "sparse tensors"),
    ("InputLayer", "ragged", True, "ragged tensors"),
    ("InputLayer", "optional", True, "optional input"),
    ("InputLayer", "sparse", 0, "sparse 0"),  # not false: refused rather than guessed
])
def test_refuses_a_known_key_at_a_value_that_changes_the_layer(cls, key, value, fragment):
    layer = {"Dense": lambda: L.Dense(3, name="d"), "BatchNormalization": lambda: L.BatchNormalization(name="d"),
             "InputLayer": lambda: L.InputLayer(shape=(8, 8, 3), name="d")}[cls]()
    cfg = layer.get_config()
    _check(cls, cfg)  # as Keras writes it: read
    with pytest.raises(ModelFileError, match=fragment) as err:
        _check(cls, {**cfg, key: value})
    assert "'d'" in str(err.value)


def test_training_only_keys_are_known_on_any_layer():
    # Initializers, regularizers and constraints shape training alone, whatever weight they name.
    _check("Conv2D", {"name": "c", "filters": 2, "kernel_size": 3, "pointwise_initializer": "ones",
                      "gamma_regularizer": None, "bias_constraint": {"class_name": "NonNeg"}})
