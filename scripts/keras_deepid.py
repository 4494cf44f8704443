"""The lab's DeepID built in Keras 3 with the lab's layer names: one builder for the Keras baseline
(``scripts/keras_loop.py``) and the converter's test oracle (``tests/keras_oracle.py``).

Keras only (whatever backend ``KERAS_BACKEND`` names, set by the caller before this is imported): nothing of
badnet_jax, so both stay independent of the code they check. The lab's weights-only file (Keras 2.3.1) loads
into it with Keras' own ``load_weights``.
"""

from __future__ import annotations


def build_keras_deepid(num_classes: int = 1283):
    """The lab's architecture with the lab's layer names, as a Keras functional model (softmax output)."""
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
