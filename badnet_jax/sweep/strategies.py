"""Per-set evaluators of the sweep: (61, N) predictions of B' for k = 0..60 channels of an order pruned.

One evaluator per :data:`~badnet_jax.sweep.plan.Strategy`, all exact (they give the plain sweep's
predictions, float32 near-ties aside):

- ``plain``: the masked head vmapped over the 61 prefix masks;
- ``prefix``: every step's fc_1/conv_4 pre-activations from suffix sums, the tail evaluated at all steps;
- ``prefix_dedupe``: a reverse scan over the steps; a step whose added channel is dead on the whole chunk
  reuses the previous predictions (``lax.cond``: real control flow, no cost);
- ``prefix_batched``: the chunk's distinct steps gathered and evaluated ``batch_steps`` per head call.

With ``plan.group`` the images are sorted by alive channels before chunking and the predictions put back.
:func:`head_evaluations` counts, on the host, the (image, step) evaluations of the tail each plan does;
:func:`shared_evaluations` the fewest that several orders would need if they shared their common steps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.kernels.masked_head.api import head_top2
from badnet_jax.model import BadNet, Params
from badnet_jax.sweep.chunks import chunk_starts, map_chunks
from badnet_jax.sweep.plan import STEPS, SweepPlan
from badnet_jax.sweep.prefix import alive_groups, prefix_masks, reverse_steps, step_aliases, step_preactivations
from badnet_jax.numerics.ties import near_tie, output_with_ties

ChunkFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _tail(p: Params) -> tuple[jax.Array, ...]:
    return p["fc_2"]["kernel"], p["fc_2"]["bias"], p["output"]["kernel"], p["output"]["bias"]


def _head(p: Params, plan: SweepPlan, fc1: jax.Array, c4: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(M, n) predictions and near-tie flags of the tail for (M, n, 160) / (M, n, 960) pre-activations."""
    arg, gap, scale = head_top2(fc1, c4, *_tail(p), impl=plan.impl, platform=plan.platform)
    return arg, near_tie(gap, scale)


def _plain(model: BadNet, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    masks = prefix_masks(order)

    def one(feats, mask):
        hidden = model.apply({"params": p}, feats, mask, method=BadNet.hidden)
        return output_with_ties(hidden, p["output"]["kernel"], p["output"]["bias"])
    return lambda feats: jax.vmap(one, in_axes=(None, 0))(feats, masks)


def _prefix(model: BadNet, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    def run(feats):
        fc1, c4 = step_preactivations(p, feats, order)  # (61, n, 160), (61, n, 960)
        return _head(p, plan, fc1, c4)
    return run


def _prefix_dedupe(model: BadNet, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    # Going from step k+1 to k adds channel order[k]; if it is dead on this chunk, nothing changed.
    head = lambda k, fc1, c4: jax.tree.map(lambda a: a[0], _head(p, plan, fc1[None], c4[None]))
    return lambda feats: reverse_steps(p, feats, order, head, skip_dead=True)


def _prefix_batched(model: BadNet, p: Params, order: jax.Array, plan: SweepPlan) -> ChunkFn:
    batch = plan.batch_steps

    def run(feats):
        # Within a run of steps with one effective mask the pre-activations are exact copies (skip_dead), so
        # each run is evaluated once, at its first step (its alias), and shared.
        fc1, c4 = step_preactivations(p, feats, order, skip_dead=True)  # (61, n, 160), (61, n, 960)
        aliases = step_aliases(feats, order)
        evaluated = aliases == jnp.arange(STEPS, dtype=aliases.dtype)
        # The evaluated steps first, padded with step 0 (always evaluated) to whole batches: a padded entry
        # recomputes step 0's predictions and writes the same values again.
        todo = jnp.nonzero(evaluated, size=-(-STEPS // batch) * batch, fill_value=0)[0]

        def one_batch(b, out):
            idx = jax.lax.dynamic_slice_in_dim(todo, b * batch, batch)
            return jax.tree.map(lambda o, v: o.at[idx].set(v), out, _head(p, plan, fc1[idx], c4[idx]))

        count = jnp.sum(evaluated.astype(jnp.int32))
        empty = (jnp.zeros((STEPS, feats.shape[0]), jnp.int32), jnp.zeros((STEPS, feats.shape[0]), bool))
        out = jax.lax.fori_loop(0, (count + batch - 1) // batch, one_batch, empty)
        return jax.tree.map(lambda o: o[aliases], out)
    return run


EVALUATORS = {"plain": _plain, "prefix": _prefix, "prefix_dedupe": _prefix_dedupe, "prefix_batched": _prefix_batched}


def sweep_set(model: BadNet, params: Params, pool3_NxHxWxC: jax.Array, orders_RxC: jax.Array,
              plan: SweepPlan, on_chunk=None) -> tuple[jax.Array, jax.Array]:
    """(R, 61, N) int32 predictions of B' for k = 0..60 channels of each order pruned, and (R, 61, N) bool
    near-tie flags (``badnet_jax.numerics.ties``: predictions the caller settles in float64). Traceable; call under jit.

    The orders are swept one after the other inside each chunk, so a chunk's features are read while hot.
    ``on_chunk``: the progress hook of :func:`~badnet_jax.sweep.chunks.map_chunks` (None: no progress).
    """
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
    if not plan.group:
        return map_chunks(one_chunk, pool3_NxHxWxC, plan.chunk, rows_axis=2, on_chunk=on_chunk)
    perm = alive_groups(pool3_NxHxWxC)
    out = map_chunks(one_chunk, pool3_NxHxWxC[perm], plan.chunk, rows_axis=2, on_chunk=on_chunk)
    return jax.tree.map(lambda a: jnp.zeros_like(a).at[:, :, perm].set(a, unique_indices=True), out)


def _chunks_alive(pool3_NxHxWxC: np.ndarray, plan: SweepPlan) -> tuple[int, list[np.ndarray]]:
    """Rows per chunk, and each chunk's (60,) alive channels, with the sweep's chunks (after grouping, if on)."""
    feats = np.asarray(pool3_NxHxWxC)
    if plan.group:
        feats = feats[np.asarray(alive_groups(jnp.asarray(feats)))]
    alive_NxC = feats.max(axis=(1, 2)) > 0
    chunk = min(plan.chunk, len(feats))
    return chunk, [alive_NxC[s:s + chunk].any(axis=0) for s in chunk_starts(len(feats), plan.chunk)]


def head_evaluations(pool3_NxHxWxC: np.ndarray, plan: SweepPlan) -> int:
    """How many (image, step) evaluations of the head's tail ``plan`` does on these pool_3 features.

    The work the shortcuts leave, for benchmarks: 61 per image and chunk row without dedupe; with it, per
    chunk, the all-pruned step plus one step per channel alive somewhere in the chunk (chunks after
    grouping, if on), rounded up to whole batches when steps are batched.
    """
    n = len(pool3_NxHxWxC)
    if plan.strategy in ("plain", "prefix"):
        return len(chunk_starts(n, plan.chunk)) * min(plan.chunk, n) * STEPS
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
