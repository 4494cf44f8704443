"""The pruning defense end to end: load, rank, sweep, select, evaluate on test data, write every output.

``run_defense(DefenseConfig(...))`` is what ``scripts/prune.py`` calls. Only clean validation data ranks the
channels and selects the cut; test data is only evaluated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from badnet_jax import checkpoint, metrics, report
from badnet_jax.convert import load_keras, save_keras
from badnet_jax.data import load_lab_h5, load_true_labels, peek_lab_h5
from badnet_jax.errors import ConfigError
from badnet_jax.finetune import FinetuneConfig, finetune
from badnet_jax.fileio import sha256_of
from badnet_jax.goodnet import make_goodnet
from badnet_jax.memory import chunk_for_budget
from badnet_jax.model import BadNet, Params, predict, prune_params
from badnet_jax.sweep import (SweepOptions, compile_sweep, count_hits, default_chunk, rank_and_sweep,
                              resolve_options)

log = logging.getLogger(__name__)

LAB_MODEL_CANDIDATES = ("models/bd_net.h5", "models/bd_weights.h5")
LAB_DATA_DEFAULTS = {"clean_valid": "data/cl/valid.h5", "bd_valid": "data/bd/bd_valid.h5",
                     "clean_test": "data/cl/test.h5", "bd_test": "data/bd/bd_test.h5"}
DATA_ROLES = tuple(LAB_DATA_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
    """What to defend, on which data, and where to write.

    Attributes:
        drops: stop thresholds as fractions (0.04 = 4 points under the lab's absolute rule).
        rule: ``absolute`` (points, the lab's) or ``relative`` (fraction of the original accuracy).
        model: Keras h5 of B; None = the lab layout default, else the embedded demo.
        clean_valid, bd_valid, clean_test, bd_test: lab h5 files; all None = lab defaults, else the demo.
        out_dir: where outputs go.
        chunk: images per chunk inside the jitted sweep (memory bound); None = 256 on CPU, 4096 on GPU/TPU.
        checkpoints: write B' and GoodNet checkpoints and Keras files per selected drop.
        sweep: the sweep's exact shortcuts and masked-head implementation.
        finetune: if set, also fine-prune each selected B' (see ``badnet_jax.finetune``).
        devices: shard the image axis over this many devices (0 = all; results are the single-device ones).
        memory_budget: bytes the sweep may use; the chunk shrinks below ``chunk`` to fit (None = half of the
            device's memory). Data that cannot fit is refused up front.
    """

    drops: tuple[float, ...] = (0.04,)
    rule: metrics.Rule = "absolute"
    model: Optional[str] = None
    clean_valid: Optional[str] = None
    bd_valid: Optional[str] = None
    clean_test: Optional[str] = None
    bd_test: Optional[str] = None
    out_dir: str = "results"
    chunk: Optional[int] = None
    checkpoints: bool = True
    sweep: SweepOptions = SweepOptions()
    finetune: Optional[FinetuneConfig] = None
    devices: int = 0
    memory_budget: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Resolved inputs: a model and four (x, y) sets, plus where they came from."""

    model: BadNet
    params: Params
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    files: dict[str, Path]
    demo: bool
    true_labels: dict[str, Optional[np.ndarray]] = dataclasses.field(default_factory=dict)  # bd role -> labels


Specs = dict[str, jax.ShapeDtypeStruct]


def resolve_inputs(config: DefenseConfig,
                   before_images: Optional[Callable[[BadNet, Params, Specs], None]] = None) -> Inputs:
    """Lab files if given or present at the lab's default paths; the embedded demo if none are; else an error.

    ``before_images(model, params, specs)``, if given, is called for lab files once the model is loaded and
    the image shapes/dtypes are known from the file headers, before the images are read (the defense
    starts compiling the sweep there).
    """
    given = {r: getattr(config, r) for r in DATA_ROLES if getattr(config, r)}
    if given and len(given) < len(DATA_ROLES):
        missing = [f"--{r}" for r in DATA_ROLES if r not in given]
        raise ConfigError(f"give all four data files or none (then the lab defaults or the demo are used); "
                          f"missing {', '.join(missing)}")
    paths = {r: Path(p) for r, p in given.items()} or {r: Path(p) for r, p in LAB_DATA_DEFAULTS.items()}
    present = [r for r, p in paths.items() if p.exists()]
    model_path = Path(config.model) if config.model else next(
        (Path(c) for c in LAB_MODEL_CANDIDATES if Path(c).exists()), None)
    if not given and not present and config.model is None:
        from badnet_jax import demo

        log.info("Lab data not found at %s: running on the embedded demo (synthetic faces, demo BadNet).",
                 ", ".join(LAB_DATA_DEFAULTS.values()))
        return demo.demo_inputs()
    if len(present) < len(DATA_ROLES):
        missing = [f"{r} ({paths[r]})" for r in DATA_ROLES if r not in present]
        raise ConfigError(f"lab data files not found: {', '.join(missing)}")
    if model_path is None:
        raise ConfigError(f"no model: pass --model or put the lab's model at {' or '.join(LAB_MODEL_CANDIDATES)}")
    model, params = load_keras(model_path)
    specs = {r: jax.ShapeDtypeStruct(*peek_lab_h5(paths[r], keep_uint8=True)) for r in DATA_ROLES}
    for r, spec in specs.items():
        if spec.shape[0] == 0:
            raise ConfigError(f"{paths[r]}: holds no images")
    if before_images is not None:
        before_images(model, params, specs)
    data = {r: load_lab_h5(paths[r], num_classes=model.num_classes, keep_uint8=True) for r in DATA_ROLES}
    true = {r: load_true_labels(paths[r]) for r in ("bd_valid", "bd_test")}
    return Inputs(model, params, data, {"model": model_path, **paths}, demo=False, true_labels=true)


def init_distributed(coordinator_address: Optional[str], num_processes: int, process_id: int) -> None:
    """Join a multi-host run (TPU slice, GPU cluster) before any JAX computation; no-op without an address.

    Every process runs the same command with the same files; the sweep's mesh then spans all hosts' devices.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        log.info("jax.distributed: process %d of %d, %d global devices (%d local).", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count())


def cli_logging(level: int = logging.INFO) -> None:
    """Progress lines of badnet-jax on stderr with timestamps, without the INFO chatter of orbax/absl."""
    logger = logging.getLogger("badnet_jax")
    if not any(getattr(h, "_badnet_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._badnet_cli = True
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO through absl
    logging.getLogger("jax").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'" on every CPU run


def _versions() -> dict[str, str]:
    import flax
    import orbax.checkpoint

    import badnet_jax

    return {"badnet_jax": badnet_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "orbax-checkpoint": getattr(orbax.checkpoint, "__version__", "?"), "numpy": np.__version__,
            "python": platform.python_version(), "device": str(jax.devices()[0].device_kind)}


def run_defense(config: DefenseConfig) -> dict:
    """Run the pruning defense and write report.md, curve.json, curve.png and per-drop checkpoints.

    Returns:
        The curve dict written to curve.json.
    """
    if not config.drops:
        raise ConfigError("no drop threshold given")
    timings = {}
    t = time.perf_counter()
    # Background work, each overlapping the main thread's: compiling the sweep while the images are read
    # (XLA compiles without the GIL), hashing the inputs during the sweep (hashlib releases the GIL).
    background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    ahead = {}

    def compile_ahead(model: BadNet, params: Params, specs: Specs) -> None:
        ahead["chunk"] = _chunk(config, [specs[r] for r in DATA_ROLES])
        ahead["compiled"] = background.submit(compile_sweep, model, params, specs["clean_valid"],
                                              tuple(specs[r] for r in DATA_ROLES[1:]), ahead["chunk"],
                                              config.sweep, config.devices)

    try:
        inputs = resolve_inputs(config, before_images=compile_ahead)
    except BaseException:
        background.shutdown(wait=False, cancel_futures=True)
        raise
    timings["load"] = time.perf_counter() - t
    log.info("Loaded the model and data in %.2f s%s.", timings["load"],
             " (the sweep compiling meanwhile)" if ahead else "")
    model, params, data = inputs.model, inputs.params, inputs.data
    n_cls = model.num_classes
    (xv, yv), (xbv, ybv) = data["clean_valid"], data["bd_valid"]
    (xt, yt), (xbt, ybt) = data["clean_test"], data["bd_test"]
    log.info("Model: %d classes; valid %d clean + %d poisoned, test %d clean + %d poisoned images.",
             n_cls, len(xv), len(xbv), len(xt), len(xbt))

    chunk = ahead.get("chunk") or _chunk(config, [xv, xbv, xt, xbt])
    t = time.perf_counter()
    if "compiled" in ahead:
        ahead["compiled"].result()  # the compile's own error, if any, surfaces here
        timings["compile (after load)"] = time.perf_counter() - t
    described = background.submit(_describe_inputs, inputs)
    t = time.perf_counter()
    sweep = rank_and_sweep(model, params, xv, xbv, chunk=chunk, options=config.sweep, extra=(xt, xbt),
                           devices=config.devices)
    test_clean, test_bd = sweep.preds_extra
    timings["curve (one call)"] = time.perf_counter() - t
    log.info("Ranked the 60 channels on clean validation data and evaluated B' and G at k = 0..60 on all four "
             "sets in one call: %.2f s%s.", timings["curve (one call)"], "" if ahead else " (compile included)")

    valid_hits = count_hits(sweep.preds_clean, yv)
    g_clean = metrics.goodnet_predictions(test_clean[:1], test_clean, n_cls)
    g_bd = metrics.goodnet_predictions(test_bd[:1], test_bd, n_cls)
    curve = {
        "title": f"Pruning defense on {'the embedded demo' if inputs.demo else inputs.files['model'].name}",
        "num_classes": n_cls, "rule": config.rule, "demo": inputs.demo,
        "order": sweep.order, "mean_activation": sweep.mean_activation,
        "counts": {"valid": len(yv), "bd_valid": len(ybv), "test": len(yt), "bd_test": len(ybt)},
        "valid_acc": metrics.pct(valid_hits, len(yv)),
        "valid_asr": metrics.pct(count_hits(sweep.preds_bd, ybv), len(ybv)),
        "test_acc": metrics.pct(count_hits(test_clean, yt), len(yt)),
        "test_asr": metrics.pct(count_hits(test_bd, ybt), len(ybt)),
        "goodnet_test_acc": metrics.pct(count_hits(g_clean, yt), len(yt)),
        "goodnet_test_asr": metrics.pct(count_hits(g_bd, ybt), len(ybt)),
        "goodnet_detection_rate": metrics.pct((g_bd == n_cls).sum(1), len(ybt)),
        "goodnet_false_alarm_rate": metrics.pct((g_clean == n_cls).sum(1), len(yt)),
    }
    curve["original"] = {key: float(curve[key][0]) for key in ("valid_acc", "valid_asr", "test_acc", "test_asr")}
    curve["test_der"] = metrics.der(curve["test_acc"][0], curve["test_asr"][0], curve["test_acc"], curve["test_asr"])
    true_bd = inputs.true_labels.get("bd_test")
    if true_bd is not None:
        curve["test_asr_excluding_target"] = metrics.asr_excluding_target(test_bd, ybt, true_bd)
    curve["targets"] = sorted(int(t) for t in np.unique(ybt))
    out = Path(config.out_dir)
    selected = []
    for drop in config.drops:
        k, crossed = metrics.first_crossing(valid_hits, len(yv), drop, config.rule)
        rates = metrics.goodnet_rates(g_clean[k], yt, g_bd[k], ybt, n_cls)
        selected.append({
            "drop": drop, "channels_pruned": k, "crossed": crossed,
            "pruned_channels": sorted(int(c) for c in sweep.order[:k]),
            "valid_acc": float(curve["valid_acc"][k]), "valid_asr": float(curve["valid_asr"][k]),
            "test_acc": float(curve["test_acc"][k]), "test_asr": float(curve["test_asr"][k]),
            "goodnet": dataclasses.asdict(rates), "test_der": float(curve["test_der"][k]),
        })
        if true_bd is not None:
            selected[-1]["test_asr_excluding_target"] = float(curve["test_asr_excluding_target"][k])
        if len(curve["targets"]) > 1:
            selected[-1]["test_asr_by_target"] = metrics.asr_by_target(test_bd[k], ybt)
        if config.finetune is not None:
            selected[-1]["finetuned"] = _finetune_one(model, params, sweep.masks[k], data, config.finetune,
                                                      curve["original"], n_cls, out, selected[-1], config)
        if not crossed:
            log.warning("Drop %g: validation accuracy never fell that far; keeping all %d channels pruned.", drop, k)
    curve["selected"] = selected

    t = time.perf_counter()
    if config.checkpoints:
        for sel in selected:
            mask = sweep.masks[sel["channels_pruned"]]
            d = out / f"drop_{100 * sel['drop']:g}"
            save_keras(prune_params(params, mask), d / "b_prime.h5")
            checkpoint.save_badnet(d / "b_prime_ckpt", params, mask)
            checkpoint.save_goodnet(d / "goodnet_ckpt", make_goodnet(params, mask=mask)[1])
    timings["checkpoints"] = time.perf_counter() - t
    if config.checkpoints:
        log.info("Wrote B' (Keras h5 + orbax) and GoodNet checkpoints for %d drop(s) in %.2f s.",
                 len(selected), timings["checkpoints"])
    curve["inputs"] = described.result()
    background.shutdown()
    curve["versions"] = _versions()
    curve["timings"] = timings
    report.plot_curve(out / "curve.png", curve)
    report.write_report_md(out / "report.md", curve)
    report.write_curve_json(out / "curve.json", curve)  # last: its presence marks a complete run
    log.info("Wrote %s", ", ".join(str(out / f) for f in ("report.md", "curve.json", "curve.png")))
    return curve


def _chunk(config: DefenseConfig, sets: list) -> int:
    wanted = config.chunk or default_chunk()
    resolved = resolve_options(config.sweep)
    batched = resolved.prefix_sums and resolved.dedupe and bool(resolved.batch_steps)
    chunk = chunk_for_budget(sets, config.memory_budget, config.sweep.prefix_sums, wanted, batched=batched)
    if chunk < wanted:
        log.info("Memory budget: %d images per chunk (instead of %d).", chunk, wanted)
    return chunk


def _finetune_one(model: BadNet, params: Params, mask: np.ndarray, data: dict, ft: FinetuneConfig,
                  original: dict, n_cls: int, out: Path, sel: dict, config: DefenseConfig) -> dict:
    """Fine-prune one selected B' on clean validation data; its test numbers, GoodNet and checkpoints."""
    t = time.perf_counter()
    ft_params, history = finetune(model, params, mask, *data["clean_valid"], ft)
    (xt, yt), (xbt, ybt) = data["clean_test"], data["bd_test"]
    b_clean, b_bd = predict(model, params, xt), predict(model, params, xbt)
    ft_clean, ft_bd = predict(model, ft_params, xt, mask), predict(model, ft_params, xbt, mask)
    g_clean = metrics.goodnet_predictions(b_clean, ft_clean, n_cls)
    g_bd = metrics.goodnet_predictions(b_bd, ft_bd, n_cls)
    acc = float(metrics.pct(int((ft_clean == yt).sum()), len(yt)))
    asr = float(metrics.pct(int((ft_bd == ybt).sum()), len(ybt)))
    result = {"test_acc": acc, "test_asr": asr,
              "test_der": float(metrics.der(original["test_acc"], original["test_asr"], acc, asr)),
              "goodnet": dataclasses.asdict(metrics.goodnet_rates(g_clean, yt, g_bd, ybt, n_cls)),
              "epochs_run": len(history), "history": history, "seconds": time.perf_counter() - t}
    log.info("Fine-pruned B' for X=%g in %.1f s: test accuracy %.2f%%, ASR %.2f%%.", 100 * sel["drop"],
             result["seconds"], acc, asr)
    if config.checkpoints:
        d = out / f"drop_{100 * sel['drop']:g}"
        save_keras(ft_params, d / "b_prime_finetuned.h5")
        checkpoint.save_badnet(d / "b_prime_finetuned_ckpt", ft_params, mask)
        checkpoint.save_goodnet(d / "goodnet_finetuned_ckpt", make_goodnet(params, ft_params, mask)[1])
    return result


def _describe_inputs(inputs: Inputs) -> dict:
    described = {}
    for role, path in inputs.files.items():
        if path is None:
            continue
        described[role] = {"path": str(path), "bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    return described
