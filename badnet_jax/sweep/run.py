"""The sweep on the host: inputs checked, the plan resolved, the one jitted call compiled, exported or run.

What the call computes is ``badnet_jax.sweep.program``'s. Here sets are passed and returned by name, joined
into the program's blocks and split back (``badnet_jax.sweep.layout``); the ranking set (clean validation data)
alone decides the order, unless the caller gives one. With several devices each block's image axis is padded,
laid out over a 1-D ``data`` mesh and gathered back to the host; then the
flagged predictions and the activation ranking are settled in float64 (``badnet_jax.numerics.settling``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from badnet_jax.errors import ConfigError, arg
from badnet_jax.kernels.native import TARGETS as NATIVE_TARGETS
from badnet_jax.numerics import xla64
from badnet_jax.numerics.settling import settle, settle_ranking
from badnet_jax.numerics.tie_bound import with_measured_tie_rtol
from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep import layout
from badnet_jax.sweep.rankings import RankingPlan, single
from badnet_jax.sweep.plan import SweepOptions, SweepPlan, plan_sweep
from badnet_jax.sweep.program import Images, progress_stages, rank_and_sweep_call, rank_and_sweep_call_sharded
from badnet_jax.sweep.progress import showing
from badnet_jax.sweep.result import Sweep

log = logging.getLogger(__name__)


def data_mesh(devices: int) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``devices`` devices (across hosts too)."""
    return Mesh(np.array(jax.devices()[:devices]), ("data",))


def _images(block: layout.Block, sets: Mapping[str, Images], mesh: Optional[Mesh]) -> jax.Array | jax.ShapeDtypeStruct:
    """A block's images on the device, or over ``mesh``'s ``data`` axis with the image axis zero-padded to a
    multiple of its size (shapes give shapes). Each device's rows are joined for it alone (``layout.join``)."""
    multiple = 1 if mesh is None else mesh.devices.size
    spec = layout.shape(block, sets, multiple)
    sharding = None if mesh is None else NamedSharding(mesh, P("data"))
    if any(isinstance(sets[n], jax.ShapeDtypeStruct) for n in block.names):
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
    if mesh is None:
        arrays = [sets[n] for n in block.names]
        if all(isinstance(a, jax.Array) for a in arrays):  # already on the device: joined there, never round-tripped
            return jnp.asarray(arrays[0]) if len(arrays) == 1 else jnp.concatenate(arrays)
        return jax.device_put(layout.join(block, sets))
    # make_array_from_callback works in multi-process runs too: each process fills its own shards.
    return jax.make_array_from_callback(spec.shape, sharding,
                                        lambda idx: layout.join(block, sets, *idx[0].indices(spec.shape[0])[:2]))


