"""The lab's DeepID BadNet as a Flax Linen module, with the trunk and the masked head exposed separately.

Architecture (VALID padding, NHWC, Keras channels-last flatten order, pixels 0..255 in, logits out)::

    conv_1 20@4x4 relu -> pool_1 2x2 -> conv_2 40@3x3 relu -> pool_2 -> conv_3 60@3x3 relu -> pool_3
    fc_1  = Dense(160)(flatten(pool_3))
    fc_2  = Dense(160)(flatten(conv_4 80@2x2 relu (pool_3)))
    logits = output(relu(fc_1 + fc_2))

Pruning a conv_3 channel (zeroing its kernel and bias) makes that channel relu(0) = 0 everywhere, and the max
pool of zeros is zero, so it is *exactly* the same as multiplying pool_3 by a 0/1 mask. The head therefore
takes a ``mask`` and every pruned network shares one trunk pass.

The input scale is part of the model: the lab's B takes raw pixels 0..255 (``input_scale="raw"``), the
CSAW-HackML-2020 BadNets take pixels / 255 (``"255"``; their eval.py divides). Every badnet-jax input is
pixels 0..255; the trunk divides when the model says so, so no caller has to remember.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_HWC = (55, 47, 3)
POOL3_HWC = (5, 4, 60)
NUM_POOL3_CHANNELS = 60
LAB_NUM_CLASSES = 1283
INPUT_SCALES = ("raw", "255")  # pixels as they are, or pixels / 255

# Keras layer names in file order; the weight-carrying ones are the Flax submodule names too.
KERAS_LAYER_NAMES = (
    "input", "conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3", "conv_4",
    "flatten_1", "flatten_2", "fc_1", "fc_2", "add_1", "activation_1", "output",
)
WEIGHT_LAYERS = ("conv_1", "conv_2", "conv_3", "conv_4", "fc_1", "fc_2", "output")

Params = dict[str, Any]


def param_shapes(num_classes: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Kernel and bias shapes of every weight layer, keyed like the params pytree (and the Keras file)."""
    return {
        "conv_1": {"kernel": (4, 4, 3, 20), "bias": (20,)},
        "conv_2": {"kernel": (3, 3, 20, 40), "bias": (40,)},
        "conv_3": {"kernel": (3, 3, 40, 60), "bias": (60,)},
        "conv_4": {"kernel": (2, 2, 60, 80), "bias": (80,)},
        "fc_1": {"kernel": (1200, 160), "bias": (160,)},
        "fc_2": {"kernel": (960, 160), "bias": (160,)},
        "output": {"kernel": (160, num_classes), "bias": (num_classes,)},
    }


