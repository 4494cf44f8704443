"""Each allowed Keras layer as IR nodes, with every tensor's shape and each weight's expected shape.

:func:`build_graph` walks a parsed config (``badnet_jax.io.keras_config``) from its input and emits the
:mod:`ir <badnet_jax.models.ir>` nodes of each layer (a fused activation becomes a node of its own), checking
every config field it reads (integers, pairs, paddings, axes, activations) and computing each tensor's shape
from the input's, so a weight of another shape is refused when ``badnet_jax.io.keras_graph`` reads it, and a
declared tensor or model beyond the limits before any weight is read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from badnet_jax.errors import ModelFileError
from badnet_jax.io.keras_config import MAX_ELEMENTS, MAX_PARAMS, ConfigLayer, ConfigModel, short
from badnet_jax.io.keras_fields import ConfigFields
from badnet_jax.io.keras_keys import check_keys
from badnet_jax.models.ir import ELEMENTWISE, Graph, Node

COUNT = "count"
"""A Normalization's third weight, the number of samples its adapt() saw: read and checked, not kept (inference
does not use it; a written B' stores 0)."""

_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}  # Keras' other names of the same functions
ACTIVATIONS = ("linear", "relu", "relu6", "softmax", "leaky_relu", *ELEMENTWISE, *_ALIASES)
"""Activation names allowed in an ``Activation`` layer or fused into a Conv2D, DepthwiseConv2D, SeparableConv2D or
Dense."""

_LEAKY_RELU_ACTIVATION_SLOPE = 0.2  # keras.activations.leaky_relu's default (Keras 3 names it; Keras 2 does not)

Shape = tuple[int, ...]  # one image's tensor: (H, W, C) or (D,)


