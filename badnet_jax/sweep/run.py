"""The sweep as one jitted call: trunk, ranking, every set's predictions at every step; sharding and host I/O.

Pruning the first k channels of the order (k = 0..C) only changes the head's input mask, so every set goes
through the trunk (input -> the pruned layer) once and the head is evaluated at all C + 1 steps inside one jit-compiled
call, in chunks (``badnet_jax.sweep.chunks``) so memory stays bounded. Sets are passed and returned by name;
the ranking set (clean validation data) alone decides the order, unless the caller gives one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from badnet_jax.sweep.anp import anp_order
from badnet_jax.errors import ConfigError, arg
from badnet_jax.kernels.native import TARGETS as NATIVE_TARGETS
from badnet_jax.numerics import xla64
from badnet_jax.numerics.settling import settle, settle_ranking
from badnet_jax.numerics.tie_bound import with_measured_tie_rtol
from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep.rankings import RankingPlan, single
from badnet_jax.sweep.chunks import map_chunks
from badnet_jax.sweep.plan import SweepOptions, SweepPlan, plan_sweep
from badnet_jax.sweep.progress import chunk_hook, showing
from badnet_jax.sweep.result import Sweep
from badnet_jax.sweep.strategies import sweep_images, sweep_set

Images = np.ndarray | jax.ShapeDtypeStruct
log = logging.getLogger(__name__)


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


def _body(model, params, xs, given, divisor, rank_labels, n_rank, plan, ranking, gather=lambda a: a):
    """Trunk and the rankings on ``xs[0]`` (if ``n_rank``), then every set swept at every order, one after the other.

    Returns the orders, the ranking set's statistics (see ``_orders``; None without one), and per set the
    (R, 61, N) predictions and near-tie flags. With ``plan.progress`` set j's trunk chunks report as stage
    2j and its head chunks as stage 2j + 1, ANP's steps as the stage after the last set's (``_stages``).
    """
    hook = (lambda stage: chunk_hook(stage)) if plan.progress else (lambda stage: None)
    if n_rank:
        feats, *margins = trunk_features(model, params, xs[0], plan.trunk_block, divisor, margins=True, on_chunk=hook(0))
    else:
        feats, margins = trunk_features(model, params, xs[0], plan.trunk_block, divisor, on_chunk=hook(0)), None
    orders, stats = _orders(model, params, feats, margins, given, rank_labels, n_rank, ranking, gather,
                            on_step=hook(2 * len(xs)))
    out = [sweep_set(model, params, feats, orders, plan, on_chunk=hook(1))]
    for j, x in enumerate(xs[1:], start=1):
        # One set after the other: left free, XLA:CPU interleaves the sets' loops and runs ~10% slower.
        x, _ = jax.lax.optimization_barrier((x, out[-1]))
        if plan.fuses_trunk:
            out.append(sweep_images(model, params, x, divisor, orders, plan, on_chunk=hook(2 * j + 1)))
            continue
        feats = trunk_features(model, params, x, plan.trunk_block, divisor, on_chunk=hook(2 * j))
        out.append(sweep_set(model, params, feats, orders, plan, on_chunk=hook(2 * j + 1)))
    return orders, stats, tuple(out)


def _stages(names: list[str], sets: Mapping[str, Images], ranking: RankingPlan,
            plan: SweepPlan) -> list[tuple[str, float, str]]:
    """The progress stages of ``_body`` (label, share of the work, unit): per set, its trunk and its heads at every
    order (a set after the first with ``plan.fuses_trunk``: one stage, the second, for both); then ANP's
    optimisation, if asked."""
    orders, stages = len(ranking.labels), []
    for j, name in enumerate(names):
        n = float(sets[name].shape[0])
        heads = f"heads ({orders} orders)" if orders > 1 else "heads"
        if j and plan.fuses_trunk:
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
def _rank_and_sweep(model, params, xs, given, divisor, rank_labels, n_rank, plan, ranking):
    return _body(model, params, xs, given, divisor, rank_labels, n_rank, plan, ranking)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "mesh"))
def _rank_and_sweep_sharded(model, params, xs, given, divisor, rank_labels, n_rank, plan, ranking, mesh):
    """The same as ``_rank_and_sweep`` with the image axis sharded over ``mesh``'s ``data`` axis."""
    body = functools.partial(_body, model, n_rank=n_rank, plan=plan, ranking=ranking,
                             gather=lambda a: jax.lax.all_gather(a, "data", tiled=True))
    data, rep = P("data"), P()
    return jax.shard_map(
        lambda p, xs_, g, d, lab: body(p, xs_, g, d, lab), mesh=mesh,
        in_specs=(rep, tuple(data for _ in xs), rep, rep, rep),
        out_specs=(rep, (rep, rep, rep) if n_rank else None, tuple((P(None, None, "data"),) * 2 for _ in xs)),
        check_vma=False,
    )(params, xs, given, divisor, rank_labels)


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


