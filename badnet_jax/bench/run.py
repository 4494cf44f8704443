"""The benchmark run: the layers, the plain forward, the sweep variants and a per-step loop, timed in one go.

Timing only, for any :class:`~badnet_jax.models.protocol.PrunableModel` (the lab's DeepID by default). Every
variant is compiled first (compile time reported separately), then timed as the median of ``repeats`` runs
with ``block_until_ready``. The sweep is timed through the public ``rank_and_sweep`` with the images already on
the device (as the defense calls it, predictions copied back to the host included). The per-step loop is the
lab's algorithm written in JAX: mask the pruned layer's channels, run the whole network, once per step. The
matmul peak is measured before the layers, after them and after the sweeps (``badnet_jax.bench.machine``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.bench.grid import Grid, grid_options, plan_label, time_grid
from badnet_jax.bench.layers import LAYER_IMAGES, layer_images, layer_timings, model_flops, tail_flops
from badnet_jax.bench.machine import cpu_model, machine_name, matmul_peak_gflops, noise_note, timed
from badnet_jax.errors import ConfigError, arg
from badnet_jax.model import LAB_NUM_CLASSES
from badnet_jax.models.deepid import DeepID, as_model
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep.plan import CPU_DEVICES_HINT, check_options
from badnet_jax.sweep.rankings import RankingOptions, RankingPlan, resolve_rankings
from badnet_jax.sweep import (PLAIN, SweepOptions, SweepPlan, compile_sweep, head_evaluations, plan_sweep,
                              prefix_masks, rank_and_sweep, shared_evaluations, trunk_features)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to benchmark.

    Attributes:
        n_clean, n_bd: random images in the clean and poisoned validation sets (lab: 11547 each; ignored for
            the images given).
        num_classes: output size of the random DeepID (lab: ``LAB_NUM_CLASSES``; ignored with a given model).
        sweep: the fast sweep's options (head implementation, batch_steps, chunk).
        per_step_steps: how many of the per-step full forwards to time (the rest are identical work; the total
            is scaled to the model's steps and reported as such). None: every step.
        repeats: timed repetitions (median reported).
        seed: random images and (without params) random weights.
        scaling: device counts to time the fast sweep on (image axis sharded), e.g. (1, 2, 4).
        ablation: also time the shortcuts one by one (prefix sums alone; with dedupe but no grouping).
        input_scale: the model's input scale (``raw`` or ``255``; the timings hardly depend on it). None: the
            model's own.
        rankings: also time the fast sweep with these rankings at once (``badnet_jax.sweep.rankings``), against
            the lab's one, e.g. ("activation", "clp", "l1", "random", "anp").
        random_orders: R of the ``random`` ranking.
        layer_images: images each layer is timed on (the first clean images, repeated if there are fewer).
        layers_only: time the layers only (no forward, sweeps or per-step loop).
        grid: time only the fast sweep, once per combination of these options' values
            (``badnet_jax.bench.grid``; ``sweep`` gives the options not varied), with ``rankings`` too if given.
    """

    n_clean: int = 11547
    n_bd: int = 11547
    num_classes: int = LAB_NUM_CLASSES
    sweep: SweepOptions = SweepOptions()
    per_step_steps: Optional[int] = None
    repeats: int = 3
    seed: int = 0
    scaling: tuple[int, ...] = ()
    ablation: bool = False
    input_scale: Optional[str] = None
    rankings: tuple[str, ...] = ()
    random_orders: int = 1
    layer_images: int = LAYER_IMAGES
    layers_only: bool = False
    grid: Grid = ()

    def check(self) -> None:
        """Refuse what cannot be timed, naming the field.

        Raises:
            ConfigError: a count below 1, ``layers_only`` with work it would skip (ablation, rankings,
                scaling), or ``grid`` with ``layers_only``, ablation, scaling or ``per_step_steps``.
        """
        for name in ("n_clean", "n_bd", "repeats", "layer_images", "per_step_steps", "random_orders"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{arg(name, str(value))}: expected a whole number of at least 1", field=name)
        if self.layers_only:
            for name in ("ablation", "rankings", "scaling"):
                if getattr(self, name):
                    raise ConfigError(f"{arg(name)} is not timed with {arg('layers_only')} (the layers alone); "
                                      f"leave one of them out", field=name)
        if self.grid:
            for name in ("layers_only", "ablation", "scaling", "per_step_steps"):
                if getattr(self, name):
                    raise ConfigError(f"{arg(name)} is not timed with {arg('grid')} (the fast sweep alone); "
                                      f"leave one of them out", field=name)


def run_benchmark(config: BenchConfig, params: Optional[Params] = None, x_clean: Optional[np.ndarray] = None,
                  x_bd: Optional[np.ndarray] = None, y_clean: Optional[np.ndarray] = None,
                  model: Optional[PrunableModel] = None) -> dict:
    """Time the layers, the plain forward, the sweeps and the per-step loop; return a JSON-able dict with a
    summary line.

    Args:
        config: what to time.
        params: the model's params (None: random, ``config.seed``).
        x_clean, x_bd: the images (pixels 0..255 of the model's input shape; None: random uint8 images).
        y_clean: the clean images' labels (the rankings' labels; None: random).
        model: any :class:`PrunableModel` (or a ``BadNet`` module); None: the lab's DeepID with
            ``config.num_classes`` classes.
    """
    config.check()
    bad = [d for d in config.scaling if not 1 <= d <= jax.device_count()]
    if bad:  # the sweep's plan is made for each count below, past the planner's own check of the devices
        raise ConfigError(f"{arg('scaling', ','.join(map(str, config.scaling)))}: {bad[0]} devices, but "
                          f"{jax.device_count()} available (each count from 1 to the devices there are; "
                          f"{CPU_DEVICES_HINT})", field="scaling")
    rng = np.random.default_rng(config.seed)
    model = DeepID(config.num_classes) if model is None else as_model(model)
    if config.input_scale is not None:
        model = model.with_input_scale(config.input_scale)
    params = model.init_params(config.seed) if params is None else params
    n_cls = model.check_params(params)
    if x_clean is None:
        x_clean = rng.integers(0, 256, size=(config.n_clean, *model.input_hwc), dtype=np.uint8)
    if x_bd is None and not config.layers_only:  # the layers are timed on clean images alone
        x_bd = rng.integers(0, 256, size=(config.n_bd, *model.input_hwc), dtype=np.uint8)
    steps = model.steps
    out = {"machine": machine_name(), "cpu_model": cpu_model(), "device": str(jax.devices()[0].device_kind),
           "backend": jax.default_backend(), "jax": jax.__version__, "model": model.describe(),
           "input_scale": model.input_scale, "num_classes": n_cls, "steps": steps, "repeats": config.repeats}
    if not config.layers_only:  # the sets the sweeps run on (the layers' images are counted in layer_images)
        out["n_clean"], out["n_bd"] = len(x_clean), len(x_bd)
    log.info("Benchmark on %s (jax %s, %s): %s", out["machine"], out["jax"], out["backend"], out["model"])
    # The peak measured before and after the layers (and at the end), the highest taken; their spread flags a
    # busy machine.
    peaks = [matmul_peak_gflops()]
    if config.grid:
        return _grid_only(config, model, params, x_clean, x_bd, y_clean, out, peaks)
    x_layers = layer_images(np.asarray(x_clean), config.layer_images)
    blocks = plan_sweep(config.sweep, [], model)  # the blocks and devices the sweep runs the trunk and the head on
    out["layer_blocks"] = {"trunk": blocks.trunk_block, "head": blocks.chunk, "devices": blocks.devices}
    out["layers"] = layer_timings(model, params, x_layers, config.repeats, trunk_block=blocks.trunk_block,
                                  head_block=blocks.chunk, devices=blocks.devices)
    out["layer_images"] = out["layers"][-1]["images"]  # a multiple of the devices
    peaks.append(matmul_peak_gflops())
    _set_peak(out, peaks)
    flops = model_flops(model)
    trunk_f, contrib_f, tail = flops["trunk"], flops["channel_contributions"], flops["tail_after_prefix_sums"]
    out["flops_per_image"] = flops
    if config.layers_only:
        trunk_row = next(r for r in out["layers"] if r["name"] == "trunk" and r["part"] == "trunk")
        rate = "?" if trunk_row["gflops"] is None else f"{trunk_row['gflops']:.1f}"
        out["summary"] = (f"trunk {1e3 * trunk_row['s']:.1f} ms for {out['layer_images']} images, {rate} GFLOP/s on "
                          f"{out['machine']} (matmul peak {out['matmul_peak_gflops']:.1f} GFLOP/s)")
        return _flag_noise(out)

    sets = {"clean_valid": jnp.asarray(x_clean), "bd_valid": jnp.asarray(x_bd)}  # on the device once
    n_img = len(x_clean) + len(x_bd)
    fast = plan_sweep(config.sweep, list(sets.values()), model)
    out.update({"chunk": fast.chunk, "plan": fast.describe(), "impl": fast.impl, "batch_steps": fast.batch_steps})

    def time_compiled(name: str, compile_fn: Callable[[], None], run_fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        compile_fn()
        out[f"{name}_compile_s"] = time.perf_counter() - t
        jax.block_until_ready(run_fn())  # first run: allocations, not compile
        out[f"{name}_s"] = seconds = timed(run_fn, config.repeats)
        log.info("%-24s %8.3f s  (compile %.2f s)", name, seconds, out[f"{name}_compile_s"])
        return seconds

    forward = jax.jit(functools.partial(_predict_all, model, chunk=fast.chunk))
    xc = sets["clean_valid"]
    compiled_forward = []
    t = time_compiled("forward", lambda: compiled_forward.append(forward.lower(params, xc).compile()),
                      lambda: compiled_forward[0](params, xc))
    out["forward_images_per_s"] = len(x_clean) / t

    same = dict(chunk=fast.chunk, devices=fast.devices)
    variants = [("sweep_plain", plan_sweep(dataclasses.replace(PLAIN, **same), [], model))]
    if config.ablation:
        # the scan's strategies, also on a model the planner sweeps cumulatively, and the cumulative one
        variants += [("sweep_prefix_only", plan_sweep(SweepOptions(dedupe=False, group=False, impl=config.sweep.impl,
                                                                   cumulative=False, **same), [], model)),
                     ("sweep_prefix_dedupe", plan_sweep(dataclasses.replace(config.sweep, group=False, cumulative=False,
                                                                            **same), [], model)),
                     ("sweep_cumulative", plan_sweep(SweepOptions(cumulative=True, impl=config.sweep.impl, **same),
                                                     [], model))]
    def split(name: str, runs: list[dict]) -> None:
        # Where each timed run went: the jitted call on the device vs float64 near-ties on the host (medians
        # over the timed runs only: the first ones compiled).
        for part in ("device", "settle"):
            out[f"{name}_{part}_s"] = float(np.median([r[part] for r in runs[-config.repeats:]]))

    for name, plan in variants + [("sweep_fast", fast)]:
        runs = []
        t = time_compiled(name, lambda p=plan: compile_sweep(model, params, sets, p),
                          lambda p=plan, r=runs: _kept(r, rank_and_sweep(model, params, sets, p)).preds["bd_valid"])
        out[f"{name}_mask_images_per_s"] = steps * n_img / t
        split(name, runs)
        log.info("%-24s %8.3f s on the device, %.3f s settling float64 near-ties", "", out[f"{name}_device_s"],
                 out[f"{name}_settle_s"])

    # The work the fast sweep actually does: (image, step) evaluations of the head's tail that dedupe left.
    mean = rank_and_sweep(model, params, sets, fast).mean_activation
    trunk = jax.jit(lambda p, a: trunk_features(model, p, a, fast.chunk))
    feats = [np.asarray(trunk(params, a)) for a in sets.values()]
    evaluations = sum(head_evaluations(f, fast) for f in feats)
    out["per_step_loop_s"] = _per_step_loop(model, params, sets, fast.chunk, config, out)

    if config.rankings:
        plan, labels = _rankings(config, params, model, y_clean, len(x_clean), n_cls, rng)
        runs = []
        sweep = lambda: _kept(runs, rank_and_sweep(model, params, sets, fast, rankings=plan, rank_labels=labels))
        orders = sweep().orders  # compiles
        out["rankings"] = {"names": list(plan.names), "orders": len(plan.labels),
                           "s": timed(lambda: sweep().preds["bd_valid"], config.repeats)}
        split("rankings", runs)
        out["rankings"]["vs_one"] = out["rankings"]["s"] / out["sweep_fast_s"]
        log.info("%-24s %8.3f s  (%d orders, %.2fx one; device %.3f s, float64 near-ties %.3f s)", "sweep, rankings",
                 out["rankings"]["s"], len(plan.labels), out["rankings"]["vs_one"], out["rankings_device_s"],
                 out["rankings_settle_s"])
        if trunk_f is not None and tail is not None:
            out["rankings"].update(_rankings_work(feats, orders, fast, trunk_f, tail))
            log.info("%-24s %8.2fx  at equal FLOP rates (trunk + tail); %.2fx if orders shared every common step; "
                     "2x needs the tail at %.2fx the trunk's FLOP rate", "rankings, FLOP ratio",
                     out["rankings"]["flop_ratio"], out["rankings"]["flop_ratio_shared"],
                     out["rankings"]["tail_rate_vs_trunk_for_2x"])

    for d in config.scaling:
        plan = dataclasses.replace(fast, devices=d)
        run = lambda: rank_and_sweep(model, params, {"clean_valid": x_clean, "bd_valid": x_bd}, plan).preds["bd_valid"]
        run()  # compile
        out.setdefault("scaling_fast_sweep_s", {})[str(d)] = timed(run, config.repeats)
        log.info("%-24s %8.3f s", f"fast sweep, {d} device(s)", out["scaling_fast_sweep_s"][str(d)])

    out["speedup_fast_vs_per_step_loop"] = out["per_step_loop_s"] / out["sweep_fast_s"]
    out["speedup_plain_vs_per_step_loop"] = out["per_step_loop_s"] / out["sweep_plain_s"]
    out["bytes_per_image_input"] = int(np.prod(model.input_hwc)) * np.dtype(x_clean.dtype).itemsize
    out["alive_channels"] = int((mean > 0).sum())  # alive on some clean image (activations are non-negative)
    out["head_evaluations_per_image"] = evaluations / n_img
    peaks.append(matmul_peak_gflops())  # the third: a machine busy during the sweeps shows here
    _set_peak(out, peaks)
    peak = out["matmul_peak_gflops"]
    if None not in (trunk_f, contrib_f, tail):
        # Each evaluated step but the all-pruned one also adds one channel's contribution (1/C of them).
        fast_flops = n_img * trunk_f + evaluations * (tail + contrib_f / model.num_channels)
        out["sweep_plain_gflops"] = n_img * (trunk_f + steps * (contrib_f + tail)) / out["sweep_plain_s"] / 1e9
        out["sweep_fast_gflops"] = fast_flops / out["sweep_fast_s"] / 1e9
        out["min_time_fast_at_peak_s"] = fast_flops / (peak * 1e9)
        rate = (f"{out['sweep_fast_gflops']:.0f} GFLOP/s = "
                f"{100 * out['sweep_fast_gflops'] / peak:.0f}% of the measured matmul peak")
    else:
        rate = f"GFLOP/s unknown (the model does not count its FLOPs; matmul peak {peak:.0f} GFLOP/s)"
    out["summary"] = (f"fast sweep {out['sweep_fast_s']:.3f} s for {steps} steps x {n_img} images "
                      f"({out['speedup_fast_vs_per_step_loop']:.1f}x the per-step loop), {rate}")
    return _flag_noise(out)


def _grid_only(config: BenchConfig, model: PrunableModel, params: Params, x_clean: np.ndarray, x_bd: np.ndarray,
               y_clean: Optional[np.ndarray], out: dict, peaks: list[float]) -> dict:
    """The grid alone (``config.grid``): each combination's fast sweep, the fastest in the summary."""
    sets = {"clean_valid": jnp.asarray(x_clean), "bd_valid": jnp.asarray(x_bd)}  # on the device once
    out["n_clean"], out["n_bd"] = len(x_clean), len(x_bd)
    rankings, labels = None, None
    if config.rankings:
        rankings, labels = _rankings(config, params, model, y_clean, len(x_clean), model.num_classes,
                                      np.random.default_rng(config.seed))
    check_options(config.sweep)  # a bad option given outside the grid is named as given, not as the grid's
    out["grid"] = time_grid(model, params, sets, grid_options(config.sweep, config.grid), config.repeats,
                            rankings, labels)
    peaks.append(matmul_peak_gflops())
    _set_peak(out, peaks)
    rows, best = out["grid"]["rows"], out["grid"]["best"]
    fastest = rows[best["one_order"]["row"]]
    out["summary"] = (f"grid of {len(rows)}: the fastest whole curve {1e3 * fastest['s']:.2f} ms "
                      f"({plan_label(fastest['plan'])})")
    if "rankings" in best:
        r = rows[best["rankings"]["row"]]
        n = len(rankings.labels)
        out["summary"] += (f"; {n} order{'s' if n > 1 else ''} fastest {1e3 * r['rankings_s']:.2f} ms = "
                           f"{r['vs_one']:.2f}x one ({plan_label(r['plan'])})")
    return _flag_noise(out)


def _rankings(config: BenchConfig, params: Params, model: PrunableModel, y_clean: Optional[np.ndarray], n_clean: int,
              num_classes: int, rng: np.random.Generator) -> tuple[RankingPlan, np.ndarray]:
    """``config.rankings`` resolved, and the ranking set's labels (random from ``rng`` where none are given)."""
    plan = resolve_rankings(RankingOptions(rank_by=config.rankings, random_orders=config.random_orders), params, model)
    return plan, (rng.integers(0, num_classes, size=n_clean) if y_clean is None else y_clean)


def _set_peak(out: dict, peaks_gflops: list[float]) -> None:
    """The run's peak (the highest measurement: a busy moment lowers one), each timed layer's share of it, and
    the noise flag, in ``out``."""
    out["matmul_peak_gflops"], out["matmul_peak_gflops_each"] = max(peaks_gflops), list(peaks_gflops)
    for row in out.get("layers", ()):  # a grid times no layers
        row["peak_share"] = None if row["gflops"] is None else row["gflops"] / out["matmul_peak_gflops"]
    out["noisy"] = noise_note(peaks_gflops)


def _flag_noise(out: dict) -> dict:
    if out["noisy"]:
        log.warning("Noisy run: %s.", out["noisy"])
        out["summary"] += f" [NOISY: {out['noisy']}]"
    return out


def _kept(runs: list, sweep):
    """Keep a sweep's time split in ``runs``; return the sweep."""
    runs.append(sweep.seconds)
    return sweep


def _predict_all(model: PrunableModel, params: Params, x: jax.Array, chunk: int,
                 mask: Optional[jax.Array] = None) -> jax.Array:
    # Whole-network argmax over chunks (lax.map over a padded reshape), for the forward and per-step timings.
    pad = (-x.shape[0]) % chunk
    xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    xs = xs.reshape(-1, chunk, *x.shape[1:])
    logits = lambda b: model.head(params, model.features(params, b.astype(jnp.float32)), mask)
    return jnp.argmax(jax.lax.map(logits, xs), -1)


def _rankings_work(feats: list[np.ndarray], orders_RxC: np.ndarray, plan: SweepPlan, trunk_flops: int,
                   tail_flops_: int) -> dict:
    """What several orders cost in FLOPs against one, whatever runs them: the trunk once, and per order the
    tail evaluations ``plan`` does (the same count for every order: it depends on the chunks' alive channels
    only), or at best once per effective mask distinct across all orders if they shared their common steps.
    ANP's optimisation and the channel contributions are left out. ``trunk_flops``, ``tail_flops_``: per image
    (and evaluated mask)."""
    trunk = sum(len(f) for f in feats) * trunk_flops
    per_order = sum(head_evaluations(f, plan) for f in feats)  # batch rounding included: work done
    shared = sum(shared_evaluations(f, orders_RxC, plan) for f in feats)
    tail = per_order * tail_flops_
    return {"tail_evaluations_per_order": per_order, "tail_evaluations_shared": shared,
            "flop_ratio": (trunk + len(orders_RxC) * tail) / (trunk + tail),
            "flop_ratio_shared": (trunk + shared * tail_flops_) / (trunk + tail),
            # R orders within 2x one, (trunk + R t) <= 2 (trunk + t), needs the tail's FLOP rate this many times
            # the trunk's: (R - 2) x tail FLOPs / trunk FLOPs.
            "tail_rate_vs_trunk_for_2x": max(0, len(orders_RxC) - 2) * tail / trunk}


def _per_step_loop(model: PrunableModel, params: Params, sets: dict, chunk: int, config: BenchConfig,
                   out: dict) -> float:
    """The lab's algorithm in JAX: mask the pruned layer's channels, full forward on every set, once per step
    (scaled to every step)."""
    step_fn = jax.jit(lambda p, mask, xs: [_predict_all(model, p, x, chunk, mask) for x in xs])
    steps = model.steps
    masks = prefix_masks(np.arange(model.num_channels))
    xs = list(sets.values())
    t0 = time.perf_counter()
    compiled = step_fn.lower(params, masks[0], xs).compile()
    out["per_step_loop_compile_s"] = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, masks[0], xs))
    k_steps = max(1, min(config.per_step_steps or steps, steps))
    t0 = time.perf_counter()
    for k in range(k_steps):
        jax.block_until_ready(compiled(params, masks[k], xs))
    out["per_step_loop_steps_timed"] = k_steps
    seconds = (time.perf_counter() - t0) / k_steps * steps
    log.info("%-24s %8.3f s  (%d steps timed, scaled to %d)", "per-step loop", seconds, k_steps, steps)
    return seconds