def _pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class BadNet(nn.Module):
    """DeepID face classifier of the NYU ML-for-Cyber lab.

    Attributes:
        num_classes: size of the output layer (1283 for the lab's YouTube-Face model).
        input_scale: ``"raw"`` (the lab's B: pixels 0..255 go in as they are) or ``"255"`` (the 2020
            competition's BadNets: pixels / 255).
        precision: matmul/conv precision. ``HIGHEST`` by default so that accelerators (TF32 on GPUs, bf16
            passes on TPUs) give the same argmax as float32 on a CPU.
    """

    num_classes: int = LAB_NUM_CLASSES
    input_scale: str = "raw"
    precision: Any = jax.lax.Precision.HIGHEST

    def setup(self) -> None:
        if self.input_scale not in INPUT_SCALES:
            raise ValueError(f"input_scale must be one of {INPUT_SCALES}, got {self.input_scale!r}")
        # Submodule names come from the attribute names, which are the Keras layer names.
        conv = lambda f, k: nn.Conv(f, (k, k), padding="VALID", precision=self.precision)
        dense = lambda f: nn.Dense(f, precision=self.precision)
        self.conv_1 = conv(20, 4)
        self.conv_2 = conv(40, 3)
        self.conv_3 = conv(60, 3)
        self.conv_4 = conv(80, 2)
        self.fc_1 = dense(160)
        self.fc_2 = dense(160)
        self.output = dense(self.num_classes)

    def trunk(self, x_NxHxWxC: jax.Array) -> jax.Array:
        """Pixels 0..255 (N, 55, 47, 3) -> pool_3 activations (N, 5, 4, 60)."""
        return _pool(nn.relu(self.conv_3(self._pool2(x_NxHxWxC))))

    def trunk_with_margins(self, x_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The trunk, and how far each channel is from dead: (pool_3 (N, 5, 4, 60), each image's largest conv_3
        pre-activation per channel (N, 60), each image's largest conv_3 input (N,)).

        ReLU and max pooling only compare, so they commute exactly: relu(pool(conv_3)) is :meth:`trunk`'s
        pool(relu(conv_3)) bit for bit, and the pooled pre-activations give every position's maximum
        (conv_3's 10 x 8 output is tiled by the 2 x 2 windows).
        """
        h = self._pool2(x_NxHxWxC)
        pre = _pool(self.conv_3(h))
        return nn.relu(pre), jnp.max(pre, axis=(1, 2)), jnp.max(h, axis=(1, 2, 3))

    def _pool2(self, x_NxHxWxC: jax.Array) -> jax.Array:
        if self.input_scale == "255":
            x_NxHxWxC = x_NxHxWxC / jnp.float32(255.0)  # as the competition's eval.py: x / 255 in float32
        h = _pool(nn.relu(self.conv_1(x_NxHxWxC)))
        return _pool(nn.relu(self.conv_2(h)))

    def hidden(self, pool3_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """pool_3 activations (N, 5, 4, 60), optionally masked -> relu(fc_1 + fc_2), the output layer's input (N, 160)."""
        if mask is not None:
            pool3_NxHxWxC = pool3_NxHxWxC * jnp.asarray(mask, pool3_NxHxWxC.dtype)[None, None, None, :]
        n = pool3_NxHxWxC.shape[0]
        fc1 = self.fc_1(pool3_NxHxWxC.reshape(n, -1))
        conv4 = nn.relu(self.conv_4(pool3_NxHxWxC))
        fc2 = self.fc_2(conv4.reshape(n, -1))
        return nn.relu(fc1 + fc2)

    def head(self, pool3_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """pool_3 activations (N, 5, 4, 60) and an optional (60,) 0/1 channel mask -> logits (N, classes)."""
        return self.output(self.hidden(pool3_NxHxWxC, mask))

    def __call__(self, x_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """Pixels 0..255 (N, 55, 47, 3) -> logits (N, num_classes), pool_3 optionally masked."""
        return self.head(self.trunk(x_NxHxWxC), mask)


def init_params(num_classes: int = LAB_NUM_CLASSES, seed: int = 0) -> Params:
    """Random BadNet params (Flax default initialisers), for tests and for training from scratch."""
    model = BadNet(num_classes)
    x = jnp.zeros((1, *INPUT_HWC), jnp.float32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]


def num_classes_of(params: Params) -> int:
    """The number of classes of a params pytree (from the output bias)."""
    return int(params["output"]["bias"].shape[0])


@functools.lru_cache(maxsize=None)
def _argmax_fn(model: BadNet):
    # One compiled predictor per model (and input shape), reused across calls and epochs.
    return jax.jit(lambda p, m, x: jnp.argmax(model.apply({"params": p}, x.astype(jnp.float32), mask=m),
                                              -1).astype(jnp.int32))


def predict(model: BadNet, params: Params, x_NxHxWxC: np.ndarray, mask: Optional[jax.Array] = None,
            batch: int = 1024) -> np.ndarray:
    """(N,) int32 argmax predictions of B (or of B' under a pool_3 mask), ``batch`` images per jitted call."""
    m = jnp.ones((NUM_POOL3_CHANNELS,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    fn = _argmax_fn(model)
    parts = [np.asarray(fn(params, m, x_NxHxWxC[i:i + batch])) for i in range(0, len(x_NxHxWxC), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def prune_params(params: Params, mask: jax.Array) -> Params:
    """Zero the conv_3 kernel and bias of every channel whose mask entry is 0, as the lab's Keras code does."""
    m = jnp.asarray(mask, jnp.float32)
    conv3 = params["conv_3"]
    return {
        **params,
        "conv_3": {"kernel": conv3["kernel"] * m[None, None, None, :], "bias": conv3["bias"] * m},
    }