def _ranking_plan(model: PrunableModel, order, rankings: Optional[RankingPlan]) -> RankingPlan:
    if rankings is not None and order is not None:
        raise ConfigError("give either an order or a ranking plan, not both")
    return rankings if rankings is not None else single(order, model.num_channels, model.layer)


def _checked_labels(labels, num_classes: int) -> np.ndarray:
    """The ranking set's labels as int32, refused unless they are integers in [0, num_classes)."""
    y = np.asarray(labels)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{arg('rank_labels')}: labels of dtype {y.dtype}, expected integer classes",
                          field="rank_labels")
    outside = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(outside):
        raise ConfigError(f"{arg('rank_labels')}: label {int(y.flat[outside[0]])} is outside [0, {num_classes}) for a "
                          f"{num_classes}-class model ({len(outside)} label(s) are)", field="rank_labels")
    return y.astype(np.int32)


def _call(model: PrunableModel, params: Params, sets: Mapping[str, Images], ranking: RankingPlan, rank_on: Optional[str],
          rank_labels, plan: SweepPlan):
    """The jitted function for this plan, its arguments (arrays, or shapes to compile for) and static arguments."""
    if ranking.needs_ranking_set and rank_on is None:
        raise ConfigError(f"the rankings {', '.join(ranking.names)} need a ranking set (rank_on)")
    if rank_on is not None and rank_on not in sets:
        raise ConfigError(f"ranking set {rank_on!r} is not among the sets ({', '.join(sets)})")
    names = ([rank_on] if rank_on else []) + [n for n in sets if n != rank_on]
    n_rank = int(sets[rank_on].shape[0]) if rank_on else 0
    if ranking.anp is not None:
        if rank_labels is None:
            raise ConfigError("the anp ranking needs the ranking set's labels (rank_labels)")
        if not isinstance(rank_labels, jax.ShapeDtypeStruct):
            rank_labels = _checked_labels(rank_labels, model.num_classes)
        if rank_labels.shape != (n_rank,):
            raise ConfigError(f"{arg('rank_labels')}: shape {rank_labels.shape} for {n_rank} ranking images, "
                              f"expected ({n_rank},)", field="rank_labels")
    else:
        rank_labels = np.zeros((0,), np.int32)
    given = ranking.given  # host array: replicated as is in multi-process runs too
    # The input scale goes in as a traced divisor, so one compiled program serves both scales: the defense
    # compiles the sweep before it has measured which scale the model takes (see trunk_features).
    divisor = np.float32(model.divisor)
    model = model.with_input_scale("raw")
    static = dict(n_rank=n_rank, plan=plan, ranking=ranking)
    if plan.devices == 1:
        put = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
        xs = tuple(put(sets[n]) for n in names)
        return names, _rank_and_sweep, (model, params, xs, given, divisor, rank_labels), static
    mesh = data_mesh(plan.devices)
    xs = tuple(_shard_rows(sets[n], mesh) for n in names)
    return names, _rank_and_sweep_sharded, (model, params, xs, given, divisor, rank_labels), {**static, "mesh": mesh}


def _check_inputs(model: PrunableModel, params: Params, sets: Mapping[str, Images], rank_on: Optional[str]) -> None:
    """Refuse, on the host before anything is traced, what the sweep cannot take: params that are not the
    model's, no sets, images the model cannot take (shape, dtype, NaN or infinite pixels), an empty ranking set.

    Raises:
        ConfigError: the model, params or sets (naming the argument).
        DataFileError: a set's images, naming ``sets[name]``.
    """
    model.check_params(params)
    if not isinstance(sets, Mapping) or not sets:
        raise ConfigError(f"{arg('sets')}: expected image sets by name (e.g. {{'clean_valid': x_NHWC}}), got "
                          f"{sets!r:.60}", field="sets")
    for name, x in sets.items():
        # The set's key is the field at fault: in the defense's config it names the file the set came from.
        model.check_images(x, f"sets[{name!r}]", allow_empty=name != rank_on, field=name)


def _check_options(options) -> None:
    if not isinstance(options, (SweepOptions, SweepPlan)):
        raise ConfigError(f"{arg('options')}: expected SweepOptions or a SweepPlan, got {type(options).__name__}",
                          field="options")


