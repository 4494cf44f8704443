"""Ranking and the pruning sweep: the whole 61-step curve from one trunk pass per data set.

Pruning the first k channels of the order (k = 0..60) only changes the head's input mask, so every data set
goes through the trunk (input -> pool_3) once and the head is evaluated at all 61 steps, all inside one
jit-compiled call, in fixed-size chunks sliced in place (``fori_loop``) so memory stays bounded. The plain
sweep vmaps the masked head over the 61 prefix masks; :class:`SweepOptions` switches on the exact shortcuts
(prefix sums of per-channel contributions, one evaluation per distinct effective mask).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from badnet_jax.model import NUM_POOL3_CHANNELS, POOL3_HWC, BadNet, Params
from badnet_jax.prefix import alive_groups, reverse_steps, step_aliases, step_preactivations
from kernels.masked_head.api import head_argmax, resolve_impl

DEFAULT_CHUNK = 256  # CPU: per-step GEMMs of 256 rows run near the matmul peak, and dedupe stays fine-grained
ACCELERATOR_CHUNK = 4096  # GPU/TPU: few, large calls


def default_chunk() -> int:
    """Images per chunk when none is given: :data:`DEFAULT_CHUNK` on CPU, :data:`ACCELERATOR_CHUNK` else."""
    return DEFAULT_CHUNK if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK


def prefix_masks(order: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """(61, 60) float32 masks; row k prunes (zeroes) the first k channels of ``order``.

    NumPy in, NumPy out (no device round trip for host-side bookkeeping); traceable for a jax.Array.
    """
    xp = np if isinstance(order, np.ndarray) else jnp
    order = xp.asarray(order)
    c = order.shape[0]
    rank = xp.argsort(order)  # the inverse permutation: each channel's position in the order
    return (rank[None, :] >= xp.arange(c + 1)[:, None]).astype(xp.float32)


def _map_chunks(fn, x: jax.Array, chunk: int, rows_axis: int) -> jax.Array:
    """``fn`` over ``chunk``-row blocks of x; its outputs put together along ``rows_axis`` (traceable).

    No padded copy of x is made: a ``fori_loop`` slices blocks in place, and the last block is clamped to
    end at the last row (it overlaps the one before; those rows are computed again, identically, since
    every row is independent and dedupe is exact per block).
    """
    n = x.shape[0]
    chunk = max(1, min(chunk, n))
    blocks = -(-n // chunk) if n else 0
    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((chunk, *x.shape[1:]), x.dtype))
    full = list(out_shape.shape)
    full[rows_axis] = n
    out = jnp.zeros(full, out_shape.dtype)
    if n == 0:
        return out

    def body(i, out):
        start = jnp.minimum(i * chunk, n - chunk)
        y = fn(jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0))
        return jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=rows_axis)

    return jax.lax.fori_loop(0, blocks, body, out)


def trunk_features(model: BadNet, params: Params, x_NxHxWxC: jax.Array, chunk: int) -> jax.Array:
    """pool_3 activations of every image, ``chunk`` images at a time (traceable; call under jit)."""
    # Images may stay uint8 (the lab's files are): the cast to float32 is exact and happens per chunk, so
    # the resident data is a quarter of the float32 size.
    trunk = lambda xb: model.apply({"params": params}, xb.astype(jnp.float32), method=BadNet.trunk)
    return _map_chunks(trunk, jnp.asarray(x_NxHxWxC), chunk, rows_axis=0)


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """Exact shortcuts of the sweep, each switchable (all give the plain sweep's predictions, ties aside).

    Attributes:
        prefix_sums: build every step's fc_1/conv_4 pre-activations from per-channel contributions with
            suffix sums over the order (``badnet_jax.prefix``) instead of re-running the masked head.
        dedupe: evaluate each distinct effective mask once per chunk: a step that only prunes channels that
            are zero on every image of the chunk reuses the previous step's predictions.
        group: with ``dedupe``, sort each set's images by their alive channels before chunking (and the
            predictions back after), so that a chunk's images share dead channels and skip more steps.
        impl: masked-head implementation for the prefix path: ``auto``, ``reference`` or ``pallas``
            (see ``kernels.masked_head.api``).
        batch_steps: with ``prefix_sums`` and ``dedupe``: 0 evaluates a chunk's distinct steps one head
            call each, inside the scan over steps (best on a CPU); B > 0 builds all 61 steps'
            pre-activations, gathers the distinct ones and evaluates them B steps per head call (an
            accelerator wants few large calls). None: 0 on CPU, 8 on GPU/TPU.
    """

    prefix_sums: bool = True
    dedupe: bool = True
    group: bool = True
    impl: str = "auto"
    batch_steps: Optional[int] = None


PLAIN = SweepOptions(prefix_sums=False, dedupe=False, group=False, impl="reference")


def step_predictions(model: BadNet, params: Params, pool3_NxHxWxC: jax.Array, order: jax.Array, chunk: int,
                     options: SweepOptions = PLAIN) -> jax.Array:
    """(61, N) int32 predictions of B' for k = 0..60 channels of ``order`` pruned (traceable; call under jit).

    ``options.impl`` must already be resolved (``kernels.masked_head.api.resolve_impl``).
    """
    masks = prefix_masks(order)
    steps = masks.shape[0]
    p = params

    def one_chunk(feats):
        if options.prefix_sums:
            tail = (p["fc_2"]["kernel"], p["fc_2"]["bias"], p["output"]["kernel"], p["output"]["bias"])
            if options.dedupe and options.batch_steps:
                return _distinct_steps_batched(p, feats, order, tail, options.impl, options.batch_steps)
            if options.dedupe:
                # Going from step k+1 to k adds channel order[k]; if it is dead on this chunk, nothing changed.
                head = lambda k, fc1, c4: head_argmax(fc1[None], c4[None], *tail, impl=options.impl)[0]
                return reverse_steps(p, feats, order, head, skip_dead=True)
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

    if not (options.dedupe and options.group):
        return _map_chunks(one_chunk, pool3_NxHxWxC, chunk, rows_axis=1)  # (61, N)
    perm = alive_groups(pool3_NxHxWxC)
    preds = _map_chunks(one_chunk, pool3_NxHxWxC[perm], chunk, rows_axis=1)
    return jnp.zeros_like(preds).at[:, perm].set(preds, unique_indices=True)


def _distinct_steps_batched(p: Params, feats: jax.Array, order: jax.Array, tail: tuple, impl: str,
                            batch: int) -> jax.Array:
    """(61, n) predictions of one chunk: its distinct steps gathered and evaluated ``batch`` at a time."""
    # Within a run of steps with one effective mask the pre-activations are exact copies (skip_dead), so
    # each run is evaluated once, at its first step (its alias), and shared.
    fc1, c4 = step_preactivations(p, feats, order, skip_dead=True)  # (61, n, 160), (61, n, 960)
    aliases = step_aliases(feats, order)
    steps = aliases.shape[0]
    evaluated = aliases == jnp.arange(steps, dtype=aliases.dtype)
    # The evaluated steps first, padded with step 0 (always evaluated) to whole batches: a padded entry
    # recomputes step 0's predictions and writes the same values again.
    todo = jnp.nonzero(evaluated, size=-(-steps // batch) * batch, fill_value=0)[0]

    def one_batch(b, out):
        idx = jax.lax.dynamic_slice_in_dim(todo, b * batch, batch)
        return out.at[idx].set(head_argmax(fc1[idx], c4[idx], *tail, impl=impl))

    count = jnp.sum(evaluated.astype(jnp.int32))
    out = jax.lax.fori_loop(0, (count + batch - 1) // batch, one_batch, jnp.zeros((steps, feats.shape[0]), jnp.int32))
    return out[aliases]


def _rank(per_image_NxC: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    # Per-image channel sums first, then one reduction over the real images: single- and multi-device runs
    # reduce the same (n, 60) array the same way, so they rank identically. Sums of non-negative values:
    # exact zeros stay exactly zero, so dead channels tie at 0.
    per_image_NxC = jax.lax.optimization_barrier(per_image_NxC)  # keeps XLA from fusing the two reductions
    mean = jnp.sum(per_image_NxC[:n], axis=0) / (n * POOL3_HWC[0] * POOL3_HWC[1])
    return jnp.argsort(mean, stable=True), mean  # ties broken by channel index


def _sweep_body(model, params, x_clean, others, n_clean, chunk, options, gather=lambda a: a):
    feats = trunk_features(model, params, x_clean, chunk)
    order, mean = _rank(gather(jnp.sum(feats, axis=(1, 2))), n_clean)
    preds = [step_predictions(model, params, feats, order, chunk, options)]
    for x in others:
        # One set after the other: left free, XLA:CPU interleaves the sets' loops and runs ~10% slower.
        x, _ = jax.lax.optimization_barrier((x, preds[-1]))
        preds.append(step_predictions(model, params, trunk_features(model, params, x, chunk), order, chunk, options))
    return order, mean, preds[0], tuple(preds[1:])


@functools.partial(jax.jit, static_argnames=("model", "chunk", "options"))
def _rank_and_sweep(model, params, x_clean, others, chunk, options):
    return _sweep_body(model, params, x_clean, others, x_clean.shape[0], chunk, options)


@functools.partial(jax.jit, static_argnames=("model", "n_clean", "chunk", "options", "mesh"))
def _rank_and_sweep_sharded(model, params, x_clean, others, n_clean, chunk, options, mesh):
    """The same as ``_rank_and_sweep`` with the image axis sharded over ``mesh``'s ``data`` axis."""
    body = functools.partial(_sweep_body, model, n_clean=n_clean, chunk=chunk, options=options,
                             gather=lambda a: jax.lax.all_gather(a, "data", tiled=True))
    data, rep = P("data"), P()
    return jax.shard_map(
        lambda p, xc, xs: body(p, xc, xs), mesh=mesh,
        in_specs=(rep, data, tuple(data for _ in others)),
        out_specs=(rep, rep, P(None, "data"), tuple(P(None, "data") for _ in others)),
        check_vma=False,
    )(params, x_clean, others)