def _to_host(a: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def _ranking_plan(model: PrunableModel, order, rankings: Optional[RankingPlan]) -> RankingPlan:
    if rankings is not None and order is not None:
        raise ConfigError(f"give either {arg('order')} or {arg('rankings')} (a ranking plan), not both",
                          field="rankings")
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
    """The blocks the sets are swept in (``layout.blocks``), the jitted function for this plan, its arguments
    (each block's images, or shapes to compile for) and static arguments."""
    if ranking.needs_ranking_set and rank_on is None:
        raise ConfigError(f"the rankings {', '.join(ranking.names)} need a ranking set ({arg('rank_on')})",
                          field="rank_on")
    blocks = layout.blocks(sets, rank_on)
    n_rank = int(sets[rank_on].shape[0]) if rank_on is not None else 0
    if ranking.anp is not None:
        if rank_labels is None:
            raise ConfigError(f"the anp ranking needs the ranking set's labels ({arg('rank_labels')})",
                              field="rank_labels")
        if not isinstance(rank_labels, jax.ShapeDtypeStruct):
            rank_labels = _checked_labels(rank_labels, model.num_classes)
        if rank_labels.shape != (n_rank,):
            raise ConfigError(f"{arg('rank_labels')}: shape {rank_labels.shape} for {n_rank} ranking images, "
                              f"expected ({n_rank},)", field="rank_labels")
    else:
        rank_labels = np.zeros((0,), np.int32)
    given = ranking.given  # host array: replicated as is in multi-process runs too
    # The input scale goes in as a traced divisor and the near-tie bound as a traced scalar, so one compiled
    # program serves every scale and bound: the defense compiles the sweep before it has measured which scale
    # the model takes (see ``program.trunk_features``) and, for a model other than DeepID, its bound.
    divisor, tie_rtol = np.float32(model.divisor), np.float32(model.tie_rtol)
    model = model.in_program()
    static = dict(n_rank=n_rank, plan=plan, ranking=ranking)
    if plan.devices == 1:
        xs = tuple(_images(b, sets, None) for b in blocks)
        return blocks, rank_and_sweep_call, (model, params, xs, given, divisor, tie_rtol, rank_labels), static
    mesh = data_mesh(plan.devices)
    xs = tuple(_images(b, sets, mesh) for b in blocks)
    sharded_static = {**static, "mesh": mesh}
    args = (model, params, xs, given, divisor, tie_rtol, rank_labels)
    return blocks, rank_and_sweep_call_sharded, args, sharded_static


def _check_inputs(model: PrunableModel, params: Params, sets: Mapping[str, Images], rank_on: Optional[str]) -> None:
    """Refuse, on the host before anything is traced, what the sweep cannot take: params that are not the
    model's or hold NaN or infinite values, no sets, images the model cannot take (shape, dtype, NaN or infinite
    pixels), an empty ranking set.

    Raises:
        ConfigError: the model, params or sets (naming the argument).
        DataFileError: a set's images, naming ``sets[name]``.
    """
    model.check_weights(params)
    if not isinstance(sets, Mapping) or not sets:
        raise ConfigError(f"{arg('sets')}: expected image sets by name (e.g. {{'clean_valid': x_NHWC}}), got "
                          f"{sets!r:.60}", field="sets")
    if rank_on is not None and rank_on not in sets:
        raise ConfigError(f"{arg('rank_on', rank_on)}: no set of that name among the sets "
                          f"({', '.join(map(repr, sets))}); the channels are ranked on it: give the clean "
                          f"validation set under that name or name its set in {arg('rank_on')}, or give "
                          f"{arg('rank_on', None)} with an order of your own (nothing is ranked then)", field="rank_on")
    for name, x in sets.items():
        # The set's key is the field at fault: in the defense's config it names the file the set came from.
        model.check_images(x, f"sets[{name!r}]", allow_empty=name != rank_on, field=name)


def _check_options(options) -> None:
    if not isinstance(options, (SweepOptions, SweepPlan)):
        raise ConfigError(f"{arg('options')}: expected SweepOptions or a SweepPlan, got {type(options).__name__}",
                          field="options")


def _ranking_first(sets: Mapping[str, Images], rank_on: Optional[str]) -> list[str]:
    """The sets' names, the ranking set's first (``rank_on`` checked to be None or one of them): the order the
    plan sizes them in and the results name them in."""
    return ([rank_on] if rank_on is not None else []) + [n for n in sets if n != rank_on]


def _resolve(options: SweepOptions | SweepPlan, sets: Mapping[str, Images], model: PrunableModel,
             rank_on: Optional[str]) -> SweepPlan:
    _check_options(options)
    if isinstance(options, SweepPlan):
        return options
    return plan_sweep(options, [sets[n] for n in _ranking_first(sets, rank_on)], model)


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
                  rank_on: Optional[str] = "clean_valid", rankings: Optional[RankingPlan] = None,
                  float64: bool = True) -> None:
    """Compile :func:`rank_and_sweep` for sets of these shapes and dtypes, ahead of the data.

    The program lands in JAX's cache: a later ``rank_and_sweep`` with the same model, params shapes, set
    names, shapes, dtypes, plan and rankings runs without compiling. The model's input scale and near-tie
    bound go in traced (``PrunableModel.in_program``): the program serves the scale measured later and the
    bound that ``rank_and_sweep`` measures on a model's own images. The defense calls this in a thread while
    the images are still being read. With ``float64`` (the default), :func:`compile_float64` follows; the
    defense runs that as a task of its own, beside this one.
    """
    _, fn, args, static = _abstract_call(model, params, sets, options, order, rank_on, rankings)
    fn.lower(*args, **static).compile()
    if float64:
        compile_float64(model, params, sets, rank_on)


