"""Renderings of a :class:`~badnet_jax.defense.curve.Curve`: curve.json, report.md, curve.png and the terminal table.

Each is written atomically; ``badnet_jax.defense.outputs`` puts them together with the models as one result.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from badnet_jax.io import atomic, fileio
from badnet_jax.defense.ranking_curves import COMPARISON_HEADER, comparison_rows
from badnet_jax.defense.curve import Curve, coarse_validation_note


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
    return json.dumps(_round(curve.to_json()), indent=1, sort_keys=True, allow_nan=False) + "\n"  # strict JSON


def pruned_layer(curve: Curve) -> str:
    """The layer whose channels the curve prunes (the lab's pool_3 unless the curve names another)."""
    return "pool_3" if curve.model is None else curve.model["layer"]


def write_curve_json(path: Path, curve: Curve) -> Path:
    """Write :func:`curve_json_text` to ``path`` atomically."""
    return atomic.atomic_write_text(path, curve_json_text(curve))


CSV_HEADER = ("k_pruned", "channel", "sorted_mean_act", "valid_acc", "bd_valid_asr", "test_acc", "bd_test_asr")


def curve_csv_text(curve: Curve) -> str:
    """The curve in the shape of the lab's published ``lab3_prune_curve.csv``: one row per k = 1..60 with the
    channel pruned at that step, its mean activation on clean validation data and B''s accuracy and ASR per
    set; a set that was not given (no poisoned data) leaves its column empty. Rates as exact as they were
    computed (Python's shortest round-trip float text); mean activations as the lab prints them."""
    rates = [curve.valid_acc, curve.valid_asr, curve.test_acc, curve.test_asr]
    lines = [",".join(CSV_HEADER)]
    for k in range(1, len(curve.order) + 1):
        channel = int(curve.order[k - 1])
        cells = [str(k), str(channel), f"{float(curve.mean_activation[channel]):.7e}"]
        cells += ["" if r is None else repr(float(r[k])) for r in rates]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def write_curve_csv(path: Path, curve: Curve) -> Path:
    """Write :func:`curve_csv_text` to ``path`` atomically."""
    return atomic.atomic_write_text(path, curve_csv_text(curve))


def read_curve_json(path: Path) -> Curve:
    """The :class:`Curve` in a ``curve.json`` written by :func:`write_curve_json`."""
    return Curve.from_json(json.loads(Path(path).read_text()))


def _import_matplotlib() -> None:
    """Import matplotlib whatever ``MPLBACKEND`` says.

    The object API used here (no pyplot) never consults that setting; only ``import matplotlib`` does, and
    raises on a value it does not know. The variable is set aside for the import: a plot must not lose a
    run's results at the very end.
    """
    if "matplotlib" not in sys.modules:
        saved = os.environ.pop("MPLBACKEND", None)
        try:
            import matplotlib  # noqa: F401
        finally:
            if saved is not None:
                os.environ["MPLBACKEND"] = saved


def preload_plotting() -> None:
    """Import what the plots draw with (matplotlib's Figure and Agg canvas) ahead of time.

    The defense calls it from a worker thread while the sweep runs (the main thread then waits on the device
    without the GIL), so the plots at the end cost their drawing only, not ~0.3 s of imports. Where
    ``MPLBACKEND`` is set it does nothing: :func:`_import_matplotlib` sets that variable aside, which is not
    for a second thread to do while the first may read the environment.
    """
    if os.environ.get("MPLBACKEND") is not None:
        return
    _import_matplotlib()
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def _figure(figsize: tuple[float, float], dpi: int = 110, layout: str | None = None):
    """A matplotlib Figure drawn by Agg (see :func:`_import_matplotlib`)."""
    _import_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    # Fixed metadata (no matplotlib version, no timestamp) keeps the PNG byte-identical across runs.
    fig.savefig(buf, format="png", metadata={"Software": "badnet-jax"})
    return atomic.atomic_write_bytes(path, buf.getvalue())


_CUT_STYLE = (("o", "tab:red"), ("s", "tab:orange"), ("D", "magenta"), ("^", "black"), ("v", "tab:brown"),
              ("P", "tab:pink"), ("X", "tab:olive"), ("*", "tab:cyan"))


def plot_rankings(path: Path, curve: Curve) -> Path:
    """The rankings compared, one panel each on shared axes: clean test accuracy against test ASR from B
    (k = 0) to all channels pruned, coloured by k, every cut marked and listed.

    In each panel the other rankings' curves are drawn in light grey for comparison; ``random`` is its
    orders' mean, the orders themselves faint. Cuts of several X at the same point stay visible (concentric
    open markers, largest first). Without poisoned data there is no ASR: accuracy is drawn against the
    fraction pruned instead.
    """
    _import_matplotlib()
    import matplotlib.cm
    import matplotlib.colors
    import matplotlib.lines
    from matplotlib.collections import LineCollection

    names = list(curve.rankings)
    n = len(names)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    spare = nrows * ncols > n  # an empty panel takes the legend; else it goes under the panels
    fig = _figure((4.1 * ncols + 1.0, 3.7 * nrows + (0 if spare else 0.5)), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    poisoned = all(r.test_asr is not None for r in curve.rankings.values())
    steps = next(iter(curve.rankings.values())).test_acc.shape[1]
    ks = np.arange(steps)
    norm = matplotlib.colors.Normalize(0, steps - 1)
    cmap = matplotlib.colormaps["viridis"]

    def xs_of(r):
        return r.test_asr if poisoned else np.broadcast_to(ks / (steps - 1), r.test_acc.shape)

    means = {name: (xs_of(r).mean(0), r.test_acc.mean(0)) for name, r in curve.rankings.items()}
    for i, name in enumerate(names):
        ax = axes.flat[i]
        r = curve.rankings[name]
        for other, (x, y) in means.items():
            if other != name:
                ax.plot(x, y, "-", color="0.86", lw=0.9, zorder=1)
        if len(r.orders) > 1:
            for x, y in zip(xs_of(r), r.test_acc):
                ax.plot(x, y, "--", color="tab:blue", lw=0.6, alpha=0.3, zorder=2)
        x, y = means[name]
        pts = np.stack([x, y], 1)
        segments = LineCollection(np.stack([pts[:-1], pts[1:]], 1), cmap=cmap, norm=norm, lw=2.0, zorder=3)
        segments.set_array(ks[:-1] + 0.5)
        ax.add_collection(segments)
        ax.scatter(x, y, c=ks, cmap=cmap, norm=norm, s=9, zorder=4, linewidths=0)
        _arrows_along(ax, x, y, cmap, norm)
        ax.annotate("B (k=0)", (x[0], y[0]), xytext=(-12, -2), textcoords="offset points", ha="right", va="top",
                    fontsize=7)
        ax.annotate(f"k={steps - 1}", (x[-1], y[-1]), xytext=(5, 4), textcoords="offset points", fontsize=7)
        listed = []
        for j, cut in reversed(list(enumerate(r.selected))):  # the largest marker first, so each stays visible
            marker, color = _CUT_STYLE[j % len(_CUT_STYLE)]
            cx = np.mean(cut.test_asr) if poisoned else np.mean(cut.channels_pruned) / (steps - 1)
            ax.plot([cx], [np.mean(cut.test_acc)], marker, ms=7 + 4 * (len(r.selected) - 1 - j), mfc="none",
                    mec=color, mew=1.6, zorder=5 + len(r.selected) - j, clip_on=False)
        for j, cut in enumerate(r.selected):
            k = (f"{cut.channels_pruned[0]}" if len(cut.channels_pruned) == 1
                 else f"{np.mean(cut.channels_pruned):.1f}")
            asr = f", ASR {summary_mean(cut.test_asr)}" if poisoned else ""
            listed.append(f"X={100 * cut.drop:g}: k={k}, acc {summary_mean(cut.test_acc)}{asr}")
        ax.text(0.98, 0.03, "\n".join(listed), transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5,
                family="monospace", bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.7", alpha=0.85), zorder=20)
        title = f"{name} (mean of {len(r.orders)} orders)" if len(r.orders) > 1 else name
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(-3, 103)
        ax.set_xlim(-3, 103) if poisoned else ax.set_xlim(-0.03, 1.03)
    for col in range(ncols):  # the lowest panel of each column carries the x axis
        ax = axes[(n - 1 - col) // ncols, col]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("ASR on poisoned test data (%)" if poisoned
                      else f"fraction of {pruned_layer(curve)} channels pruned",
                      fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("clean test accuracy (%)", fontsize=8)
    for ax in axes.flat[n:]:
        ax.axis("off")
    handles = [matplotlib.lines.Line2D([], [], ls="none", marker=_CUT_STYLE[j % len(_CUT_STYLE)][0], mfc="none",
                                       mec=_CUT_STYLE[j % len(_CUT_STYLE)][1], mew=1.6, ms=7,
                                       label=f"cut X={100 * cut.drop:g}")
               for j, cut in enumerate(curve.selected)]
    handles.append(matplotlib.lines.Line2D([], [], color="0.86", lw=0.9, label="the other rankings"))
    if any(len(r.orders) > 1 for r in curve.rankings.values()):
        handles.append(matplotlib.lines.Line2D([], [], ls="--", color="tab:blue", lw=0.6, alpha=0.5,
                                               label="random: each order"))
    if spare:
        axes.flat[n].legend(handles=handles, loc="center", fontsize=8, title="each ranking's own cut",
                            title_fontsize=8)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    heading = curve.title + ": rankings compared"
    heading += ("; better = further left (less ASR) and higher (more accuracy)" if poisoned
                else " (no poisoned data: no ASR)")
    fig.suptitle(heading, fontsize=10)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), shrink=0.8,
                 pad=0.02, label="k: channels pruned (B at 0)")
    return _save(fig, path)


def summary_mean(values) -> str:
    """A cut value for a plot label: the value, or the mean over random orders."""
    return f"{np.mean(values):.1f}"


def _arrows_along(ax, x: np.ndarray, y: np.ndarray, cmap, norm, count: int = 3) -> None:
    """Arrowheads at ``count`` places where the curve moves, pointing the way k grows."""
    moves = np.flatnonzero(np.hypot(np.diff(x), np.diff(y)) > 1.0)
    for k in moves[np.linspace(0, len(moves) - 1, min(count, len(moves))).astype(int)] if len(moves) else ():
        ax.annotate("", xy=(x[k + 1], y[k + 1]), xytext=(x[k], y[k]), zorder=6,
                    arrowprops=dict(arrowstyle="-|>", color=cmap(norm(k)), lw=1.2, mutation_scale=11))


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
    k = np.arange(len(curve.valid_acc))
    frac = k / (len(k) - 1)
    fig = _figure((8, 4.8))
    ax = fig.subplots()
    lines = [(curve.valid_acc, "-", "tab:blue", "clean accuracy (valid)"),
             (curve.valid_asr, "-", "tab:red", "attack success rate (bd valid)"),
             (curve.test_acc, ":", "tab:blue", "clean accuracy (test)"),
             (curve.test_asr, ":", "tab:red", "attack success rate (bd test)")]
    for values, style, color, label in lines:
        if values is not None:  # no poisoned data: the ASR lines are simply not there
            ax.plot(frac, values, style, color=color, label=label)
    by_k = {}  # cuts at the same k share one line and one label, which would otherwise print over each other
    for cut in curve.selected:
        by_k.setdefault(cut.channels_pruned, []).append(f"{100 * cut.drop:g}")
    for channels, xs in by_k.items():
        f = channels / (len(k) - 1)
        ax.axvline(f, color="grey", lw=0.8, ls="--")
        ax.annotate(f"X={', '.join(xs)}: k={channels}", (f, 3), rotation=90, fontsize=7, ha="right", va="bottom",
                    color="dimgrey")
    ax.set_xlabel(f"fraction of {pruned_layer(curve)} channels pruned")
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


def _code_cell(text: str) -> str:
    """``text`` (a path) as one Markdown table cell in code style: one line (:func:`fileio.shown_path`), a
    ``|`` that cannot end the cell, and a fence longer than any run of backticks inside."""
    text = fileio.shown_path(text).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def write_report_md(path: Path, curve: Curve, timings: Mapping[str, float],
                    details: Optional[Mapping[str, str]] = None, warnings: Sequence[str] = ()) -> Path:
    """report.md: the table, the original model's numbers, the inputs (size, sha256), versions and timings.

    ``details``: further "name: text" lines of how the run was done (the input scale chosen, the sweep plan).
    ``warnings``: what the run found doubtful about its inputs; shown first, with the note on a small
    validation set (:func:`~badnet_jax.defense.curve.coarse_validation_note`).
    """
    lines = [f"# {curve.title}", ""]
    coarse = coarse_validation_note(curve)
    shown = [*warnings, *([coarse[0].upper() + coarse[1:] + "."] if coarse else [])]
    if shown:
        lines += ["## Warnings", ""] + [f"- {fileio.shown_path(w)}" for w in shown] + [""]
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
        lines.append(f"| {role} | {_code_cell(f['path'])} | {f['bytes']} | `{f['sha256']}` |")
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in curve.versions.items()]
    if details:
        lines += ["", "## How it ran", ""] + [f"- {k}: {v}" for k, v in details.items()]
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.2f}" for k, v in timings.items()]
    lines += ["", "Pruning curve: `curve.json` (and `curve.csv`, in the lab's CSV layout), plot: `curve.png`.", ""]
    return atomic.atomic_write_text(path, "\n".join(lines))
