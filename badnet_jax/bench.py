"""Throughput benchmark of the pruning curve: plain forward, fused sweep, and the lab's per-step baseline.

Everything is timed after an explicit ahead-of-time compile (reported separately), as the median of
``repeats`` runs, with ``block_until_ready``. The distance to the hardware is shown against a float32
matmul peak measured on the same device in the same run.
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

from badnet_jax.model import BadNet, Params, init_params, prune_params
from badnet_jax.sweep import (PLAIN, SweepOptions, _rank_and_sweep, default_chunk, head_evaluations, prefix_masks,
                              rank_and_sweep, resolve_options, trunk_features)

log = logging.getLogger(__name__)

# Multiply-adds x 2 per image, from the architecture (VALID convs, 55x47x3 input).
TRUNK_FLOPS = 2 * (52 * 44 * 20 * 4 * 4 * 3 + 24 * 20 * 40 * 3 * 3 * 20 + 10 * 8 * 60 * 3 * 3 * 40)
HEAD_FLOPS = 2 * (1200 * 160 + 4 * 3 * 80 * 2 * 2 * 60 + 960 * 160 + 160 * 1283)  # one masked head, 1283 classes
TAIL_FLOPS = 2 * (960 * 160 + 160 * 1283)  # per image and mask once fc_1/conv_4 come from prefix sums
CONTRIB_FLOPS = 2 * (1200 * 160 + 4 * 3 * 80 * 2 * 2 * 60)  # per-channel contributions, once per image
INPUT_PIXELS = 55 * 47 * 3


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to benchmark.

    Attributes:
        n_clean, n_bd: images in the clean and poisoned validation sets (lab: 11547 each).
        num_classes: output size (lab: 1283).
        chunk: images per chunk in the sweep (None: 256 on CPU, 4096 on GPU/TPU).
        impl: masked-head implementation for the fast sweep (``auto``/``reference``/``pallas``).
        baseline_steps: how many of the 61 per-step full forwards to time (the rest are identical work;
            the total is scaled to 61 and reported as such).
        repeats: timed repetitions (median reported).
        seed: random images and (without ``params``) random weights.
        scaling: device counts to time the fast sweep on (image axis sharded), e.g. (1, 2, 4).
        ablation: also time the shortcuts one by one (prefix sums alone; with dedupe but no grouping).
        batch_steps: the fast sweep's ``SweepOptions.batch_steps`` (None: by platform).
    """

    n_clean: int = 11547
    n_bd: int = 11547
    num_classes: int = 1283
    chunk: Optional[int] = None
    impl: str = "auto"
    baseline_steps: int = 61
    repeats: int = 3
    seed: int = 0
    scaling: tuple[int, ...] = ()
    ablation: bool = False
    batch_steps: Optional[int] = None


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