class _Build(ConfigFields):
    """Turns the parsed layers into ir nodes, computing every tensor's shape and each weight's expected shape."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        self.nodes: list[Node] = []
        self.shapes: dict[str, Shape] = {}

    def one_input(self, layer: ConfigLayer, rank: Optional[int] = None) -> Shape:
        if len(layer.inbound) != 1:
            raise self.fail(layer, f"reads {len(layer.inbound)} tensors, expected one")
        shape = self.shapes[layer.inbound[0]]
        if rank is not None and len(shape) != rank:
            kind = "an image tensor (height, width, channels)" if rank == 3 else "a flat tensor (features,)"
            raise self.fail(layer, f"is applied to a tensor of shape {shape}; it must be applied to {kind}"
                            + (" (put a Flatten or a global pooling before it)" if rank == 1 else ""))
        return shape

    # --- nodes ----------------------------------------------------------------------------------------------

    def emit(self, layer: ConfigLayer, name: str, op: str, inputs: tuple[str, ...], shape: Shape,
             weights: Optional[str] = None, **attrs: Any) -> None:
        size = math.prod(shape)
        if size > MAX_ELEMENTS or min(shape) < 1:
            raise self.fail(layer, f"outputs a tensor of shape {shape} per image (at least 1 and at most "
                            f"{MAX_ELEMENTS} elements)")
        try:
            self.nodes.append(Node.make(name, op, inputs, weights, **attrs))
        except ModelFileError as err:
            raise ModelFileError(f"{self.path}: {err}") from None
        self.shapes[name] = shape

    def activation(self, layer: ConfigLayer, pre_op: str, shape: Shape, weights: Optional[str] = None,
                   **attrs: Any) -> None:
        """A weighted op with its fused activation: the op as ``<layer>/pre`` and the activation as ``<layer>``."""
        act = self.activation_name(layer)
        if act == "linear":
            self.emit(layer, layer.name, pre_op, layer.inbound, shape, weights, **attrs)
            return
        pre = f"{layer.name}/pre"
        self.emit(layer, pre, pre_op, layer.inbound, shape, weights, **attrs)
        self.act_node(layer, act, pre, shape)

    def activation_name(self, layer: ConfigLayer) -> str:
        act = layer.cfg.get("activation", "linear")
        if act is None:
            act = "linear"
        if act not in ACTIVATIONS:
            raise self.fail(layer, f"has activation {short(act)}; badnet-jax reads only {list(ACTIVATIONS)}")
        return act

    def act_node(self, layer: ConfigLayer, act: str, src: str, shape: Shape) -> None:
        if act == "linear":
            self.emit(layer, layer.name, "identity", (src,), shape)
        elif act == "relu":
            self.emit(layer, layer.name, "relu", (src,), shape)
        elif act == "relu6":
            self.emit(layer, layer.name, "relu", (src,), shape, max_value=6.0)
        elif act == "leaky_relu":
            self.emit(layer, layer.name, "relu", (src,), shape, negative_slope=_LEAKY_RELU_ACTIVATION_SLOPE)
        elif act == "softmax":
            self.emit(layer, layer.name, "softmax", (src,), shape)
        else:
            self.emit(layer, layer.name, "activation", (src,), shape, fn=_ALIASES.get(act, act))

    # --- layers ---------------------------------------------------------------------------------------------

    def input(self, layer: ConfigLayer, batch_shape: Any) -> None:
        if not (isinstance(batch_shape, list) and len(batch_shape) == 4):
            raise ModelFileError(f"{self.path}: input {layer.name!r} has batch shape {short(batch_shape)}; badnet-jax "
                                 "reads image models, input (batch, height, width, channels)")
        hwc = batch_shape[1:]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hwc):
            raise ModelFileError(f"{self.path}: input {layer.name!r} has shape {short(hwc)}; height, width and "
                                 "channels must be known positive integers (no None)")
        self.float_dtype(layer)
        check_keys(self, layer)
        self.emit(layer, layer.name, "input", (), tuple(hwc))

    def layer(self, layer: ConfigLayer) -> None:
        self.float_dtype(layer)
        check_keys(self, layer)
        getattr(self, f"_{layer.cls}")(layer)

    def _InputLayer(self, layer: ConfigLayer) -> None:
        raise self.fail(layer, "is a second input; badnet-jax reads single-input models")

    def _Conv2D(self, layer: ConfigLayer) -> None:
        self.channels_last(layer)
        h, w, cin = self.one_input(layer, 3)
        filters = self.integer(layer, "filters")
        self.one_group(layer)
        kernel, strides, dilation, padding = self.window(layer)
        out = self.conv_out(layer, (h, w), kernel, strides, dilation, padding)
        layer.weights = [("kernel", (*kernel, cin, filters))] + self.bias(layer, filters)
        self.no_lora(layer)
        self.activation(layer, "conv", (*out, filters), layer.name, strides=strides, padding=padding,
                        dilation=dilation)

    def _DepthwiseConv2D(self, layer: ConfigLayer) -> None:
        self.channels_last(layer)
        h, w, cin = self.one_input(layer, 3)
        mult = self.integer(layer, "depth_multiplier", 1)
        self.one_group(layer)
        kernel, strides, dilation, padding = self.window(layer)
        out = self.conv_out(layer, (h, w), kernel, strides, dilation, padding)
        layer.weights = [("kernel", (*kernel, cin, mult))] + self.bias(layer, cin * mult)
        self.no_lora(layer)
        self.activation(layer, "depthwise_conv", (*out, cin * mult), layer.name, strides=strides, padding=padding,
                        dilation=dilation)

    def _SeparableConv2D(self, layer: ConfigLayer) -> None:
        self.channels_last(layer)
        h, w, cin = self.one_input(layer, 3)
        filters = self.integer(layer, "filters")
        mult = self.integer(layer, "depth_multiplier", 1)
        self.one_group(layer)
        kernel, strides, dilation, padding = self.window(layer)
        out = self.conv_out(layer, (h, w), kernel, strides, dilation, padding)
        # Keras' order: depthwise_kernel (read as "kernel"), pointwise_kernel, bias.
        layer.weights = [("kernel", (*kernel, cin, mult)), ("pointwise_kernel", (1, 1, cin * mult, filters))] \
            + self.bias(layer, filters)
        self.activation(layer, "separable_conv", (*out, filters), layer.name, strides=strides, padding=padding,
                        dilation=dilation)

    def _Dense(self, layer: ConfigLayer) -> None:
        (din,) = self.one_input(layer, 1)
        units = self.integer(layer, "units")
        layer.weights = [("kernel", (din, units))] + self.bias(layer, units)
        self.no_lora(layer)
        self.activation(layer, "dense", (units,), layer.name)

    def pool(self, layer: ConfigLayer, op: str) -> None:
        self.channels_last(layer)
        h, w, c = self.one_input(layer, 3)
        window = self.pair(layer, "pool_size", 2)
        strides = self.pair(layer, "strides", None) if layer.cfg.get("strides") is not None else window
        padding = self.padding(layer)
        out = self.conv_out(layer, (h, w), window, strides, (1, 1), padding)
        self.emit(layer, layer.name, op, layer.inbound, (*out, c), window=window, strides=strides, padding=padding)

    def _MaxPooling2D(self, layer: ConfigLayer) -> None:
        self.pool(layer, "max_pool")

    def _AveragePooling2D(self, layer: ConfigLayer) -> None:
        self.pool(layer, "avg_pool")

    def global_pool(self, layer: ConfigLayer, op: str) -> None:
        self.channels_last(layer)
        _, _, c = self.one_input(layer, 3)
        keepdims = layer.cfg.get("keepdims", False)
        if not isinstance(keepdims, bool):
            raise self.fail(layer, f"has keepdims {short(keepdims)}, expected true or false")
        self.emit(layer, layer.name, op, layer.inbound, (1, 1, c) if keepdims else (c,), keepdims=keepdims)

    def _GlobalAveragePooling2D(self, layer: ConfigLayer) -> None:
        self.global_pool(layer, "global_avg_pool")

    def _GlobalMaxPooling2D(self, layer: ConfigLayer) -> None:
        self.global_pool(layer, "global_max_pool")

    def _BatchNormalization(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        self.axis_is_last(layer, "axis", len(shape))
        if layer.cfg.get("renorm", False) is not False:
            raise self.fail(layer, "uses batch renormalization, which badnet-jax does not read")
        epsilon = self.number(layer, "epsilon", 1e-3, low=0.0)
        c = shape[-1]
        flags = {}
        for key in ("scale", "center"):
            flags[key] = layer.cfg.get(key, True)
            if not isinstance(flags[key], bool):
                raise self.fail(layer, f"has {key} {short(flags[key])}, expected true or false")
        # Keras' own order: gamma, beta, moving_mean, moving_variance (the first two only when used).
        layer.weights = ([("gamma", (c,))] if flags["scale"] else []) + ([("beta", (c,))] if flags["center"] else []) \
            + [("moving_mean", (c,)), ("moving_variance", (c,))]
        self.emit(layer, layer.name, "batch_norm", layer.inbound, shape, layer.name, epsilon=epsilon)

    def _Normalization(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        self.axis_is_last(layer, "axis", len(shape))
        if layer.cfg.get("invert", False) is not False:
            raise self.fail(layer, f"has invert {short(layer.cfg.get('invert'))}; badnet-jax reads only invert=false")
        for key in ("mean", "variance"):
            if layer.cfg.get(key) is not None:
                raise self.fail(layer, f"has its {key} in the config ({short(layer.cfg[key])}); badnet-jax reads a "
                                "Normalization whose statistics are weights (measured by adapt())")
        c = shape[-1]
        # Keras' order: mean, variance and the count of samples adapt() saw (read, not used at inference).
        layer.weights = [("moving_mean", (c,)), ("moving_variance", (c,)), (COUNT, ())]
        self.emit(layer, layer.name, "normalize", layer.inbound, shape, layer.name)

    def _Activation(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        self.act_node(layer, self.activation_name(layer), layer.inbound[0], shape)

    def _ReLU(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        max_value = layer.cfg.get("max_value")
        if max_value is not None:
            max_value = self.number(layer, "max_value", None, low=0.0)
        self.emit(layer, layer.name, "relu", layer.inbound, shape, max_value=max_value,
                  negative_slope=self.number(layer, "negative_slope", 0.0, low=0.0),
                  threshold=self.number(layer, "threshold", 0.0, low=0.0))

    def _LeakyReLU(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        if "negative_slope" in layer.cfg and "alpha" in layer.cfg:  # Keras 3 takes alpha over negative_slope
            raise self.fail(layer, f"has both negative_slope {short(layer.cfg['negative_slope'])} (Keras 3's name) "
                            f"and alpha {short(layer.cfg['alpha'])} (Keras 2's); Keras writes one of them: keep "
                            "the one meant")
        key = "negative_slope" if "negative_slope" in layer.cfg else "alpha"  # Keras 3 / Keras 2
        self.emit(layer, layer.name, "relu", layer.inbound, shape, negative_slope=self.number(layer, key, 0.3, low=0.0))

    def _Softmax(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        self.axis_is_last(layer, "axis", len(shape))
        self.emit(layer, layer.name, "softmax", layer.inbound, shape)

    def merge_inputs(self, layer: ConfigLayer) -> list[Shape]:
        if len(layer.inbound) < 2:
            raise self.fail(layer, f"merges {len(layer.inbound)} tensor(s), expected at least two")
        return [self.shapes[src] for src in layer.inbound]

    def same_shapes(self, layer: ConfigLayer, op: str, verb: str, count: Optional[int] = None) -> None:
        shapes = self.merge_inputs(layer)
        if count is not None and len(shapes) != count:
            raise self.fail(layer, f"{verb} {len(shapes)} tensors, expected {count}")
        if len(set(shapes)) != 1:
            raise self.fail(layer, f"{verb} tensors of shapes {shapes}; badnet-jax merges only equal shapes")
        self.emit(layer, layer.name, op, layer.inbound, shapes[0])

    def _Add(self, layer: ConfigLayer) -> None:
        self.same_shapes(layer, "add", "adds")

    def _Subtract(self, layer: ConfigLayer) -> None:
        self.same_shapes(layer, "subtract", "subtracts", count=2)

    def _Average(self, layer: ConfigLayer) -> None:
        self.same_shapes(layer, "average", "averages")

    def _Maximum(self, layer: ConfigLayer) -> None:
        self.same_shapes(layer, "maximum", "takes the maximum of")

    def _Minimum(self, layer: ConfigLayer) -> None:
        self.same_shapes(layer, "minimum", "takes the minimum of")

    def _Multiply(self, layer: ConfigLayer) -> None:
        shapes = self.merge_inputs(layer)
        out = tuple(max(axis) for axis in zip(*shapes))
        if len({len(s) for s in shapes}) != 1 or any(d not in (1, o) for s in shapes for d, o in zip(s, out)):
            raise self.fail(layer, f"multiplies tensors of shapes {shapes}; badnet-jax multiplies tensors of one "
                            "rank whose axes agree or are 1 (broadcast)")
        self.emit(layer, layer.name, "multiply", layer.inbound, out)

    def _Reshape(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        target = layer.cfg.get("target_shape")
        size = math.prod(shape)
        if not (isinstance(target, list) and 1 <= len(target) <= 3 and target.count(-1) <= 1
                and all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or 1 <= d <= MAX_ELEMENTS)
                        for d in target)):
            raise self.fail(layer, f"has target_shape {short(target)}; expected one to three positive integers "
                            "(one of them may be -1)")
        known = math.prod(d for d in target if d != -1)
        if -1 in target and size % known == 0:
            target = [size // known if d == -1 else d for d in target]
        if math.prod(target) != size:
            raise self.fail(layer, f"reshapes a tensor of shape {shape} ({size} values) to {short(target)}")
        self.emit(layer, layer.name, "reshape", layer.inbound, tuple(target), target=tuple(target))

    def _Concatenate(self, layer: ConfigLayer) -> None:
        shapes = self.merge_inputs(layer)
        if len({len(s) for s in shapes}) != 1 or len({s[:-1] for s in shapes}) != 1:
            raise self.fail(layer, f"concatenates tensors of shapes {shapes}; all but the last axis must agree")
        self.axis_is_last(layer, "axis", len(shapes[0]))
        self.emit(layer, layer.name, "concat", layer.inbound, (*shapes[0][:-1], sum(s[-1] for s in shapes)))

    def _Flatten(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        if "data_format" in layer.cfg:  # null too: Keras fills it from the loading machine's keras.json
            self.channels_last(layer)  # a channels_first Flatten reorders the features
        self.emit(layer, layer.name, "flatten", layer.inbound, (math.prod(shape),))

    def _Dropout(self, layer: ConfigLayer) -> None:
        # The rate matters only to training a written file further; a config without one still reads.
        rate = None if layer.cfg.get("rate") is None else self.number(layer, "rate", None, low=0.0)
        if rate is not None and rate >= 1:
            raise self.fail(layer, f"has rate {rate:g}, expected a number from 0 to below 1")
        self.emit(layer, layer.name, "identity", layer.inbound, self.one_input(layer), dropout=rate)

    def _ZeroPadding2D(self, layer: ConfigLayer) -> None:
        self.channels_last(layer)
        h, w, c = self.one_input(layer, 3)
        pad = self.edges(layer, "padding", 1)
        self.emit(layer, layer.name, "zero_pad", layer.inbound, (h + sum(pad[0]), w + sum(pad[1]), c), pad=pad)

    def _Cropping2D(self, layer: ConfigLayer) -> None:
        self.channels_last(layer)
        h, w, c = self.one_input(layer, 3)
        crop = self.edges(layer, "cropping", [[0, 0], [0, 0]])
        if h - sum(crop[0]) < 1 or w - sum(crop[1]) < 1:
            raise self.fail(layer, f"crops {crop} from a {h} x {w} image, which leaves nothing")
        self.emit(layer, layer.name, "crop", layer.inbound, (h - sum(crop[0]), w - sum(crop[1]), c), crop=crop)

    def _UpSampling2D(self, layer: ConfigLayer) -> None:
        self.channels_last(layer)
        h, w, c = self.one_input(layer, 3)
        size = self.pair(layer, "size", [2, 2])
        if layer.cfg.get("interpolation", "nearest") != "nearest":
            raise self.fail(layer, f"has interpolation {short(layer.cfg.get('interpolation'))}; badnet-jax reads "
                            "'nearest' (each pixel repeated)")
        self.emit(layer, layer.name, "upsample", layer.inbound, (h * size[0], w * size[1], c), size=size)

    def _Rescaling(self, layer: ConfigLayer) -> None:
        shape = self.one_input(layer)
        for key, article in (("scale", "a"), ("offset", "an")):
            if isinstance(layer.cfg.get(key), (list, dict)):  # Keras allows one per channel
                raise self.fail(layer, f"has {article} {key} per channel ({short(layer.cfg[key])}); badnet-jax "
                                       f"reads one number for every channel (fold a per-channel {key} into the "
                                       "next layer's weights, or into the data)")
        self.emit(layer, layer.name, "rescale", layer.inbound, shape, scale=self.number(layer, "scale", None),
                  offset=self.number(layer, "offset", 0.0))


def build_graph(model: ConfigModel, path: Path | str, stem: str) -> tuple[Graph, list[ConfigLayer]]:
    build = _Build(path)
    build.input(model.layers[0], model.input_shape)
    for layer in model.layers[1:]:
        build.layer(layer)
    name = model.name or stem
    try:
        graph = Graph(tuple(build.nodes), tuple(build.shapes[model.layers[0].name]), model.output, name)
    except ModelFileError as err:
        raise ModelFileError(f"{path}: {err}") from None
    weighted = [layer for layer in model.layers if layer.weights]
    total = declared_params(weighted)
    big = [(layer.name, key, shape) for layer in weighted for key, shape in layer.weights
           if math.prod(shape) > MAX_ELEMENTS]
    if big:
        raise ModelFileError(f"{path}: layer {big[0][0]!r} {big[0][1]} would have shape {big[0][2]}, more than "
                             f"{MAX_ELEMENTS} elements")
    if total > MAX_PARAMS:
        raise ModelFileError(f"{path}: the model declares {total} parameters, more than {MAX_PARAMS}")
    return graph, weighted


def declared_params(weighted: list[ConfigLayer]) -> int:
    """The parameters the weighted layers' config declares, all together (their weights' shapes)."""
    return sum(math.prod(shape) for layer in weighted for _, shape in layer.weights)
