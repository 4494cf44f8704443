"""The sweep's result: every set's predictions at every step of every order, with what decided them.

:func:`~badnet_jax.sweep.run.rank_and_sweep` returns a :class:`Sweep`; the defense reads its curves from it
(``badnet_jax.defense.curve``), and the GoodNet its masks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from badnet_jax.models.affine import prefix_masks
from badnet_jax.sweep.plan import SweepPlan
from badnet_jax.sweep.rankings import RankingPlan


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Result of :func:`rank_and_sweep`: every set's predictions at every step of every order.

    C is the model's channel count in its pruned layer (the lab's DeepID: 60 of pool_3), so each order has
    C + 1 steps, k = 0..C.

    Attributes:
        orders: (R, C) channels in pruning order, one row per ``labels`` entry (the lab's activation ranking:
            increasing mean activation, ties by channel index).
        labels: what each order is (``activation``, ``clp``, ``random/0``, ..., or ``order`` for a given one).
        mean_activation: (C,) mean activation of the pruned layer per channel over the ranking set (None
            without one).
        all_preds: set name -> (R, C + 1, N) int32 predictions of B' for each order and k, near-ties settled in
            float64 (``badnet_jax.numerics.ties``, ``badnet_jax.numerics.settling``).
        plan: the plan the sweep ran with.
        rankings: the rankings it ran.
        settled: set name -> how many of its predictions were near-ties recomputed in float64.
        ranking_settled: whether the activation ranking had near-ties that float64 decided.
        seconds: where the call's time went: ``tie_bound`` (a model's near-tie bound measured on its images
            before the sweep; 0 for the lab's DeepID, whose bound is derived), ``device`` (the jitted call,
            results on the host) and ``settle`` (float64 near-ties on the host), the last two summed over a
            second sweep if the ranking needed one.
    """

    orders: np.ndarray
    labels: tuple[str, ...]
    mean_activation: Optional[np.ndarray]
    all_preds: dict[str, np.ndarray]
    plan: SweepPlan
    rankings: RankingPlan
    settled: dict[str, int] = dataclasses.field(default_factory=dict)
    ranking_settled: bool = False
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def order(self) -> np.ndarray:
        """(C,) the first (primary) order."""
        return self.orders[0]

    @property
    def masks(self) -> np.ndarray:
        """(C + 1, C) prefix masks of the primary order; row k prunes ``order[:k]``."""
        return prefix_masks(self.order)

    @property
    def preds(self) -> dict[str, np.ndarray]:
        """Set name -> (C + 1, N) predictions along the primary order."""
        return {n: p[0] for n, p in self.all_preds.items()}

    def preds_of(self, label: str) -> dict[str, np.ndarray]:
        """Set name -> (C + 1, N) predictions along the order labelled ``label``."""
        i = self.labels.index(label)
        return {n: p[i] for n, p in self.all_preds.items()}
