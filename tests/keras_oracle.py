"""The lab's DeepID built in Keras 3 (JAX backend): an independent oracle for the converter's tests."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")


def build_keras_deepid(num_classes: int = 1283):
    """The lab's architecture with the lab's layer names, as a Keras functional model."""
    import keras
    from keras import layers

    inp = keras.Input((55, 47, 3), name="input")
    c1 = layers.Conv2D(20, 4, activation="relu", name="conv_1")(inp)
    p1 = layers.MaxPooling2D(2, name="pool_1")(c1)
    c2 = layers.Conv2D(40, 3, activation="relu", name="conv_2")(p1)
    p2 = layers.MaxPooling2D(2, name="pool_2")(c2)
    c3 = layers.Conv2D(60, 3, activation="relu", name="conv_3")(p2)
    p3 = layers.MaxPooling2D(2, name="pool_3")(c3)
    c4 = layers.Conv2D(80, 2, activation="relu", name="conv_4")(p3)
    f1 = layers.Flatten(name="flatten_1")(p3)
    f2 = layers.Flatten(name="flatten_2")(c4)
    d1 = layers.Dense(160, name="fc_1")(f1)
    d2 = layers.Dense(160, name="fc_2")(f2)
    act = layers.Activation("relu", name="activation_1")(layers.Add(name="add_1")([d1, d2]))
    out = layers.Dense(num_classes, activation="softmax", name="output")(act)
    return keras.Model(inp, out)


def keras_weights(model) -> dict:
    """{layer: {"kernel", "bias"}} numpy arrays of a Keras model."""
    import numpy as np

    return {
        layer.name: {"kernel": np.asarray(layer.get_weights()[0]), "bias": np.asarray(layer.get_weights()[1])}
        for layer in model.layers if layer.get_weights()
    }


def keras_predict(model, x):
    """Keras' own softmax output (Keras' JAX code relies on rank promotion, which the tests forbid)."""
    import jax
    import numpy as np

    with jax.numpy_rank_promotion("allow"):
        return np.asarray(model.predict(x, verbose=0))


def keras_load_model(path):
    """``keras.models.load_model`` as the lab's eval.py calls it (Keras 3 reads Keras 2 full-model h5 files)."""
    import keras

    return keras.models.load_model(str(path), compile=False)