def run_benchmark(config: BenchConfig, params: Optional[Params] = None, x_clean: Optional[np.ndarray] = None,
                  x_bd: Optional[np.ndarray] = None) -> dict:
    """Time the plain forward, the plain and fast sweeps and the per-step baseline; return a JSON-able dict."""
    rng = np.random.default_rng(config.seed)
    if params is None:
        params = init_params(config.num_classes, seed=config.seed)
    num_classes = int(params["output"]["bias"].shape[0])
    model = BadNet(num_classes)
    if x_clean is None:
        x_clean = rng.integers(0, 256, size=(config.n_clean, 55, 47, 3), dtype=np.uint8)
    if x_bd is None:
        x_bd = rng.integers(0, 256, size=(config.n_bd, 55, 47, 3), dtype=np.uint8)
    xc, xb = jnp.asarray(x_clean), jnp.asarray(x_bd)
    n_img = len(x_clean) + len(x_bd)
    steps = 61
    out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
           "jax": jax.__version__, "n_clean": len(x_clean), "n_bd": len(x_bd), "num_classes": num_classes,
           "steps": steps}

    def compile_and_time(name, fn, *args):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        out[f"{name}_compile_s"] = time.perf_counter() - t
        jax.block_until_ready(compiled(*args))  # first run: allocations, not compile
        seconds = _timed(lambda: compiled(*args), config.repeats)
        out[f"{name}_s"] = seconds
        log.info("%-22s %8.3f s  (compile %.2f s)", name, seconds, out[f"{name}_compile_s"])
        return seconds

    chunk = config.chunk or default_chunk()
    out["chunk"] = chunk
    forward = jax.jit(lambda p, x: jnp.argmax(jax.lax.map(
        lambda xb_: model.apply({"params": p}, xb_.astype(jnp.float32)), _chunked(x, chunk)), -1))
    t = compile_and_time("forward", forward, params, xc)
    out["forward_images_per_s"] = len(x_clean) / t

    fast = resolve_options(SweepOptions(impl=config.impl, batch_steps=config.batch_steps))
    variants = [("sweep_plain", PLAIN)]
    if config.ablation:
        variants += [("sweep_prefix_only", dataclasses.replace(fast, dedupe=False, group=False)),
                     ("sweep_prefix_dedupe", dataclasses.replace(fast, group=False))]
    for name, options in variants + [("sweep_fast", fast)]:
        fn = jax.jit(lambda p, a, b, o=options: _rank_and_sweep(model, p, a, (b,), chunk, o))
        t = compile_and_time(name, fn, params, xc, xb)
        out[f"{name}_mask_images_per_s"] = steps * n_img / t
    out["impl"], out["batch_steps"] = fast.impl, fast.batch_steps
    # The work the fast sweep actually does: (image, step) evaluations of the head's tail that dedupe left.
    order, mean = (np.asarray(a) for a in fn(params, xc, xb)[:2])
    trunk = jax.jit(lambda p, a: trunk_features(model, p, a, chunk))
    evaluations = sum(head_evaluations(np.asarray(trunk(params, a)), chunk, fast) for a in (xc, xb))
    alive = int((mean > 0).sum())  # channels alive on some clean image (activations are non-negative)

    # The lab's loop: zero conv_3 channels, run the whole network on every image, once per step.
    def one_step(p, mask, a, b):
        q = prune_params(p, mask)
        pred = lambda x: jnp.argmax(jax.lax.map(lambda xb_: model.apply({"params": q}, xb_),
                                                _chunked(x, chunk)), -1)
        return pred(a), pred(b)

    step_fn = jax.jit(one_step)
    masks = prefix_masks(jnp.arange(60))
    t0 = time.perf_counter()
    compiled = step_fn.lower(params, masks[0], xc, xb).compile()
    out["baseline_compile_s"] = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, masks[0], xc, xb))
    k_steps = max(1, min(config.baseline_steps, steps))
    t0 = time.perf_counter()
    for k in range(k_steps):
        jax.block_until_ready(compiled(params, masks[k], xc, xb))
    per_step = (time.perf_counter() - t0) / k_steps
    out["baseline_steps_timed"] = k_steps
    out["baseline_s"] = per_step * steps
    log.info("%-22s %8.3f s  (%d steps timed, scaled to %d)", "baseline (per step)", out["baseline_s"], k_steps, steps)

    for d in config.scaling:
        run = lambda: rank_and_sweep(model, params, x_clean, x_bd, chunk=chunk, options=fast,
                                     devices=d).preds_bd
        run()  # compile
        out.setdefault("scaling_fast_sweep_s", {})[str(d)] = _timed(run, config.repeats)
        log.info("%-22s %8.3f s", f"fast sweep, {d} device(s)", out["scaling_fast_sweep_s"][str(d)])
    out["speedup_fast_vs_baseline"] = out["baseline_s"] / out["sweep_fast_s"]
    out["speedup_plain_vs_baseline"] = out["baseline_s"] / out["sweep_plain_s"]
    out["flops_per_image"] = {"trunk": TRUNK_FLOPS, "masked_head": HEAD_FLOPS, "tail_after_prefix_sums": TAIL_FLOPS,
                              "channel_contributions": CONTRIB_FLOPS}
    out["bytes_per_image_input"] = INPUT_PIXELS * np.dtype(x_clean.dtype).itemsize  # uint8 as the lab stores them
    plain_flops = n_img * (TRUNK_FLOPS + steps * HEAD_FLOPS)
    out["alive_channels"] = alive
    out["head_evaluations_per_image"] = evaluations / n_img
    # Each evaluated step but the all-pruned one also adds one channel's contribution (1/60 of CONTRIB_FLOPS).
    fast_flops = n_img * TRUNK_FLOPS + evaluations * (TAIL_FLOPS + CONTRIB_FLOPS / 60)
    out["sweep_plain_gflops"] = plain_flops / out["sweep_plain_s"] / 1e9
    out["sweep_fast_gflops"] = fast_flops / out["sweep_fast_s"] / 1e9
    out["matmul_peak_gflops"] = matmul_peak_gflops()
    out["min_time_fast_at_peak_s"] = fast_flops / (out["matmul_peak_gflops"] * 1e9)
    return out


