"""The pruning defense end to end, as a few named steps: locate, load (compiling meanwhile), sweep, cut,
fine-prune, write.

``run_defense(DefenseConfig(...))`` is what ``badnet-prune`` (``scripts/prune.py``) calls. Only clean
validation data ranks the channels and selects the cut; test data is only evaluated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import pathlib
import platform
import time
from typing import Optional

import jax
import numpy as np

from badnet_jax import metrics
from badnet_jax.defense.ranking_curves import RankingCurve, ranking_curve
from badnet_jax.defense.curve import (Curve, Cut, Finetuned, LabeledPreds, check_drops, coarse_validation_note,
                                     evaluate_curve, select_cuts)
from badnet_jax.models.predict import predict_settled
from badnet_jax.defense.finetune import FinetuneConfig, finetune
from badnet_jax.defense.inputs import (CLEAN_ROLES, DATA_ROLES, POISONED_ROLES, InputFiles, Sets, describe_inputs,
                                       load_model, load_sets, locate_inputs, peek_sets, sample_clean_valid)
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.numerics.tie_bound import compile_tie_bound, with_measured_tie_rtol
from badnet_jax.defense.outputs import CutModels, check_out_dir, check_space, preload_checkpoints, write_results
from badnet_jax.defense.report import preload_plotting
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.defense.scale import PLAUSIBLE, SAMPLE, ScaleChoice, accuracy_at_each_scale, choose_input_scale, clear_winner
from badnet_jax.sweep import SweepOptions, compile_float64, compile_sweep, plan_sweep, rank_and_sweep
from badnet_jax.sweep.plan import check_options

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
    """What to defend, on which data, and where to write.

    Attributes:
        drops: stop thresholds as fractions (0.04 = 4 points under the lab's absolute rule).
        rule: ``absolute`` (points, the lab's) or ``relative`` (fraction of the original accuracy).
        model: Keras file of B (the lab's DeepID or any CNN of standard layers); None = the lab layout default,
            else the embedded demo.
        example: run an embedded example instead of files: ``deepid`` (the default demo when no file is given)
            or ``gapnet`` (a 32x32 BatchNorm CNN with a global-average-pooling head).
        layer: the layer whose output channels are pruned; None: the lab's pool_3 for DeepID, else the last
            feature map before flatten or global pooling (``badnet_jax.models.graph``).
        clean_valid, bd_valid, clean_test, bd_test: lab h5 files; all None = lab defaults, else the demo. The
            poisoned sets are optional: without them ASR is "n/a" and the rest runs as usual.
        out_dir: where the results go (the folder is replaced as a whole; see ``badnet_jax.defense.outputs``).
        input_scale: ``auto`` (measured on clean validation images, see ``badnet_jax.defense.scale``), ``raw`` (the
            lab's B: pixels 0..255) or ``255`` (the CSAW-HackML-2020 BadNets: pixels / 255).
        checkpoints: write B' and GoodNet checkpoints and Keras files per selected drop.
        sweep: the sweep's options (shortcuts, head implementation, chunk, devices, memory budget).
        finetune: if set, also fine-prune each selected B' (see ``badnet_jax.defense.finetune``).
        rankings: the pruning orders to compare (``badnet_jax.sweep.rankings``); the first one's cuts are the
            models written. Default: the lab's activation ranking alone.
    """

    drops: tuple[float, ...] = (0.04,)
    rule: metrics.Rule = "absolute"
    model: Optional[str] = None
    layer: Optional[str] = None
    example: Optional[str] = None
    clean_valid: Optional[str] = None
    bd_valid: Optional[str] = None
    clean_test: Optional[str] = None
    bd_test: Optional[str] = None
    out_dir: str = "results"
    input_scale: str = "auto"
    checkpoints: bool = True
    sweep: SweepOptions = SweepOptions(devices=0)
    finetune: Optional[FinetuneConfig] = None
    rankings: RankingOptions = RankingOptions()


def run_defense(config: DefenseConfig) -> Curve:
    """Run the pruning defense and write report.md, curve.json, curve.png and per-drop models.

    Returns:
        The curve written to curve.json, with its selected cuts.
    """
    check_drops(config.drops)
    check_options(config.sweep)  # before any file is read
    # Multi-process runs: every process sweeps its shards, process 0 alone writes (the others write nothing).
    primary = jax.process_index() == 0
    out_dir = check_out_dir(config.out_dir) if primary else None
    timings = {}
    t = time.perf_counter()
    files = locate_inputs(config.model, {r: getattr(config, r) for r in DATA_ROLES}, config.example)
    model, params, recorded = load_model(files, config.layer)
    log.info("Model: %s.", model.describe())
    if primary and config.checkpoints:
        check_space(config.out_dir, params, config.drops, config.finetune is not None, model)
    ranking = resolve_rankings(config.rankings, params, model)
    # Overlapped: the images load in one thread and the sweep compiles in the other (XLA compiles without the
    # GIL) while the main thread decides the input scale on a sample read ahead; the loading thread then
    # compiles the near-tie bound's programs and the float64 network, whichever thread is free first. Later
    # the inputs are hashed during the sweep (hashlib releases the GIL).
    background = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    try:
        loading = background.submit(load_sets, files, model)
        specs = peek_sets(files, model)
        plan = None if specs is None else plan_sweep(config.sweep, list(specs.values()), model)
        # One compiled sweep serves every input scale and near-tie bound (both traced), so it compiles before the
        # scale is known and, for a model other than DeepID, before its bound is measured on its images; so do
        # the bound's programs (the main thread measures it first) and the float64 network that settles.
        compiling = [] if specs is None else [
            background.submit(compile_sweep, model, params, specs, plan, rankings=ranking, float64=False),
            background.submit(compile_tie_bound, model, params, specs["clean_valid"]),
            background.submit(compile_float64, model, params, specs)]
        # orbax (for the models written at the end) loads in the next free worker: beside the compile once the
        # images are read, or beside the loading where nothing compiles ahead.
        preloading = background.submit(preload_checkpoints) if primary and config.checkpoints else None
        sample = sample_clean_valid(files, SAMPLE, model)
        scale = None if sample is None else _scale(config, model, params, recorded, sample, files)
        model = model if scale is None else model.with_input_scale(scale.scale)
        sets = loading.result()
        timings["load"] = time.perf_counter() - t
        _log_loaded(timings["load"], bool(compiling), sets, model.num_classes)
        if scale is None:  # the demo: its data was generated just now
            scale = _scale(config, model, params, recorded, sets.data["clean_valid"], files)
            model = model.with_input_scale(scale.scale)
        warnings = [*_check_given_scale(config, model, params, scale, sets),
                    *_clean_images_as_poisoned(sets)]
        if plan is None:
            plan = plan_sweep(config.sweep, [x for x, _ in sets.data.values()], model)
        # A model other than DeepID has its near-tie bound measured on its clean validation images (what
        # rank_and_sweep would do first), here while the sweep compiles: the program takes the bound traced. The
        # measured model sweeps; the models written keep theirs unmeasured (screening measures on its images).
        t = time.perf_counter()
        if compiling:
            compiling[1].result()  # the bound's programs (a compile's own error, if any, surfaces here)
        swept = with_measured_tie_rtol(model, params, sets.data["clean_valid"][0])
        if swept is not model:
            timings["near-tie bound"] = time.perf_counter() - t
        if compiling:
            t = time.perf_counter()
            for done in compiling:
                done.result()
            timings["compile (after load)"] = time.perf_counter() - t
        if preloading is not None:
            preloading.result()  # a broken orbax is refused here, before the sweep
        described = background.submit(describe_inputs, files)
        if primary:
            background.submit(preload_plotting)  # during the sweep; the plot itself surfaces any import error
        t = time.perf_counter()
        sweep = rank_and_sweep(swept, params, {r: x for r, (x, _) in sets.data.items()}, plan, rankings=ranking,
                               rank_labels=sets.data["clean_valid"][1] if ranking.anp is not None else None)
        timings["curve (one call)"] = time.perf_counter() - t
        log.info("Ranked the %d channels of %s (%s) and evaluated B' and G at k = 0..%d of %d order(s) on all sets in "
                 "one call: %.2f s%s (%s; %sdevice %.2f s, float64 near-ties %.2f s).", model.num_channels,
                 model.layer, ", ".join(ranking.names), model.num_channels,
                 len(ranking.labels), timings["curve (one call)"],
                 "" if compiling else " (compile included)", plan.describe(),
                 f"near-tie bound measured {timings['near-tie bound']:.2f} s before it, " if "near-tie bound" in timings
                 else "", sweep.seconds["device"], sweep.seconds["settle"])
        log.info("Near-ties: %s.", _describe_ties(sweep))
        curve = _curve(config, files, model, sweep, sets)
        if len(ranking.names) > 1:
            curve = dataclasses.replace(curve, rankings=_compare(config, sweep, sets, curve))
        _warn_if_not_poisoned(curve)
        coarse = coarse_validation_note(curve)
        if coarse is not None:
            log.warning("Small validation set: %s.", coarse)
        cuts = select_cuts(curve, config.drops, *(_labeled(sweep, sets, r) for r in ("clean_valid", "clean_test",
                                                                                    "bd_test")))
        models = []
        for cut in cuts:
            if not cut.crossed:
                log.warning("Drop %g: validation accuracy never fell that far; keeping all %d channels pruned.",
                            cut.drop, cut.channels_pruned)
            cut, ft_params = _finetune_cut(model, params, sweep, sets, config.finetune, curve, cut)
            models.append(CutModels(cut, sweep.masks[cut.channels_pruned], ft_params))
        curve = dataclasses.replace(curve, selected=tuple(m.cut for m in models), inputs=described.result(),
                                    versions=_versions())
    except BaseException:
        background.shutdown(wait=False, cancel_futures=True)
        raise
    background.shutdown()
    t = time.perf_counter()
    if primary:
        write_results(out_dir, curve, model, params, models if config.checkpoints else (), timings,
                      {"model": model.describe(), "input scale": scale.describe(), "sweep": plan.describe(),
                       "rankings": _describe_rankings(ranking), "near-ties": _describe_ties(sweep)}, warnings)
        written = sorted(p.name for p in pathlib.Path(config.out_dir).iterdir())
        log.info("Wrote %s (%s) in %.2f s.", config.out_dir, ", ".join(written), time.perf_counter() - t)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("badnet-jax: results written")  # the others end after process 0
    return curve


def _describe_ties(sweep) -> str:
    total = sum(p.size for p in sweep.all_preds.values())
    per_set = ", ".join(f"{name} {count}" for name, count in sweep.settled.items())
    return (f"{sum(sweep.settled.values())} of {total} predictions had a top-2 logit gap within the float32 error "
            f"bound and were recomputed in float64 ({per_set}); activation ranking: "
            f"{'near-ties decided in float64' if sweep.ranking_settled else 'no near-ties'}")


def _describe_rankings(ranking) -> str:
    parts = []
    for name in ranking.names:
        extra = {"random": f" ({len(ranking.rows(name))} orders, seeded)",
                 "anp": "" if ranking.anp is None else f" (eps {ranking.anp.eps:g}, alpha {ranking.anp.alpha:g}, "
                                                       f"{ranking.anp.steps} steps of {ranking.anp.batch} images, "
                                                       f"seed {ranking.anp.seed})",
                 "clp": f" (of {ranking.reads})", "l1": f" (of {ranking.reads})"}.get(name, "")
        parts.append(name + extra)
    return ", ".join(parts) + "; the first one's cuts are the models written"


def _warn_if_not_poisoned(curve: Curve) -> None:
    """A "poisoned" set that B does not answer with its labels is seldom what the user meant: say so."""
    for key, name in (("valid_asr", "bd_valid"), ("test_asr", "bd_test")):
        asr = curve.original[key]
        if asr is not None and asr < 50.0:
            log.warning("B's attack success rate on %s is only %.2f%%: are its labels the attacker's target "
                        "(the lab's bd files label every image with it), and does it carry the trigger?", name, asr)


def _check_given_scale(config: DefenseConfig, model: PrunableModel, params: Params, scale: ScaleChoice,
                       sets: Sets) -> list[str]:
    """A warning (logged, and returned for report.md) when a given input scale looks wrong as ``auto`` would
    judge it: measured on the same clean validation sample, the other scale is the clear choice, or neither
    scale is plausible. Every number of a run at the wrong scale is garbage, with no error to say so."""
    if scale.how != "given":
        return []
    x, y = (a[:SAMPLE] for a in sets.data["clean_valid"])
    acc = accuracy_at_each_scale(model, params, x, y)
    judged = clear_winner(acc)
    if judged == scale.scale or (judged is None and acc[scale.scale] >= PLAUSIBLE):
        return []  # the given scale wins, or both are plausible (a model that does not mind the scale)
    measured = ", ".join(f"{s}: {a:.2f}%" for s, a in acc.items())
    why = (f"the other scale ({judged}) is clearly better" if judged is not None
           else "neither scale is plausible (is this data the model's?)")
    text = (f"the input scale {scale.scale} was given, but B's clean accuracy on {len(y)} validation images is "
            f"{measured}: {why}; every number of this run is likely meaningless at scale {scale.scale}")
    log.warning("Input scale: %s.", text)
    return [f"Input scale: {text}."]


def _clean_images_as_poisoned(sets: Sets) -> list[str]:
    """A warning for each "poisoned" set whose images are pixel for pixel clean ones (of either clean set):
    a clean file given as poisoned data, whose "ASR" is only B's clean accuracy. Exact: images whose
    fingerprints match a clean image's are compared byte for byte."""
    clean = [sets.data[role][0] for role in CLEAN_ROLES if role in sets.data]
    prints = [_fingerprints(x) for x in clean]
    by_print = {}  # fingerprint -> the clean images (set, index) that have it
    for which, fp in enumerate(prints):
        for i, f in enumerate(fp.tolist()):
            by_print.setdefault(f, []).append((which, i))
    warnings = []
    for role in POISONED_ROLES:
        if role not in sets.data:
            continue
        images = sets.data[role][0]
        fp = _fingerprints(images)
        same = sum(any(np.array_equal(images[i], clean[w][j]) and images[i].dtype == clean[w][j].dtype
                       for w, j in by_print[int(fp[i])])
                   for i in np.flatnonzero(np.isin(fp, list(by_print))))
        if 2 * same > len(images):
            text = (f"{same} of {len(images)} images of the poisoned set {role} are pixel for pixel clean images "
                    "(of the clean validation or test set): a clean file given as poisoned data? Its ASR is then "
                    "B's accuracy on clean images, not the attack's success")
            log.warning("%s.", text)
            warnings.append(text[0].upper() + text[1:] + ".")
    return warnings


# Odd multipliers of the fingerprints' 8-byte words (fixed: a run's fingerprints are the same every run).
_FINGERPRINT_MULT = np.random.default_rng(2026).integers(1, 2**63, size=1 << 14, dtype=np.uint64) | np.uint64(1)


def _fingerprints(x_NxHxWxC: np.ndarray, block: int = 1024) -> np.ndarray:
    """(N,) uint64: each image's bytes as 8-byte words, weighted and summed modulo 2^64 (vectorised: ~0.2 s for
    the lab's 48 754 images, where hashing each image in Python took ~0.45 s). Equal images, equal fingerprints."""
    rows = np.ascontiguousarray(x_NxHxWxC).reshape(len(x_NxHxWxC), -1).view(np.uint8)
    width = -(-rows.shape[1] // 8) * 8
    out = np.empty(len(rows), np.uint64)
    for start in range(0, len(rows), block):
        words = np.zeros((min(block, len(rows) - start), width), np.uint8)
        words[:, :rows.shape[1]] = rows[start:start + block]
        words = words.view(np.uint64)
        mult = np.resize(_FINGERPRINT_MULT, words.shape[1])
        out[start:start + len(words)] = (words * mult).sum(axis=1)
    return out


def _scale(config: DefenseConfig, model: PrunableModel, params: Params, recorded: Optional[str],
           sample: tuple[np.ndarray, np.ndarray], files: InputFiles) -> ScaleChoice:
    source = "the embedded demo BadNet" if files.demo else str(files.model)
    return choose_input_scale(model, params, config.input_scale, recorded, *sample, source=source)


def _log_loaded(seconds: float, compiling: bool, sets: Sets, num_classes: int) -> None:
    log.info("Loaded the model and data in %.2f s%s.", seconds, " (the sweep compiling meanwhile)" if compiling else "")
    n = {r: len(sets.data[r][1]) if r in sets.data else 0 for r in DATA_ROLES}
    log.info("Model: %d classes; valid %d clean + %d poisoned, test %d clean + %d poisoned images.", num_classes,
             n["clean_valid"], n["bd_valid"], n["clean_test"], n["bd_test"])
    # Said here, by the main thread once every set given has been read and checked, not by the loading thread:
    # a note about what was not given is no help next to an error about what was.
    if not any(r in sets.data for r in POISONED_ROLES):
        log.info("No poisoned data given: ranking and cutting on clean data; ASR is n/a (no poisoned data).")


def _labeled(sweep, sets: Sets, role: str) -> Optional[LabeledPreds]:
    return LabeledPreds(sweep.preds[role], sets.data[role][1]) if role in sets.data else None


def describe_model(model: PrunableModel) -> Optional[dict]:
    """What curve.json records of a model other than the lab's DeepID pruned at pool_3 (None for that one)."""
    if isinstance(model, DeepID):
        return None
    return {"name": model.name, "layer": model.layer, "channels": model.num_channels,
            "input_hwc": list(model.input_hwc), "num_classes": model.num_classes}


def _curve(config: DefenseConfig, files: InputFiles, model: PrunableModel, sweep, sets: Sets) -> Curve:
    demo = "the embedded demo" if files.example == "deepid" else f"the embedded {files.example} example"
    title = f"Pruning defense on {demo if files.demo else files.model.name}"
    return evaluate_curve(*(_labeled(sweep, sets, r) for r in DATA_ROLES), order=sweep.order,
                          mean_activation=sweep.mean_activation, num_classes=model.num_classes, rule=config.rule,
                          title=title, demo=files.demo, bd_test_true_labels=sets.true_labels.get("bd_test"),
                          input_scale=model.input_scale, model=describe_model(model))


def _compare(config: DefenseConfig, sweep, sets: Sets, curve: Curve) -> dict[str, RankingCurve]:
    """Every ranking's curves and cuts, side by side (``badnet_jax.defense.ranking_curves``)."""
    labels = {role: y for role, (_, y) in sets.data.items()}
    out = {}
    for name in sweep.rankings.names:
        rows = sweep.rankings.rows(name)
        out[name] = ranking_curve(sweep.orders[rows], {role: p[rows] for role, p in sweep.all_preds.items()}, labels,
                                  config.drops, config.rule, curve.original)
    return out


def _finetune_cut(model: PrunableModel, params: Params, sweep, sets: Sets, ft: Optional[FinetuneConfig], curve: Curve,
                  cut: Cut) -> tuple[Cut, Optional[Params]]:
    """Fine-prune one selected B' on clean validation data (if asked): the cut with its numbers, and the params.

    G takes B's class from the sweep's k = 0 row, near-ties settled there, and the fine-pruned B''s from a
    forward whose near-ties are settled the same way, so every GoodNet number has one source for B.
    """
    if ft is None:
        return cut, None
    t = time.perf_counter()
    mask = sweep.masks[cut.channels_pruned]
    ft_params, history = finetune(model, params, mask, *sets.data["clean_valid"], ft)
    # The fine-pruned weights err in float32 as they do: a model other than DeepID has its near-tie bound
    # measured on them (on the clean validation images, as the sweep's), not B's bound or the floor.
    ft_model = with_measured_tie_rtol(model, ft_params, sets.data["clean_valid"][0])
    n = model.num_classes
    g = {}
    for role in ("clean_test", "bd_test"):
        if role in sets.data:
            x, y = sets.data[role]
            ft_preds, _ = predict_settled(ft_model, ft_params, x, mask)
            g[role] = (ft_preds, metrics.goodnet_predictions(sweep.preds[role][0], ft_preds, n), y)
    acc = float(metrics.accuracy(g["clean_test"][0], g["clean_test"][2]))
    asr = float(metrics.accuracy(g["bd_test"][0], g["bd_test"][2])) if "bd_test" in g else None
    original = curve.original
    der = None if asr is None else float(metrics.der(original["test_acc"], original["test_asr"], acc, asr))
    bd = g.get("bd_test", (None, None, None))
    result = Finetuned(test_acc=acc, test_asr=asr, test_der=der,
                       goodnet=metrics.goodnet_rates(g["clean_test"][1], g["clean_test"][2], bd[1], bd[2], n),
                       epochs_run=len(history), history=tuple(history))
    log.info("Fine-pruned B' for X=%g in %.1f s: test accuracy %.2f%%, ASR %s.", 100 * cut.drop,
             time.perf_counter() - t, acc, "n/a" if asr is None else f"{asr:.2f}%")
    return dataclasses.replace(cut, finetuned=result), ft_params


def _versions() -> dict[str, str]:
    import importlib.metadata

    import flax

    import badnet_jax

    try:  # the installed distribution's version: importing orbax for it would cost a run without checkpoints ~0.2 s
        orbax_version = importlib.metadata.version("orbax-checkpoint")
    except importlib.metadata.PackageNotFoundError:
        orbax_version = "?"
    return {"badnet_jax": badnet_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "orbax-checkpoint": orbax_version, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(jax.devices()[0].device_kind)}
