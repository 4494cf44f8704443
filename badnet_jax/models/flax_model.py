"""A researcher's own Flax CNN as a :class:`~badnet_jax.models.protocol.PrunableModel`: :class:`FlaxCNN`.

The module splits itself at the layer to prune, with two methods and an output layer:

* ``features(self, x)``: the (scaled) images -> the pruned layer's output (N, H, W, C);
* ``hidden(self, feats)``: those features -> the output layer's input (N, H');
* an ``nn.Dense`` submodule (default name ``output``) from the hidden layer to the logits.

Example::

    class Net(nn.Module):
        @nn.compact
        def features(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
            return nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv2")(x))   # pruned: its 32 channels
        @nn.compact
        def hidden(self, feats):
            return jnp.mean(feats, axis=(1, 2))
        ...  # __call__ = self.output(self.hidden(self.features(x))), output = nn.Dense(10)

    model = FlaxCNN.build(Net(), params, input_hwc=(32, 32, 3), input_scale="255", layer="conv2")
    sweep = rank_and_sweep(model, params, {"clean_valid": x_valid, "bd_valid": x_bd})

Nothing about the head is assumed, so the affine split is the masked features themselves (every step's
pre-activations are the features with its pruned channels zeroed, built by suffix sums of one channel at a
time) and every step runs the whole head: exact, as fast as the masked forward. A Keras or IR model
(:class:`~badnet_jax.models.graph.GraphCNN`) gets the cheaper split of its first affine layers.

Its layer stages (``PrunableModel.layer_stages``) are the protocol's default: nothing inside the module is
known, so a benchmark times the trunk and the head whole, with FLOPs from XLA's cost analysis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.protocol import Params, PrunableModel, input_divisor, scaled
from badnet_jax.numerics.ties import TIE_RTOL


@dataclasses.dataclass(frozen=True)
class FlaxCNN(PrunableModel):
    """A Flax module with ``features`` / ``hidden`` methods and a Dense output layer (see the module docstring).

    Attributes:
        module: the Flax module (hashable: a dataclass of its hyper-parameters).
        input_hwc, num_classes, input_scale, layer, feature_hwc: the protocol's properties (``layer`` names the
            pruned layer in logs and reports).
        output: the name of the Dense output submodule in the params.
        hidden_width: the output layer's input width.
    """

    module: nn.Module
    input_hwc: tuple[int, int, int]
    num_classes: int
    input_scale: str
    layer: str
    feature_hwc: tuple[int, int, int]
    output: str = "output"
    hidden_width: int = 0
    tie_rtol: float = TIE_RTOL
    tie_rtol_measured: bool = False

    @classmethod
    def build(cls, module: nn.Module, params: Params, input_hwc: tuple[int, int, int], input_scale: str,
              layer: str = "features", output: str = "output") -> "FlaxCNN":
        """The model of ``module`` with these params (shapes are read from an abstract evaluation).

        Raises:
            ConfigError: the module has no ``features`` or ``hidden`` method, its features are not a 4-D
                feature map, or the params hold no Dense ``output`` layer.
        """
        input_divisor(input_scale)  # refuses an unknown scale now, not at the first sweep
        for method in ("features", "hidden"):
            if not callable(getattr(module, method, None)):
                raise ConfigError(f"{arg('module')}: {type(module).__name__} has no {method}() method; see "
                                  "badnet_jax.models.flax_model", field="module")
        if not isinstance(params, dict) or output not in params or "kernel" not in params[output]:
            raise ConfigError(f"{arg('output', output)}: no Dense layer of that name in the params (they hold "
                              f"{', '.join(params) if isinstance(params, dict) else type(params).__name__})",
                              field="output")
        x = jax.ShapeDtypeStruct((1, *input_hwc), jnp.float32)
        feats = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method="features"), params, x)
        if len(feats.shape) != 4:
            raise ConfigError(f"{arg('layer', layer)}: {type(module).__name__}.features gives shape {feats.shape}, not a "
                              "feature map (N, height, width, channels)", field="layer")
        kernel = np.shape(params[output]["kernel"])
        return cls(module, tuple(input_hwc), int(kernel[1]), input_scale, layer, tuple(feats.shape[1:]), output,
                   int(kernel[0]))

    @property
    def name(self) -> str:
        return type(self.module).__name__

    @property
    def preactivation_size(self) -> int:
        return int(np.prod(self.feature_hwc))

    @property
    def hidden_size(self) -> int:
        return self.hidden_width

    def with_input_scale(self, input_scale: str) -> "FlaxCNN":
        return dataclasses.replace(self, input_scale=input_scale)

    def check_params(self, params: Any, name: str = "params") -> int:
        if not isinstance(params, dict) or self.output not in params:
            raise ConfigError(f"{arg(name)}: expected the params of {self.name} (with its {self.output!r} layer)",
                              field=name)
        shape = tuple(np.shape(params[self.output].get("kernel")))
        if shape != (self.hidden_width, self.num_classes):
            raise ConfigError(f"{arg(name)}: layer {self.output!r} kernel of shape {shape}, expected "
                              f"{(self.hidden_width, self.num_classes)}", field=name)
        return self.num_classes

    def init_params(self, seed: int = 0) -> Params:
        x = jnp.zeros((1, *self.input_hwc), jnp.float32)
        return self.module.init(jax.random.PRNGKey(seed), x)["params"]

    def features(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> jax.Array:
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        return self.module.apply({"params": params}, x, method="features")

    def hidden(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        if mask is not None:
            feats_NxHxWxC = feats_NxHxWxC * jnp.asarray(mask, feats_NxHxWxC.dtype)[None, None, None, :]
        return self.module.apply({"params": params}, feats_NxHxWxC, method="hidden")

    def output_layer(self, params: Params) -> tuple[jax.Array, jax.Array]:
        p = params[self.output]
        return p["kernel"], p["bias"] if "bias" in p else jnp.zeros((self.num_classes,), p["kernel"].dtype)

    # The affine split: the masked features themselves.
    def preactivation_bias(self, params: Params) -> jax.Array:
        return jnp.zeros(self.feature_hwc, jnp.asarray(params[self.output]["kernel"]).dtype)

    def channel_contribution(self, params: Params, feats_NxHxWxC: jax.Array, c: jax.Array) -> jax.Array:
        keep = jnp.arange(self.num_channels) == c
        return jnp.where(keep[None, None, None, :], feats_NxHxWxC, jnp.zeros((), feats_NxHxWxC.dtype))

    def tail_hidden(self, params: Params, pre: jax.Array) -> jax.Array:
        lead = pre.shape[:-3]
        hidden = self.module.apply({"params": params}, pre.reshape(-1, *self.feature_hwc), method="hidden")
        return hidden.reshape(*lead, hidden.shape[-1])
