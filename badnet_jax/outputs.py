"""A defense run's results written as one unit: report, curve.json, plot and every cut's models.

Everything is built in one temporary directory beside ``out_dir`` and swapped in at the end
(``fileio.atomic_dir``): afterwards ``out_dir`` holds the earlier run's results whole or this run's whole,
never a mix, and never a ``drop_X/`` folder that the new ``curve.json`` does not list. Because the whole
folder is replaced, :func:`check_out_dir` refuses up front a folder that holds anything else.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from badnet_jax import checkpoint, fileio, report
from badnet_jax.convert import save_keras
from badnet_jax.curve import Curve, Cut
from badnet_jax.errors import ConfigError
from badnet_jax.goodnet import make_goodnet
from badnet_jax.model import Params, prune_params

RESULT_FILES = ("curve.json", "report.md", "curve.png", "rankings.png")
_DROP_DIR = re.compile(r"drop_[0-9.e+-]+")


@dataclasses.dataclass(frozen=True)
class CutModels:
    """The models of one cut: its pool_3 mask and, after fine-pruning, the fine-tuned params."""

    cut: Cut
    mask: np.ndarray
    finetuned_params: Optional[Params] = None


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path, refused before any work if the results could not replace it.

    Raises:
        ConfigError: it is a file, lies under a file, holds entries that are not badnet-jax results (they would
            be lost when the new results replace the folder), or its parent cannot be written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out_dir {out}: exists and is not a folder")
    existing = next(p for p in (out.resolve().parent, *out.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out_dir {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out_dir {out}: cannot write in {existing}")
    if out.is_dir():
        foreign = sorted(e.name for e in out.iterdir() if e.name not in RESULT_FILES and not _DROP_DIR.fullmatch(e.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ConfigError(f"--out_dir {out}: holds entries that are not badnet-jax results ({shown}); the new "
                              "results replace the whole folder, so choose a new or empty folder")
    existing = next(p for p in (out.resolve().parent, *out.resolve().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out_dir {out}: cannot write in {existing}")
    return out


def write_results(out_dir: str | os.PathLike, curve: Curve, params: Params, models: Sequence[CutModels],
                  timings: Mapping[str, float], details: Optional[Mapping[str, str]] = None) -> Path:
    """Write report.md, curve.json, curve.png (rankings.png with several rankings) and each cut's models, all
    swapped into ``out_dir`` at once.

    Per cut (``drop_X/``): B' as a Keras h5 and an orbax checkpoint (params + mask), the GoodNet checkpoint,
    and with fine-pruning the same for the fine-tuned B'; each records B's input scale (``curve.input_scale``).
    Orbax has finished every save before the swap.
    """
    scale = curve.input_scale

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for m in models:
            d = tmp / m.cut.folder
            save_keras(prune_params(params, m.mask), d / "b_prime.h5", scale)
            checkpoint.save_badnet(d / "b_prime_ckpt", params, m.mask, scale)
            checkpoint.save_goodnet(d / "goodnet_ckpt", make_goodnet(params, mask=m.mask)[1], scale)
            if m.finetuned_params is not None:
                save_keras(m.finetuned_params, d / "b_prime_finetuned.h5", scale)
                checkpoint.save_badnet(d / "b_prime_finetuned_ckpt", m.finetuned_params, m.mask, scale)
                checkpoint.save_goodnet(d / "goodnet_finetuned_ckpt",
                                        make_goodnet(params, m.finetuned_params, m.mask)[1], scale)
        report.plot_curve(tmp / "curve.png", curve)
        if curve.rankings is not None:
            report.plot_rankings(tmp / "rankings.png", curve)
        report.write_report_md(tmp / "report.md", curve, timings, details)
        report.write_curve_json(tmp / "curve.json", curve)

    return fileio.atomic_dir(out_dir, write)
