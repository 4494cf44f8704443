"""Per-set evaluators of the sweep: (C + 1, N) predictions of B' for k = 0..C channels of an order pruned.

One evaluator per :data:`~badnet_jax.sweep.plan.Strategy`, all exact (they give the plain sweep's
predictions, float32 near-ties aside):

- ``plain``: the masked head vmapped over the C + 1 prefix masks;
- ``prefix``: every step's pre-activations from suffix sums, the tail evaluated at all steps;
- ``prefix_dedupe``: a reverse scan over the steps; a step whose added channel is dead on the whole chunk
  reuses the previous predictions (``lax.cond``: real control flow, no cost);
- ``prefix_batched``: the chunk's distinct steps gathered and evaluated ``batch_steps`` per head call;
- ``cumulative``: every step's pre-activations at once (vmapped contributions, a reverse cumulative sum), the
  tail evaluated at all steps in one call: no loop over steps, for heads whose tail is cheap.

With ``plan.group`` the images are sorted by alive channels before chunking and the predictions put back.
:func:`head_evaluations` counts, on the host, the (image, step) evaluations of the tail each plan does;
:func:`shared_evaluations` the fewest that several orders would need if they shared their common steps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.numerics.ties import near_tie, output_with_ties
from badnet_jax.sweep.chunks import chunk_starts, map_chunks
from badnet_jax.sweep.plan import SweepPlan
from badnet_jax.models.affine import cumulative_preactivations, prefix_masks, reverse_steps, step_preactivations
from badnet_jax.sweep.prefix import alive_groups, step_aliases

ChunkFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _head(model: PrunableModel, p: Params, plan: SweepPlan, pre) -> tuple[jax.Array, jax.Array]:
    """(M, n) predictions and near-tie flags of the tail for pre-activations of leading axes (M, n)."""
    arg, gap, scale = model.tail_top2(p, pre, impl=plan.impl, platform=plan.platform)
    return arg, near_tie(gap, scale, model.tie_rtol)


def _plain(model: PrunableModel, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    masks = prefix_masks(order)
    w, b = model.output_layer(p)

    def one(feats, mask):
        return output_with_ties(model.hidden(p, feats, mask), w, b, model.tie_rtol)
    return lambda feats: jax.vmap(one, in_axes=(None, 0))(feats, masks)


def _prefix(model: PrunableModel, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    def run(feats):
        return _head(model, p, plan, step_preactivations(model, p, feats, order))  # (C + 1, n, ...) each
    return run


def _prefix_dedupe(model: PrunableModel, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    # Going from step k+1 to k adds channel order[k]; if it is dead on this chunk, nothing changed.
    def head(k, pre):
        return jax.tree.map(lambda a: a[0], _head(model, p, plan, jax.tree.map(lambda a: a[None], pre)))
    return lambda feats: reverse_steps(model, p, feats, order, head, skip_dead=True)


def _prefix_batched(model: PrunableModel, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    batch, steps = plan.batch_steps, order.shape[0] + 1

    def run(feats):
        # Within a run of steps with one effective mask the pre-activations are exact copies (skip_dead), so
        # each run is evaluated once, at its first step (its alias), and shared.
        pre = step_preactivations(model, p, feats, order, skip_dead=True)  # (C + 1, n, ...) each
        aliases = step_aliases(feats, order)
        evaluated = aliases == jnp.arange(steps, dtype=aliases.dtype)
        # The evaluated steps first, padded with step 0 (always evaluated) to whole batches: a padded entry
        # recomputes step 0's predictions and writes the same values again.
        todo = jnp.nonzero(evaluated, size=-(-steps // batch) * batch, fill_value=0)[0]

        def one_batch(b, out):
            idx = jax.lax.dynamic_slice_in_dim(todo, b * batch, batch)
            values = _head(model, p, plan, jax.tree.map(lambda a: a[idx], pre))
            return jax.tree.map(lambda o, v: o.at[idx].set(v), out, values)

        count = jnp.sum(evaluated.astype(jnp.int32))
        empty = (jnp.zeros((steps, feats.shape[0]), jnp.int32), jnp.zeros((steps, feats.shape[0]), bool))
        out = jax.lax.fori_loop(0, (count + batch - 1) // batch, one_batch, empty)
        return jax.tree.map(lambda o: o[aliases], out)
    return run


def _cumulative(model: PrunableModel, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    def run(feats):
        return _head(model, p, plan, cumulative_preactivations(model, p, feats, order))  # (C + 1, n, ...) each
    return run


EVALUATORS = {"plain": _plain, "prefix": _prefix, "prefix_dedupe": _prefix_dedupe, "prefix_batched": _prefix_batched,
              "cumulative": _cumulative}


def sweep_set(model: PrunableModel, params: Params, pool3_NxHxWxC: jax.Array, orders_RxC: jax.Array,
              plan: SweepPlan, on_chunk=None) -> tuple[jax.Array, jax.Array]:
    """(R, C + 1, N) int32 predictions of B' for k = 0..C channels of each order pruned, and (R, C + 1, N) bool
    near-tie flags (``badnet_jax.numerics.ties``: predictions the caller settles in float64). Traceable; call under jit.

    The orders are swept one after the other inside each chunk, so a chunk's features are read while hot.
    ``on_chunk``: the progress hook of :func:`~badnet_jax.sweep.chunks.map_chunks` (None: no progress).
    """
    one_chunk = _chunk_fn(model, params, orders_RxC, plan)
    if not plan.group or not pool3_NxHxWxC.shape[0]:  # an empty set: nothing to sort or gather from
        return map_chunks(one_chunk, pool3_NxHxWxC, plan.chunk, rows_axis=2, on_chunk=on_chunk)
    perm = alive_groups(pool3_NxHxWxC)
    # Each chunk gathers its rows of the sorted order: a sorted copy of the whole set is never made.
    out = map_chunks(lambda rows: one_chunk(pool3_NxHxWxC[rows]), perm, plan.chunk, rows_axis=2, on_chunk=on_chunk)
    return jax.tree.map(lambda a: jnp.zeros_like(a).at[:, :, perm].set(a, unique_indices=True), out)


def sweep_images(model: PrunableModel, params: Params, x_NxHxWxC: jax.Array, divisor, orders_RxC: jax.Array,
                 plan: SweepPlan, on_chunk=None) -> tuple[jax.Array, jax.Array]:
    """:func:`sweep_set` from the images, the trunk run chunk by chunk beside the heads (``plan.fuses_trunk``):
    a set's features are never stored whole, and XLA fuses the trunk's last layers into the head's reductions
    (a global average pooling). Traceable; call under jit. ``divisor`` as in ``PrunableModel.features``."""
    one_chunk = _chunk_fn(model, params, orders_RxC, plan)
    run = lambda xb: one_chunk(model.features(params, xb.astype(jnp.float32), divisor))
    return map_chunks(run, x_NxHxWxC, plan.chunk, rows_axis=2, on_chunk=on_chunk)


def _chunk_fn(model: PrunableModel, params: Params, orders_RxC: jax.Array, plan: SweepPlan) -> ChunkFn:
    """One chunk's features (n, H, W, C) -> its (R, C + 1, n) predictions and near-tie flags, every order."""
    evaluate = lambda order, feats: EVALUATORS[plan.strategy](model, params, order, plan)(feats)
    r, g = orders_RxC.shape[0], min(plan.orders_per_call, orders_RxC.shape[0])
    if r == 1:
        one_chunk = lambda feats: jax.tree.map(lambda a: a[None], evaluate(orders_RxC[0], feats))
    elif g == 1:
        one_chunk = lambda feats: jax.lax.map(lambda order: evaluate(order, feats), orders_RxC)
    else:
        # Groups of g orders vmapped (the last group padded with copies of the last order, dropped after).
        groups = jnp.concatenate([orders_RxC, jnp.repeat(orders_RxC[-1:], -r % g, axis=0)])
        groups = groups.reshape(-1, g, orders_RxC.shape[1])
        one_group = lambda group, feats: jax.vmap(lambda order: evaluate(order, feats))(group)
        one_chunk = lambda feats: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:r],
                                               jax.lax.map(lambda group: one_group(group, feats), groups))
    return one_chunk


