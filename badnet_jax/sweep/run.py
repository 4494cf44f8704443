"""The sweep as one jitted call: trunk, ranking, every set's 61-step predictions; sharding and host I/O.

Pruning the first k channels of the order (k = 0..60) only changes the head's input mask, so every set goes
through the trunk (input -> pool_3) once and the head is evaluated at all 61 steps inside one jit-compiled
call, in chunks (``badnet_jax.sweep.chunks``) so memory stays bounded. Sets are passed and returned by name;
the ranking set (clean validation data) alone decides the order, unless the caller gives one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from badnet_jax.errors import ConfigError
from badnet_jax.model import NUM_POOL3_CHANNELS, POOL3_HWC, BadNet, Params, num_classes_of
from badnet_jax.sweep.chunks import map_chunks
from badnet_jax.sweep.plan import SweepOptions, SweepPlan, plan_sweep
from badnet_jax.sweep.prefix import prefix_masks
from badnet_jax.sweep.strategies import sweep_set

Images = np.ndarray | jax.ShapeDtypeStruct


def trunk_features(model: BadNet, params: Params, x_NxHxWxC: jax.Array, chunk: int,
                   divisor: Optional[jax.Array] = None) -> jax.Array:
    """pool_3 activations of every image, ``chunk`` images at a time (traceable; call under jit).

    ``divisor``: None applies the model's own input scale; a traced scalar (1 or 255) divides the pixels
    before a raw-scale trunk instead, so that one compiled program serves both scales (``x / 1`` is ``x``
    exactly and ``x / 255`` is what the model's trunk computes: the results are the same bits).
    """
    # Images may stay uint8 (the lab's files are): the cast to float32 is exact and happens per chunk, so
    # the resident data is a quarter of the float32 size.
    if divisor is None:
        trunk = lambda xb: model.apply({"params": params}, xb.astype(jnp.float32), method=BadNet.trunk)
    else:
        raw = model.clone(input_scale="raw")
        trunk = lambda xb: raw.apply({"params": params}, xb.astype(jnp.float32) / divisor, method=BadNet.trunk)
    return map_chunks(trunk, jnp.asarray(x_NxHxWxC), chunk, rows_axis=0)


def activation_ranking(per_image_NxC: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The lab's ranking: channels by increasing mean pool_3 activation over the first ``n`` images.

    Takes per-image channel sums, so single- and multi-device runs reduce the same (n, 60) array the same
    way and rank identically. Sums of non-negative values keep exact zeros, so dead channels tie at 0 and
    the stable sort breaks ties by channel index.
    """
    per_image_NxC = jax.lax.optimization_barrier(per_image_NxC)  # keeps XLA from fusing the two reductions
    mean = jnp.sum(per_image_NxC[:n], axis=0) / (n * POOL3_HWC[0] * POOL3_HWC[1])
    return jnp.argsort(mean, stable=True), mean


def _body(model, params, xs, order, divisor, n_rank, plan, gather=lambda a: a):
    """Trunk and ranking on ``xs[0]`` (if ``n_rank``), then every set swept, one after the other."""
    feats = trunk_features(model, params, xs[0], plan.chunk, divisor)
    mean = None
    if n_rank:
        ranked, mean = activation_ranking(gather(jnp.sum(feats, axis=(1, 2))), n_rank)
        order = ranked if order is None else order
    preds = [sweep_set(model, params, feats, order, plan)]
    for x in xs[1:]:
        # One set after the other: left free, XLA:CPU interleaves the sets' loops and runs ~10% slower.
        x, _ = jax.lax.optimization_barrier((x, preds[-1]))
        preds.append(sweep_set(model, params, trunk_features(model, params, x, plan.chunk, divisor), order, plan))
    return order, mean, tuple(preds)


@functools.partial(jax.jit, static_argnames=("model", "n_rank", "plan"))
def _rank_and_sweep(model, params, xs, order, divisor, n_rank, plan):
    return _body(model, params, xs, order, divisor, n_rank, plan)


@functools.partial(jax.jit, static_argnames=("model", "n_rank", "plan", "mesh"))
def _rank_and_sweep_sharded(model, params, xs, order, divisor, n_rank, plan, mesh):
    """The same as ``_rank_and_sweep`` with the image axis sharded over ``mesh``'s ``data`` axis."""
    body = functools.partial(_body, model, n_rank=n_rank, plan=plan,
                             gather=lambda a: jax.lax.all_gather(a, "data", tiled=True))
    data, rep = P("data"), P()
    return jax.shard_map(
        lambda p, xs_, o, d: body(p, xs_, o, d), mesh=mesh,
        in_specs=(rep, tuple(data for _ in xs), rep, rep),
        out_specs=(rep, rep if n_rank else None, tuple(P(None, "data") for _ in xs)),
        check_vma=False,
    )(params, xs, order, divisor)


def data_mesh(devices: int) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``devices`` devices (across hosts too)."""
    return Mesh(np.array(jax.devices()[:devices]), ("data",))


def _shard_rows(x: Images, mesh: Mesh) -> jax.Array | jax.ShapeDtypeStruct:
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


def _order_array(order) -> Optional[np.ndarray]:
    if order is None:
        return None
    o = np.asarray(order)
    if o.shape != (NUM_POOL3_CHANNELS,) or sorted(o.tolist()) != list(range(NUM_POOL3_CHANNELS)):
        raise ConfigError(f"an order must be a permutation of the {NUM_POOL3_CHANNELS} pool_3 channels, "
                          f"got shape {o.shape}")
    return o.astype(np.int32)  # host array: replicated as is in multi-process runs too


def _call(model: BadNet, params: Params, sets: Mapping[str, Images], order, rank_on: Optional[str],
          plan: SweepPlan):
    """The jitted function for this plan and its arguments (arrays, or shapes to compile for)."""
    if rank_on is None and order is None:
        raise ConfigError("give an order or a ranking set (rank_on)")
    if rank_on is not None and rank_on not in sets:
        raise ConfigError(f"ranking set {rank_on!r} is not among the sets ({', '.join(sets)})")
    names = ([rank_on] if rank_on else []) + [n for n in sets if n != rank_on]
    n_rank = int(sets[rank_on].shape[0]) if rank_on else 0
    order = _order_array(order)
    # The input scale goes in as a traced divisor, so one compiled program serves both scales: the defense
    # compiles the sweep before it has measured which scale the model takes (see trunk_features).
    divisor = np.float32(255.0 if model.input_scale == "255" else 1.0)
    model = model.clone(input_scale="raw")
    if plan.devices == 1:
        put = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
        xs = tuple(put(sets[n]) for n in names)
        return names, _rank_and_sweep, (model, params, xs, order, divisor, n_rank, plan)
    mesh = data_mesh(plan.devices)
    xs = tuple(_shard_rows(sets[n], mesh) for n in names)
    return names, _rank_and_sweep_sharded, (model, params, xs, order, divisor, n_rank, plan, mesh)


def _resolve(options: SweepOptions | SweepPlan, sets: Mapping[str, Images], params: Params,
             rank_on: Optional[str]) -> SweepPlan:
    if isinstance(options, SweepPlan):
        return options
    ordered = ([sets[rank_on]] if rank_on in sets else []) + [x for n, x in sets.items() if n != rank_on]
    return plan_sweep(options, ordered, num_classes_of(params))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Result of :func:`rank_and_sweep`.

    Attributes:
        order: (60,) channels in pruning order (the given order, or increasing mean activation with ties by
            channel index).
        mean_activation: (60,) mean pool_3 activation per channel over the ranking set (None without one).
        masks: (61, 60) prefix masks; row k prunes ``order[:k]``.
        preds: set name -> (61, N) int32 predictions of B' for each k.
        plan: the plan the sweep ran with.
    """

    order: np.ndarray
    mean_activation: Optional[np.ndarray]
    masks: np.ndarray
    preds: dict[str, np.ndarray]
    plan: SweepPlan


def compile_sweep(model: BadNet, params: Params, sets: Mapping[str, jax.ShapeDtypeStruct],
                  options: SweepOptions | SweepPlan = SweepOptions(), order=None,
                  rank_on: Optional[str] = "clean_valid") -> None:
    """Compile :func:`rank_and_sweep` for sets of these shapes and dtypes, ahead of the data.

    The program lands in JAX's cache: a later ``rank_and_sweep`` with the same model, params shapes, set
    names, shapes, dtypes and plan runs without compiling. The defense calls this in a thread while the
    images are still being read.
    """
    plan = _resolve(options, sets, params, rank_on)
    _, fn, args = _call(model, params, sets, order, rank_on, plan)
    fn.lower(*args).compile()


KERNEL_CALL_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


def export_sweep(model: BadNet, params: Params, sets: Mapping[str, jax.ShapeDtypeStruct],
                 options: SweepOptions | SweepPlan, order=None,
                 rank_on: Optional[str] = "clean_valid") -> jax.export.Exported:
    """The one-call sweep lowered for ``options.platform`` with ``jax.export``, without running it.

    This is how the GPU/TPU path is checked on a machine without one: e.g.
    ``export_sweep(model, params, specs, SweepOptions(platform="cuda"))`` lowers exactly what ``prune.py``
    would run on a GPU (batched steps, 4096-image chunks, the Pallas kernel through Triton). The kernel's
    custom calls are allowed in the export (``KERNEL_CALL_TARGETS``).
    """
    plan = _resolve(options, sets, params, rank_on)
    if plan.devices != 1:
        raise ConfigError("export_sweep lowers the single-device sweep (devices=1)")
    _, fn, (model, params, xs, order, divisor, n_rank, plan) = _call(model, params, sets, order, rank_on, plan)
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in KERNEL_CALL_TARGETS]
    lowered = jax.jit(lambda p, xs_, o, d: fn(model, p, xs_, o, d, n_rank, plan))
    return jax.export.export(lowered, platforms=[plan.platform], disabled_checks=checks)(params, xs, order, divisor)


