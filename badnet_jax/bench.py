"""Throughput benchmark of the pruning curve: plain forward, the sweep variants, and a per-step loop.

Timing only. Every variant is compiled first (compile time reported separately), then timed as the median
of ``repeats`` runs with ``block_until_ready``. The sweep is timed through the public ``rank_and_sweep``
with the images already on the device (as the defense calls it, predictions copied back to the host
included). The per-step loop is the lab's algorithm written in JAX: zero conv_3 channels, run the whole
network, once per step. The distance to the hardware is shown against a float32 matmul peak measured on
the same device in the same run; FLOPs come from the model's layer shapes (``model.multiply_adds``) and its
own class count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.model import (INPUT_HWC, LAB_NUM_CLASSES, NUM_POOL3_CHANNELS, BadNet, Params, init_params,
                               multiply_adds, num_classes_of, prune_params)

from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.sweep import (PLAIN, SweepOptions, SweepPlan, compile_sweep, head_evaluations, plan_sweep,
                              prefix_masks, rank_and_sweep, shared_evaluations, trunk_features)

log = logging.getLogger(__name__)

INPUT_PIXELS = int(np.prod(INPUT_HWC))
STEPS = NUM_POOL3_CHANNELS + 1  # the lab DeepID's curve: k = 0..60
_MACS = multiply_adds(LAB_NUM_CLASSES)  # the layers before the output one do not depend on the class count
# FLOPs (2 per multiply-add) per image of the trunk (input -> pool_3), and of the fc_1 and conv_4
# pre-activations (once per image in the prefix sweep: the per-channel contributions).
TRUNK_FLOPS = 2 * (_MACS["conv_1"] + _MACS["conv_2"] + _MACS["conv_3"])
CONTRIB_FLOPS = 2 * (_MACS["fc_1"] + _MACS["conv_4"])


def tail_flops(num_classes: int) -> int:
    """Per image and mask once fc_1/conv_4 come from prefix sums: fc_2 and the output layer."""
    macs = multiply_adds(num_classes)
    return 2 * (macs["fc_2"] + macs["output"])


def head_flops(num_classes: int) -> int:
    """One masked head per image: fc_1, conv_4, fc_2 and the output layer."""
    return CONTRIB_FLOPS + tail_flops(num_classes)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to benchmark.

    Attributes:
        n_clean, n_bd: images in the clean and poisoned validation sets (lab: 11547 each).
        num_classes: output size of the random model (lab: ``LAB_NUM_CLASSES``; ignored with given params).
        sweep: the fast sweep's options (head implementation, batch_steps, chunk).
        per_step_steps: how many of the 61 per-step full forwards to time (the rest are identical work;
            the total is scaled to 61 and reported as such).
        repeats: timed repetitions (median reported).
        seed: random images and (without params) random weights.
        scaling: device counts to time the fast sweep on (image axis sharded), e.g. (1, 2, 4).
        ablation: also time the shortcuts one by one (prefix sums alone; with dedupe but no grouping).
        input_scale: the model's input scale (``raw`` or ``255``; the timings hardly depend on it).
        rankings: also time the fast sweep with these rankings at once (``badnet_jax.sweep.rankings``), against
            the lab's one, e.g. ("activation", "clp", "l1", "random", "anp").
        random_orders: R of the ``random`` ranking.
    """

    n_clean: int = 11547
    n_bd: int = 11547
    num_classes: int = LAB_NUM_CLASSES
    sweep: SweepOptions = SweepOptions()
    per_step_steps: int = STEPS
    repeats: int = 3
    seed: int = 0
    scaling: tuple[int, ...] = ()
    ablation: bool = False
    input_scale: str = "raw"
    rankings: tuple[str, ...] = ()
    random_orders: int = 1


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


def _kept(runs: list, sweep):
    """Keep a sweep's time split in ``runs``; return the sweep."""
    runs.append(sweep.seconds)
    return sweep


def _predict_all(model: BadNet, params: Params, x: jax.Array, chunk: int) -> jax.Array:
    # Whole-network argmax over chunks (lax.map over a padded reshape), for the forward and per-step timings.
    pad = (-x.shape[0]) % chunk
    xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    xs = xs.reshape(-1, chunk, *x.shape[1:])
    return jnp.argmax(jax.lax.map(lambda b: model.apply({"params": params}, b.astype(jnp.float32)), xs), -1)


