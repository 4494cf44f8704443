"""Rankings side by side: each ranking's curve and its cut for every drop X, from one sweep's predictions.

The question the lab's report leaves open ("optimizing pruning strategies to balance security and
performance") is answered per model by comparing, for each X, where each ranking stops and what its B' then
costs (clean test accuracy) and buys (attack success rate, DER). The cut uses each ranking's own validation
curve and the same stop rule as the defense (``metrics.first_crossing``). ``random`` has R orders: its
entries hold one value per order, and the report shows their mean and range.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from badnet_jax import metrics
from badnet_jax.metrics import Rule


@dataclasses.dataclass(frozen=True)
class RankingCut:
    """One ranking's cut for one drop X: per order (one, or R for ``random``) k and the test numbers there."""

    drop: float
    channels_pruned: tuple[int, ...]
    valid_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    test_asr: Optional[tuple[float, ...]]
    test_der: Optional[tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class RankingCurve:
    """One ranking's orders and curves: arrays are (R, 61) percentages by order and k (``test_der`` in [0, 1])."""

    orders: np.ndarray
    valid_acc: np.ndarray
    valid_asr: Optional[np.ndarray]
    test_acc: np.ndarray
    test_asr: Optional[np.ndarray]
    test_der: Optional[np.ndarray]
    selected: tuple[RankingCut, ...]

    def to_json(self) -> dict[str, Any]:
        """``{order, valid_acc, valid_asr, test_acc, test_asr, test_der, selected}``: one order's values as
        they are, or lists over the R orders (``order[i]`` goes with ``test_acc[i]``) for ``random``."""
        one = len(self.orders) == 1
        flat = lambda a: None if a is None else (a[0] if one else a).tolist()
        flat_t = lambda t: None if t is None else (t[0] if one else list(t))
        out = {key: flat(getattr(self, key)) for key in ("valid_acc", "valid_asr", "test_acc", "test_asr", "test_der")}
        out["order"] = flat(self.orders)
        out["selected"] = [{"drop": c.drop, **{key: flat_t(getattr(c, key)) for key in
                                               ("channels_pruned", "valid_acc", "test_acc", "test_asr", "test_der")}}
                           for c in self.selected]
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RankingCurve":
        """The inverse of :meth:`to_json`."""
        one = np.ndim(d["order"]) == 1
        arr = lambda v: None if v is None else np.atleast_2d(np.asarray(v))
        tup = lambda v: None if v is None else ((v,) if one else tuple(v))
        cuts = tuple(RankingCut(drop=c["drop"], **{key: tup(c[key]) for key in
                                                   ("channels_pruned", "valid_acc", "test_acc", "test_asr",
                                                    "test_der")}) for c in d["selected"])
        return cls(orders=arr(d["order"]), **{key: arr(d[key]) for key in
                                              ("valid_acc", "valid_asr", "test_acc", "test_asr", "test_der")},
                   selected=cuts)


def ranking_curve(orders: np.ndarray, preds: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                  drops: Sequence[float], rule: Rule, original: Mapping[str, Optional[float]]) -> RankingCurve:
    """One ranking's curves and cuts.

    Args:
        orders: (R, 60) the ranking's orders.
        preds: set role (``clean_valid``, ``bd_valid``, ``clean_test``, ``bd_test``; poisoned ones optional) ->
            (R, 61, N) predictions along each order.
        labels: set role -> (N,) labels (the attacker's targets for the poisoned sets).
        drops, rule: the stop rule, as the defense applies it.
        original: B's own ``test_acc`` and ``test_asr`` (for DER).
    """
    rate = lambda role: (None if role not in preds
                         else np.stack([metrics.accuracy(p, labels[role]) for p in preds[role]]))
    valid_acc, valid_asr, test_acc, test_asr = (rate(r) for r in ("clean_valid", "bd_valid", "clean_test", "bd_test"))
    test_der = None if test_asr is None else np.asarray(
        metrics.der(original["test_acc"], original["test_asr"], test_acc, test_asr))
    n_valid = len(labels["clean_valid"])
    cuts = []
    for drop in drops:
        ks = [metrics.first_crossing(metrics.hits(p, labels["clean_valid"]), n_valid, drop, rule)[0]
              for p in preds["clean_valid"]]
        at = lambda a: None if a is None else tuple(float(a[i, k]) for i, k in enumerate(ks))
        cuts.append(RankingCut(drop=float(drop), channels_pruned=tuple(ks), valid_acc=at(valid_acc),
                               test_acc=at(test_acc), test_asr=at(test_asr), test_der=at(test_der)))
    return RankingCurve(orders=np.asarray(orders), valid_acc=valid_acc, valid_asr=valid_asr, test_acc=test_acc,
                        test_asr=test_asr, test_der=test_der, selected=tuple(cuts))


def summary(values: Optional[tuple[float, ...]], digits: int = 2) -> str:
    """A cut's value as text: the value for one order; ``mean [min, max]`` over R orders; ``n/a`` if absent."""
    if values is None:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


COMPARISON_HEADER = ["ranking", "cut k", "valid acc", "test acc", "test ASR", "DER"]


def comparison_rows(rankings: Mapping[str, RankingCurve], drop_index: int) -> list[list[str]]:
    """One row per ranking for the ``drop_index``-th X: cut k, validation and test accuracy, ASR, DER."""
    rows = []
    for name, r in rankings.items():
        c = r.selected[drop_index]
        k = summary(tuple(float(v) for v in c.channels_pruned), 1) if len(c.channels_pruned) > 1 else \
            str(c.channels_pruned[0])
        label = f"{name} (R={len(r.orders)})" if len(r.orders) > 1 else name
        rows.append([label, k, summary(c.valid_acc), summary(c.test_acc), summary(c.test_asr),
                     summary(c.test_der, 3)])
    return rows
