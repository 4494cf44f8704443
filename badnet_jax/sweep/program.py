"""What the sweep's one jitted call computes: trunk, in-sweep rankings, every set's predictions at every step.

Pruning the first k channels of the order (k = 0..C) only changes the head's input mask, so every set goes through
the trunk (input -> the pruned layer) once and the head is evaluated at all C + 1 steps inside one jit-compiled
call, in chunks (``badnet_jax.sweep.chunks``) so memory stays bounded. The images come as blocks
(``badnet_jax.sweep.layout``): the ranking set (the first block) alone decides the data-driven orders; the sets
that rank nothing are joined into one block per dtype, so their trunk and head loops are compiled once. One body
runs on one device (``rank_and_sweep_call``) or, the image axis sharded over a 1-D ``data`` mesh, under
``shard_map`` (``rank_and_sweep_call_sharded``); ``progress_stages`` names its progress stages.
``badnet_jax.sweep.run`` checks the inputs, lays them out, calls it and settles what it returns.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep.anp import anp_order
from badnet_jax.sweep.chunks import map_chunks
from badnet_jax.sweep.layout import Block
from badnet_jax.sweep.plan import SweepPlan
from badnet_jax.sweep.progress import chunk_hook
from badnet_jax.sweep.rankings import RankingPlan
from badnet_jax.sweep.strategies import sweep_images, sweep_set

Images = np.ndarray | jax.ShapeDtypeStruct


def trunk_features(model: PrunableModel, params: Params, x_NxHxWxC: jax.Array, chunk: int,
                   divisor: Optional[jax.Array] = None, margins: bool = False, on_chunk=None):
    """The pruned layer's output for every image, ``chunk`` images at a time (traceable; call under jit).

    ``divisor``: None applies the model's own input scale; a traced scalar (1 or 255) divides the pixels
    instead, so that one compiled program serves both scales (``x / 1`` is ``x`` exactly and ``x / 255`` is
    what the model's trunk computes: the results are the same bits).
    ``margins``: also the model's dead-channel margins (``PrunableModel.features_with_margins``; the same
    feature bits).
    ``on_chunk``: the progress hook of :func:`~badnet_jax.sweep.chunks.map_chunks` (None: no progress).
    """
    # Images may stay uint8 (the lab's files are): the cast to float32 is exact and happens per chunk, so
    # the resident data is a quarter of the float32 size.
    model = as_model(model)
    method = model.features_with_margins if margins else model.features
    trunk = lambda xb: method(params, xb.astype(jnp.float32), divisor)
    return map_chunks(trunk, jnp.asarray(x_NxHxWxC), chunk, rows_axis=0, on_chunk=on_chunk)


def activation_ranking(per_image_NxC: jax.Array, n: int) -> jax.Array:
    """The lab's ranking: channels by increasing mean activation over the first ``n`` images.

    Takes per-image channel sums, so single- and multi-device runs reduce the same (n, C) array the same
    way and rank identically. Sums of non-negative values keep exact zeros, so dead channels tie at 0 and
    the stable sort breaks ties by channel index. The host checks this float32 order against float64 sums
    of the same per-image sums (``badnet_jax.numerics.settling.settle_ranking``).
    """
    per_image_NxC = jax.lax.optimization_barrier(per_image_NxC)  # keeps XLA from fusing the two reductions
    return jnp.argsort(jnp.sum(per_image_NxC[:n], axis=0), stable=True).astype(jnp.int32)


def _orders(model, params, feats, margins, given, rank_labels, n_rank, ranking: RankingPlan, gather, on_step=None):
    """(R, C) orders in ``ranking.labels`` order, and the ranking set's statistics (None without one): its
    (n, C) per-image channel sums and the max over the set of the model's two dead-channel margins (what
    ``settling.settle_ranking`` needs to certify dead channels). ``on_step``: ANP's progress hook."""
    stats, rows, next_given = None, [], 0
    if n_rank:  # the mean activations are reported whatever the orders
        sums = gather(jnp.sum(feats, axis=(1, 2)))[:n_rank]
        margin_NxC, scale_N = margins
        stats = (sums, jnp.max(gather(margin_NxC)[:n_rank], axis=0, initial=-jnp.inf),
                 jnp.max(gather(scale_N)[:n_rank], axis=0, initial=0.0))
    for source in ranking.sources:
        if source == "activation":
            rows.append(activation_ranking(stats[0], n_rank))
        elif source == "anp":
            # ANP optimises on the ranking set's features; every device runs it on all of them (replicated).
            rows.append(anp_order(model, params, gather(feats)[:n_rank], rank_labels, ranking.anp, on_step))
        else:
            rows.append(given[next_given])
            next_given += 1
    return jnp.stack(rows), stats


