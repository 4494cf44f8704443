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
        @nn.compact
        def __call__(self, x):   # the whole network: the output layer after the hidden layer
            return nn.Dense(10, name="output")(self.hidden(self.features(x)))

    params = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]   # or your trained ones

    model = FlaxCNN.build(Net(), params, input_hwc=(32, 32, 3), input_scale="255", layer="conv2")
    sweep = rank_and_sweep(model, params, {"clean_valid": x_valid, "bd_valid": x_bd})

**Batch norm.** A module with ``nn.BatchNorm(use_running_average=True)`` (a trained CNN in inference mode)
reads its running statistics from the ``batch_stats`` collection: build the model from the module's full
variables, ``FlaxCNN.build(Net(), variables, ...)`` with ``variables = {"params": ..., "batch_stats": ...}``
(any further collections come along too). The model records the collections it was built with
(``FlaxCNN.collections``), and the params it takes everywhere (the sweep, rankings, settling, GoodNet,
fine-tuning) are then that whole variables dict: ``rank_and_sweep(model, variables, ...)``. Every collection
other than ``params`` is a constant of the network: the module runs in inference mode with nothing mutable
(a batch norm in training mode is refused when the model is built), no gradient flows into those
collections, so fine-tuning (Adam: a zero gradient is a zero update) trains the params and leaves the
running statistics exactly as they are, and the float64 settling converts them to float64 with the params.
A model built from params alone takes params alone, as before.

**What the module must do.** Each image's values are its own (no statistics over the batch: the sweep cuts
the images into chunks of any size), and given float64 images and variables it computes in float64 (near-ties
are settled by the module itself under ``jax.enable_x64``, so no layer pins ``dtype=jnp.float32``). Both are
checked when the model is built (``badnet_jax.models.flax_checks``).

By default nothing about the head is assumed, so the affine split is the masked features themselves (every
step's pre-activations are the features with its pruned channels zeroed, built by suffix sums of one channel at
a time) and every step runs the whole head: exact, as fast as the masked forward. A module that splits
``hidden`` at its first affine layers into ``pre`` and ``post`` methods names them (``head_split=("pre",
"post")``, checked when the model is built) and gets the cheaper split a Keras or IR model
(:class:`~badnet_jax.models.graph.GraphCNN`) has: see ``badnet_jax.models.flax_split``.

Its layer stages (``PrunableModel.layer_stages``) are the protocol's default: nothing inside the module is
known, so a benchmark times the trunk and the head whole, with FLOPs from XLA's cost analysis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax.extend.core import Literal, jaxprs_in_params, subjaxprs
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.pixels import input_divisor, scaled
from badnet_jax.models import flax_convs
from badnet_jax.models.flax_checks import check_module
from badnet_jax.models.flax_split import HeadSplit, check_split, contribution, linear_map, map_bytes, split_names
from badnet_jax.models.flax_variables import PARAMS, check_variables, collections_of, for_apply, shape_of, shapes
from badnet_jax.models.protocol import Params, PrunableModel, working_bytes
from badnet_jax.numerics.ties import TIE_RTOL


