"""Throughput benchmark of the pruning curve: per-layer rates, plain forward, the sweep variants, a per-step loop.

Timing only, for any :class:`~badnet_jax.models.protocol.PrunableModel` (the lab's DeepID by default). Every
variant is compiled first (compile time reported separately), then timed as the median of ``repeats`` runs
with ``block_until_ready``. The sweep is timed through the public ``rank_and_sweep`` with the images already on
the device (as the defense calls it, predictions copied back to the host included). The per-step loop is the
lab's algorithm written in JAX: mask the pruned layer's channels, run the whole network, once per step.

Per layer, each of the model's stages (``PrunableModel.layer_stages``: DeepID's conv_1..conv_3 with their
pools and its head layers, a graph model's weight ops) runs alone on its real input (``stage_inputs`` of the
benchmark's images), jitted, its output summed so that no large result is written; so do the trunk and the
masked head as wholes. The distance to the hardware is shown against a float32 matmul peak measured on the
same device in the same run. FLOPs (2 per multiply-add) come from the model's layer shapes; where a model
cannot count them (a Flax module's), from XLA's cost analysis of one image, and are said to be.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.model import LAB_NUM_CLASSES
from badnet_jax.models.deepid import DeepID, as_model
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep.chunks import map_chunks
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.sweep import (PLAIN, SweepOptions, SweepPlan, compile_sweep, head_evaluations, plan_sweep,
                              prefix_masks, rank_and_sweep, shared_evaluations, trunk_features)

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

    def check(self) -> None:
        """Refuse what cannot be timed, naming the field.

        Raises:
            ConfigError: a count below 1, or ``layers_only`` with work it would skip (ablation, rankings,
                scaling).
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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name", as lscpu's "Model name"), else what the platform
    says, else "unknown CPU"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model name", "Processor", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_name() -> str:
    """What the benchmark ran on: the CPU model on the CPU backend, else the accelerator's kind and count."""
    devices = jax.devices()
    if jax.default_backend() == "cpu":
        return cpu_model()
    count = f"{len(devices)} x " if len(devices) > 1 else ""
    return f"{count}{devices[0].device_kind}"


def _timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_gflops(n: Optional[int] = None, repeats: int = 5) -> float:
    """float32 (HIGHEST precision) n x n x n matmul rate on the default device, GFLOP/s."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)).lower(a, b).compile()
    f(a, b).block_until_ready()
    return 2 * n**3 / _timed(lambda: f(a, b), repeats) / 1e9


NOISY_PEAK_SPREAD = 0.15
"""A run is flagged as noisy when its matmul peak measurements (before the layers, after them and, for a full
run, at the end) differ by more than this (max / min - 1). On a quiet machine they agree within a few percent;
on a shared one they have been seen 1.5x apart within minutes, and every time and share of the peak moves
with them, so such a run says so rather than report numbers it cannot stand behind."""


def noise_note(peaks_gflops: list[float]) -> Optional[str]:
    """Why a run's numbers are unreliable (its peak measurements too far apart), or None for a steady run."""
    lo, hi = min(peaks_gflops), max(peaks_gflops)
    if hi / lo - 1 <= NOISY_PEAK_SPREAD:
        return None
    return (f"the matmul peak measured {lo:.0f} to {hi:.0f} GFLOP/s in this run ({100 * (hi / lo - 1):.0f}% apart, "
            f"more than {100 * NOISY_PEAK_SPREAD:.0f}%): the machine was busy, so its times and shares of the peak "
            "are unreliable; rerun on a quiet machine")


