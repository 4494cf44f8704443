"""The lab's DeepID BadNet as a :class:`~badnet_jax.models.protocol.PrunableModel`.

The Flax module (``badnet_jax.model.BadNet``) computes; this adapter gives the defense its view: the trunk up
to pool_3, the head's affine split (fc_1 and conv_4 pre-activations, summed over pool_3 channels), the
masked-head kernels of ``badnet_jax.kernels.masked_head`` for the tail, the dead-channel margins of conv_3
and the canonical float64 NumPy network of ``badnet_jax.numerics.settling``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.kernels.dense import api as dense_api
from badnet_jax.kernels.masked_head.api import head_top2
from badnet_jax.model import (CONV4_FEATURES, CONV4_POSITIONS, HIDDEN_UNITS, INPUT_HWC, LAB_NUM_CLASSES, POOL,
                              POOL3_HWC, BadNet, Params, check_params, init_params, multiply_adds)
from badnet_jax.models.ir import Graph, Node
from badnet_jax.pixels import scaled
from badnet_jax.models.protocol import Producer, PrunableModel, Stage
from badnet_jax.numerics import settling
from badnet_jax.numerics.ties import HIGHEST, TIE_RTOL, undecided_channels

POOL3 = "pool_3"


@dataclasses.dataclass(frozen=True)
class DeepID(PrunableModel):
    """The lab's DeepID (see ``badnet_jax.model``), pruned at pool_3.

    Attributes:
        num_classes: the output layer's width (1283 for the lab's YouTube-Face model).
        input_scale: ``raw`` (the lab's B) or ``255`` (the 2020 competition's BadNets).
        precision: matmul/conv precision of the float32 network.
    """

    num_classes: int = LAB_NUM_CLASSES
    input_scale: str = "raw"
    precision: Any = jax.lax.Precision.HIGHEST
    tie_rtol: float = TIE_RTOL
    input_hwc: tuple[int, int, int] = INPUT_HWC
    layer: str = POOL3
    feature_hwc: tuple[int, int, int] = POOL3_HWC

    @property
    def name(self) -> str:
        return "DeepID"

    @property
    def module(self) -> BadNet:
        """The Flax module, at the raw input scale (this adapter divides)."""
        # parent=None: a top-level module even when called inside another module's apply (e.g. a GoodNet's)
        return BadNet(self.num_classes, input_scale="raw", precision=self.precision, parent=None)

    @property
    def flax_module(self) -> BadNet:
        """The Flax module at this model's input scale (what training and ``BadNet.apply`` callers use)."""
        return BadNet(self.num_classes, input_scale=self.input_scale, precision=self.precision, parent=None)

    @classmethod
    def of(cls, module: BadNet) -> "DeepID":
        """The adapter of a ``BadNet`` module (its classes, input scale and precision)."""
        return cls(module.num_classes, module.input_scale, module.precision)

    def with_input_scale(self, input_scale: str) -> "DeepID":
        return dataclasses.replace(self, input_scale=input_scale)

    def check_params(self, params: Any, name: str = "params") -> int:
        return check_params(params, name, num_classes=self.num_classes)

    def init_params(self, seed: int = 0) -> Params:
        return init_params(self.num_classes, seed)

    def multiply_adds(self) -> dict[str, int]:
        return multiply_adds(self.num_classes)

    def layer_stages(self) -> tuple[Stage, ...]:
        """conv_1, conv_2, conv_3 (each with its relu and 2x2 max pool: they compose to :meth:`features` on
        scaled pixels), then the head's layers alone: fc_1 (flattened pool_3), conv_4 (pool_3, with its relu),
        fc_2 (flattened conv_4), output (the hidden layer; its argmax, top-2 gap and output scale, what the
        sweep computes of it). The tail's layers run as the sweep's head runs them here (the native dense
        kernels on a CPU that built them: ``badnet_jax.kernels.dense``)."""
        macs, module = self.multiply_adds(), self.module
        # The dense kernels' implementation is resolved when a stage runs: resolving asks JAX for its backend,
        # which would fix the CPU device count before a command sets it (``processes.use_cpu_cores``).
        impl = lambda: dense_api.resolve_impl()  # noqa: E731

        def layer(name: str, **epilogue):
            if name == "fc_2":
                return lambda p, x: dense_api.dense(x, p[name]["kernel"], p[name]["bias"], impl=impl())
            if name == "output":
                return lambda p, x: dense_api.dense_top2(x, p[name]["kernel"], p[name]["bias"], impl=impl())
            return lambda p, x: module.apply({"params": p}, x, method=lambda m, v: getattr(m, name)(v, **epilogue))

        parts = {"conv_1": "trunk", "conv_2": "trunk", "conv_3": "trunk", "fc_1": "affine", "conv_4": "affine",
                 "fc_2": "tail", "output": "tail"}
        # The trunk's convolutions as the trunk runs them: with their relu and pool in the same call.
        epilogues = {"conv_1": dict(relu=True, pool=True), "conv_2": dict(relu=True, pool=True),
                     "conv_3": dict(relu=True, pool=True), "conv_4": dict(relu=True)}
        return tuple(Stage(name, part, 2 * macs[name], layer(name, **epilogues.get(name, {})))
                     for name, part in parts.items())

    def stage_inputs(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> dict[str, jax.Array]:
        stages = {s.name: s.fn for s in self.layer_stages()}
        out = {"conv_1": scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)}
        out["conv_2"] = stages["conv_1"](params, out["conv_1"])
        out["conv_3"] = stages["conv_2"](params, out["conv_2"])
        feats = stages["conv_3"](params, out["conv_3"])
        n = feats.shape[0]
        out.update(fc_1=feats.reshape(n, -1), conv_4=feats,
                   fc_2=stages["conv_4"](params, feats).reshape(n, -1), output=self.hidden(params, feats))
        return out

    has_kernels = True

    @property
    def preactivation_size(self) -> int:
        return HIDDEN_UNITS + CONV4_FEATURES  # fc_1's and flattened conv_4's pre-activations

    @property
    def hidden_size(self) -> int:
        return HIDDEN_UNITS

    def trunk_bytes_per_image(self) -> int:
        return 350_000  # conv_1's output 52x44x20 and its pool, conv_2's output (float32)

    def plain_head_bytes_per_image(self) -> int:
        return 920_000  # the head vmapped over the 61 masks

    def step_bytes_per_image(self) -> int:
        return 15_000

    def producer(self, params: Params) -> Producer:
        return Producer(np.asarray(params["conv_3"]["kernel"], np.float64), "conv_3")  # conv_3 -> relu -> pool_3

    # ----- trunk
    def features(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> jax.Array:
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        return self.module.apply({"params": params}, x, method=BadNet.trunk)

    def features_with_margins(self, params: Params, x_NxHxWxC: jax.Array,
                              divisor: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """pool_3, each image's largest conv_3 pre-activation per channel (N, 60) and largest conv_3 input (N,)."""
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        return self.module.apply({"params": params}, x, method=BadNet.trunk_with_margins)

    def undecided_channels(self, params: Params, margin_C: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return undecided_channels(margin_C, float(scale), params["conv_3"]["kernel"], params["conv_3"]["bias"])

    # ----- head
    def hidden(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        return self.module.apply({"params": params}, feats_NxHxWxC, mask, method=BadNet.hidden)

    def output_layer(self, params: Params) -> tuple[jax.Array, jax.Array]:
        return params["output"]["kernel"], params["output"]["bias"]

    def head(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        return self.module.apply({"params": params}, feats_NxHxWxC, mask, method=BadNet.head)

    # ----- affine split: fc_1 (160) and flattened conv_4 (4x3x80 = 960) pre-activations
    def preactivation_bias(self, params: Params) -> tuple[jax.Array, jax.Array]:
        """fc_1's bias (160,) and conv_4's bias in the flattened (4, 3, 80) layout (960,)."""
        return params["fc_1"]["bias"], jnp.tile(params["conv_4"]["bias"], CONV4_POSITIONS)

    def channel_contribution(self, params: Params, feats_NxHxWxC: jax.Array,
                             c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """fc_1 (N, 160) and flattened conv_4 (N, 960) contributions of pool_3 channel ``c`` (~14 kFLOP an image:
        a (20 x 160) and a (4 x 80) product per position)."""
        n = feats_NxHxWxC.shape[0]
        h, w, ch = POOL3_HWC
        v = jnp.take(feats_NxHxWxC, c, axis=3)  # (N, 5, 4)
        w1_c = jnp.take(params["fc_1"]["kernel"].reshape(h * w, ch, -1), c, axis=1)  # (20, 160), Keras (h, w, c)
        f = jnp.dot(v.reshape(n, h * w), w1_c, precision=HIGHEST)
        k4_c = jnp.take(params["conv_4"]["kernel"], c, axis=2)  # (2, 2, 80)
        kh, kw, o = k4_c.shape
        oh, ow = h - kh + 1, w - kw + 1
        patches = jnp.stack([v[:, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=-1)  # (N, 4, 3, 4)
        g = jnp.dot(patches, k4_c.reshape(kh * kw, o), precision=HIGHEST)  # (N, 4, 3, 80)
        return f, g.reshape(n, oh * ow * o)

    def tail_hidden(self, params: Params, pre: tuple[jax.Array, jax.Array]) -> jax.Array:
        fc1, c4 = pre
        lead = (1,) * (fc1.ndim - 1)
        c4_hidden = jnp.dot(jax.nn.relu(c4), params["fc_2"]["kernel"], precision=HIGHEST)
        return jax.nn.relu(c4_hidden + params["fc_2"]["bias"].reshape(*lead, -1) + fc1)

    def tail_top2(self, params: Params, pre: tuple[jax.Array, jax.Array], impl: str = "reference",
                  platform: str = "cpu") -> tuple[jax.Array, jax.Array, jax.Array]:
        """The masked-head kernels (``badnet_jax.kernels.masked_head``): the reference or the Pallas kernel."""
        fc1, c4 = pre
        return head_top2(fc1, c4, params["fc_2"]["kernel"], params["fc_2"]["bias"], params["output"]["kernel"],
                         params["output"]["bias"], impl=impl, platform=platform)

    # ----- float64: the canonical NumPy network (badnet_jax.numerics.settling)
    def features64(self, params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
        return settling.pool3_64_xla(params, x_NxHxWxC, divisor)

    def argmax64(self, params: Params, x_NxHxWxC: np.ndarray, divisor: float,
                 masks_NxC: Optional[np.ndarray] = None, image_of: Optional[np.ndarray] = None) -> np.ndarray:
        return settling.argmax64(params, x_NxHxWxC, divisor, masks_NxC, image_of)

    def warm64(self, params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> None:
        # Only the trunk is XLA's (the head is NumPy's): the head on zeros would also flag every row as a near-tie.
        self.features64(params, x_NxHxWxC, divisor)

    def feature_means64(self, params: Params, x_NxHxWxC: np.ndarray, divisor: float) -> np.ndarray:
        return settling.pool3_means64(params, x_NxHxWxC, divisor)

    def warm_means64(self, params: Params, images: jax.ShapeDtypeStruct) -> None:
        pass  # its means run the float64 trunk in the calls that warm64 compiles


def as_model(model: Any) -> PrunableModel:
    """A :class:`PrunableModel` as it is; a ``BadNet`` module as its :class:`DeepID` adapter.

    Raises:
        ConfigError: anything else.
    """
    if isinstance(model, PrunableModel):
        return model
    if isinstance(model, BadNet):
        return DeepID.of(model)
    raise ConfigError(f"{arg('model')}: expected a model (a PrunableModel such as DeepID or GraphCNN, or a BadNet "
                      f"module), got {type(model).__name__}", field="model")


def deepid_graph(num_classes: int = LAB_NUM_CLASSES) -> Graph:
    """The lab's DeepID as a layer graph (``badnet_jax.models.ir``), its Keras layer names and params keys: what
    prunes any of its layers other than pool_3 (``GraphCNN.build(deepid_graph(n), params, layer="pool_2")``)."""
    def conv(name: str, src: str) -> list[Node]:
        return [Node.make(f"{name}/pre", "conv", (src,), weights=name), Node.make(name, "relu", (f"{name}/pre",))]

    nodes = [Node.make("input", "input")]
    src = "input"
    for i in (1, 2, 3):
        nodes += conv(f"conv_{i}", src)
        nodes.append(Node.make(f"pool_{i}", "max_pool", (f"conv_{i}",), window=(POOL, POOL), strides=(POOL, POOL)))
        src = f"pool_{i}"
    nodes += conv("conv_4", "pool_3")
    nodes += [Node.make("flatten_1", "flatten", ("pool_3",)), Node.make("flatten_2", "flatten", ("conv_4",)),
              Node.make("fc_1", "dense", ("flatten_1",), weights="fc_1"),
              Node.make("fc_2", "dense", ("flatten_2",), weights="fc_2"),
              Node.make("add_1", "add", ("fc_1", "fc_2")), Node.make("activation_1", "relu", ("add_1",)),
              Node.make("output/pre", "dense", ("activation_1",), weights="output"),
              Node.make("output", "softmax", ("output/pre",))]
    return Graph(tuple(nodes), INPUT_HWC, "output", name="DeepID")