def kernel_timings(masks: int = 8, images: int = 4096, num_classes: int = LAB_NUM_CLASSES,
                   block_ns: tuple[int, ...] = (16, 32, 64), repeats: int = 5, seed: int = 0) -> dict:
    """Time the masked-head tail alone: the JAX reference and the Pallas kernel at each ``block_n``.

    One head call of the accelerator sweep has this shape (``batch_steps`` masks x a chunk of images).
    For tuning the kernel on a device; on CPU the kernel runs in interpret mode (correct, slow), so keep
    the shape small there. Each kernel's agreement with the reference (share of equal predictions; only
    near-ties may differ) is reported beside its time.
    """
    from badnet_jax.kernels.masked_head.api import head_argmax, random_head_inputs, resolve_impl
    from badnet_jax.kernels.masked_head.pallas_kernel import head_argmax_pallas

    args = tuple(jax.device_put(a) for a in random_head_inputs(masks, images, num_classes, seed))
    interpret = resolve_impl("pallas") == "interpret"
    variants = {"reference": jax.jit(lambda *a: head_argmax(*a, impl="reference"))}
    for b in block_ns:
        variants[f"pallas_block_n{b}"] = jax.jit(functools.partial(head_argmax_pallas, block_n=b, interpret=interpret))
    out = {"masks": masks, "images": images, "num_classes": num_classes, "interpret": interpret}
    ref = None
    for name, fn in variants.items():
        preds = np.asarray(jax.block_until_ready(fn(*args)))  # compile + first run
        ref = preds if ref is None else ref
        seconds = timed(lambda: fn(*args), repeats)
        out[name] = {"s": seconds, "gflops": masks * images * tail_flops(num_classes) / seconds / 1e9,
                     "agree": float((preds == ref).mean())}
        log.info("%-24s %8.4f s  %7.1f GFLOP/s  agree %.4f", name, seconds, out[name]["gflops"], out[name]["agree"])
    return out
