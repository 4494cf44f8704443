"""A channel's contribution to a :class:`~badnet_jax.models.graph.GraphCNN`'s pre-activations, one channel at a time.

The region after the pruned layer (``badnet_jax.models.graph_split``) is affine in the masked features, so its
frontier's values are a constant plus one contribution per kept channel. Channel c's contribution runs the
region's linear part (``badnet_jax.models.ops`` with ``linear=True``: no biases or shifts) on that channel
alone: the masked nodes and the ops that act on each channel alone (:data:`PER_CHANNEL_OPS`) on its slice (a
batch norm with channel c's scale), the first convolution or dense layer on that channel's slice of its kernel
(one channel's share of the work, as the lab's DeepID does it; a flatten read by one dense layer alone goes
with that layer, on the kernel's rows of channel c), anything after on the full tensors, zero outside channel c.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from badnet_jax.models.graph_split import Split
from badnet_jax.models.ir import Graph
from badnet_jax.models.ops import HIGHEST, apply_op
from badnet_jax.models.protocol import Params

# Affine ops that act on each channel alone (channel c of the output reads channel c of the input only).
PER_CHANNEL_OPS = ("batch_norm", "normalize", "avg_pool", "global_avg_pool", "rescale", "identity", "zero_pad",
                   "crop", "upsample")


def channel_contribution(graph: Graph, split: Split, layer: str, channels: int, params: Params,
                         feats_NxHxWxC: jax.Array, c: jax.Array) -> tuple[jax.Array, ...]:
    """Channel ``c``'s (maybe traced) contribution to the frontier's values of ``graph`` cut at ``layer``, whose
    ``channels`` channels ``feats_NxHxWxC`` holds: a tuple of (N, ...) arrays in ``split.frontier`` order."""
    by_name = graph.by_name
    one = jax.lax.dynamic_slice_in_dim(feats_NxHxWxC, c, 1, axis=3)  # (N, H, W, 1): channel c alone
    single = {layer: one}  # masked values kept as channel c's slice
    full: dict[str, jax.Array] = {}

    def value(name):  # a full tensor: a single-channel value placed at channel c, zeros elsewhere
        if name in full:
            return full[name]
        v = single[name]
        z = jnp.zeros((*v.shape[:-1], channels), v.dtype)
        return jax.lax.dynamic_update_slice_in_dim(z, v, c, axis=v.ndim - 1)

    for name in split.region:
        node = by_name[name]
        srcs = node.inputs
        if all(s in single for s in srcs) and (name in split.masked or node.op in PER_CHANNEL_OPS):
            # per channel: channel c's slice of the op (batch norm: channel c's scale)
            if node.op in ("batch_norm", "normalize"):
                p = {k: jax.lax.dynamic_slice_in_dim(jnp.asarray(v), c, 1) for k, v in params[node.weights].items()}
                single[name] = apply_op(node, {node.weights: p}, [single[s] for s in srcs], linear=True)
            else:
                single[name] = apply_op(node, params, [single[s] for s in srcs], linear=True)
        elif node.op == "conv" and srcs[0] in single:
            k = jax.lax.dynamic_slice_in_dim(jnp.asarray(params[node.weights]["kernel"]), c, 1, axis=2)
            full[name] = apply_op(node, {node.weights: {"kernel": k}}, [single[srcs[0]]], linear=True)
        elif node.op == "dense" and srcs[0] in single and single[srcs[0]].ndim == 2:
            k = jax.lax.dynamic_slice_in_dim(jnp.asarray(params[node.weights]["kernel"]), c, 1, axis=0)
            full[name] = jnp.dot(single[srcs[0]], k.astype(single[srcs[0]].dtype), precision=HIGHEST)
        elif (node.op == "flatten" and srcs[0] in single and len(node.inputs) == 1
              and _flatten_then_dense(graph, name, split)):
            dense = by_name[graph.consumers()[name][0]]
            v = single[srcs[0]]  # (N, H, W, 1)
            n, h, w = v.shape[:3]
            rows = jnp.asarray(params[dense.weights]["kernel"]).reshape(h * w, channels, -1)
            k_c = jax.lax.dynamic_index_in_dim(rows, c, axis=1, keepdims=False)  # (H*W, units): Keras (h, w, c)
            full[dense.name] = jnp.dot(v.reshape(n, h * w), k_c.astype(v.dtype), precision=HIGHEST)
            full[name] = None  # consumed only by that dense layer, done above
        elif name in full:
            continue  # a dense layer computed with its flatten
        else:
            full[name] = apply_op(node, params, [value(s) for s in srcs], linear=True)
    return tuple(value(n) for n in split.frontier)


def _flatten_then_dense(graph: Graph, name: str, split: Split) -> bool:
    """Whether flatten node ``name`` is read by exactly one Dense layer of the region (and nothing else)."""
    readers = graph.consumers()[name]
    return (len(readers) == 1 and graph.by_name[readers[0]].op == "dense" and readers[0] in split.region
            and name not in split.frontier)
