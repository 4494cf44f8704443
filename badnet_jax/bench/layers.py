"""Per layer: FLOPs per image from a model's layer stages, each stage timed alone on its real input, the table.

Each of the model's stages (``PrunableModel.layer_stages``: DeepID's conv_1..conv_3 with their pools and its
head layers, a graph model's weight ops) runs alone on its real input (``stage_inputs`` of the benchmark's
images), jitted, its output summed so that no large result is written; so do the trunk and the masked head as
wholes. Where the sweep shards its images over several devices (a CPU's cores as devices), each stage is timed
sharded the same way, each device summing its own images in the sweep's blocks. FLOPs (2 per multiply-add)
come from the model's layer shapes; where a model cannot count them (a Flax module's), from XLA's cost analysis
of one image, and are said to be.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from badnet_jax.bench.machine import timed
from badnet_jax.errors import ConfigError, arg
from badnet_jax.model import LAB_NUM_CLASSES
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep.chunks import map_chunks
from badnet_jax.sweep.run import data_mesh

log = logging.getLogger(__name__)

LAYER_IMAGES = 2048  # images each layer is timed on


def model_flops(model: PrunableModel) -> dict[str, Optional[int]]:
    """FLOPs per image by part, from the model's layer stages: ``trunk`` (input -> the pruned layer),
    ``channel_contributions`` (the head's part affine in the mask, once per image in the prefix sweep),
    ``tail_after_prefix_sums`` (the rest of the head: per image and evaluated mask) and ``masked_head`` (one
    whole masked head). None where a stage's count is unknown."""
    def total(*parts: str) -> Optional[int]:
        flops = [s.flops for s in model.layer_stages() if s.part in parts]
        return None if any(f is None for f in flops) else int(sum(flops))

    return {"trunk": total("trunk"), "channel_contributions": total("affine"), "tail_after_prefix_sums": total("tail"),
            "masked_head": total("affine", "tail")}


_DEEPID_FLOPS = model_flops(DeepID(LAB_NUM_CLASSES))
STEPS = DeepID().steps  # the lab DeepID's curve: k = 0..60
# The lab DeepID's FLOPs per image of the trunk (input -> pool_3) and of the fc_1 and conv_4 pre-activations.
TRUNK_FLOPS = _DEEPID_FLOPS["trunk"]
CONTRIB_FLOPS = _DEEPID_FLOPS["channel_contributions"]


def tail_flops(num_classes: int) -> int:
    """DeepID, per image and mask once fc_1/conv_4 come from prefix sums: fc_2 and the output layer."""
    return model_flops(DeepID(num_classes))["tail_after_prefix_sums"]


def head_flops(num_classes: int) -> int:
    """DeepID, one masked head per image: fc_1, conv_4, fc_2 and the output layer."""
    return model_flops(DeepID(num_classes))["masked_head"]


def _xla_flops_per_image(fn: Callable, params: Params, x: jax.Array) -> Optional[int]:
    """XLA's FLOP count of ``fn`` on one image (every op, not only multiply-adds); None if XLA does not say."""
    try:
        cost = jax.jit(fn).lower(params, x[:1]).compile().cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without cost analysis)
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return int(flops) if flops and flops > 0 else None