def rank_and_sweep(model: BadNet, params: Params, sets: Mapping[str, np.ndarray],
                   options: SweepOptions | SweepPlan = SweepOptions(), order=None,
                   rank_on: Optional[str] = "clean_valid") -> Sweep:
    """Rank the channels on one set and predict every set at every k = 0..60, in one jitted call.

    Args:
        model, params: the BadNet B.
        sets: name -> (N, 55, 47, 3) images (uint8 or float32), e.g. ``clean_valid``, ``bd_valid``,
            ``clean_test``, ``bd_test``. Only ``rank_on`` decides the order; the others are only evaluated.
        options: the sweep's options, or an already resolved plan.
        order: a user's own (60,) pruning order; None = the lab's activation ranking on ``rank_on``.
        rank_on: the ranking set's name (None: no ranking, ``order`` required).

    Returns:
        The order, mean activations, masks and every set's (61, N) predictions, by name.
    """
    plan = _resolve(options, sets, params, rank_on)
    names, fn, args = _call(model, params, sets, order, rank_on, plan)
    order_out, mean, preds = fn(*args)
    if plan.devices > 1:
        preds = tuple(_to_host(p)[:, :len(sets[n])] for p, n in zip(preds, names))
    order_out = np.asarray(order_out)
    return Sweep(order=order_out, mean_activation=None if mean is None else np.asarray(mean),
                 masks=prefix_masks(order_out), preds={n: np.asarray(p) for n, p in zip(names, preds)}, plan=plan)


def predict_steps(model: BadNet, params: Params, x: np.ndarray, order,
                  options: SweepOptions | SweepPlan = SweepOptions()) -> np.ndarray:
    """(61, N) predictions of B' at every k of a given order for one set of images, in one call."""
    return rank_and_sweep(model, params, {"x": x}, options, order=order, rank_on=None).preds["x"]
