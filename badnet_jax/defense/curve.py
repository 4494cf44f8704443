"""The pruning curve and its cuts as typed values: what ``curve.json`` holds, computed from the sweep.

:func:`evaluate_curve` turns a sweep's predictions into rates at every k (B' and GoodNet, validation and
test); :func:`select_cuts` applies the stop rule for each drop X. :class:`Curve` is the one schema of
``curve.json`` (:meth:`Curve.to_json` / :meth:`Curve.from_json`); the report and the plot read it.
Rates are percentages computed from exact counts (``badnet_jax.metrics``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from badnet_jax import metrics
from badnet_jax.defense.ranking_curves import RankingCurve
from badnet_jax.errors import ConfigError, arg
from badnet_jax.metrics import GoodNetRates, Rule

RATE_KEYS = ("valid_acc", "valid_asr", "test_acc", "test_asr")
COARSE_STEP = 0.5  # points of validation accuracy one image may weigh before a run says its cuts are coarse


@dataclasses.dataclass(frozen=True)
class Finetuned:
    """A selected B' after fine-pruning: its test numbers and GoodNet's, and the training history."""

    test_acc: float
    test_asr: Optional[float]
    test_der: Optional[float]
    goodnet: GoodNetRates
    epochs_run: int
    history: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class Cut:
    """The B' selected for one drop X: the first k whose validation accuracy falls more than X below B's."""

    drop: float
    channels_pruned: int
    crossed: bool
    pruned_channels: tuple[int, ...]
    valid_acc: float
    valid_asr: Optional[float]
    test_acc: float
    test_asr: Optional[float]
    goodnet: GoodNetRates
    test_der: Optional[float]
    test_asr_excluding_target: Optional[float] = None
    test_asr_by_target: Optional[dict[int, float]] = None
    finetuned: Optional[Finetuned] = None

    @property
    def folder(self) -> str:
        """The output folder of this cut's models, e.g. ``drop_4`` for X = 0.04."""
        return drop_folder(self.drop)


def drop_folder(drop: float) -> str:
    """``drop_<X in points>``, the folder of a cut's models (6 significant digits, as %g prints)."""
    return f"drop_{100 * drop:g}"


def check_drops(drops: Sequence[float]) -> tuple[float, ...]:
    """The drops X, refused before any work unless each is a fraction in (0, 1) with a folder of its own.

    Raises:
        ConfigError: none given, not finite, outside (0, 1) (``4`` most likely meant 0.04 = 4 points), or two
            drops that are equal or would share an output folder (0.041 and 0.0410000001 both print 4.1).
    """
    if not drops:
        raise ConfigError(f"no drop threshold given ({arg('drops')} is empty)", field="drops")
    folders = {}
    for d in drops:
        if not isinstance(d, (int, float)) or not math.isfinite(d):
            raise ConfigError(f"{arg('drops', repr(d))} is not a finite number", field="drops")
        if not 0 < d < 1:
            hint = f"; did you mean {d / 100:g} ({d:g} point{'' if d == 1 else 's'})?" if 1 <= d < 100 else ""
            raise ConfigError(f"{arg('drops', f'{d:g}')} is not a fraction between 0 and 1 (0.04 = 4 points){hint}",
                              field="drops")
        name = drop_folder(d)
        if name in folders:
            same = "is given twice" if folders[name] == d else f"and {folders[name]!r} would share {name}/"
            raise ConfigError(f"{arg('drops', repr(d))} {same}; give each drop once, distinct to 6 digits",
                              field="drops")
        folders[name] = d
    return tuple(float(d) for d in drops)