def run_benchmark(config: BenchConfig, params: Optional[Params] = None, x_clean: Optional[np.ndarray] = None,
                  x_bd: Optional[np.ndarray] = None, y_clean: Optional[np.ndarray] = None) -> dict:
    """Time the plain forward, the sweeps and the per-step loop; return a JSON-able dict with a summary line."""
    rng = np.random.default_rng(config.seed)
    params = init_params(config.num_classes, seed=config.seed) if params is None else params
    n_cls = num_classes_of(params)
    model = BadNet(n_cls, input_scale=config.input_scale)
    if x_clean is None:
        x_clean = rng.integers(0, 256, size=(config.n_clean, *INPUT_HWC), dtype=np.uint8)
    if x_bd is None:
        x_bd = rng.integers(0, 256, size=(config.n_bd, *INPUT_HWC), dtype=np.uint8)
    sets = {"clean_valid": jnp.asarray(x_clean), "bd_valid": jnp.asarray(x_bd)}  # on the device once
    n_img = len(x_clean) + len(x_bd)
    fast = plan_sweep(config.sweep, list(sets.values()), model)
    out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
           "n_clean": len(x_clean), "n_bd": len(x_bd), "num_classes": n_cls, "steps": STEPS, "chunk": fast.chunk,
           "plan": fast.describe(), "impl": fast.impl, "batch_steps": fast.batch_steps}

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
        variants += [("sweep_prefix_only", plan_sweep(SweepOptions(dedupe=False, group=False, impl=config.sweep.impl,
                                                                   **same), [], model)),
                     ("sweep_prefix_dedupe", plan_sweep(dataclasses.replace(config.sweep, group=False, **same),
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
        out[f"{name}_mask_images_per_s"] = STEPS * n_img / t
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
        out["rankings"].update(_rankings_work(feats, orders, fast, n_cls))
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
    tail = tail_flops(n_cls)
    out["flops_per_image"] = {"trunk": TRUNK_FLOPS, "masked_head": head_flops(n_cls), "tail_after_prefix_sums": tail,
                              "channel_contributions": CONTRIB_FLOPS}
    out["bytes_per_image_input"] = INPUT_PIXELS * np.dtype(x_clean.dtype).itemsize
    out["alive_channels"] = int((mean > 0).sum())  # alive on some clean image (activations are non-negative)
    out["head_evaluations_per_image"] = evaluations / n_img
    # Each evaluated step but the all-pruned one also adds one channel's contribution (1/60 of CONTRIB_FLOPS).
    fast_flops = n_img * TRUNK_FLOPS + evaluations * (tail + CONTRIB_FLOPS / NUM_POOL3_CHANNELS)
    out["sweep_plain_gflops"] = n_img * (TRUNK_FLOPS + STEPS * head_flops(n_cls)) / out["sweep_plain_s"] / 1e9
    out["sweep_fast_gflops"] = fast_flops / out["sweep_fast_s"] / 1e9
    out["matmul_peak_gflops"] = matmul_peak_gflops()
    out["min_time_fast_at_peak_s"] = fast_flops / (out["matmul_peak_gflops"] * 1e9)
    out["summary"] = (f"fast sweep {out['sweep_fast_s']:.3f} s for {STEPS} steps x {n_img} images "
                      f"({out['speedup_fast_vs_per_step_loop']:.1f}x the per-step loop), "
                      f"{out['sweep_fast_gflops']:.0f} GFLOP/s = "
                      f"{100 * out['sweep_fast_gflops'] / out['matmul_peak_gflops']:.0f}% of the measured matmul peak")
    return out


def _rankings_work(feats: list[np.ndarray], orders_RxC: np.ndarray, plan: SweepPlan, num_classes: int) -> dict:
    """What several orders cost in FLOPs against one, whatever runs them: the trunk once, and per order the
    tail evaluations ``plan`` does (the same count for every order: it depends on the chunks' alive channels
    only), or at best once per effective mask distinct across all orders if they shared their common steps.
    ANP's optimisation and the channel contributions are left out."""
    trunk = sum(len(f) for f in feats) * TRUNK_FLOPS
    per_order = sum(head_evaluations(f, plan) for f in feats)  # batch rounding included: work done
    shared = sum(shared_evaluations(f, orders_RxC, plan) for f in feats)
    tail = per_order * tail_flops(num_classes)
    return {"tail_evaluations_per_order": per_order, "tail_evaluations_shared": shared,
            "flop_ratio": (trunk + len(orders_RxC) * tail) / (trunk + tail),
            "flop_ratio_shared": (trunk + shared * tail_flops(num_classes)) / (trunk + tail),
            # R orders within 2x one, (trunk + R t) <= 2 (trunk + t), needs the tail's FLOP rate this many times
            # the trunk's: (R - 2) x tail FLOPs / trunk FLOPs.
            "tail_rate_vs_trunk_for_2x": max(0, len(orders_RxC) - 2) * tail / trunk}


def _per_step_loop(model: BadNet, params: Params, sets: dict, chunk: int, config: BenchConfig, out: dict) -> float:
    """The lab's algorithm in JAX: zero conv_3 channels, full forward on every set, once per step (scaled to 61)."""
    step_fn = jax.jit(lambda p, mask, xs: [_predict_all(model, prune_params(p, mask), x, chunk) for x in xs])
    masks = prefix_masks(np.arange(NUM_POOL3_CHANNELS))
    xs = list(sets.values())
    t0 = time.perf_counter()
    compiled = step_fn.lower(params, masks[0], xs).compile()
    out["per_step_loop_compile_s"] = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, masks[0], xs))
    k_steps = max(1, min(config.per_step_steps, STEPS))
    t0 = time.perf_counter()
    for k in range(k_steps):
        jax.block_until_ready(compiled(params, masks[k], xs))
    out["per_step_loop_steps_timed"] = k_steps
    seconds = (time.perf_counter() - t0) / k_steps * STEPS
    log.info("%-24s %8.3f s  (%d steps timed, scaled to %d)", "per-step loop", seconds, k_steps, STEPS)
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
