"""Choose the sweep's options by measurement: the fast sweep timed for every combination of a few options.

The defaults an accelerator gets (``SweepOptions``: the head implementation, ``batch_steps``, ``chunk``,
``orders_per_call``) are only as good as the machine they were measured on. A grid names a few values per
option, e.g. ``impl=reference,pallas;batch_steps=8,16,32``; every combination is planned first (so a
combination that cannot run is refused before anything is timed), then compiled and timed through the public
``rank_and_sweep`` on the images already on the device, the lab's one order and, with rankings, several orders
in one call. Each row keeps what the planner resolved (an ``impl=pallas`` that falls back says so) and the
time split between the device and the float64 settling.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import time
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from badnet_jax.bench.machine import timed
from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.sweep import SweepOptions, compile_sweep, plan_sweep, rank_and_sweep
from badnet_jax.sweep.rankings import RankingPlan

log = logging.getLogger(__name__)


def _whole(text: str) -> int:
    """A whole number written in ASCII digits (``int`` would also take other scripts' digits)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(text)
    return int(text)


# The options a grid may vary, and how a value is read from text.
GRID_FIELDS = {"impl": str, "batch_steps": _whole, "chunk": _whole, "orders_per_call": _whole}

Grid = tuple[tuple[str, tuple], ...]  # ((field, values), ...): hashable, so a frozen config can hold it


def parse_grid(text: str) -> Grid:
    """``"impl=reference,pallas;batch_steps=8,16"`` -> ``(("impl", ("reference", "pallas")), ("batch_steps",
    (8, 16)))``.

    Raises:
        ConfigError: an unknown option, a value of the wrong kind, an option named twice or with no values.
    """
    grid, seen = [], set()
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, values = part.partition("=")
        name = name.strip()
        if not eq or name not in GRID_FIELDS:
            raise ConfigError(f"{arg('grid', text)}: {part!r} is not OPTION=V1,V2 with OPTION one of "
                              f"{', '.join(GRID_FIELDS)}", field="grid")
        if name in seen:
            raise ConfigError(f"{arg('grid', text)}: {name} is named twice", field="grid")
        seen.add(name)
        try:
            parsed = tuple(GRID_FIELDS[name](v.strip()) for v in values.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"{arg('grid', text)}: {name} takes whole numbers, got {values!r}",
                              field="grid") from None
        if not parsed:
            raise ConfigError(f"{arg('grid', text)}: {name} has no values", field="grid")
        repeated = sorted({str(v) for v in parsed if parsed.count(v) > 1})
        if repeated:
            raise ConfigError(f"{arg('grid', text)}: {name} names {', '.join(repeated)} twice", field="grid")
        grid.append((name, parsed))
    if not grid:
        raise ConfigError(f"{arg('grid', text)}: no option to vary", field="grid")
    return tuple(grid)


def grid_options(base: SweepOptions, grid: Grid) -> list[SweepOptions]:
    """Every combination of the grid's values, the other options as in ``base`` (first option slowest)."""
    names = [name for name, _ in grid]
    return [dataclasses.replace(base, **dict(zip(names, combo)))
            for combo in itertools.product(*(values for _, values in grid))]


def time_grid(model: PrunableModel, params: Params, sets: Mapping[str, jax.Array], candidates: Sequence[SweepOptions],
              repeats: int, rankings: Optional[RankingPlan] = None,
              rank_labels: Optional[np.ndarray] = None) -> dict:
    """Time the fast sweep for each candidate; the fastest first in ``best``.

    Args:
        model, params: the model swept.
        sets: the sets the sweep runs on (on the device already), by name; the first is the ranking set.
        candidates: the options to time (``grid_options``).
        repeats: timed runs per candidate (median reported), after one compile and one untimed run.
        rankings: also time each candidate with these orders in one call (its ``orders_per_call`` applies).
        rank_labels: the ranking set's labels (the ``anp`` ranking).

    Returns:
        ``{"rows": [...], "best": {...}}``: per row the options asked, what the planner resolved (its
        strategy too: ``cumulative`` on a model whose logits are affine in the mask), ``s``
        (the median whole call), ``device_s`` and ``settle_s``, and with rankings ``rankings_s`` and
        ``vs_one`` (against the same options with the one order). ``best`` names the fastest row for one
        order and, with rankings, for the orders.

    Raises:
        ConfigError: a candidate the planner refuses, or ``orders_per_call`` > 1 without rankings (which it
            would not change), before anything is timed.
    """
    if rankings is None and any(c.orders_per_call > 1 for c in candidates):
        raise ConfigError(f"{arg('grid')}: orders_per_call only changes how several rankings are swept; give "
                          f"{arg('rankings')} too, or leave it out", field="grid")
    rank_on = next(iter(sets))
    plans = []
    for options in candidates:  # refuse up front, naming the combination
        try:
            plans.append(plan_sweep(options, list(sets.values()), model))
        except ConfigError as err:
            asked = " ".join(f"{f}={'default' if getattr(options, f) is None else getattr(options, f)}"
                             for f in GRID_FIELDS)
            # err.template keeps its marked names, so a command shows its own flags inside this message too
            raise ConfigError(f"{arg('grid')}: the combination {asked} cannot run: {err.template}",
                              field="grid") from err
    rows, one = [], {}
    for i, (options, plan) in enumerate(zip(candidates, plans)):
        row = {"options": {f: getattr(options, f) for f in GRID_FIELDS},
               "plan": {"strategy": plan.strategy, "impl": plan.impl, "batch_steps": plan.batch_steps,
                        "chunk": plan.chunk, "orders_per_call": plan.orders_per_call, "devices": plan.devices}}
        key = (plan.strategy, plan.impl, plan.batch_steps, plan.chunk)  # the one-order sweep ignores orders_per_call
        if key not in one:
            t = time.perf_counter()
            compile_sweep(model, params, sets, plan, rank_on=rank_on)
            compile_s = time.perf_counter() - t
            one[key] = _timed_split(lambda p=plan: rank_and_sweep(model, params, sets, p, rank_on=rank_on), repeats)
            one[key]["compile_s"] = compile_s
        row.update(one[key])
        if rankings is not None:
            ranked = _timed_split(lambda p=plan: rank_and_sweep(model, params, sets, p, rank_on=rank_on,
                                                                rankings=rankings, rank_labels=rank_labels), repeats)
            row.update({f"rankings_{k}": v for k, v in ranked.items()})
            row["vs_one"] = row["rankings_s"] / row["s"]
        rows.append(row)
        log.info("grid %d/%d %s: %s", i + 1, len(candidates), plan_label(row["plan"]), _times(row))
    best = {"one_order": min(range(len(rows)), key=lambda i: rows[i]["s"])}
    if rankings is not None:
        best["rankings"] = min(range(len(rows)), key=lambda i: rows[i]["rankings_s"])
    return {"rows": rows, "best": {k: {"row": i, "plan": rows[i]["plan"]} for k, i in best.items()}}


def format_grid(result: dict) -> str:
    """The grid as a table, one row per candidate, the fastest marked (when there is more than one)."""
    rows = result["rows"]
    ranked = "rankings_s" in rows[0]
    head = (f"{'strategy':15s} {'impl':10s} {'batch':>5s} {'chunk':>6s} {'opc':>4s} {'devs':>4s} {'one ms':>8s} "
            f"{'device':>8s} {'settle':>8s}")
    lines = [head + (f" {'ranks ms':>9s} {'vs one':>7s}" if ranked else "")]
    marks: dict[int, list[str]] = {}
    for what, best in result["best"].items():
        marks.setdefault(best["row"], []).append("one order" if what == "one_order" else what)
    for i, row in enumerate(rows):
        p = row["plan"]
        line = (f"{p['strategy']:15s} {p['impl']:10s} {p['batch_steps']:5d} {p['chunk']:6d} {p['orders_per_call']:4d} "
                f"{p.get('devices', 1):4d} {1e3 * row['s']:8.2f} {1e3 * row['device_s']:8.2f} "
                f"{1e3 * row['settle_s']:8.2f}")
        if ranked:
            line += f" {1e3 * row['rankings_s']:9.2f} {row['vs_one']:7.2f}"
        if i in marks and len(rows) > 1:
            line += "  <- fastest: " + ", ".join(marks[i])
        lines.append(line)
    return "\n".join(lines)


def _timed_split(sweep, repeats: int) -> dict:
    """One untimed run (allocations; a first call also compiles), then ``repeats`` timed: the median whole
    call and the median device / float64-settling parts."""
    sweep()
    runs = []
    s = timed(lambda: runs.append(sweep()) or runs[-1].orders, repeats)  # the results are on the host
    return {"s": s, "device_s": float(np.median([r.seconds["device"] for r in runs])),
            "settle_s": float(np.median([r.seconds["settle"] for r in runs]))}


def plan_label(plan: dict) -> str:
    """A row's resolved plan as ``strategy=... impl=... batch_steps=... chunk=... orders_per_call=... devices=...``."""
    return " ".join(f"{k}={v}" for k, v in plan.items())


def _times(row: dict) -> str:
    text = f"{1e3 * row['s']:.2f} ms (device {1e3 * row['device_s']:.2f}, settle {1e3 * row['settle_s']:.2f})"
    if "rankings_s" in row:
        text += f"; rankings {1e3 * row['rankings_s']:.2f} ms = {row['vs_one']:.2f}x one"
    return text
