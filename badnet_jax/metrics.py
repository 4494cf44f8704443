"""Accuracy, attack success rate, GoodNet rates and the pruning stop rule, all from exact counts.

Everything is computed from integer counts and compared with exact rational arithmetic, so "exactly X
points below" is never mistaken for a crossing by float rounding.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Literal, Optional

import numpy as np

from badnet_jax.errors import ConfigError, arg

Rule = Literal["absolute", "relative"]


def pct(hits: int | np.ndarray, total: int) -> float | np.ndarray:
    """Percentage ``100 * hits / total`` (0 for an empty set)."""
    return 100.0 * np.asarray(hits) / total if total else np.zeros_like(np.asarray(hits), float)


def hits(preds: np.ndarray, labels: np.ndarray) -> int | np.ndarray:
    """Number of predictions equal to their label: an int for (N,) predictions, (M,) for (M, N).

    Raises:
        ConfigError: labels that are not one per prediction (N,).
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if labels.ndim != 1 or preds.ndim not in (1, 2) or preds.shape[-1] != len(labels):
        raise ConfigError(f"{arg('labels')}: shape {labels.shape} for predictions of shape {preds.shape}; expected "
                          "one label per image, (N,) for (N,) or (M, N) predictions", field="labels")
    if preds.ndim == 1:
        return int((preds == labels).sum())
    return (preds == labels[None, :]).sum(axis=1)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float | np.ndarray:
    """Percentage of predictions equal to their label (per row for (M, N)); use the target labels for ASR.

    The one accuracy of badnet-jax: training, fine-tuning, the defense and the benchmark all use it.
    """
    return pct(hits(preds, labels), len(labels))


def first_crossing(valid_hits: np.ndarray, total: int, drop: float, rule: Rule = "absolute") -> tuple[int, bool]:
    """The first k whose validation accuracy falls more than ``drop`` below the original (k = 0).

    Args:
        valid_hits: (61,) correct clean validation predictions for k = 0..60.
        total: number of clean validation images.
        drop: a fraction: 0.04 is 4 percentage points (``absolute``, the lab's rule) or 4% of the original
            accuracy (``relative``).
        rule: ``absolute`` or ``relative``.

    Returns:
        (k, crossed). When no k crosses, (last k, False).
    """
    if drop < 0:
        raise ValueError(f"drop must be >= 0, got {drop}")
    if rule not in ("absolute", "relative"):
        raise ValueError(f"rule must be 'absolute' or 'relative', got {rule!r}")
    x = Fraction(str(drop))  # 0.04 is exactly 4/100, not the binary float
    h0 = int(valid_hits[0])
    for k, hk in enumerate(np.asarray(valid_hits).tolist()):
        lost = Fraction(h0 - int(hk))  # acc0 - acc_k = lost / total
        limit = x * total if rule == "absolute" else x * h0
        if lost > limit:
            return k, True
    return len(valid_hits) - 1, False


def goodnet_predictions(pred_b: np.ndarray, pred_bprime: np.ndarray, num_classes: int) -> np.ndarray:
    """G's answer: B's class where B and B' agree, ``num_classes`` (= N, "poisoned") where they disagree."""
    return np.where(pred_b == pred_bprime, pred_b, num_classes)


@dataclasses.dataclass(frozen=True)
class GoodNetRates:
    """GoodNet percentages on a clean and a poisoned set (ASR and detection None without poisoned data)."""

    acc: float
    asr: Optional[float]
    detection_rate: Optional[float]
    false_alarm_rate: float


def goodnet_rates(g_clean: np.ndarray, y_clean: np.ndarray, g_bd: Optional[np.ndarray], y_bd: Optional[np.ndarray],
                  num_classes: int) -> GoodNetRates:
    """G's clean accuracy, ASR (answers the attacker's label), detection rate and false-alarm rate."""
    poisoned = g_bd is not None
    return GoodNetRates(
        acc=float(accuracy(g_clean, y_clean)),
        asr=float(accuracy(g_bd, y_bd)) if poisoned else None,
        detection_rate=float(pct(int((g_bd == num_classes).sum()), len(y_bd))) if poisoned else None,
        false_alarm_rate=float(pct(int((g_clean == num_classes).sum()), len(y_clean))),
    )


def der(acc0: float, asr0: float, acc: float | np.ndarray, asr: float | np.ndarray) -> float | np.ndarray:
    """Defense-effectiveness rating (BackdoorBench): (max(0, dASR) - max(0, dACC) + 1) / 2, in [0, 1].

    Args are percentages of the original model (acc0, asr0) and of the defended one (acc, asr).
    """
    d_asr = (asr0 - np.asarray(asr)) / 100.0
    d_acc = (acc0 - np.asarray(acc)) / 100.0
    return (np.maximum(0.0, d_asr) - np.maximum(0.0, d_acc) + 1.0) / 2.0


def asr_excluding_target(preds_MxN: np.ndarray, y_bd: np.ndarray, y_true: np.ndarray) -> Optional[np.ndarray]:
    """(M,) ASR over poisoned inputs whose true class is not the attacker's label (None if there are none: the
    share of nothing is no number, and JSON has no NaN)."""
    keep = np.asarray(y_true) != np.asarray(y_bd)
    if not keep.any():
        return None
    return pct((np.asarray(preds_MxN)[:, keep] == np.asarray(y_bd)[keep]).sum(1), int(keep.sum()))


def asr_by_target(preds_N: np.ndarray, y_bd: np.ndarray) -> dict[int, float]:
    """ASR per attacker label, for data poisoned towards several targets."""
    return {int(t): float(accuracy(preds_N[y_bd == t], y_bd[y_bd == t])) for t in np.unique(y_bd)}