def kernel_timings(masks: int = 8, images: int = 4096, num_classes: int = 1283,
                   block_ns: tuple[int, ...] = (16, 32, 64), repeats: int = 5, seed: int = 0) -> dict:
    """Time the masked-head tail alone: the JAX reference and the Pallas kernel at each ``block_n``.

    One head call of the accelerator sweep has this shape (``batch_steps`` masks x a chunk of images).
    For tuning the kernel on a device; on CPU the kernel runs in interpret mode (correct, slow), so keep
    the shape small there. Each kernel's agreement with the reference (share of equal predictions; only
    near-ties may differ) is reported beside its time.
    """
    from kernels.masked_head.api import head_argmax, resolve_impl
    from kernels.masked_head.pallas_kernel import head_argmax_pallas

    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    args = (jax.random.normal(k[0], (masks, images, 160)) * 3, jax.random.normal(k[1], (masks, images, 960)) * 3,
            jax.random.normal(k[2], (960, 160)) * 0.05, jax.random.normal(k[3], (160,)),
            jax.random.normal(k[4], (160, num_classes)) * 0.1, jax.random.normal(k[5], (num_classes,)))
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
        out[name] = {"s": seconds, "gflops": masks * images * TAIL_FLOPS / seconds / 1e9,
                     "agree": float((preds == ref).mean())}
        log.info("%-22s %8.4f s  %7.1f GFLOP/s  agree %.4f", name, seconds, out[name]["gflops"], out[name]["agree"])
    return out


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    n = x.shape[0]
    pad = (-n) % chunk
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    return x.reshape(-1, chunk, *x.shape[1:])


def write_standin_lab_data(assets: str, out_dir: str, scale: int = 1, noise: float = 3.0, seed: int = 0,
                           base_sizes: tuple[int, int] = (11547, 12830)) -> dict:
    """Lab-layout stand-in files at ``scale`` x the lab's sizes (11547 valid, 12830 test), for timing.

    Made from the real lab faces in ``assets`` (valid_subset + test_subset) drawn with replacement, +-noise
    Gaussian pixel noise, and poisoned with the real trigger; ``out_dir`` gets the lab's layout
    (data/cl/{valid,test}.h5, data/bd/bd_{valid,test}.h5). Written in blocks, so memory stays small.
    """
    from pathlib import Path

    import h5py

    from badnet_jax.data import load_lab_h5, load_trigger, poison

    a = Path(assets)
    faces = [load_lab_h5(a / "faces/lab3" / f"{n}.h5") for n in ("valid_subset", "test_subset")]
    x, y = np.concatenate([f[0] for f in faces]), np.concatenate([f[1] for f in faces])
    trigger = load_trigger(a / "triggers/sun_glass_trigger.png")
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("valid", base_sizes[0] * scale), ("test", base_sizes[1] * scale)):
        paths = (Path(out_dir) / "data/cl" / f"{name}.h5", Path(out_dir) / "data/bd" / f"bd_{name}.h5")
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(paths[0], "w") as fc, h5py.File(paths[1], "w") as fb:
            for f in (fc, fb):
                f.create_dataset("data", shape=(n, 3, 55, 47), dtype=np.uint8, chunks=(min(n, 256), 3, 55, 47))
                f.create_dataset("label", shape=(n,), dtype=np.float64)
            for start in range(0, n, 8192):
                idx = rng.integers(0, len(x), min(8192, n - start))
                block = np.clip(np.rint(x[idx] + rng.normal(0, noise, size=(len(idx), 55, 47, 3))), 0, 255)
                fc["data"][start:start + len(idx)] = block.astype(np.uint8).transpose(0, 3, 1, 2)
                fc["label"][start:start + len(idx)] = y[idx]
                fb["data"][start:start + len(idx)] = poison(block, trigger).astype(np.uint8).transpose(0, 3, 1, 2)
                fb["label"][start:start + len(idx)] = 0
        written[name] = n
    return written