def data_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``devices`` devices (0 = all, across hosts too)."""
    available = jax.devices()
    n = len(available) if devices <= 0 else devices
    if n > len(available):
        raise ValueError(f"asked for {n} devices, only {len(available)} available")
    return Mesh(np.array(available[:n]), ("data",))


def _shard_rows(x: np.ndarray | jax.ShapeDtypeStruct, mesh: Mesh) -> jax.Array | jax.ShapeDtypeStruct:
    """Zero-pad the image axis to a multiple of the mesh size and lay it out over the ``data`` axis."""
    d = mesh.devices.size
    sharding = NamedSharding(mesh, P("data"))
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((-(-x.shape[0] // d) * d, *x.shape[1:]), x.dtype, sharding=sharding)
    x = np.asarray(x)
    pad = (-len(x)) % d
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    # make_array_from_callback works in multi-process runs too: each process fills its own shards.
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(a: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


@functools.partial(jax.jit, static_argnames=("model", "chunk", "options"))
def _predict_steps(model, params, x, order, chunk, options):
    return step_predictions(model, params, trunk_features(model, params, x, chunk), order, chunk, options)


def resolve_options(options: SweepOptions) -> SweepOptions:
    """``options`` with the masked-head implementation and ``batch_steps`` fixed for the default backend."""
    if not options.prefix_sums:
        return options
    batch = options.batch_steps
    if batch is None:
        batch = 0 if jax.default_backend() == "cpu" else 8
    return dataclasses.replace(options, impl=resolve_impl(options.impl), batch_steps=batch)


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


Images = np.ndarray | jax.ShapeDtypeStruct


def _sweep_call(model: BadNet, params: Params, x_clean: Images, sets: tuple[Images, ...], chunk: Optional[int],
                options: SweepOptions, devices: int):
    """The jitted sweep for this device count and its arguments (arrays, or shapes to compile for)."""
    chunk = chunk or default_chunk()
    mesh = data_mesh(devices) if devices != 1 else None
    options = resolve_options(options)
    if mesh is None or mesh.devices.size == 1:
        put = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
        return _rank_and_sweep, (model, params, put(x_clean), tuple(put(x) for x in sets), chunk, options), None
    put = lambda x: _shard_rows(x, mesh)
    return (_rank_and_sweep_sharded,
            (model, params, put(x_clean), tuple(put(x) for x in sets), x_clean.shape[0], chunk, options, mesh), mesh)


def compile_sweep(model: BadNet, params: Params, x_clean: jax.ShapeDtypeStruct,
                  sets: tuple[jax.ShapeDtypeStruct, ...], chunk: Optional[int] = None,
                  options: SweepOptions = SweepOptions(), devices: int = 1) -> None:
    """Compile :func:`rank_and_sweep` for images of these shapes and dtypes, ahead of the data.

    The compiled program lands in JAX's cache: a later ``rank_and_sweep`` with the same model, params
    shapes, image shapes/dtypes and settings runs without compiling. The defense calls this in a thread
    while the images are still being read.

    Args:
        x_clean, sets: shape and dtype of the clean validation images and of the other sets, in the order
            ``rank_and_sweep`` gets them (``x_bd`` first, then ``extra``).
    """
    fn, args, _ = _sweep_call(model, params, x_clean, sets, chunk, options, devices)
    fn.lower(*args).compile()


def rank_and_sweep(model: BadNet, params: Params, x_clean: np.ndarray, x_bd: np.ndarray,
                   chunk: Optional[int] = None, options: SweepOptions = SweepOptions(),
                   extra: tuple[np.ndarray, ...] = (), devices: int = 1) -> Sweep:
    """Rank channels on the clean validation images and predict every set at every k, in one jitted call.

    Only clean validation data decides the order; the poisoned set and the ``extra`` sets (e.g. the test
    sets) are only evaluated. ``devices`` > 1 (or 0 = all) shards the image axis over that many devices
    (params replicated, sizes padded); the results are the single-device ones.
    """
    sets = (x_bd, *extra)
    fn, args, mesh = _sweep_call(model, params, x_clean, sets, chunk, options, devices)
    order, mean, pc, po = fn(*args)
    if mesh is not None:
        pc = _to_host(pc)[:, :len(x_clean)]
        po = tuple(_to_host(p)[:, :len(x)] for p, x in zip(po, sets))
    order = np.asarray(order)
    return Sweep(order=order, mean_activation=np.asarray(mean), masks=np.asarray(prefix_masks(order)),
                 preds_clean=np.asarray(pc), preds_bd=np.asarray(po[0]),
                 preds_extra=tuple(np.asarray(p) for p in po[1:]))


def predict_steps(model: BadNet, params: Params, x: np.ndarray, order: np.ndarray, chunk: Optional[int] = None,
                  options: SweepOptions = SweepOptions()) -> np.ndarray:
    """(61, N) predictions of B' at every k of a given order for a set of images (e.g. test data), in one call."""
    return np.asarray(_predict_steps(model, params, jnp.asarray(x), jnp.asarray(order, jnp.int32),
                                     chunk or default_chunk(), resolve_options(options)))