@dataclasses.dataclass(frozen=True)
class FlaxCNN(PrunableModel):
    """A Flax module with ``features`` / ``hidden`` methods and a Dense output layer (see the module docstring).

    Attributes:
        module: the Flax module (hashable: a dataclass of its hyper-parameters).
        input_hwc, num_classes, input_scale, layer, feature_hwc: the protocol's properties (``layer`` names the
            pruned layer in logs and reports: the module's ``features`` ends there).
        output: the name of the Dense output submodule in the params.
        hidden_width: the output layer's input width.
        collections: the Flax collections of the variables the model was built from, sorted (e.g.
            ``("batch_stats", "params")``): the params it takes are then that variables dict. Empty: built from
            the ``params`` collection alone, which is what it takes.
        variable_shapes: (path, shape) of every array of the variables it was built from: params of another
            module (a wider layer) are refused by name, not by Flax inside a sweep.
        trunk_sizes: the values per image of the two largest tensors ``features`` computes (read from its
            traced program), for the sweep's memory model; empty: the protocol's default estimate.
        head_split: the head split at its first affine layers (``badnet_jax.models.flax_split``), or None: the
            pre-activations are the masked features and every step runs all of ``hidden``.
        fast_convs: whether the module's plain float32 ``nn.Conv`` layers run through the kernels' convolution
            forms (``badnet_jax.models.flax_convs``); off: XLA's convolution, as the module wrote it.
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
    collections: tuple[str, ...] = ()
    variable_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    trunk_sizes: tuple[int, ...] = ()
    head_split: Optional[HeadSplit] = None
    fast_convs: bool = True

    layers_known = False  # the module is code: which layer produces the pruned channels is not known here

    @classmethod
    def build(cls, module: nn.Module, variables: Params, input_hwc: tuple[int, int, int], input_scale: str,
              layer: str = "features", output: str = "output",
              head_split: Optional[tuple[str, Optional[str]]] = None, fast_convs: bool = True) -> "FlaxCNN":
        """The model of ``module`` with these variables (shapes are read from an abstract evaluation).

        Args:
            module: the Flax module, with ``features`` and ``hidden`` methods (see the module docstring).
            variables: the module's params alone, or its full variables (``{"params": ..., "batch_stats": ...}``,
                what ``module.init`` returns), which a module with batch norm in inference mode needs. What is
                given here is what the model takes as its params afterwards.
            input_hwc: the input images' height, width and channels.
            input_scale: ``raw`` or ``255`` (what the pixels 0..255 are divided by before the module).
            layer: the pruned layer's name, for logs and reports; it names the layer, it does not choose it:
                the pruned layer is where ``features`` ends.
            output: the name of the Dense output submodule.
            head_split: ``(pre, post)``: the module's methods that split ``hidden`` at its first affine layers,
                ``pre(feats)`` affine in the features and ``post(pre)`` the rest (``("hidden", None)``: hidden is
                affine itself, e.g. a global average pooling); checked on random features. The sweep then adds
                one contribution per channel instead of running all of ``hidden`` at every step
                (``badnet_jax.models.flax_split``). None: no split.
            fast_convs: run the module's plain float32 ``nn.Conv`` layers through the kernels' convolution forms
                (``badnet_jax.models.flax_convs``: on a CPU, an RGB first layer or a narrow one 1.3-4x faster);
                False: XLA's convolution, as the module wrote it.

        Raises:
            ConfigError: the module has no ``features`` or ``hidden`` method, its features are not a 4-D
                feature map, its hidden layer does not fit the output layer, the params hold no Dense
                ``output`` layer, the variables hold NaN or infinite values or lack a collection the module reads
                (naming it, e.g. ``batch_stats``), the module writes a collection (a batch norm in training
                mode), a method computes in a narrower dtype than float64 when given float64 or mixes the images
                of a batch (``badnet_jax.models.flax_checks``), or the head split is not one (see
                ``flax_split.check_split``).
        """
        input_divisor(input_scale)  # refuses an unknown scale now, not at the first sweep
        if isinstance(module, type):
            raise ConfigError(f"{arg('module')}: got the class {module.__name__}, not a module: give an instance, "
                              f"FlaxCNN.build({module.__name__}(), ...)", field="module")
        for method in ("features", "hidden"):
            if not callable(getattr(module, method, None)):
                raise ConfigError(f"{arg('module')}: {type(module).__name__} has no {method}() method; see "
                                  "badnet_jax.models.flax_model", field="module")
        collections = collections_of(variables, output)
        params = variables[PARAMS] if collections else variables
        if not isinstance(params, Mapping) or output not in params or "kernel" not in params[output]:
            held = ', '.join(params) if isinstance(params, Mapping) else type(params).__name__
            raise ConfigError(f"{arg('output', output)}: no Dense layer of that name in the params (they hold "
                              f"{held})", field="output")
        kernel = np.shape(params[output]["kernel"])
        model = cls(module, tuple(input_hwc), int(kernel[1]), input_scale, layer, (0, 0, 0), output, int(kernel[0]),
                    collections=collections, variable_shapes=shapes(variables), fast_convs=bool(fast_convs))
        model.check_finite(variables, "variables")
        x = jax.ShapeDtypeStruct((1, *input_hwc), jnp.float32)
        feats = model._abstract("features", variables, x)
        if len(feats.shape) != 4 or 0 in feats.shape[1:]:
            raise ConfigError(f"{arg('layer', layer)}: {type(module).__name__}.features gives shape {feats.shape}, not "
                              "a feature map (N, height, width, channels) of at least one value per image (is "
                              "input_hwc the size the module takes?)", field="layer")
        hidden = model._abstract("hidden", variables, feats)
        if tuple(hidden.shape) != (1, model.hidden_width):
            raise ConfigError(f"{arg('module')}: {type(module).__name__}.hidden gives shape {tuple(hidden.shape)} for "
                              f"one image, but the output layer {output!r} takes (N, {model.hidden_width})",
                              field="module")
        model = dataclasses.replace(model, feature_hwc=tuple(feats.shape[1:]),
                                    trunk_sizes=model._largest_per_image(variables))
        apply = lambda v, x, method: module.apply(model._variables(v), x, method=method)  # noqa: E731
        check_module(apply, variables, type(module).__name__, model.input_hwc, model.feature_hwc, model.divisor)
        if head_split is not None:
            pre, post = split_names(head_split)
            for method in (pre, post):
                if method and not callable(getattr(module, method, None)):
                    raise ConfigError(f"{arg('head_split', head_split)}: {type(module).__name__} has no {method}() "
                                      "method", field="head_split")
            split = check_split(apply, variables, type(module).__name__, model.feature_hwc, model.hidden_width,
                                pre, post)
            model = dataclasses.replace(model, head_split=split)
        return model

    def _abstract(self, method: str, variables: Params, x: Any) -> jax.ShapeDtypeStruct:
        """The shape of ``method`` on ``x``, Flax's refusals as ConfigErrors (``flax_variables.shape_of``)."""
        return shape_of(lambda v, x: self.module.apply(self._variables(v), x, method=method), variables, x,
                        f"{self.name}.{method}", self.collections, self.input_hwc)

    def _largest_per_image(self, variables: Params) -> tuple[int, ...]:
        """The values per image of the two largest tensors of ``features``: its program traced for three images,
        each value that depends on the images divided by three (what the weights alone compute, a transposed
        kernel, is left out; a value inside a loop or a call that reads the images counts whole). Three, not
        one: JAX skips broadcasts for a single image, and a batch padded to a multiple counts in full."""
        n = 3
        x = jax.ShapeDtypeStruct((n, *self.input_hwc), jnp.float32)
        fn = lambda v, x: self.module.apply(self._variables(v), x, method="features")  # noqa: E731
        jaxpr = jax.make_jaxpr(fn)(variables, x).jaxpr
        reads_images, sizes = {jaxpr.invars[-1]}, []

        def count(inner) -> None:  # every value of a loop's or a call's body that reads the images
            for eqn in inner.eqns:
                sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars)
            for sub in subjaxprs(inner):
                count(sub)

        for eqn in jaxpr.eqns:
            if any(not isinstance(v, Literal) and v in reads_images for v in eqn.invars):
                reads_images.update(eqn.outvars)
                sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars)
                for sub in jaxprs_in_params(eqn.params):
                    count(sub)
        return tuple(sorted((-(-size // n) for size in sizes), reverse=True)[:2])

    def trunk_bytes_per_image(self) -> int:
        return working_bytes(self.trunk_sizes) if self.trunk_sizes else super().trunk_bytes_per_image()

    def call_bytes(self) -> int:
        # The split's linear map, and as much again while it is read (its basis, or its transposed copy).
        return 2 * map_bytes(self.head_split, self.feature_hwc) if self.head_split else 0

    def _variables(self, params: Params) -> dict[str, Any]:
        """The Flax variables of ``params`` for ``module.apply`` (``flax_variables.for_apply``)."""
        return for_apply(params, self.collections, self.name)

    def counted(self) -> "FlaxCNN":
        # The kernels' convolution forms are native calls XLA's cost analysis cannot see into; XLA's own compute
        # the same products.
        return dataclasses.replace(self, fast_convs=False)

    def _apply(self, params: Params, x: jax.Array, method: str) -> jax.Array:
        """The module's ``method`` on ``x``, its float32 convolutions through the kernels' forms unless
        ``fast_convs`` is off (``badnet_jax.models.flax_convs``)."""
        return flax_convs.apply(self.module, self._variables(params), x, method, self.fast_convs)

    def _params(self, params: Params) -> Params:
        """The ``params`` collection (the learned weights) of what the model takes."""
        return params[PARAMS] if self.collections else params

    @property
    def name(self) -> str:
        return type(self.module).__name__

    @property
    def preactivation_size(self) -> int:
        return self.head_split.size if self.head_split else int(np.prod(self.feature_hwc))

    @property
    def logits_affine(self) -> bool:
        return self.head_split is not None and not self.head_split.post

    @property
    def hidden_size(self) -> int:
        return self.hidden_width

    def with_input_scale(self, input_scale: str) -> "FlaxCNN":
        return dataclasses.replace(self, input_scale=input_scale)

    def check_params(self, params: Any, name: str = "params") -> int:
        """Refuse params that are not this model's: the collections it was built with (the variables dict of a
        model built from variables, the params alone otherwise), the output layer's kernel shape and every
        array's shape (``flax_variables.check_variables``).

        Raises:
            ConfigError: naming ``name``, the missing or unexpected collection, or the array and its shape.
        """
        check_variables(params, name, self.name, self.collections, self.output, (self.hidden_width, self.num_classes),
                        self.variable_shapes)
        return self.num_classes

    def init_params(self, seed: int = 0) -> Params:
        """Random params of the module (``module.init``): its variables with the collections the model was
        built with (batch norms' running statistics as Flax initialises them), or its params alone."""
        x = jnp.zeros((1, *self.input_hwc), jnp.float32)
        variables = self.module.init(jax.random.PRNGKey(seed), x)
        if not self.collections:
            return variables[PARAMS]
        return {c: variables.get(c, {}) for c in self.collections}

    def features(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> jax.Array:
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        return self._apply(params, x, "features")

    def hidden(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        if mask is not None:
            feats_NxHxWxC = feats_NxHxWxC * jnp.asarray(mask, feats_NxHxWxC.dtype)[None, None, None, :]
        return self._apply(params, feats_NxHxWxC, "hidden")

    def output_layer(self, params: Params) -> tuple[jax.Array, jax.Array]:
        p = self._params(params)[self.output]
        return p["kernel"], p["bias"] if "bias" in p else jnp.zeros((self.num_classes,), p["kernel"].dtype)

    # The affine split: the head split's pre-activations, or the masked features themselves.
    def _pre(self, params: Params, feats_NxHxWxC: jax.Array) -> jax.Array:
        return self._apply(params, feats_NxHxWxC, self.head_split.pre)

    def _dtype(self, params: Params) -> Any:
        """The weights' dtype (the output layer's kernel's): what the split's values are computed in."""
        return jnp.asarray(self._params(params)[self.output]["kernel"]).dtype

    def preactivation_bias(self, params: Params) -> jax.Array:
        dtype = self._dtype(params)
        if self.head_split:
            return self._pre(params, jnp.zeros((1, *self.feature_hwc), dtype))[0]
        return jnp.zeros(self.feature_hwc, dtype)

    def channel_contribution(self, params: Params, feats_NxHxWxC: jax.Array, c: jax.Array) -> jax.Array:
        return self.contributor(params)(feats_NxHxWxC, c)

    def contributor(self, params: Params) -> Callable[[jax.Array, jax.Array], jax.Array]:
        if self.head_split:  # the linear map read once per call, from its smaller side (flax_split.linear_map)
            matrix = linear_map(lambda f: self._pre(params, f), self.feature_hwc, self._dtype(params))
            return lambda feats, c: contribution(matrix, feats, c, self.head_split.pre_shape)

        def masked(feats_NxHxWxC: jax.Array, c: jax.Array) -> jax.Array:
            keep = jnp.arange(self.num_channels) == c
            return jnp.where(keep[None, None, None, :], feats_NxHxWxC, jnp.zeros((), feats_NxHxWxC.dtype))
        return masked

    def tail_hidden(self, params: Params, pre: jax.Array) -> jax.Array:
        shape = self.head_split.pre_shape if self.head_split else self.feature_hwc
        lead = pre.shape[:pre.ndim - len(shape)]
        flat = pre.reshape(-1, *shape)
        if self.head_split and not self.head_split.post:
            hidden = flat.reshape(flat.shape[0], -1)
        else:
            method = self.head_split.post if self.head_split else "hidden"
            hidden = self._apply(params, flat, method)
        return hidden.reshape(*lead, hidden.shape[-1])