def _chunks_alive(pool3_NxHxWxC: np.ndarray, plan: SweepPlan) -> tuple[int, list[np.ndarray]]:
    """Rows per chunk, and each chunk's (C,) alive channels, with the sweep's chunks (after grouping, if on)."""
    feats = np.asarray(pool3_NxHxWxC)
    if plan.group:
        feats = feats[np.asarray(alive_groups(jnp.asarray(feats)))]
    alive_NxC = np.abs(feats).max(axis=(1, 2)) > 0
    chunk = min(plan.chunk, len(feats))
    return chunk, [alive_NxC[s:s + chunk].any(axis=0) for s in chunk_starts(len(feats), plan.chunk)]


def head_evaluations(pool3_NxHxWxC: np.ndarray, plan: SweepPlan) -> int:
    """How many (image, step) evaluations of the head's tail ``plan`` does on these features (N, H, W, C).

    The work the shortcuts leave, for benchmarks: C + 1 per image and chunk row without dedupe; with it, per
    chunk, the all-pruned step plus one step per channel alive somewhere in the chunk (chunks after
    grouping, if on), rounded up to whole batches when steps are batched.
    """
    n = len(pool3_NxHxWxC)
    if plan.strategy in ("plain", "prefix", "cumulative"):
        return len(chunk_starts(n, plan.chunk)) * min(plan.chunk, n) * (pool3_NxHxWxC.shape[3] + 1)
    chunk, alive = _chunks_alive(pool3_NxHxWxC, plan)
    batch = plan.batch_steps or 1
    return sum(chunk * -(-(1 + int(a.sum())) // batch) * batch for a in alive)


def shared_evaluations(pool3_NxHxWxC: np.ndarray, orders_RxC: np.ndarray, plan: SweepPlan) -> int:
    """The fewest (image, step) tail evaluations an exact sweep of all ``orders`` could do with ``plan``'s
    chunks (and grouping), whatever its strategy, if it shared every effective mask two orders have in common
    on a chunk.

    On a chunk whose alive channels are A, step k of an order has the effective mask ``order[:k]`` & A; the
    tail's inputs depend on nothing else, so the distinct effective masks over all orders and steps are
    what must be evaluated. A bound for benchmarks (batch rounding ignored): against ``R`` times
    :func:`head_evaluations` it shows what sharing the tail across orders could save. With ``plan.chunk``
    1 and no grouping it is the per-image floor.
    """
    chunk, chunks_alive = _chunks_alive(pool3_NxHxWxC, plan)
    total = 0
    for alive in chunks_alive:
        masks = set()
        for order in np.asarray(orders_RxC):
            kept = [int(c) for c in order if alive[c]]
            masks.update(frozenset(kept[:k]) for k in range(len(kept) + 1))
        total += chunk * len(masks)
    return total
