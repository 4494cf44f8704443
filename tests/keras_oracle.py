"""The lab's DeepID built in Keras 3 (JAX backend): an independent oracle for the converter's tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

# The lab's DeepID in Keras: one builder with the Keras baseline (scripts/keras_deepid.py, keras only).
_spec = importlib.util.spec_from_file_location(
    "keras_deepid", Path(__file__).resolve().parents[1] / "scripts" / "keras_deepid.py")
_keras_deepid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_keras_deepid)
build_keras_deepid = _keras_deepid.build_keras_deepid


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
