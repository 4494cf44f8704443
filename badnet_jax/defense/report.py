"""Renderings of a :class:`~badnet_jax.defense.curve.Curve`: curve.json, report.md, curve.png and the terminal table.

Each is written atomically; ``badnet_jax.defense.outputs`` puts them together with the models as one result.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from badnet_jax.io import fileio
from badnet_jax.defense.ranking_curves import COMPARISON_HEADER, comparison_rows
from badnet_jax.defense.curve import Curve


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _round(obj.tolist())
    if isinstance(obj, np.generic):
        return _round(obj.item())
    return obj


def curve_json_text(curve: Curve) -> str:
    """The curve as sorted, rounded JSON: identical runs give identical bytes (timings live in report.md)."""
    return json.dumps(_round(curve.to_json()), indent=1, sort_keys=True) + "\n"


def write_curve_json(path: Path, curve: Curve) -> Path:
    """Write :func:`curve_json_text` to ``path`` atomically."""
    return fileio.atomic_write_text(path, curve_json_text(curve))


def read_curve_json(path: Path) -> Curve:
    """The :class:`Curve` in a ``curve.json`` written by :func:`write_curve_json`."""
    return Curve.from_json(json.loads(Path(path).read_text()))


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    # Fixed metadata (no matplotlib version, no timestamp) keeps the PNG byte-identical across runs.
    fig.savefig(buf, format="png", metadata={"Software": "badnet-jax"})
    plt.close(fig)
    return fileio.atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rankings(path: Path, curve: Curve) -> Path:
    """The rankings compared: clean test accuracy against test ASR along each ranking's curve, cuts marked.

    Each line runs from B (k = 0) to all channels pruned; ``random`` is its orders' mean, the orders themselves
    faint. Without poisoned data there is no ASR: accuracy is drawn against the fraction pruned instead.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    markers = "os^DvP*X"
    for i, (name, r) in enumerate(curve.rankings.items()):
        color = f"C{i}"
        steps = np.arange(r.test_acc.shape[1]) / (r.test_acc.shape[1] - 1)
        xs = r.test_asr if r.test_asr is not None else np.broadcast_to(steps, r.test_acc.shape)
        if len(r.orders) > 1:
            for x, y in zip(xs, r.test_acc):
                ax.plot(x, y, "-", color=color, lw=0.5, alpha=0.25)
        label = f"{name} (mean of {len(r.orders)})" if len(r.orders) > 1 else name
        ax.plot(xs.mean(0), r.test_acc.mean(0), "-", color=color, lw=1.6, label=label)
        for j, cut in enumerate(r.selected):
            x = np.mean(cut.test_asr) if cut.test_asr is not None else np.mean(cut.channels_pruned) / (len(steps) - 1)
            ax.plot([x], [np.mean(cut.test_acc)], markers[j % len(markers)], color=color, ms=6, mec="black", mew=0.5)
    for j, cut in enumerate(curve.selected):  # one legend entry per X, in grey
        ax.plot([], [], markers[j % len(markers)], color="grey", mec="black", mew=0.5,
                label=f"cut X={100 * cut.drop:g}")
    ax.set_xlabel("attack success rate on poisoned test data (%)" if curve.poisoned
                  else "fraction of pool_3 channels pruned")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(curve.title + ": rankings compared" + ("" if curve.poisoned else " (no poisoned data: no ASR)"),
                 fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def comparison_text(curve: Curve) -> str:
    """The rankings compared as fixed-width text for the terminal: one block per drop X."""
    blocks = []
    for j, cut in enumerate(curve.selected):
        rows = [COMPARISON_HEADER] + comparison_rows(curve.rankings, j)
        widths = [max(len(r[i]) for r in rows) for i in range(len(COMPARISON_HEADER))]
        blocks.append(f"X = {100 * cut.drop:g}:\n" + "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths))
                                                             for r in rows))
    return "\n\n".join(blocks)