def head_evaluations(pool3_NxHxWxC: np.ndarray, chunk: int, options: SweepOptions = SweepOptions()) -> int:
    """How many (image, step) evaluations of the head's tail the sweep does on these pool_3 features.

    The work the shortcuts leave, for benchmarks: 61 per image without dedupe; with it, per chunk, the
    all-pruned step plus one step per channel alive somewhere in the chunk (chunks after grouping, if on),
    rounded up to whole batches with ``batch_steps`` (as resolved for the backend).
    """
    batch = (resolve_options(options).batch_steps or 1) if options.prefix_sums else 1
    feats = np.asarray(pool3_NxHxWxC)
    n, steps = len(feats), NUM_POOL3_CHANNELS + 1
    if n == 0:
        return 0
    chunk = max(1, min(chunk, n))
    starts = [min(i * chunk, n - chunk) for i in range(-(-n // chunk))]  # as _map_chunks: last block clamped
    if not options.dedupe:
        return len(starts) * chunk * steps
    if options.group:
        feats = feats[np.asarray(alive_groups(jnp.asarray(feats)))]
    alive_NxC = feats.max(axis=(1, 2)) > 0
    distinct = [1 + int(alive_NxC[s:s + chunk].any(axis=0).sum()) for s in starts]
    return sum(chunk * -(-d // batch) * batch for d in distinct)


def count_hits(preds_MxN: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
    """(M,) number of images whose prediction equals its label, per mask."""
    return (np.asarray(preds_MxN) == np.asarray(labels_N)[None, :]).sum(axis=1)