def _resolve(options: SweepOptions | SweepPlan, sets: Mapping[str, Images], model: PrunableModel,
             rank_on: Optional[str]) -> SweepPlan:
    _check_options(options)
    if isinstance(options, SweepPlan):
        return options
    ordered = ([sets[rank_on]] if rank_on in sets else []) + [x for n, x in sets.items() if n != rank_on]
    return plan_sweep(options, ordered, model)


def _abstract_call(model: PrunableModel, params: Params, sets: Mapping[str, jax.ShapeDtypeStruct],
                   options: SweepOptions | SweepPlan, order, rank_on: Optional[str],
                   rankings: Optional[RankingPlan], single_device: bool = False, progress: bool = True):
    """:func:`compile_sweep`'s and :func:`export_sweep`'s common start: the plan, and the jitted function, its
    arguments and static arguments for sets given as shapes (the ranking set's labels as a shape too).
    ``progress=False`` leaves the plan's progress callbacks out (an exported program cannot hold them).

    Raises:
        ConfigError: ``single_device`` and a plan over several devices, or what ``_call`` refuses.
    """
    model = as_model(model)
    _check_inputs(model, params, sets, rank_on)
    plan = _resolve(options, sets, model, rank_on)
    if not progress:
        plan = dataclasses.replace(plan, progress=False)
    if single_device and plan.devices != 1:
        raise ConfigError("export_sweep lowers the single-device sweep (devices=1)", field="devices")
    ranking = _ranking_plan(model, order, rankings)
    labels = None
    if ranking.anp is not None and rank_on in sets:
        labels = jax.ShapeDtypeStruct((sets[rank_on].shape[0],), np.int32)
    _, fn, args, static = _call(model, params, sets, ranking, rank_on, labels, plan)
    return plan, fn, args, static


def compile_sweep(model: PrunableModel, params: Params, sets: Mapping[str, jax.ShapeDtypeStruct],
                  options: SweepOptions | SweepPlan = SweepOptions(), order=None,
                  rank_on: Optional[str] = "clean_valid", rankings: Optional[RankingPlan] = None) -> None:
    """Compile :func:`rank_and_sweep` for sets of these shapes and dtypes, ahead of the data.

    The program lands in JAX's cache: a later ``rank_and_sweep`` with the same model, params shapes, set
    names, shapes, dtypes, plan and rankings runs without compiling. The defense calls this in a thread while
    the images are still being read. With concrete weights, the float64 network that settles the near-ties
    compiles here too, for each of its call sizes (``badnet_jax.numerics.xla64``) and the sets' dtypes, by
    running it on zeros (``PrunableModel.warm64``: the trunk, and the head where it is XLA's; DeepID settles
    its head on the host, where nothing compiles).
    """
    _, fn, args, static = _abstract_call(model, params, sets, options, order, rank_on, rankings)
    fn.lower(*args, **static).compile()
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params)):
        return  # weights as shapes only: nothing to run the float64 trunk with
    model = as_model(model)
    for size, dtype in itertools.product(xla64.sizes_on(xla64.float64_device().platform),
                                         {np.dtype(s.dtype) for s in sets.values()}):
        model.warm64(params, np.zeros((size, *model.input_hwc), dtype), model.divisor)


# The kernels' custom calls: the masked head through Triton or Mosaic, the CPU's native kernels.
KERNEL_CALL_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call", *NATIVE_TARGETS)


def export_sweep(model: PrunableModel, params: Params, sets: Mapping[str, jax.ShapeDtypeStruct],
                 options: SweepOptions | SweepPlan, order=None, rank_on: Optional[str] = "clean_valid",
                 rankings: Optional[RankingPlan] = None) -> jax.export.Exported:
    """The one-call sweep lowered for ``options.platform`` with ``jax.export``, without running it.

    This is how the GPU/TPU path is checked on a machine without one: e.g.
    ``export_sweep(model, params, specs, SweepOptions(platform="cuda"))`` lowers exactly what ``prune.py``
    would run on a GPU (one head call per distinct step, 4096-image chunks, XLA's head; with
    ``impl="pallas"`` the Pallas kernel through Triton). The kernel's
    custom calls are allowed in the export (``KERNEL_CALL_TARGETS``); a program exported for a CPU that calls
    a native kernel runs where ``badnet_jax.kernels.native.native_library()`` has registered it.
    """
    plan, fn, (model, *args), static = _abstract_call(model, params, sets, options, order, rank_on, rankings,
                                                      single_device=True, progress=False)
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in KERNEL_CALL_TARGETS]
    lowered = jax.jit(lambda *arrays: fn(model, *arrays, **static))
    return jax.export.export(lowered, platforms=[plan.platform], disabled_checks=checks)(*args)