def plot_curve(path: Path, curve: Curve) -> Path:
    """Accuracy and ASR (validation and test) against the fraction of pool_3 channels pruned, cuts marked."""
    plt = _pyplot()
    k = np.arange(len(curve.valid_acc))
    frac = k / (len(k) - 1)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    lines = [(curve.valid_acc, "-", "tab:blue", "clean accuracy (valid)"),
             (curve.valid_asr, "-", "tab:red", "attack success rate (bd valid)"),
             (curve.test_acc, ":", "tab:blue", "clean accuracy (test)"),
             (curve.test_asr, ":", "tab:red", "attack success rate (bd test)")]
    for values, style, color, label in lines:
        if values is not None:  # no poisoned data: the ASR lines are simply not there
            ax.plot(frac, values, style, color=color, label=label)
    for cut in curve.selected:
        f = cut.channels_pruned / (len(k) - 1)
        ax.axvline(f, color="grey", lw=0.8, ls="--")
        ax.annotate(f"X={100 * cut.drop:g}: {cut.channels_pruned}", (f, 3), rotation=90, fontsize=7,
                    ha="right", va="bottom", color="dimgrey")
    ax.set_xlabel("fraction of pool_3 channels pruned")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(curve.title + ("" if curve.poisoned else " (no poisoned data: no ASR)"), fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def table_rows(curve: Curve) -> list[list[str]]:
    """One row per selected drop (and one per fine-pruned B'): X, channels, valid acc, B' and G test numbers."""
    rows = []
    for s in curve.selected:
        rates = lambda g: [_fmt(g.acc), _fmt(g.asr), _fmt(g.detection_rate), _fmt(g.false_alarm_rate)]
        channels = f"{s.channels_pruned}" + ("" if s.crossed else " (not crossed)")
        rows.append([f"{100 * s.drop:g}", channels, _fmt(s.valid_acc), _fmt(s.test_acc), _fmt(s.test_asr),
                     *rates(s.goodnet), _fmt(s.test_der, 3)])
        if s.finetuned is not None:
            f = s.finetuned
            rows.append([f"{100 * s.drop:g} +FT", channels, "", _fmt(f.test_acc), _fmt(f.test_asr),
                         *rates(f.goodnet), _fmt(f.test_der, 3)])
    return rows


RULE_TEXT = {"absolute": "absolute (first k with validation accuracy more than X percentage points below B's)",
             "relative": "relative (first k with validation accuracy more than X percent of B's accuracy below it)"}
TABLE_HEADER = ["X (pts)", "channels pruned", "valid acc", "B' test acc", "B' test ASR", "G test acc",
                "G test ASR", "G detection", "G false alarm", "DER"]


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_header(curve: Curve) -> list[str]:
    """The table's column names; X is in points under the absolute rule, in % of B's accuracy under relative."""
    return ["X (pts)" if curve.rule == "absolute" else "X (% of B's acc)", *TABLE_HEADER[1:]]


def format_table(curve: Curve) -> str:
    """The report table as fixed-width text for the terminal."""
    rows = [table_header(curve)] + table_rows(curve)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def write_report_md(path: Path, curve: Curve, timings: Mapping[str, float],
                    details: Optional[Mapping[str, str]] = None) -> Path:
    """report.md: the table, the original model's numbers, the inputs (size, sha256), versions and timings.

    ``details``: further "name: text" lines of how the run was done (the input scale chosen, the sweep plan).
    """
    lines = [f"# {curve.title}", ""]
    b = curve.original
    asr = lambda v: "n/a (no poisoned data)" if v is None else f"{v:.3f}%"
    lines += [f"Original B: validation accuracy {b['valid_acc']:.3f}%, validation ASR {asr(b['valid_asr'])}, "
              f"test accuracy {b['test_acc']:.3f}%, test ASR {asr(b['test_asr'])}.", "",
              f"Stop rule: {RULE_TEXT[curve.rule]}. "
              "All percentages. G answers N = "
              f"{curve.num_classes} ('poisoned') where B and B' disagree. DER = (max(0, dASR) - "
              "max(0, dACC) + 1) / 2 on test data (BackdoorBench). Rows '+FT': the same B' fine-pruned "
              "(fine-tuned on clean validation data with its mask frozen).", ""]
    if not curve.poisoned:
        lines += ["No poisoned data was given: ASR, detection and DER are n/a (no poisoned data). The cut needs clean "
                  "validation data only; G's false-alarm rate is measured on the clean test data.", ""]
    lines.append("| " + " | ".join(table_header(curve)) + " |")
    lines.append("|" + "---|" * len(TABLE_HEADER))
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(curve)]
    for sel in curve.selected:
        extra = []
        if sel.test_asr_excluding_target is not None:
            extra.append(f"ASR excluding inputs of the target class {sel.test_asr_excluding_target:.2f}%")
        if sel.test_asr_by_target is not None:
            extra.append("ASR by target " + ", ".join(f"{t}: {v:.2f}%" for t, v in sel.test_asr_by_target.items()))
        if extra:
            lines.append(f"- X={100 * sel.drop:g}: " + "; ".join(extra))
    if curve.rankings is not None:
        lines += ["", "## Rankings compared", "",
                  "Each ranking's own cut by the same stop rule, on its own validation curve; the table above is "
                  f"the first ranking's ({next(iter(curve.rankings))}). random: mean [min, max] over its orders. "
                  "Plot: `rankings.png`.", ""]
        for j, cut in enumerate(curve.selected):
            lines += [f"X = {100 * cut.drop:g}:", "", "| " + " | ".join(COMPARISON_HEADER) + " |",
                      "|" + "---|" * len(COMPARISON_HEADER)]
            lines += ["| " + " | ".join(r) + " |" for r in comparison_rows(curve.rankings, j)] + [""]
    lines += ["", "## Inputs", "", "| role | file | bytes | sha256 |", "|---|---|---|---|"]
    for role, f in curve.inputs.items():
        lines.append(f"| {role} | `{f['path']}` | {f['bytes']} | `{f['sha256']}` |")
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in curve.versions.items()]
    if details:
        lines += ["", "## How it ran", ""] + [f"- {k}: {v}" for k, v in details.items()]
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.2f}" for k, v in timings.items()]
    lines += ["", "Pruning curve: `curve.json`, plot: `curve.png`.", ""]
    return fileio.atomic_write_text(path, "\n".join(lines))