def _body(model, params, xs, given, divisor, tie_rtol, rank_labels, n_rank, plan, ranking, gather=lambda a: a):
    """Trunk and the rankings on ``xs[0]`` (if ``n_rank``), then every block of sets (``badnet_jax.sweep.layout``)
    swept at every order, one after the other.

    Returns the orders, the ranking set's statistics (see ``_orders``; None without one), and per block the
    (R, 61, N) predictions and near-tie flags. With ``plan.progress`` block j's trunk chunks report as stage
    2j and its head chunks as stage 2j + 1, ANP's steps as the stage after the last block's
    (``progress_stages``).
    """
    hook = (lambda stage: chunk_hook(stage)) if plan.progress else (lambda stage: None)
    # The model arrives in its program form (``PrunableModel.in_program``); the near-tie bound, a traced scalar,
    # is its bound from here on.
    model = dataclasses.replace(model, tie_rtol=tie_rtol)
    feats, margins = None, None  # without a ranking set, no block is needed before the orders
    if n_rank:
        feats, *margins = trunk_features(model, params, xs[0], plan.trunk_block, divisor, margins=True, on_chunk=hook(0))
    orders, stats = _orders(model, params, feats, margins, given, rank_labels, n_rank, ranking, gather,
                            on_step=hook(2 * len(xs)))
    out = []
    for j, x in enumerate(xs):
        if out:  # one block after the other: left free, XLA:CPU interleaves their loops and runs ~10% slower
            x, _ = jax.lax.optimization_barrier((x, out[-1]))
        if j == 0 and n_rank:
            out.append(sweep_set(model, params, feats, orders, plan, on_chunk=hook(1)))
        elif plan.fuses_trunk:
            out.append(sweep_images(model, params, x, divisor, orders, plan, on_chunk=hook(2 * j + 1)))
        else:
            block_feats = trunk_features(model, params, x, plan.trunk_block, divisor, on_chunk=hook(2 * j))
            out.append(sweep_set(model, params, block_feats, orders, plan, on_chunk=hook(2 * j + 1)))
    return orders, stats, tuple(out)


def progress_stages(blocks: Sequence[Block], ranking: RankingPlan, plan: SweepPlan,
                    ranked: bool = True) -> list[tuple[str, float, str]]:
    """The progress stages of ``_body`` (label, share of the work, unit): per block of sets, its trunk and its
    heads at every order (a block that ranks nothing, with ``plan.fuses_trunk``: one stage, the second, for
    both); then ANP's optimisation, if asked. ``ranked``: the first block is the ranking set."""
    orders, stages = len(ranking.labels), []
    for j, block in enumerate(blocks):
        n, name = float(block.size), block.label
        heads = f"heads ({orders} orders)" if orders > 1 else "heads"
        if (j or not ranked) and plan.fuses_trunk:
            stages += [(f"{name} trunk", 0.0, "chunk"), (f"{name} trunk and {heads}", n * (1 + orders), "chunk")]
        else:
            stages += [(f"{name} trunk", n, "chunk"), (f"{name} {heads}", n * orders, "chunk")]
    if ranking.anp is not None:
        stages.append(("anp ranking", ANP_IMAGES_PER_SAMPLE * ranking.anp.steps * ranking.anp.batch, "step"))
    return stages


_STATIC = ("model", "n_rank", "plan", "ranking")
# ANP's work in the stages' unit (an image through the trunk or a head): each of its samples is a head's
# forward and backward pass three times over, about two images' worth (timed at lab scale on a CPU).
ANP_IMAGES_PER_SAMPLE = 2.0


@functools.partial(jax.jit, static_argnames=_STATIC)
def rank_and_sweep_call(model, params, xs, given, divisor, tie_rtol, rank_labels, n_rank, plan, ranking):
    """The sweep's one compiled call on one device: ``(orders, ranking stats, per block of sets (predictions,
    near-tie flags))`` (the body's arguments; ``badnet_jax.sweep.run`` makes them)."""
    return _body(model, params, xs, given, divisor, tie_rtol, rank_labels, n_rank, plan, ranking)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "mesh"))
def rank_and_sweep_call_sharded(model, params, xs, given, divisor, tie_rtol, rank_labels, n_rank, plan, ranking,
                                mesh):
    """The same as ``rank_and_sweep_call`` with the image axis sharded over ``mesh``'s ``data`` axis."""
    body = functools.partial(_body, model, n_rank=n_rank, plan=plan, ranking=ranking,
                             gather=lambda a: jax.lax.all_gather(a, "data", tiled=True))
    data, rep = P("data"), P()
    return jax.shard_map(
        lambda p, xs_, g, d, r, lab: body(p, xs_, g, d, r, lab), mesh=mesh,
        in_specs=(rep, tuple(data for _ in xs), rep, rep, rep, rep),
        out_specs=(rep, (rep, rep, rep) if n_rank else None, tuple((P(None, None, "data"),) * 2 for _ in xs)),
        check_vma=False,
    )(params, xs, given, divisor, tie_rtol, rank_labels)
