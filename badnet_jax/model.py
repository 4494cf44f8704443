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
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.kernels.conv2d import conv2d
from badnet_jax.pixels import INPUT_DIVISORS, INPUT_SCALES, check_images_of_shape, input_divisor  # noqa: F401

INPUT_HWC = (55, 47, 3)
# The convolutions, in data order: (layer, filters, k) of a VALID k x k conv followed by relu. conv_1..conv_3
# each feed a 2x2 max pool (pool_1..pool_3); conv_4 reads pool_3 and is flattened into fc_2.
CONVS = (("conv_1", 20, 4), ("conv_2", 40, 3), ("conv_3", 60, 3), ("conv_4", 80, 2))
POOL = 2  # max pool window and stride
HIDDEN_UNITS = 160  # fc_1 and fc_2 (summed, relu): the output layer's input
LAB_NUM_CLASSES = 1283


def _conv_shapes() -> dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]:
    shapes, hwc = {}, INPUT_HWC
    for name, filters, k in CONVS:
        out = (hwc[0] - k + 1, hwc[1] - k + 1, filters)
        shapes[name] = (hwc, out)
        hwc = (out[0] // POOL, out[1] // POOL, filters)
    return shapes


CONV_SHAPES = _conv_shapes()  # layer -> (input HWC, output HWC), e.g. conv_1: (55, 47, 3) -> (52, 44, 20)
POOL3_HWC = CONV_SHAPES["conv_4"][0]  # (5, 4, 60): conv_4's input, the layer the defense prunes
CONV4_HWC = CONV_SHAPES["conv_4"][1]  # (4, 3, 80)
NUM_POOL3_CHANNELS = POOL3_HWC[2]
POOL3_FEATURES = POOL3_HWC[0] * POOL3_HWC[1] * POOL3_HWC[2]  # 1200: flattened pool_3, fc_1's input
CONV4_POSITIONS = CONV4_HWC[0] * CONV4_HWC[1]  # 12: conv_4's output positions (its bias repeats at each)
CONV4_FEATURES = CONV4_POSITIONS * CONV4_HWC[2]  # 960: flattened conv_4, fc_2's input

# Keras layer names in file order; the weight-carrying ones are the Flax submodule names too.
KERAS_LAYER_NAMES = (
    "input", "conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3", "conv_4",
    "flatten_1", "flatten_2", "fc_1", "fc_2", "add_1", "activation_1", "output",
)
WEIGHT_LAYERS = ("conv_1", "conv_2", "conv_3", "conv_4", "fc_1", "fc_2", "output")

Params = dict[str, Any]


def param_shapes(num_classes: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Kernel and bias shapes of every weight layer, keyed like the params pytree (and the Keras file)."""
    shapes = {name: {"kernel": (k, k, CONV_SHAPES[name][0][2], filters), "bias": (filters,)}
              for name, filters, k in CONVS}
    dense = {"fc_1": (POOL3_FEATURES, HIDDEN_UNITS), "fc_2": (CONV4_FEATURES, HIDDEN_UNITS),
             "output": (HIDDEN_UNITS, num_classes)}
    return {**shapes, **{name: {"kernel": shape, "bias": shape[1:]} for name, shape in dense.items()}}


def multiply_adds(num_classes: int) -> dict[str, int]:
    """Multiply-adds per image of each weight layer: a conv's kernel at every output position, a dense layer's
    kernel once (biases, relu and pooling are not counted)."""
    out = {}
    for name, shapes in param_shapes(num_classes).items():
        kernel = int(np.prod(shapes["kernel"]))
        out[name] = kernel * CONV_SHAPES[name][1][0] * CONV_SHAPES[name][1][1] if name in CONV_SHAPES else kernel
    return out


class Conv(nn.Module):
    """A VALID convolution with bias, the params of ``nn.Conv`` (kernel (kh, kw, C, F), bias (F,), the same
    initialisers), run by ``badnet_jax.kernels.conv2d``: XLA's convolution, or the width-blocked form where its
    rule picks it (conv_1's 3 input channels on a CPU)."""

    features: int
    kernel_size: tuple[int, int]
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_NxHxWxC: jax.Array, relu: bool = False, pool: bool = False) -> jax.Array:
        """The convolution plus bias; ``pool``: then DeepID's 2x2 max pool, ``relu``: then a ReLU (the
        conv -> relu -> pool stage in one ``conv2d`` call, which a CPU's direct kernel fuses)."""
        shape = (*self.kernel_size, x_NxHxWxC.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        dtype = jnp.result_type(x_NxHxWxC, kernel)  # float64 images (the settling's network) promote like nn.Conv
        return conv2d(x_NxHxWxC.astype(dtype), kernel.astype(dtype), padding="VALID", precision=self.precision,
                      bias=bias.astype(dtype), relu=relu, pool=(POOL, POOL) if pool else None)


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
        input_divisor(self.input_scale)  # refuses an unknown scale
        # Submodule names come from the attribute names, which are the Keras layer names.
        convs = {name: Conv(filters, (k, k), precision=self.precision) for name, filters, k in CONVS}
        dense = lambda f: nn.Dense(f, precision=self.precision)
        self.conv_1 = convs["conv_1"]
        self.conv_2 = convs["conv_2"]
        self.conv_3 = convs["conv_3"]
        self.conv_4 = convs["conv_4"]
        self.fc_1 = dense(HIDDEN_UNITS)
        self.fc_2 = dense(HIDDEN_UNITS)
        self.output = dense(self.num_classes)

    @property
    def divisor(self) -> float:
        """What this model divides the pixels 0..255 by (:func:`input_divisor` of its input scale)."""
        return input_divisor(self.input_scale)

    def trunk(self, x_NxHxWxC: jax.Array) -> jax.Array:
        """Pixels 0..255 (N, 55, 47, 3) -> pool_3 activations (N, 5, 4, 60)."""
        return self.conv_3(self._pool2(x_NxHxWxC), relu=True, pool=True)

    def trunk_with_margins(self, x_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The trunk, and how far each channel is from dead: (pool_3 (N, 5, 4, 60), each image's largest conv_3
        pre-activation per channel (N, 60), each image's largest conv_3 input (N,)).

        ReLU and max pooling only compare, so they commute exactly: relu(pool(conv_3)) is :meth:`trunk`'s
        pool(relu(conv_3)) bit for bit, and the pooled pre-activations give every position's maximum
        (conv_3's 10 x 8 output is tiled by the 2 x 2 windows).
        """
        h = self._pool2(x_NxHxWxC)
        pre = self.conv_3(h, pool=True)
        return nn.relu(pre), jnp.max(pre, axis=(1, 2)), jnp.max(h, axis=(1, 2, 3))

    def _pool2(self, x_NxHxWxC: jax.Array) -> jax.Array:
        if self.divisor != 1.0:
            # the competition's eval.py divides by 255 in float32; XLA:CPU multiplies by the float32 reciprocal
            # instead (126 of the 256 pixel values then differ in the last bit), an input error the float32
            # near-tie bound was measured with, and the float64 settling divides exactly
            x_NxHxWxC = x_NxHxWxC / jnp.float32(self.divisor)
        h = self.conv_1(x_NxHxWxC, relu=True, pool=True)
        return self.conv_2(h, relu=True, pool=True)

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
    """Random BadNet params (Flax default initialisers), for tests and for training from scratch.

    Raises:
        ConfigError: ``num_classes`` is not a positive integer.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"{arg('num_classes', str(num_classes))}: expected a positive number of classes",
                          field="num_classes")
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
    """(N,) int32 argmax predictions of B (or of B' under a pool_3 mask), ``batch`` images per jitted call.

    Raises:
        ConfigError: params that are not ``model``'s, a mask that is not (60,) zeros and ones, or ``batch`` < 1.
        DataFileError: images that are not (N, 55, 47, 3) finite pixels.
    """
    check_params(params, num_classes=model.num_classes)
    check_images(x_NxHxWxC, "x_NxHxWxC", allow_empty=True)
    if batch < 1:
        raise ConfigError(f"{arg('batch', batch)}: expected at least 1 image per call", field="batch")
    m = jnp.ones((NUM_POOL3_CHANNELS,), jnp.float32) if mask is None else jnp.asarray(check_mask(mask))
    fn = _argmax_fn(model)
    parts = [np.asarray(fn(params, m, x_NxHxWxC[i:i + batch])) for i in range(0, len(x_NxHxWxC), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def prune_params(params: Params, mask: jax.Array) -> Params:
    """Zero the conv_3 kernel and bias of every channel whose mask entry is 0, as the lab's Keras code does.

    Traceable (a traced mask is checked for its shape only).

    Raises:
        ConfigError: params without a conv_3 layer of the BadNet's shape, or a mask that is not (60,) zeros and ones.
    """
    check_params(params)
    m = jnp.asarray(check_mask(mask), jnp.float32)
    conv3 = params["conv_3"]
    return {
        **params,
        "conv_3": {"kernel": conv3["kernel"] * m[None, None, None, :], "bias": conv3["bias"] * m},
    }


# Checks of what a library caller passes in, on the host before any jitted call: shapes and dtypes cost nothing,
# and finiteness is one pass over float images (uint8 images, the lab's, need none).


def _is_traced(a: Any) -> bool:
    return isinstance(a, jax.core.Tracer)


def check_params(params: Any, name: str = "params", num_classes: Optional[int] = None) -> int:
    """Refuse anything but a BadNet's params (every weight layer, kernel and bias, of the DeepID shapes).

    Shapes only (no values are read, so traced or abstract params pass too). Whoever writes or runs params
    calls it first, so that a missing layer is named instead of surfacing as a ``KeyError`` or a broadcast.

    Args:
        params: the params pytree (``{"conv_1": {"kernel", "bias"}, ..., "output": ...}``).
        name: the argument it was passed as, for the message.
        num_classes: the class count the caller's model has, if it has one.

    Returns:
        The number of classes (the output layer's width).

    Raises:
        ConfigError: not a mapping of the weight layers, a layer or a kernel/bias missing, a shape other
            than the DeepID architecture's, or an output width other than ``num_classes``.
    """
    expected_layers = ", ".join(WEIGHT_LAYERS)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{arg(name)}: expected a BadNet's params (a dict of the layers {expected_layers}), got "
                          f"{type(params).__name__}", field=name)
    missing = [layer for layer in WEIGHT_LAYERS if not isinstance(params.get(layer), Mapping)
               or not {"kernel", "bias"} <= set(params[layer])]
    if missing:
        raise ConfigError(f"{arg(name)}: no {' or '.join(missing)} (kernel and bias) among its layers "
                          f"({', '.join(map(str, params)) or 'none'}); a BadNet's params hold {expected_layers}",
                          field=name)
    out = tuple(np.shape(params["output"]["bias"]))
    if len(out) != 1 or out[0] < 1:
        raise ConfigError(f"{arg(name)}: output bias of shape {out}, expected (num_classes,)", field=name)
    if num_classes is not None and out[0] != num_classes:
        raise ConfigError(f"{arg(name)}: {out[0]} classes, expected the model's {num_classes}", field=name)
    for layer, shapes in param_shapes(out[0]).items():
        for what, want in shapes.items():
            got = tuple(np.shape(params[layer][what]))
            if got != want:
                raise ConfigError(f"{arg(name)}: {layer} {what} of shape {got}, expected {want} (the DeepID "
                                  f"BadNet with {out[0]} classes)", field=name)
    return out[0]


def check_mask(mask: Any, name: str = "mask") -> Any:
    """A (60,) pool_3 mask as float32, refused unless every entry is 0 (pruned) or 1 (kept).

    A mask of other values would scale channels instead of pruning them. A traced mask (inside jit) is
    checked for its shape only and returned as it is.

    Raises:
        ConfigError: another shape, or an entry other than 0 or 1.
    """
    shape = tuple(np.shape(mask))
    if shape != (NUM_POOL3_CHANNELS,):
        raise ConfigError(f"{arg(name)}: shape {shape}, expected ({NUM_POOL3_CHANNELS},): one entry per pool_3 "
                          "channel, 0 pruned or 1 kept", field=name)
    if _is_traced(mask):
        return mask
    m = np.asarray(mask, np.float32)
    bad = np.flatnonzero((m != 0) & (m != 1))
    if len(bad):
        raise ConfigError(f"{arg(name)}: channel {int(bad[0])} is {m[bad[0]]:g} ({len(bad)} of {NUM_POOL3_CHANNELS} "
                          "entries are neither 0 nor 1); expected 0 (pruned) or 1 (kept): a mask prunes, it does not "
                          "scale", field=name)
    return m


def check_images(x_NxHxWxC: Any, name: str = "x", allow_empty: bool = False,
                 field: Optional[str] = None) -> None:
    """Refuse images a BadNet cannot take: not (N, 55, 47, 3), not real pixels 0..255
    (``badnet_jax.pixels.check_images_of_shape`` at DeepID's input).

    Raises:
        DataFileError: naming ``name`` and what was expected.
    """
    check_images_of_shape(x_NxHxWxC, INPUT_HWC, name, allow_empty, field)