def rank_and_sweep(model: PrunableModel, params: Params, sets: Mapping[str, np.ndarray],
                   options: SweepOptions | SweepPlan = SweepOptions(), order=None,
                   rank_on: Optional[str] = "clean_valid", rankings: Optional[RankingPlan] = None,
                   rank_labels: Optional[np.ndarray] = None) -> Sweep:
    """Rank the channels on one set and predict every set at every k = 0..60 of every order, in one jitted call.

    Args:
        model, params: the BadNet B.
        sets: name -> (N, 55, 47, 3) images (uint8 or float32), e.g. ``clean_valid``, ``bd_valid``,
            ``clean_test``, ``bd_test``. Only ``rank_on`` decides data-driven orders; the others are only
            evaluated.
        options: the sweep's options, or an already resolved plan.
        order: a user's own (60,) pruning order; None = the lab's activation ranking on ``rank_on``.
        rank_on: the ranking set's name (None: no ranking on data, ``order`` or data-free rankings only).
        rankings: several rankings at once (``badnet_jax.sweep.rankings.resolve_rankings``), instead of ``order``.
            The trunk pass is shared: each further order costs only its head evaluations.
        rank_labels: the ranking set's labels (needed by the ``anp`` ranking only).

    Returns:
        The orders, mean activations and every set's (R, 61, N) predictions, by name.
    """
    model = as_model(model)
    _check_inputs(model, params, sets, rank_on)
    # A model other than the lab's DeepID has its near-tie bound measured on its own images first.
    model = with_measured_tie_rtol(model, params, sets[rank_on] if rank_on else next(iter(sets.values())))
    plan = _resolve(options, sets, model, rank_on)
    return _sweep(model, params, sets, plan, _ranking_plan(model, order, rankings), rank_on, rank_labels)


def _sweep(model: PrunableModel, params: Params, sets: Mapping[str, np.ndarray], plan: SweepPlan, ranking: RankingPlan,
           rank_on: Optional[str], rank_labels, settled_mean: Optional[np.ndarray] = None,
           spent: Optional[dict[str, float]] = None) -> Sweep:
    """:func:`rank_and_sweep` once its plans are resolved; ``settled_mean``: the float64 means of a sweep run
    again with the float64 activation order (they are not computed twice); ``spent``: its first run's seconds."""
    seconds = dict(spent or {"device": 0.0, "settle": 0.0})
    t = time.perf_counter()
    names, fn, args, static = _call(model, params, sets, ranking, rank_on, rank_labels, plan)
    with showing(_stages(names, sets, ranking, plan), plan.progress):
        orders, stats, out = jax.block_until_ready(fn(*args, **static))
    if plan.devices > 1:
        out = tuple(jax.tree.map(lambda a, n=n: _to_host(a)[:, :, :len(sets[n])], o) for o, n in zip(out, names))
    orders, out = np.asarray(orders), jax.tree.map(np.asarray, out)
    seconds["device"] += time.perf_counter() - t
    t = time.perf_counter()
    mean, ranking_settled = settled_mean, settled_mean is not None
    if stats is not None and settled_mean is None:
        sums, margin, scale = (np.asarray(a) for a in stats)
        order64, mean, ranking_settled = settle_ranking(model, params, sets[rank_on], sums, margin, scale)
        if "activation" in ranking.sources and not np.array_equal(order64, orders[ranking.labels.index("activation")]):
            # float32 ranked two channels the other way round from float64: sweep again with the float64 order.
            log.info("The activation ranking differs from float64 at a near-tie; sweeping again with the float64 order.")
            seconds["settle"] += time.perf_counter() - t
            return _sweep(model, params, sets, plan, ranking.with_given("activation", order64), rank_on, rank_labels,
                          settled_mean=mean, spent=seconds)
    preds, settled = {}, {}
    for name, (p, near) in zip(names, out):
        preds[name], settled[name] = settle(model, params, sets[name], orders, p, near)
    seconds["settle"] += time.perf_counter() - t
    return Sweep(orders=orders, labels=ranking.labels, mean_activation=mean, all_preds=preds, plan=plan,
                 rankings=ranking, settled=settled, ranking_settled=ranking_settled, seconds=seconds)


def predict_steps(model: PrunableModel, params: Params, x: np.ndarray, order,
                  options: SweepOptions | SweepPlan = SweepOptions()) -> np.ndarray:
    """(61, N) predictions of B' at every k of a given order for one set of images, in one call."""
    return rank_and_sweep(model, params, {"x": x}, options, order=order, rank_on=None).preds["x"]
