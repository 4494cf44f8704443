"""Checked reads of untrusted JSON values: a graph document's names, numbers and node attributes.

Each check takes a decoded JSON value and what it is (for the message) and returns it as the IR holds it
(:mod:`badnet_jax.models.ir`), or raises :class:`Refused` saying what was found and what was expected.
:data:`ATTRS` maps every node attribute to its check. ``badnet_jax.io.graph_json`` reads whole documents
with them and turns a refusal into a :class:`~badnet_jax.errors.CheckpointError` naming the source.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import numpy as np

from badnet_jax.io.keras_config import MAX_ELEMENTS, MAX_NAME
from badnet_jax.models.ir import ELEMENTWISE


class Refused(Exception):
    """What is wrong with a value (the caller names the document it came from)."""


def no_constant(name: str) -> Any:
    """Refuse JSON's NaN and Infinity (``json.loads``' ``parse_constant``)."""
    raise Refused(f"holds {name}, which is no number")


def short(value: Any) -> str:
    """``value`` as JSON, cut to 60 characters, for a message."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def json_object(value: Any, keys: tuple[str, ...], what: str) -> dict:
    """``value``, a JSON object with exactly ``keys``."""
    if not isinstance(value, dict):
        raise Refused(f"{what} is {short(value)}, expected an object")
    missing = [k for k in keys if k not in value]
    extra = sorted(set(value) - set(keys))
    if missing or extra:
        raise Refused(f"{what} has " + "; ".join(
            ([f"no {', '.join(missing)}"] if missing else []) + ([f"unknown entries {extra}"] if extra else [])))
    return value


def name(value: Any, what: str) -> str:
    """``value``, a printable name of 1 to ``MAX_NAME`` characters."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or not value.isprintable():
        raise Refused(f"{what} is {short(value)}, expected a printable name of 1 to {MAX_NAME} characters")
    return value


def integer(value: Any, what: str, low: int) -> int:
    """``value``, an integer from ``low`` to ``MAX_ELEMENTS`` (no boolean)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_ELEMENTS:
        raise Refused(f"{what} is {short(value)}, expected an integer from {low} to {MAX_ELEMENTS}")
    return value


def number(value: Any, what: str, low: float = -math.inf, above: bool = False) -> float:
    """``value`` as a float: finite, at least ``low`` (above it if ``above``)."""
    try:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > low if above else value >= low))
    except OverflowError:  # an integer beyond float's range
        ok = False
    if not ok:
        bound = "" if low == -math.inf else f" {'>' if above else '>='} {low:g}"
        raise Refused(f"{what} is {short(value)}, expected a finite number{bound}")
    return float(value)


def pair(value: Any, what: str, low: int = 1) -> tuple[int, int]:
    """``value``, two integers of at least ``low`` (strides, dilation, a window)."""
    if not isinstance(value, list) or len(value) != 2:
        raise Refused(f"{what} is {short(value)}, expected two integers >= {low}")
    return integer(value[0], what, low), integer(value[1], what, low)


def padding(value: Any, what: str) -> str:
    """``value``, Keras' 'valid' or 'same'."""
    if value not in ("valid", "same"):
        raise Refused(f"{what} is {short(value)}, expected 'valid' or 'same'")
    return value


def pad(value: Any, what: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``value``, explicit zero padding ((top, bottom), (left, right))."""
    if not isinstance(value, list) or len(value) != 2:
        raise Refused(f"{what} is {short(value)}, expected [[top, bottom], [left, right]]")
    return pair(value[0], what, 0), pair(value[1], what, 0)


def max_value(value: Any, what: str) -> Optional[float]:
    """``value``, a ReLU's cap: None or a finite number >= 0."""
    return None if value is None else number(value, what, 0.0)


def dropout(value: Any, what: str) -> Optional[float]:
    """``value``, an identity's dropout rate: None or from 0 to below 1."""
    if value is None:
        return None
    rate = number(value, what, 0.0)
    if rate >= 1:
        raise Refused(f"{what} is {short(value)}, expected null or a rate from 0 to below 1")
    return rate


def epsilon(value: Any, what: str) -> float:
    """``value``, a normalization's epsilon: > 0 and finite in float32."""
    eps = number(value, what, 0.0, above=True)
    if eps > float(np.finfo(np.float32).max):  # inf in float32: the float32 and float64 networks would part
        raise Refused(f"{what} is {short(value)}, expected a number > 0 that float32 holds (at most 3.4e38)")
    return eps


def fn(value: Any, what: str) -> str:
    """``value``, an elementwise activation's name (:data:`~badnet_jax.models.ir.ELEMENTWISE`)."""
    if value not in ELEMENTWISE:
        raise Refused(f"{what} is {short(value)}, expected one of {', '.join(ELEMENTWISE)}")
    return value


def shape(value: Any, what: str) -> tuple[int, ...]:
    """``value``, a reshape's target: one to three integers >= 1."""
    if not isinstance(value, list) or not 1 <= len(value) <= 3:
        raise Refused(f"{what} is {short(value)}, expected one to three integers >= 1")
    return tuple(integer(v, what, 1) for v in value)


def flag(value: Any, what: str) -> bool:
    """``value``, a boolean."""
    if not isinstance(value, bool):
        raise Refused(f"{what} is {short(value)}, expected true or false")
    return value


# attribute -> its check: (value, what) -> the value as the IR holds it
ATTRS = {
    "scale": number, "offset": number, "strides": pair, "dilation": pair, "window": pair, "padding": padding,
    "epsilon": epsilon, "negative_slope": lambda v, w: number(v, w, 0.0),
    "threshold": lambda v, w: number(v, w, 0.0), "max_value": max_value, "pad": pad, "dropout": dropout,
    "fn": fn, "target": shape, "keepdims": flag, "crop": pad, "size": pair,
}
# Attributes a document may lack, read as their defaults: added to an op after documents without them were
# written (an identity's dropout rate, a global pooling's keepdims), so those checkpoints still load.
OPTIONAL_ATTRS = ("dropout", "keepdims")


__all__ = ["ATTRS", "OPTIONAL_ATTRS", "Refused", "dropout", "epsilon", "flag", "fn", "integer", "json_object",
           "max_value", "name", "no_constant", "number", "pad", "padding", "pair", "shape", "short"]
