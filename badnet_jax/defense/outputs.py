"""A defense run's results written as one unit: report, curve.json, plot and every cut's models.

Everything is built in one temporary directory beside ``out_dir`` and swapped in at the end
(``fileio.atomic_dir``): afterwards ``out_dir`` holds the earlier run's results whole or this run's whole,
never a mix, and never a ``drop_X/`` folder that the new ``curve.json`` does not list. Because the whole
folder is replaced, :func:`check_out_dir` refuses up front a folder that holds anything else.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from badnet_jax.defense import report
from badnet_jax.defense.curve import Curve, Cut
from badnet_jax.errors import ConfigError, OutputError, arg
from badnet_jax.goodnet import make_goodnet
from badnet_jax.io import checkpoint, fileio
from badnet_jax.io.keras import save_keras
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
        raise ConfigError(f"{arg('out_dir', out)}: exists and is not a folder", field="out_dir")
    existing = next(p for p in (out.resolve().parent, *out.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{arg('out_dir', out)}: {existing} is not a folder", field="out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{arg('out_dir', out)}: cannot write in {existing}", field="out_dir")
    if out.is_dir():
        foreign = sorted(e.name for e in out.iterdir()
                         if e.name not in RESULT_FILES and not _DROP_DIR.fullmatch(e.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ConfigError(f"{arg('out_dir', out)}: holds entries that are not badnet-jax results ({shown}); the "
                              "new results replace the whole folder, so choose a new or empty folder", field="out_dir")
    return out


# What one cut's folder takes, in multiples of B's parameter bytes: B' as h5 and as a checkpoint (1 + 1), the
# GoodNet checkpoint (B and B', 2); fine-pruning doubles it. An upper bound: orbax compresses (the demo's cut
# folder takes 3.8x).
_PARAM_COPIES_PER_CUT = 4
_FIXED_BYTES = 256 << 10  # report.md, curve.json and the plots: ~100 KB, with room to spare


def check_space(out_dir: str | os.PathLike, params: Params, drops: Sequence[float], finetune: bool) -> int:
    """The bytes the results will take, refused before any work if the file system has less free.

    Raises:
        ConfigError: less free space under ``out_dir`` than the results need (with both numbers).
    """
    param_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(params))
    copies = _PARAM_COPIES_PER_CUT * (2 if finetune else 1)
    need = len(set(drops)) * copies * param_bytes + _FIXED_BYTES
    free = fileio.free_bytes(out_dir)
    if free is not None and free < need:  # None (the file system does not say): the writes themselves will tell
        raise ConfigError(f"{arg('out_dir', out_dir)}: the results need about {need / 2**20:.1f} MiB but only "
                          f"{free / 2**20:.1f} MiB are free there; free some space or choose another folder "
                          f"(or {arg('checkpoints', False)}: no models, about 1 MiB)", field="out_dir")
    return need


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

    try:
        return fileio.atomic_dir(out_dir, write)
    except Exception as err:  # noqa: BLE001 - an OSError, or one that orbax wrapped in its own exceptions
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise OutputError(_write_failed(out_dir, cause), field="out_dir") from None


def _os_error_in(err: BaseException) -> Optional[OSError]:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_failed(out_dir: str | os.PathLike, err: OSError) -> str:
    why = "no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return (f"{arg('out_dir', out_dir)}: the results could not be written ({why}); nothing of this run was kept and "
            "the folder holds what it held before")