def compile_float64(model: PrunableModel, params: Params, sets: Mapping[str, jax.ShapeDtypeStruct],
                    rank_on: Optional[str] = "clean_valid") -> None:
    """Compile the float64 network that settles a sweep's near-ties, ahead of the data: for each of its call
    sizes (``badnet_jax.numerics.xla64``) and the sets' dtypes, by running it on zeros (``PrunableModel.warm64``:
    the trunk, and the head where it is XLA's; DeepID settles its head on the host, where nothing compiles),
    and the ranking set's float64 channel means, which settle the ranking's near-ties
    (``PrunableModel.warm_means64``, compiled without running). Weights given as shapes only compile nothing."""
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params)):
        return  # weights as shapes only: nothing to run the float64 trunk with
    model = as_model(model)
    for size, dtype in itertools.product(xla64.sizes_on(xla64.float64_device().platform),
                                         {np.dtype(s.dtype) for s in sets.values()}):
        model.warm64(params, np.zeros((size, *model.input_hwc), dtype), model.divisor)
    if rank_on is not None:
        model.warm_means64(params, sets[rank_on])


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
    a native kernel runs where ``badnet_jax.kernels.native.native_library()`` has registered it. Its images are
    the blocks of ``badnet_jax.sweep.layout.blocks``: the ranking set, then the other sets joined per dtype,
    and so are its predictions. Its inputs are the call's: the weights, the blocks, the given orders, the
    divisor of the pixels and the near-tie bound (float32 scalars, ``PrunableModel.divisor`` and ``tie_rtol``;
    the bound of a model other than DeepID as ``numerics.tie_bound`` measures it), and the ranking set's labels.
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
    """Rank the channels on one set and predict every set at every k = 0..C of every order, in one jitted call.

    C is the model's channel count in its pruned layer (the lab's DeepID: 60).

    Args:
        model, params: the BadNet B (a ``PrunableModel``: DeepID, a Keras or IR CNN, a Flax CNN) and its params.
        sets: name -> (N, *model.input_hwc) images, pixels 0..255 (uint8 or float), e.g. ``clean_valid``, ``bd_valid``,
            ``clean_test``, ``bd_test``. Only ``rank_on`` decides data-driven orders; the others are only
            evaluated.
        options: the sweep's options, or an already resolved plan.
        order: a user's own (C,) pruning order; None = the lab's activation ranking on ``rank_on``.
        rank_on: the ranking set's name (None: no ranking on data, ``order`` or data-free rankings only).
        rankings: several rankings at once (``badnet_jax.sweep.rankings.resolve_rankings``), instead of ``order``.
            The trunk pass is shared: each further order costs only its head evaluations.
        rank_labels: the ranking set's labels (needed by the ``anp`` ranking only).

    Returns:
        The orders, mean activations and every set's (R, C + 1, N) predictions, by name.
    """
    model = as_model(model)
    _check_inputs(model, params, sets, rank_on)
    # A model other than the lab's DeepID has its near-tie bound measured on its own images first.
    t = time.perf_counter()
    tie_set = sets[rank_on] if rank_on is not None else next(iter(sets.values()))
    measured = with_measured_tie_rtol(model, params, tie_set)
    spent = {"device": 0.0, "settle": 0.0, "tie_bound": time.perf_counter() - t if measured is not model else 0.0}
    model = measured
    plan = _resolve(options, sets, model, rank_on)
    return _sweep(model, params, sets, plan, _ranking_plan(model, order, rankings), rank_on, rank_labels,
                  spent=spent)


def _sweep(model: PrunableModel, params: Params, sets: Mapping[str, np.ndarray], plan: SweepPlan, ranking: RankingPlan,
           rank_on: Optional[str], rank_labels, spent: dict[str, float],
           settled_mean: Optional[np.ndarray] = None) -> Sweep:
    """:func:`rank_and_sweep` once its plans are resolved; ``spent``: the seconds spent so far (the near-tie
    bound's, and a first run's when the sweep runs again); ``settled_mean``: the float64 means of a sweep run
    again with the float64 activation order (they are not computed twice)."""
    seconds = dict(spent)
    t = time.perf_counter()
    blocks, fn, args, static = _call(model, params, sets, ranking, rank_on, rank_labels, plan)
    with showing(progress_stages(blocks, ranking, plan, ranked=rank_on is not None), plan.progress):
        orders, stats, out = jax.block_until_ready(fn(*args, **static))
    orders = np.asarray(orders)
    # Only a sharded call's outputs are gathered: a multi-process run on one device per process has its own.
    host = _to_host if plan.devices > 1 else np.asarray
    out = {name: o for b, block_out in zip(blocks, out)
           for name, o in layout.split(b, jax.tree.map(host, block_out)).items()}
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
    for name in _ranking_first(sets, rank_on):
        preds[name], settled[name] = settle(model, params, sets[name], orders, *out[name])
    seconds["settle"] += time.perf_counter() - t
    return Sweep(orders=orders, labels=ranking.labels, mean_activation=mean, all_preds=preds, plan=plan,
                 rankings=ranking, settled=settled, ranking_settled=ranking_settled, seconds=seconds)


def predict_steps(model: PrunableModel, params: Params, x: np.ndarray, order,
                  options: SweepOptions | SweepPlan = SweepOptions()) -> np.ndarray:
    """(61, N) predictions of B' at every k of a given order for one set of images, in one call."""
    return rank_and_sweep(model, params, {"x": x}, options, order=order, rank_on=None).preds["x"]
