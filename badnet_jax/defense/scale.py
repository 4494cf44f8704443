"""Which input scale a BadNet takes: raw pixels 0..255 (the lab's B) or pixels / 255 (the 2020 BadNets).

A Keras file does not say: the CSAW-HackML-2020 competition's eval.py divides by 255 before calling the
model, the lab's code does not. Fed the wrong scale, a BadNet still answers, badly (the competition's
sunglasses model: 48.9% clean accuracy on raw pixels, 97.9% at / 255), and every number after it is
garbage. So ``auto`` takes the scale a badnet-jax-written file records; else it measures accuracy at both
scales on labelled images and takes the clearly better one, saying what it measured on; when neither is
clearly better and plausible it refuses rather than guess. Labels the model cannot output are refused first
(data for another model measures 0% at both scales, which says nothing about the scale).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg
from badnet_jax.metrics import accuracy
from badnet_jax.models.deepid import as_model
from badnet_jax.pixels import INPUT_SCALES
from badnet_jax.models.predict import predict
from badnet_jax.models.protocol import Params, PrunableModel

log = logging.getLogger(__name__)

CHOICES = ("auto", *INPUT_SCALES)
SAMPLE = 512  # clean images measured at each scale: plenty to tell 98% from 50% (~2% standard error), ~0.2 s
PLAUSIBLE = 50.0  # the chosen scale's clean accuracy must reach this (percent) ...
MARGIN = 10.0  # ... and beat the other scale's by this many points


@dataclasses.dataclass(frozen=True)
class ScaleChoice:
    """The input scale chosen, how, and the clean accuracies measured at each scale (percent), if any."""

    scale: str
    how: str  # "given", "recorded" (in a badnet-jax-written file) or "measured"
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    images: int = 0
    measured_on: str = "clean images"  # what the measured images are, as a reader should read it

    def describe(self) -> str:
        """One line for logs and report.md."""
        if self.how == "measured":
            measured = ", ".join(f"{s}: {a:.2f}%" for s, a in self.accuracy.items())
            return f"{self.scale} (measured on {self.images} {self.measured_on}: {measured})"
        return f"{self.scale} ({self.how})"


def accuracy_at_each_scale(model: PrunableModel, params: Params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """B's clean accuracy (percent) on ``x, y`` at each input scale."""
    model = as_model(model)
    return {s: float(accuracy(predict(model.with_input_scale(s), params, x), y)) for s in INPUT_SCALES}


def clear_winner(acc: dict[str, float]) -> Optional[str]:
    """The scale ``auto`` takes from these accuracies: at least ``PLAUSIBLE`` and ``MARGIN`` points ahead of the
    other, else None (no scale can be told)."""
    best, other = sorted(INPUT_SCALES, key=lambda s: -acc[s])
    return best if acc[best] >= PLAUSIBLE and acc[best] - acc[other] >= MARGIN else None


def choose_input_scale(model: PrunableModel, params: Params, input_scale: str = "auto", recorded: Optional[str] = None,
                       x: Optional[np.ndarray] = None, y: Optional[np.ndarray] = None,
                       source: str = "the model", measured_on: str = "clean images",
                       recorded_in: Optional[str] = None) -> ScaleChoice:
    """Resolve ``input_scale`` (``auto``, ``raw`` or ``255``) for this model, once.

    ``auto`` takes the scale a badnet-jax-written file ``recorded``, if any. Else it measures accuracy at both
    scales on up to :data:`SAMPLE` labelled images ``x, y`` (pixels 0..255) and takes the scale that reaches
    :data:`PLAUSIBLE` and beats the other by :data:`MARGIN` points.

    Args:
        source: the model's name in messages (e.g. its file).
        measured_on: what ``x, y`` are, for the log line and report (e.g. "clean images").
        recorded_in: the file that records ``recorded``, for the warning when ``input_scale`` overrides it
            (None: ``source``).

    Raises:
        ConfigError: an unknown scale; neither scale clearly right; ``auto`` with nothing to decide on.
        DataFileError: a label in ``y`` outside the model's classes (checked before measuring).
    """
    if input_scale not in CHOICES:
        raise ConfigError(f"{arg('input_scale')} must be one of {', '.join(CHOICES)}, got {input_scale!r}",
                          field="input_scale")
    if input_scale != "auto":
        if recorded is not None and recorded != input_scale:
            log.warning("Input scale %s, as given, instead of %s, which %s records: its predictions are computed "
                        "at the given scale.", input_scale, recorded, recorded_in or source)
        return ScaleChoice(input_scale, "given")
    if recorded is not None:
        return ScaleChoice(recorded, "recorded")
    if x is None or y is None or not len(y):
        raise ConfigError(f"cannot tell the input scale of {source} without labelled clean images: pass "
                          f"{arg('input_scale', 'raw')} (the lab's B) or 255 (the CSAW-HackML-2020 BadNets)",
                          field="input_scale")
    x, y = x[:SAMPLE], np.asarray(y[:SAMPLE])
    outside = (y < 0) | (y >= model.num_classes)
    if outside.any():
        raise DataFileError(f"the {measured_on} do not fit {source}: label {int(y[outside][0])} is outside "
                            f"[0, {model.num_classes}) for a {model.num_classes}-class model")
    acc = accuracy_at_each_scale(model, params, x, y)
    best = clear_winner(acc)
    measured = ", ".join(f"{s}: {a:.2f}%" for s, a in acc.items())
    if best is None:
        raise ConfigError(f"cannot tell the input scale of {source}: accuracy on {len(y)} {measured_on} is "
                          f"{measured}; pass {arg('input_scale', 'raw')} or 255 (or check that the data fits the "
                          "model)",
                          field="input_scale")
    choice = ScaleChoice(best, "measured", acc, len(y), measured_on)
    log.info("Input scale %s.", choice.describe())
    return choice