def layer_timings(model: PrunableModel, params: Params, x_NxHxWxC: np.ndarray, repeats: int = 3,
                  peak_gflops: Optional[float] = None, trunk_block: Optional[int] = None,
                  head_block: Optional[int] = None, devices: int = 1) -> list[dict]:
    """Time each of the model's layer stages alone on its real input, then the trunk and the masked head whole.

    Each stage is jitted with its output summed (no large result is written), compiled, run once, then timed
    as the median of ``repeats`` runs. It runs in blocks of images as the sweep runs it: trunk stages
    ``trunk_block`` images at a time, the head's ``head_block`` (None: all images in one call), the input split
    into blocks up front (:func:`summed_in_blocks`), over ``devices`` devices as the sweep shards its images
    (:func:`summed_call`). Its input is what the network computes for these images
    (``model.stage_inputs``); the trunk reads the images (pixels 0..255), the masked head the features and a
    mask keeping every channel (given as an argument: the work of any mask).

    Args:
        model: any model; its stages say the layers and their FLOPs.
        params: the model's params.
        x_NxHxWxC: the images (pixels 0..255).
        repeats: timed runs per layer.
        peak_gflops: the machine's measured matmul peak, for each layer's share of it (None: not shown).
        trunk_block, head_block: the images per block of the trunk's stages and of the head's (None: all of a
            device's images at once).
        devices: the devices the images are sharded over (the sweep plan's ``devices``); the images are cut to
            a multiple of it, the weights replicated on each.

    Returns:
        One row per stage, then ``trunk`` and ``head``: name, part, images, devices, flops_per_image, flops_from
        (``layer shapes``, ``XLA cost analysis`` or None when unknown), compile_s, s, gflops, peak_share.

    Raises:
        ConfigError: fewer images than devices.
    """
    n = len(x_NxHxWxC) - len(x_NxHxWxC) % devices
    if n == 0:
        raise ConfigError(f"{arg('layer_images', len(x_NxHxWxC))}: fewer images than the {devices} devices they are "
                          f"sharded over; give at least {devices} (or fewer {arg('devices')})", field="layer_images")
    if n < len(x_NxHxWxC):
        log.info("Layers timed on %d images, a multiple of the %d devices (%d given).", n, devices, len(x_NxHxWxC))
    x = jnp.asarray(x_NxHxWxC[:n]).astype(jnp.float32)
    mesh = data_mesh(devices) if devices > 1 else None
    if mesh is not None:  # on every device once, as the sweep's call takes them: not copied at each timed call
        params = jax.device_put(params, NamedSharding(mesh, P()))
    feats = jax.block_until_ready(model.features(params, x))
    mask = jnp.ones((model.num_channels,), jnp.float32)
    totals = model_flops(model)
    counted = model.counted()  # what XLA's cost analysis counts where the model knows no FLOPs
    # (name, part, fn, its input, FLOPs per image, the same fn as XLA counts it)
    runs = [("trunk", "trunk", lambda p, v: model.features(p, v), x, totals["trunk"],
             lambda p, v: counted.features(p, v)),
            ("head", "head", lambda p, f, m=mask: model.head(p, f, m), feats, totals["masked_head"],
             lambda p, f, m=mask: counted.head(p, f, m))]
    if type(model).layer_stages is not PrunableModel.layer_stages:  # the default's stages are these two
        inputs = jax.block_until_ready(model.stage_inputs(params, x))
        runs = [(s.name, s.part, s.fn, inputs[s.name], s.flops, c.fn)
                for s, c in zip(model.layer_stages(), counted.layer_stages())] + runs
    rows = []
    for name, part, fn, v, flops, count_fn in runs:
        summed = summed_call(fn, trunk_block if part == "trunk" else head_block, mesh)
        if mesh is not None:
            v = jax.device_put(v, NamedSharding(mesh, P("data")))
        t = time.perf_counter()
        compiled = summed.lower(params, v).compile()
        compile_s = time.perf_counter() - t
        jax.block_until_ready(compiled(params, v))
        seconds = timed(lambda: compiled(params, v), repeats)
        source = "layer shapes" if flops is not None else None
        if flops is None:
            flops = _xla_flops_per_image(count_fn, params, v)
            source = "XLA cost analysis" if flops is not None else None
        gflops = None if flops is None else len(v) * flops / seconds / 1e9
        rows.append({"name": name, "part": part, "images": int(len(v)), "devices": devices, "flops_per_image": flops,
                     "flops_from": source, "compile_s": compile_s, "s": seconds, "gflops": gflops,
                     "peak_share": None if gflops is None or not peak_gflops else gflops / peak_gflops})
        log.info("%-24s %8.4f s  %s", f"layer {name}", seconds,
                 "GFLOP/s unknown" if gflops is None else f"{gflops:7.1f} GFLOP/s")
    return rows


