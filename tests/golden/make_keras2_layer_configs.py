"""Writes keras2_layer_configs.json: each allowed layer's config as Keras 2 writes it (``tf_keras``), the
reference tests/io/test_keras_keys.py reads Keras 2's keys from (CI has no TensorFlow to ask).

Run with a Python that has ``tf_keras`` (it needs TensorFlow; recorded with tensorflow 2.21.0, tf_keras 2.21.0):
    python tests/golden/make_keras2_layer_configs.py
"""

import json
import pathlib

import tf_keras as keras

L = keras.layers
LAYERS = {
    "InputLayer": L.InputLayer(input_shape=(8, 8, 3)),
    "Conv2D": L.Conv2D(4, 3, input_shape=(8, 8, 3), activity_regularizer="l2"),  # a Sequential's first layer
    "DepthwiseConv2D": L.DepthwiseConv2D(3),
    "SeparableConv2D": L.SeparableConv2D(4, 3),
    "Dense": L.Dense(3),
    "MaxPooling2D": L.MaxPooling2D(),
    "AveragePooling2D": L.AveragePooling2D(),
    "GlobalAveragePooling2D": L.GlobalAveragePooling2D(keepdims=True),
    "GlobalMaxPooling2D": L.GlobalMaxPooling2D(),
    "BatchNormalization": L.BatchNormalization(),
    "Normalization": L.Normalization(),
    "Activation": L.Activation("relu"),
    "ReLU": L.ReLU(6.0),
    "LeakyReLU": L.LeakyReLU(),
    "Softmax": L.Softmax(),
    "Add": L.Add(), "Subtract": L.Subtract(), "Average": L.Average(), "Maximum": L.Maximum(),
    "Minimum": L.Minimum(), "Multiply": L.Multiply(),
    "Concatenate": L.Concatenate(),
    "Reshape": L.Reshape((4, 4)),
    "Flatten": L.Flatten(),
    "Dropout": L.Dropout(0.1, seed=3),
    "ZeroPadding2D": L.ZeroPadding2D(),
    "Cropping2D": L.Cropping2D(),
    "UpSampling2D": L.UpSampling2D(),
    "Rescaling": L.Rescaling(1 / 255),
}

if __name__ == "__main__":
    out = {"tf_keras": keras.__version__, "configs": {cls: layer.get_config() for cls, layer in LAYERS.items()}}
    path = pathlib.Path(__file__).with_name("keras2_layer_configs.json")
    path.write_text(json.dumps(out, indent=1, sort_keys=True, default=lambda a: a.tolist()) + "\n")
    print(f"wrote {path}")
