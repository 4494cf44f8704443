"""Writes keras2_slash_names.h5 and keras2_slash_names.npz: a small CNN saved by Keras 2 (``tf_keras``) whose
layer names hold a "/" as keras.applications' MobileNetV3 names them ("Conv", "Conv/BatchNorm"), so that one
layer's HDF5 group nests inside another's; with 8 seeded images and Keras 2's own logits for them.

Run with a Python that has ``tf_keras`` (recorded with tensorflow 2.21.0, tf_keras 2.21.0):
    python tests/golden/make_keras2_slash_names.py
"""

import pathlib

import numpy as np
import tf_keras as keras

L = keras.layers

if __name__ == "__main__":
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 10, 3), name="img")
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="Conv")(inp)
    x = L.BatchNormalization(name="Conv/BatchNorm")(x)
    x = L.ReLU(name="Conv/relu")(x)
    y = L.Conv2D(6, 1, name="Conv/project")(x)
    y = L.BatchNormalization(name="Conv/project/BatchNorm")(y)
    x = L.Add(name="Conv/add")([x, y])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    out = L.Dense(4, name="Logits")(x)
    model = keras.Model(inp, out, name="slash_names")
    for layer in model.layers:  # statistics away from 0 and 1, so a mixed-up weight shows
        if isinstance(layer, L.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])
    here = pathlib.Path(__file__).parent
    model.save(here / "keras2_slash_names.h5")
    x = np.random.default_rng(1).integers(0, 256, (8, 12, 10, 3)).astype("float32")
    np.savez(here / "keras2_slash_names.npz", images=x.astype(np.uint8), logits=model.predict(x / 255.0, verbose=0))
    print("wrote", here / "keras2_slash_names.h5")