def _set_peak(out: dict, peaks_gflops: list[float]) -> None:
    """The run's peak (the highest measurement: a busy moment lowers one), each layer's share of it, and the
    noise flag, in ``out``."""
    out["matmul_peak_gflops"], out["matmul_peak_gflops_each"] = max(peaks_gflops), list(peaks_gflops)
    for row in out["layers"]:
        row["peak_share"] = None if row["gflops"] is None else row["gflops"] / out["matmul_peak_gflops"]
    out["noisy"] = noise_note(peaks_gflops)


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
                  head_block: Optional[int] = None) -> list[dict]:
    """Time each of the model's layer stages alone on its real input, then the trunk and the masked head whole.

    Each stage is jitted with its output summed (no large result is written), compiled, run once, then timed
    as the median of ``repeats`` runs. It runs in blocks of images as the sweep runs it: trunk stages
    ``trunk_block`` images at a time, the head's ``head_block`` (None: all images in one call), the input split
    into blocks up front (:func:`_summed_in_blocks`). Its input is what the network computes for these images
    (``model.stage_inputs``); the trunk reads the images (pixels 0..255), the masked head the features and a
    mask keeping every channel (given as an argument: the work of any mask).

    Args:
        model: any model; its stages say the layers and their FLOPs.
        params: the model's params.
        x_NxHxWxC: the images (pixels 0..255).
        repeats: timed runs per layer.
        peak_gflops: the machine's measured matmul peak, for each layer's share of it (None: not shown).

    Returns:
        One row per stage, then ``trunk`` and ``head``: name, part, images, flops_per_image, flops_from
        (``layer shapes``, ``XLA cost analysis`` or None when unknown), compile_s, s, gflops, peak_share.
    """
    x = jnp.asarray(x_NxHxWxC).astype(jnp.float32)
    feats = jax.block_until_ready(model.features(params, x))
    mask = jnp.ones((model.num_channels,), jnp.float32)
    totals = model_flops(model)
    # (name, part, fn, its input, FLOPs per image)
    runs = [("trunk", "trunk", lambda p, v: model.features(p, v), x, totals["trunk"]),
            ("head", "head", lambda p, f, m=mask: model.head(p, f, m), feats, totals["masked_head"])]
    if type(model).layer_stages is not PrunableModel.layer_stages:  # the default's stages are these two
        inputs = jax.block_until_ready(model.stage_inputs(params, x))
        runs = [(s.name, s.part, s.fn, inputs[s.name], s.flops) for s in model.layer_stages()] + runs
    rows = []
    for name, part, fn, v, flops in runs:
        block = trunk_block if part == "trunk" else head_block
        summed = jax.jit(lambda p, a, f=fn, b=block: _summed_in_blocks(lambda c: f(p, c), a, b or len(a)))
        t = time.perf_counter()
        compiled = summed.lower(params, v).compile()
        compile_s = time.perf_counter() - t
        jax.block_until_ready(compiled(params, v))
        seconds = _timed(lambda: compiled(params, v), repeats)
        source = "layer shapes" if flops is not None else None
        if flops is None:
            flops = _xla_flops_per_image(fn, params, v)
            source = "XLA cost analysis" if flops is not None else None
        gflops = None if flops is None else len(v) * flops / seconds / 1e9
        rows.append({"name": name, "part": part, "images": int(len(v)), "flops_per_image": flops,
                     "flops_from": source, "compile_s": compile_s, "s": seconds, "gflops": gflops,
                     "peak_share": None if gflops is None or not peak_gflops else gflops / peak_gflops})
        log.info("%-24s %8.4f s  %s", f"layer {name}", seconds,
                 "GFLOP/s unknown" if gflops is None else f"{gflops:7.1f} GFLOP/s")
    return rows


def _summed_in_blocks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, block: int) -> jax.Array:
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
             f"per layer, {result['layer_images']} images in blocks of {_blocks(result)}, median of "
             f"{result['repeats']} after compile:",
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


def _layer_images(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` images: the first ``n`` of ``x``, repeated when it has fewer."""
    return x[:n] if len(x) >= n else np.concatenate([x] * -(-n // len(x)))[:n]


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
    x_layers = _layer_images(np.asarray(x_clean), config.layer_images)
    out["layer_images"] = len(x_layers)
    blocks = plan_sweep(config.sweep, [], model)  # the blocks the sweep runs the trunk and the head in
    out["layer_blocks"] = {"trunk": blocks.trunk_block, "head": blocks.chunk}
    out["layers"] = layer_timings(model, params, x_layers, config.repeats, trunk_block=blocks.trunk_block,
                                  head_block=blocks.chunk)
    peaks.append(matmul_peak_gflops())
    _set_peak(out, peaks)
    flops = model_flops(model)
    trunk_f, contrib_f, tail = flops["trunk"], flops["channel_contributions"], flops["tail_after_prefix_sums"]
    out["flops_per_image"] = flops
    if config.layers_only:
        trunk_row = next(r for r in out["layers"] if r["name"] == "trunk" and r["part"] == "trunk")
        rate = "?" if trunk_row["gflops"] is None else f"{trunk_row['gflops']:.1f}"
        out["summary"] = (f"trunk {1e3 * trunk_row['s']:.1f} ms for {len(x_layers)} images, {rate} GFLOP/s on "
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
        out[f"{name}_s"] = seconds = _timed(run_fn, config.repeats)
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
        plan = resolve_rankings(RankingOptions(rank_by=config.rankings, random_orders=config.random_orders), params,
                                 model)
        labels = rng.integers(0, n_cls, size=len(x_clean)) if y_clean is None else y_clean
        runs = []
        sweep = lambda: _kept(runs, rank_and_sweep(model, params, sets, fast, rankings=plan, rank_labels=labels))
        orders = sweep().orders  # compiles
        out["rankings"] = {"names": list(plan.names), "orders": len(plan.labels),
                           "s": _timed(lambda: sweep().preds["bd_valid"], config.repeats)}
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
        out.setdefault("scaling_fast_sweep_s", {})[str(d)] = _timed(run, config.repeats)
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


def _flag_noise(out: dict) -> dict:
    if out["noisy"]:
        log.warning("Noisy run: %s.", out["noisy"])
        out["summary"] += f" [NOISY: {out['noisy']}]"
    return out


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
        seconds = _timed(lambda: fn(*args), repeats)
        out[name] = {"s": seconds, "gflops": masks * images * tail_flops(num_classes) / seconds / 1e9,
                     "agree": float((preds == ref).mean())}
        log.info("%-24s %8.4f s  %7.1f GFLOP/s  agree %.4f", name, seconds, out[name]["gflops"], out[name]["agree"])
    return out
