"""Any CNN of standard layers as a :class:`~badnet_jax.models.protocol.PrunableModel`: :class:`GraphCNN`.

The model runs its :class:`~badnet_jax.models.ir.Graph` node by node (``badnet_jax.models.ops``), in the
input's float dtype (so the same code is its float64 network). Choosing the pruned layer splits the graph
into the trunk, the region (affine in the masked features), its frontier (the pre-activations) and the tail
(``badnet_jax.models.graph_split``).

A channel's contribution runs the region's linear part on that channel alone
(``badnet_jax.models.graph_contribution``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.graph_contribution import PER_CHANNEL_OPS, channel_contribution
from badnet_jax.models.graph_split import (ParamShapes, Split, candidates, check_layer, check_output_layer,
                                           default_layer, infer_shapes, refuse_steps, split_graph)
from badnet_jax.models.ir import Graph, Node
from badnet_jax.models.ops import apply_conv_stage, apply_op, conv_stage
from badnet_jax.pixels import scaled
from badnet_jax.models.protocol import Params, Producer, PrunableModel, Stage, working_bytes
from badnet_jax.numerics.ties import TIE_RTOL


def _freeze_shapes(params: Mapping[str, Mapping[str, Any]]) -> ParamShapes:
    return tuple(sorted((layer, tuple(sorted((k, tuple(np.shape(v))) for k, v in p.items())))
                        for layer, p in params.items()))


@dataclasses.dataclass(frozen=True)
class GraphCNN(PrunableModel):
    """A CNN given as a :class:`~badnet_jax.models.ir.Graph`, pruned at ``layer``. Build it with :meth:`build`.

    Attributes:
        graph: the layer graph.
        layer: the pruned layer (a node with a 4-D output that every path to the logits passes through).
        input_scale: ``raw`` (pixels 0..255 go in) or ``255`` (pixels / 255).
        param_shapes: the params' shapes, frozen (the model's architecture, as the checks and init use it).
        shapes: every node's output shape without the batch axis, frozen.
        num_classes, input_hwc, feature_hwc: derived from the above.
        tie_rtol, tie_rtol_measured: the float32 near-tie bound (``badnet_jax.numerics.ties``), and whether it
            was measured on this model (``badnet_jax.numerics.tie_bound``; until then DeepID's TIE_RTOL).
    """

    graph: Graph
    layer: str
    input_scale: str
    param_shapes: ParamShapes
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    num_classes: int
    input_hwc: tuple[int, int, int]
    feature_hwc: tuple[int, int, int]
    tie_rtol: float = TIE_RTOL
    tie_rtol_measured: bool = False  # set by badnet_jax.numerics.tie_bound before a sweep

    # ----- construction
    @classmethod
    def build(cls, graph: Graph, params: Params, layer: Optional[str] = None, input_scale: str = "255",
              tie_rtol: float = TIE_RTOL) -> "GraphCNN":
        """The model of ``graph`` with these params' shapes, pruned at ``layer`` (None: :meth:`default_layer`).

        Raises:
            ConfigError: naming ``layer``: not a layer of the graph, not a 4-D feature map, or bypassed by
                another path to the logits; an output layer that is not Dense; a ReLU with a threshold above 0.
            ModelFileError: params that do not fit the graph (a weight missing or of the wrong shape).
        """
        frozen = _freeze_shapes(params)
        shapes = infer_shapes(graph, frozen)
        check_output_layer(graph, shapes, frozen)
        refuse_steps(graph)
        layer = default_layer(graph, shapes) if layer is None else layer
        check_layer(graph, shapes, layer)
        out = shapes[graph.logits_node()]
        return cls(graph, layer, input_scale, frozen, tuple(sorted(shapes.items())), int(out[0]),
                   tuple(graph.input_hwc), tuple(shapes[layer]), tie_rtol)

    @functools.cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    @functools.cached_property
    def split(self) -> Split:
        """The graph cut at the pruned layer."""
        return split_graph(self.graph, self.layer)

    # ----- properties
    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def preactivation_size(self) -> int:
        return int(sum(np.prod(self._shapes[n]) for n in self.split.frontier))

    @property
    def hidden_size(self) -> int:
        return int(np.prod(self._shapes[self.split.hidden]))  # (H,), or (1, 1, H) before a 1 x 1 convolution

    @property
    def logits_affine(self) -> bool:
        return not self.split.tail  # the frontier is the output layer's input itself

    def with_input_scale(self, input_scale: str) -> "GraphCNN":
        return dataclasses.replace(self, input_scale=input_scale)

    def with_layer(self, layer: str) -> "GraphCNN":
        """The same model pruned at another layer (checked as :meth:`build` checks it)."""
        check_layer(self.graph, self._shapes, layer)
        return dataclasses.replace(self, layer=layer, feature_hwc=tuple(self._shapes[layer]), tie_rtol=TIE_RTOL,
                                   tie_rtol_measured=False)

    def layers(self) -> list[str]:
        """The layers that can be pruned (4-D outputs on every path to the logits), in graph order."""
        return candidates(self.graph, self._shapes)

    def check_params(self, params: Any, name: str = "params") -> int:
        if not isinstance(params, Mapping):
            raise ConfigError(f"{arg(name)}: expected the params of {self.name} (a dict of layers), got "
                              f"{type(params).__name__}", field=name)
        for layer, wanted in self.param_shapes:
            got = params.get(layer)
            if not isinstance(got, Mapping) or set(got) != {k for k, _ in wanted}:
                have = sorted(got) if isinstance(got, Mapping) else "nothing"
                raise ConfigError(f"{arg(name)}: layer {layer!r} holds {have}, expected {[k for k, _ in wanted]} "
                                  f"(the params of {self.name})", field=name)
            for key, shape in wanted:
                if tuple(np.shape(got[key])) != shape:
                    raise ConfigError(f"{arg(name)}: layer {layer!r} {key} of shape {tuple(np.shape(got[key]))}, "
                                      f"expected {shape} (the params of {self.name})", field=name)
        return self.num_classes

    def init_params(self, seed: int = 0) -> Params:
        """Random params (kernels He-normal, biases 0, batch norms the identity) of this architecture."""
        rng = np.random.default_rng(seed)
        out: Params = {}
        for layer, entries in self.param_shapes:
            p = {}
            for key, shape in entries:
                if key == "kernel":
                    fan_in = int(np.prod(shape[:-1])) if len(shape) == 2 else int(np.prod(shape[:3]))
                    p[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
                elif key in ("gamma", "moving_variance"):
                    p[key] = np.ones(shape, np.float32)
                else:
                    p[key] = np.zeros(shape, np.float32)
            out[layer] = p
        return out

    def multiply_adds(self) -> dict[str, int]:
        out = {}
        for node in self.graph.nodes:
            if node.op in ("conv", "depthwise_conv", "dense"):
                kernel = int(np.prod(dict(dict(self.param_shapes)[node.weights])["kernel"]))
                positions = int(np.prod(self._shapes[node.name][:-1])) if node.op != "dense" else 1
                out[node.weights] = kernel * positions
        return out

    def _weight_nodes(self) -> list[tuple[str, Node]]:
        """The part of every weight op (conv, depthwise_conv, dense) the logits need, in graph order."""
        split = self.split
        parts = {**{n: "trunk" for n in split.trunk}, **{n: "affine" for n in split.region},
                 **{n: "tail" for n in split.tail}, split.output: "tail"}
        return [(parts[node.name], node) for node in self.graph.nodes
                if node.op in WEIGHT_OPS and node.name in parts]

    def layer_stages(self) -> tuple[Stage, ...]:
        """Each weight op (conv, depthwise_conv, dense) of the trunk and the head alone, named by its Keras layer,
        on its own input (its bias included, the activation after it not); FLOPs from its kernel and output
        shapes. Other ops (batch norm, activations, pooling, add) are in no stage."""
        stages = []
        for part, node in self._weight_nodes():
            kernel = int(np.prod(dict(dict(self.param_shapes)[node.weights])["kernel"]))
            positions = int(np.prod(self._shapes[node.name][:-1])) if node.op != "dense" else 1
            fn = functools.partial(_apply_one, node)
            stages.append(Stage(node.weights or node.name, part, 2 * kernel * positions, fn))
        return tuple(stages)

    def stage_inputs(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> dict[str, jax.Array]:
        """One run of the graph (the trunk, then the unmasked head) keeping every node's value; each weight op's
        input."""
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        trunk, split = self.split.trunk, self.split
        env = self._run(params, {trunk[0]: x}, trunk[1:])
        head = {*split.region, *split.tail, split.output}
        self._run(params, env, [n.name for n in self.graph.nodes if n.name in head])
        return {node.weights or node.name: env[node.inputs[0]] for _, node in self._weight_nodes()}

    def trunk_bytes_per_image(self) -> int:
        return working_bytes(int(np.prod(self._shapes[n])) for n in self.split.trunk)

    # ----- running the graph
    @functools.cached_property
    def _stages(self) -> dict[str, tuple[str, str]]:
        """The trunk's conv -> relu -> max pool chains (``ops.conv_stage``) whose conv and relu values nothing
        else reads: conv name -> (relu name, pool name). The pruned layer may be the pool, not the others."""
        by_name, consumers, out = self.graph.by_name, self.graph.consumers(), {}
        trunk = set(self.split.trunk)
        for name in self.split.trunk:
            if len(consumers[name]) != 1 or name == self.layer:
                continue
            relu = consumers[name][0]
            if len(consumers[relu]) != 1 or relu == self.layer or relu not in trunk:
                continue
            pool = consumers[relu][0]
            if pool in trunk and conv_stage(by_name[name], by_name[relu], by_name[pool]):
                out[name] = (relu, pool)
        return out

    def _run(self, params: Params, env: dict[str, jax.Array], names, linear: bool = False,
             fuse: bool = False, keep: frozenset = frozenset()) -> dict[str, jax.Array]:
        """Each of ``names`` (in graph order) from ``env``. ``fuse``: each conv -> relu -> pool stage of the trunk
        whose conv and relu values are not in ``keep`` runs as one call, and only the pool's value is kept."""
        by_name, done = self.graph.by_name, set()
        stages = self._stages if fuse and not linear else {}
        for name in names:
            if name in done:
                continue
            node = by_name[name]
            stage = stages.get(name)
            if stage is not None and not keep & {name, stage[0]} and stage[1] in names:
                env[stage[1]] = apply_conv_stage(node, by_name[stage[1]], params, env[node.inputs[0]])
                done.update(stage)
                continue
            env[name] = apply_op(node, params, [env[src] for src in node.inputs], linear)
        return env

    def features(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> jax.Array:
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        trunk = self.split.trunk
        return self._run(params, {trunk[0]: x}, trunk[1:], fuse=True)[self.layer]

    def features_with_margins(self, params: Params, x_NxHxWxC: jax.Array,
                              divisor: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The features, each image's largest pre-activation of the relu that makes them, per channel (N, C), at
        the positions the features keep, and each image's largest |pre-activation| per channel (N, C).

        Without such a relu (features that may be negative) every margin is +inf: no channel is undecided.
        """
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        trunk = self.split.trunk
        chain = self._relu_chain()
        if chain is None:
            return super().features_with_margins(params, x_NxHxWxC, divisor)
        relu, after = chain
        relu_input = self.graph.by_name[relu].inputs[0]
        # The stages before the features' relu run fused; that relu's input is read here.
        env = self._run(params, {trunk[0]: x}, trunk[1:], fuse=True, keep=frozenset({relu, relu_input}))
        feats = env[self.layer]
        pre = env[relu_input]
        scale = jnp.max(jnp.abs(pre), axis=(1, 2))
        by_name = self.graph.by_name
        # Max pooling and cropping keep the positions the features keep (padding adds none; up-sampling repeats
        # them, which leaves each channel's maximum as it is).
        for name in after:
            if by_name[name].op in ("max_pool", "crop"):
                pre = apply_op(by_name[name], params, [pre])
        return feats, jnp.max(pre, axis=(1, 2)), scale

    def _relu_chain(self) -> Optional[tuple[str, list[str]]]:
        """The plain relu that makes the features dead where its input is <= 0, and the nodes from it to the
        layer (max pooling, identities, zero padding, cropping, up-sampling); None if there is none."""
        by_name, name, after = self.graph.by_name, self.layer, []
        while by_name[name].op in _POSITIONAL:
            after.insert(0, name)
            name = by_name[name].inputs[0]
        node = by_name[name]
        if node.op == "relu" and node.attr("negative_slope") == 0.0 and node.attr("threshold") == 0.0:
            return name, after
        return None

    def undecided_channels(self, params: Params, margin_C: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Channels whose largest pre-activation lies within ``tie_rtol`` times their largest |pre-activation| of 0.

        The measured stand-in for DeepID's derived bound (the pre-activation's own magnitude for the sum of
        its terms' magnitudes): float32 can call such a channel dead where float64 would not, or alive.
        """
        margin, scale = np.asarray(margin_C, np.float64), np.asarray(scale, np.float64)
        return np.isfinite(margin) & (np.abs(margin) < self.tie_rtol * np.maximum(scale, 0.0)) & (scale > 0)

    def producer(self, params: Params) -> Optional[Producer]:
        by_name, name, factor, norms = self.graph.by_name, self.layer, None, []
        while True:
            node = by_name[name]
            if node.op in (*_POSITIONAL, "relu"):
                name = node.inputs[0]
            elif node.op == "batch_norm":
                p = params[node.weights]
                f = np.abs(np.asarray(p.get("gamma", 1.0), np.float64)) / np.sqrt(
                    np.asarray(p["moving_variance"], np.float64) + node.attr("epsilon"))
                factor = f if factor is None else factor * f
                norms.append(node.name)
                name = node.inputs[0]
            elif node.op == "conv":
                kernel = np.asarray(params[node.weights]["kernel"], np.float64)
                return Producer(kernel if factor is None else kernel * factor, node.name, tuple(reversed(norms)))
            else:
                return None

    # ----- the head
    def hidden(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        if mask is not None:
            feats_NxHxWxC = feats_NxHxWxC * jnp.asarray(mask, feats_NxHxWxC.dtype)[None, None, None, :]
        split = self.split
        head = {*split.region, *split.tail}
        order = [n.name for n in self.graph.nodes if n.name in head]
        hidden = self._run(params, {self.layer: feats_NxHxWxC}, order)[split.hidden]
        return hidden.reshape(hidden.shape[0], self.hidden_size)

    def output_layer(self, params: Params) -> tuple[jax.Array, jax.Array]:
        p = params[self.graph.by_name[self.split.output].weights]
        w = jnp.asarray(p["kernel"])
        w = w.reshape(-1, w.shape[-1])  # a 1 x 1 convolution's (1, 1, H, K) kernel is a Dense one's (H, K)
        return w, p["bias"] if "bias" in p else jnp.zeros((w.shape[1],), w.dtype)

    # ----- the affine split
    def preactivation_bias(self, params: Params) -> tuple[jax.Array, ...]:
        dtype = jnp.asarray(params[self.graph.by_name[self.split.output].weights]["kernel"]).dtype
        zeros = jnp.zeros((1, *self.feature_hwc), dtype)
        env = self._run(params, {self.layer: zeros}, self.split.region)
        return tuple(env[n][0] for n in self.split.frontier)

    def channel_contribution(self, params: Params, feats_NxHxWxC: jax.Array, c: jax.Array) -> tuple[jax.Array, ...]:
        return channel_contribution(self.graph, self.split, self.layer, self.num_channels, params, feats_NxHxWxC, c)

    def channelwise_preactivations(self, params: Params, feats_NxHxWxC: jax.Array) -> Optional[tuple[jax.Array, ...]]:
        split = self.split
        if not all(len(self.graph.by_name[n].inputs) == 1 and (n in split.masked or
                   self.graph.by_name[n].op in PER_CHANNEL_OPS) for n in split.region):
            return None
        # Per-channel ops only: the linear part on all channels at once holds each channel's contribution in
        # its own slot (a batch norm's shift is the preactivation bias's).
        env = self._run(params, {self.layer: feats_NxHxWxC}, split.region, linear=True)
        return tuple(env[n] for n in split.frontier)

    def tail_hidden(self, params: Params, pre: tuple[jax.Array, ...]) -> jax.Array:
        split = self.split
        first = pre[0]
        lead = first.shape[:first.ndim - len(self._shapes[split.frontier[0]])]
        env = {n: v.reshape(-1, *self._shapes[n]) for n, v in zip(split.frontier, pre)}
        hidden = self._run(params, env, split.tail)[split.hidden]
        return hidden.reshape(*lead, self.hidden_size)


WEIGHT_OPS = ("conv", "depthwise_conv", "dense")
# Ops that act on each channel alone and keep a relu's zeros zero: the features they give are dead where the relu is.
_POSITIONAL = ("max_pool", "identity", "zero_pad", "crop", "upsample")


def _apply_one(node: Node, params: Params, x: jax.Array) -> jax.Array:
    return apply_op(node, params, [x])