@dataclasses.dataclass(frozen=True)
class Curve:
    """Every rate of B' and GoodNet at k = 0..60 pruned channels, the order, and the selected cuts.

    Arrays are (61,) percentages indexed by k (``test_der`` in [0, 1]); ``order`` and ``mean_activation``
    are (60,). ``input_scale`` is B's (``raw`` or ``255``, see ``badnet_jax.model``). Without poisoned data
    (a defender seldom has any) the ASR curves, GoodNet's ASR and detection rate and DER are None. ``inputs``
    and ``versions`` describe the run (file sizes and sha256, package versions). With several rankings
    (``RankingOptions.rank_by``), the top-level curves and cuts are the first ranking's and ``rankings`` holds each
    ranking's (``badnet_jax.defense.ranking_curves``); else it is None. ``model`` describes a model other than the
    lab's DeepID pruned at pool_3 (its name, pruned layer, channels, input shape); None for that one.
    """

    title: str
    num_classes: int
    input_scale: str
    rule: Rule
    demo: bool
    order: np.ndarray
    mean_activation: np.ndarray
    counts: dict[str, int]
    valid_acc: np.ndarray
    valid_asr: Optional[np.ndarray]
    test_acc: np.ndarray
    test_asr: Optional[np.ndarray]
    goodnet_test_acc: np.ndarray
    goodnet_test_asr: Optional[np.ndarray]
    goodnet_detection_rate: Optional[np.ndarray]
    goodnet_false_alarm_rate: np.ndarray
    test_der: Optional[np.ndarray]
    targets: tuple[int, ...]
    test_asr_excluding_target: Optional[np.ndarray] = None
    selected: tuple[Cut, ...] = ()
    inputs: dict[str, dict] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    rankings: Optional[dict[str, RankingCurve]] = None
    model: Optional[dict[str, Any]] = None

    @property
    def original(self) -> dict[str, Optional[float]]:
        """B's own numbers (k = 0); ASR None without poisoned data."""
        return {key: _at(getattr(self, key), 0) for key in RATE_KEYS}

    @property
    def poisoned(self) -> bool:
        """Whether poisoned data was given (else every ASR is "n/a")."""
        return self.test_asr is not None or self.valid_asr is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NumPy arrays as lists, optional entries left out when absent)."""
        out = _plain(dataclasses.asdict(self))
        out["original"] = self.original
        if self.rankings is None:
            del out["rankings"]
        else:
            out["rankings"] = {name: _plain(r.to_json()) for name, r in self.rankings.items()}
            out["rank_by"] = list(self.rankings)  # their order (curve.json sorts keys); the first is the defense's
        if self.test_asr_excluding_target is None:
            del out["test_asr_excluding_target"]
        if self.model is None:
            del out["model"]
        for cut in out["selected"]:
            for key in ("test_asr_excluding_target", "test_asr_by_target", "finetuned"):
                if cut[key] is None:
                    del cut[key]
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Curve":
        """The curve written by :meth:`to_json` (e.g. read back from ``curve.json``)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        for key in ("order", "mean_activation", "valid_acc", "valid_asr", "test_acc", "test_asr", "goodnet_test_acc",
                    "goodnet_test_asr", "goodnet_detection_rate", "goodnet_false_alarm_rate", "test_der"):
            kw[key] = None if d[key] is None else np.asarray(d[key])
        if d.get("test_asr_excluding_target") is not None:
            kw["test_asr_excluding_target"] = np.asarray(d["test_asr_excluding_target"], float)
        kw["targets"] = tuple(d["targets"])
        kw["selected"] = tuple(_cut_from_json(c) for c in d.get("selected", ()))
        if d.get("rankings") is not None:
            names = d.get("rank_by", list(d["rankings"]))
            kw["rankings"] = {name: RankingCurve.from_json(d["rankings"][name]) for name in names}
        return cls(**kw)


def coarse_validation_note(curve: Curve) -> Optional[str]:
    """A sentence for the log and report.md when one clean validation image weighs more than
    :data:`COARSE_STEP` points of accuracy: the stop rule then moves the cut in steps that large, and a
    cut can differ from one made on a larger set. None otherwise."""
    n = curve.counts.get("valid", 0)
    if not n or 100.0 / n <= COARSE_STEP:
        return None
    return (f"one validation image is {100.0 / n:.2f} points of accuracy ({n} clean validation images): cuts move "
            f"in steps that large, so they can differ from cuts made on a larger validation set")


def _cut_from_json(c: Mapping[str, Any]) -> Cut:
    kw = dict(c)
    kw["pruned_channels"] = tuple(c["pruned_channels"])
    kw["goodnet"] = GoodNetRates(**c["goodnet"])
    if c.get("test_asr_by_target") is not None:
        kw["test_asr_by_target"] = {int(t): v for t, v in c["test_asr_by_target"].items()}
    if c.get("finetuned") is not None:
        f = dict(c["finetuned"])
        f["goodnet"], f["history"] = GoodNetRates(**f["goodnet"]), tuple(f["history"])
        kw["finetuned"] = Finetuned(**f)
    return Cut(**kw)