def summed_call(fn: Callable[[Params, jax.Array], jax.Array], block: Optional[int],
                mesh: Optional[jax.sharding.Mesh] = None) -> Callable[[Params, jax.Array], jax.Array]:
    """``fn(params, x)`` summed over ``block``-image blocks of ``x`` (None: one block), jitted: on one device, or
    with ``x``'s images sharded over ``mesh``'s ``data`` axis, each device summing its own (the params
    replicated), as the sweep runs its chunks."""
    local = lambda p, a: summed_in_blocks(lambda c: fn(p, c), a, block or a.shape[0])  # noqa: E731
    if mesh is None:
        return jax.jit(local)
    return jax.jit(jax.shard_map(lambda p, a: jax.lax.psum(local(p, a), "data"), mesh=mesh,
                                 in_specs=(P(), P("data")), out_specs=P(), check_vma=False))


def summed_in_blocks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, block: int) -> jax.Array:
    """The sum of ``fn`` over ``block``-image blocks of ``x`` (traceable; a timing's work, not a result: blocks
    that do not tile ``x`` are the sweep's chunks, the last one overlapping the one before).

    When the blocks tile ``x`` it is split into them up front (``lax.map`` over a reshape): a block cut out of a
    large input inside the loop (``map_chunks``) is a copy that a layer inside the trunk never makes, and it
    cost a third of conv_2's time alone (81 against 61 ms for 2048 images on a 2-core Xeon). The sweep's own
    chunking reads the images, a few KB each, where the copy is negligible (the trunk 465-486 ms either way).
    """
    n = x.shape[0]
    # A stage may return several arrays (the output layer's argmax, gap and scale): all of them are summed.
    total = lambda c: sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(fn(c)))
    if n % block:
        return jnp.sum(map_chunks(lambda c: total(c).reshape(1), x, block, rows_axis=0))
    return jnp.sum(jax.lax.map(total, x.reshape(n // block, block, *x.shape[1:])))


def format_layers(result: dict) -> str:
    """The per-layer table of a :func:`run_benchmark` result, with the machine it ran on in its header."""
    peak = result.get("matmul_peak_gflops")
    lines = [f"machine: {result['machine']} (jax {result['jax']}, {result['backend']}); model {result['model']}; "
             f"matmul peak {peak:.1f} GFLOP/s" if peak else f"machine: {result['machine']}",
             *([f"NOISY: {result['noisy']}"] if result.get("noisy") else []),
             f"per layer, {result['layer_images']} images{_devices(result)} in blocks of {_blocks(result)}, "
             f"median of {result['repeats']} after compile:",
             f"{'layer':16s} {'part':7s} {'MFLOP/img':>10s} {'ms':>10s} {'GFLOP/s':>9s} {'of peak':>8s}"]
    for row in result["layers"]:
        f = row["flops_per_image"]
        mflop = "?" if f is None else f"{f / 1e6:.3f}" + ("*" if row["flops_from"] == "XLA cost analysis" else "")
        rate = "?" if row["gflops"] is None else f"{row['gflops']:.1f}"
        share = "?" if row["peak_share"] is None else f"{100 * row['peak_share']:.1f}%"
        lines.append(f"{row['name']:16s} {row['part']:7s} {mflop:>10s} {1e3 * row['s']:10.3f} {rate:>9s} {share:>8s}")
    if any(r["flops_from"] == "XLA cost analysis" for r in result["layers"]):
        lines.append("* FLOPs from XLA's cost analysis (every op), not from the layer shapes")
    return "\n".join(lines)


def _blocks(result: dict) -> str:
    blocks = result.get("layer_blocks") or {}
    return f"{blocks.get('trunk', '?')} (trunk) and {blocks.get('head', '?')} (head)"


def _devices(result: dict) -> str:
    devices = (result.get("layer_blocks") or {}).get("devices", 1)
    each = result["layer_images"] // devices
    return f" sharded over {devices} devices as the sweep ({each} on each)" if devices > 1 else ""


def layer_images(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` images: the first ``n`` of ``x``, repeated when it has fewer."""
    return x[:n] if len(x) >= n else np.concatenate([x] * -(-n // len(x)))[:n]
