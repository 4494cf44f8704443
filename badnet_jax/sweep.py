"""Ranking and the pruning sweep: the whole 61-step curve from one trunk pass per data set.

Pruning the first k channels of the order (k = 0..60) only changes the head's input mask, so every data set
goes through the trunk (input -> pool_3) once and the head is evaluated at all 61 steps, all inside one
jit-compiled call, in fixed-size chunks (``lax.map``) so memory stays bounded at lab scale. The plain sweep
vmaps the masked head over the 61 prefix masks; :class:`SweepOptions` switches on the exact shortcuts
(prefix sums of per-channel contributions, one evaluation per distinct effective mask).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.model import NUM_POOL3_CHANNELS, BadNet, Params
from badnet_jax.prefix import reverse_steps, step_aliases, step_preactivations
from kernels.masked_head.api import head_argmax, resolve_impl

DEFAULT_CHUNK = 256


def prefix_masks(order: jax.Array) -> jax.Array:
    """(61, 60) float32 masks; row k prunes (zeroes) the first k channels of ``order``."""
    order = jnp.asarray(order)
    c = order.shape[0]
    rank = jnp.zeros((c,), jnp.int32).at[order].set(jnp.arange(c, dtype=jnp.int32))  # position of channel
    return (rank[None, :] >= jnp.arange(c + 1, dtype=jnp.int32)[:, None]).astype(jnp.float32)


def _pad_chunks(a: jax.Array, chunk: int, fill=0) -> jax.Array:
    n = a.shape[0]
    pad = (-n) % chunk
    if pad:
        a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])
    return a.reshape(-1, chunk, *a.shape[1:])


def trunk_features(model: BadNet, params: Params, x_NxHxWxC: jax.Array, chunk: int) -> jax.Array:
    """pool_3 activations of every image, ``chunk`` images at a time (traceable; call under jit)."""
    n = x_NxHxWxC.shape[0]
    chunks = _pad_chunks(jnp.asarray(x_NxHxWxC, jnp.float32), chunk)
    feats = jax.lax.map(lambda xb: model.apply({"params": params}, xb, method=BadNet.trunk), chunks)
    return feats.reshape(-1, *feats.shape[2:])[:n]


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """Exact shortcuts of the sweep, each switchable (all give the plain sweep's predictions, ties aside).

    Attributes:
        prefix_sums: build every step's fc_1/conv_4 pre-activations from per-channel contributions with
            suffix sums over the order (``badnet_jax.prefix``) instead of re-running the masked head.
        dedupe: evaluate each distinct effective mask once per chunk: a step that only prunes channels that
            are zero on every image of the chunk reuses the previous step's predictions.
        impl: masked-head implementation for the prefix path: ``auto``, ``reference`` or ``pallas``
            (see ``kernels.masked_head.api``).
    """

    prefix_sums: bool = True
    dedupe: bool = True
    impl: str = "auto"


PLAIN = SweepOptions(prefix_sums=False, dedupe=False, impl="reference")


def step_predictions(model: BadNet, params: Params, pool3_NxHxWxC: jax.Array, order: jax.Array, chunk: int,
                     options: SweepOptions = PLAIN) -> jax.Array:
    """(61, N) int32 predictions of B' for k = 0..60 channels of ``order`` pruned (traceable; call under jit).

    ``options.impl`` must already be resolved (``kernels.masked_head.api.resolve_impl``).
    """
    n = pool3_NxHxWxC.shape[0]
    masks = prefix_masks(order)
    steps = masks.shape[0]
    p = params

    def one_chunk(feats):
        if options.prefix_sums:
            tail = (p["fc_2"]["kernel"], p["fc_2"]["bias"], p["output"]["kernel"], p["output"]["bias"])
            head = lambda fc1, c4: head_argmax(fc1[None], c4[None], *tail, impl=options.impl)[0]
            if options.dedupe:
                # Going from step k+1 to k adds channel order[k]; if it is dead on this chunk, nothing changed.
                step = lambda k, fc1, c4, prev, alive: jax.lax.cond(alive, head, lambda *_: prev, fc1, c4)
                return reverse_steps(p, feats, order, step, jnp.zeros((feats.shape[0],), jnp.int32))
            fc1, c4 = step_preactivations(p, feats, order)  # (61, chunk, 160), (61, chunk, 960)
            return head_argmax(fc1, c4, *tail, impl=options.impl)
        one = lambda k: jnp.argmax(model.apply({"params": p}, feats, masks[k], method=BadNet.head),
                                   -1).astype(jnp.int32)
        if not options.dedupe:
            return jax.vmap(one)(jnp.arange(steps))
        aliases = step_aliases(feats, order)

        def body(prev, k):
            # lax.cond is real control flow here: an aliased step costs nothing.
            preds = jax.lax.cond(aliases[k] == k, lambda: one(k), lambda: prev)
            return preds, preds

        _, preds = jax.lax.scan(body, jnp.zeros((feats.shape[0],), jnp.int32), jnp.arange(steps))
        return preds

    preds = jax.lax.map(one_chunk, _pad_chunks(pool3_NxHxWxC, chunk))  # (chunks, 61, chunk)
    return jnp.moveaxis(preds, 1, 0).reshape(steps, -1)[:, :n]


@functools.partial(jax.jit, static_argnames=("model", "chunk", "options"))
def _rank_and_sweep(model, params, x_clean, others, chunk, options):
    feats = trunk_features(model, params, x_clean, chunk)
    # float32 sums of non-negative values: exact zeros stay exactly zero, so dead channels tie at 0.
    mean = jnp.mean(feats, axis=(0, 1, 2))
    order = jnp.argsort(mean, stable=True)  # ties broken by channel index
    preds = [step_predictions(model, params, feats, order, chunk, options)]
    for x in others:
        # One set after the other: left free, XLA:CPU interleaves the sets' loops and runs ~10% slower.
        x, _ = jax.lax.optimization_barrier((x, preds[-1]))
        preds.append(step_predictions(model, params, trunk_features(model, params, x, chunk), order, chunk, options))
    return order, mean, preds[0], tuple(preds[1:])


@functools.partial(jax.jit, static_argnames=("model", "chunk", "options"))
def _predict_steps(model, params, x, order, chunk, options):
    return step_predictions(model, params, trunk_features(model, params, x, chunk), order, chunk, options)


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def _mean_activation(model, params, x, chunk):
    return jnp.mean(trunk_features(model, params, x, chunk), axis=(0, 1, 2))


def _resolved(options: SweepOptions) -> SweepOptions:
    return dataclasses.replace(options, impl=resolve_impl(options.impl)) if options.prefix_sums else options


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Result of :func:`rank_and_sweep` on the clean and poisoned validation sets.

    Attributes:
        order: (60,) channels in pruning order (increasing mean activation, ties by index).
        mean_activation: (60,) mean pool_3 activation per channel over the clean validation set.
        masks: (61, 60) prefix masks; row k prunes ``order[:k]``.
        preds_clean, preds_bd: (61, N) predictions of B' for each k.
        preds_extra: (61, N_i) predictions for each extra image set (e.g. the test sets), same order.
    """

    order: np.ndarray
    mean_activation: np.ndarray
    masks: np.ndarray
    preds_clean: np.ndarray
    preds_bd: np.ndarray
    preds_extra: tuple[np.ndarray, ...] = ()


def rank_channels(model: BadNet, params: Params, x_clean: np.ndarray,
                  chunk: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(order, mean_activation) of the pool_3 channels over clean images, in one jitted chunked pass."""
    mean = np.asarray(_mean_activation(model, params, jnp.asarray(x_clean), chunk))
    return np.argsort(mean, kind="stable"), mean


def rank_and_sweep(model: BadNet, params: Params, x_clean: np.ndarray, x_bd: np.ndarray,
                   chunk: int = DEFAULT_CHUNK, options: SweepOptions = SweepOptions(),
                   extra: tuple[np.ndarray, ...] = ()) -> Sweep:
    """Rank channels on the clean validation images and predict every set at every k, in one jitted call.

    Only clean validation data decides the order; the poisoned set and the ``extra`` sets (e.g. the test
    sets) are only evaluated.
    """
    others = (jnp.asarray(x_bd), *(jnp.asarray(x) for x in extra))
    order, mean, pc, po = _rank_and_sweep(model, params, jnp.asarray(x_clean), others, chunk, _resolved(options))
    order = np.asarray(order)
    return Sweep(order=order, mean_activation=np.asarray(mean), masks=np.asarray(prefix_masks(order)),
                 preds_clean=np.asarray(pc), preds_bd=np.asarray(po[0]),
                 preds_extra=tuple(np.asarray(p) for p in po[1:]))


def predict_steps(model: BadNet, params: Params, x: np.ndarray, order: np.ndarray, chunk: int = DEFAULT_CHUNK,
                  options: SweepOptions = SweepOptions()) -> np.ndarray:
    """(61, N) predictions of B' at every k of a given order for a set of images (e.g. test data), in one call."""
    return np.asarray(_predict_steps(model, params, jnp.asarray(x), jnp.asarray(order, jnp.int32), chunk,
                                     _resolved(options)))


def count_hits(preds_MxN: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
    """(M,) number of images whose prediction equals its label, per mask."""
    return (np.asarray(preds_MxN) == np.asarray(labels_N)[None, :]).sum(axis=1)