def _at(values: Optional[np.ndarray], k: int) -> Optional[float]:
    return None if values is None else float(values[k])


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, (int, np.integer)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclasses.dataclass(frozen=True)
class LabeledPreds:
    """(61, N) predictions of B' at every k for one set, with its labels (targets for a poisoned set)."""

    preds: np.ndarray
    labels: np.ndarray


def evaluate_curve(valid: LabeledPreds, bd_valid: Optional[LabeledPreds], test: LabeledPreds,
                   bd_test: Optional[LabeledPreds], order: np.ndarray, mean_activation: np.ndarray, num_classes: int,
                   rule: Rule, title: str, demo: bool = False, bd_test_true_labels: Optional[np.ndarray] = None,
                   input_scale: str = "raw", model: Optional[dict[str, Any]] = None) -> Curve:
    """Every rate of B' and GoodNet at every k, from the sweep's predictions (no cut selected yet).

    ``bd_valid`` / ``bd_test`` may be None (no poisoned data): their rates are then None.
    """
    n = num_classes
    rate = lambda s: None if s is None else metrics.accuracy(s.preds, s.labels)
    acc = {key: rate(s) for key, s in zip(RATE_KEYS, (valid, bd_valid, test, bd_test))}
    g_clean = metrics.goodnet_predictions(test.preds[:1], test.preds, n)
    g_bd = None if bd_test is None else metrics.goodnet_predictions(bd_test.preds[:1], bd_test.preds, n)
    poisoned = bd_test is not None
    return Curve(
        title=title, num_classes=n, input_scale=input_scale, rule=rule, demo=demo, order=np.asarray(order), model=model,
        mean_activation=np.asarray(mean_activation),
        counts={key: len(s.labels) for key, s in zip(("valid", "bd_valid", "test", "bd_test"),
                                                     (valid, bd_valid, test, bd_test)) if s is not None},
        **acc,
        goodnet_test_acc=metrics.accuracy(g_clean, test.labels),
        goodnet_test_asr=metrics.accuracy(g_bd, bd_test.labels) if poisoned else None,
        goodnet_detection_rate=metrics.pct((g_bd == n).sum(1), len(bd_test.labels)) if poisoned else None,
        goodnet_false_alarm_rate=metrics.pct((g_clean == n).sum(1), len(test.labels)),
        test_der=metrics.der(acc["test_acc"][0], acc["test_asr"][0], acc["test_acc"], acc["test_asr"])
        if poisoned else None,
        targets=tuple(sorted(int(t) for t in np.unique(bd_test.labels))) if poisoned else (),
        test_asr_excluding_target=None if bd_test_true_labels is None or not poisoned else
        metrics.asr_excluding_target(bd_test.preds, bd_test.labels, bd_test_true_labels),
    )


def select_cuts(curve: Curve, drops: Sequence[float], valid: LabeledPreds, test: LabeledPreds,
                bd_test: Optional[LabeledPreds]) -> tuple[Cut, ...]:
    """One :class:`Cut` per drop X: the stop rule on validation hits, the cut's test numbers and GoodNet's."""
    valid_hits = metrics.hits(valid.preds, valid.labels)
    g_clean = metrics.goodnet_predictions(test.preds[:1], test.preds, curve.num_classes)
    g_bd = None if bd_test is None else metrics.goodnet_predictions(bd_test.preds[:1], bd_test.preds,
                                                                    curve.num_classes)
    cuts = []
    for drop in drops:
        k, crossed = metrics.first_crossing(valid_hits, len(valid.labels), drop, curve.rule)
        cuts.append(Cut(
            drop=drop, channels_pruned=k, crossed=crossed,
            pruned_channels=tuple(sorted(int(c) for c in curve.order[:k])),
            **{key: _at(getattr(curve, key), k) for key in RATE_KEYS},
            goodnet=metrics.goodnet_rates(g_clean[k], test.labels, None if g_bd is None else g_bd[k],
                                          None if bd_test is None else bd_test.labels, curve.num_classes),
            test_der=_at(curve.test_der, k),
            test_asr_excluding_target=_at(curve.test_asr_excluding_target, k),
            test_asr_by_target=metrics.asr_by_target(bd_test.preds[k], bd_test.labels)
            if len(curve.targets) > 1 else None,
        ))
    return tuple(cuts)
