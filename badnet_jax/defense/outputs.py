"""A defense run's results written as one unit: report, curve.json, plot and every cut's models.

Everything is built in one temporary directory beside ``out_dir`` and swapped in at the end
(``atomic.atomic_dir``): afterwards ``out_dir`` holds the earlier run's results whole or this run's whole,
never a mix, and never a ``drop_X/`` folder that the new ``curve.json`` does not list. Because the whole
folder is replaced, :func:`check_out_dir` refuses up front a folder that holds anything else.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from badnet_jax.defense import report
from badnet_jax.defense.curve import Curve, Cut
from badnet_jax.errors import ConfigError, OutputError, arg
from badnet_jax.goodnet import make_goodnet
from badnet_jax.io import atomic, checkpoint, fileio, graph_json
from badnet_jax.io.keras import save_keras
from badnet_jax.io.keras_graph_writer import save_keras_graph
from badnet_jax.model import prune_params
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.protocol import Params, PrunableModel

RESULT_FILES = ("curve.json", "curve.csv", "report.md", "curve.png", "rankings.png")
_DROP_DIR = re.compile(r"drop_[0-9.e+-]+")


@dataclasses.dataclass(frozen=True)
class CutModels:
    """The models of one cut: its pool_3 mask and, after fine-pruning, the fine-tuned params."""

    cut: Cut
    mask: np.ndarray
    finetuned_params: Optional[Params] = None


# The results are built beside ``out_dir`` under longer names (``.<name>.<pid>.<token>.tmp`` and
# ``.<name>.old.<pid>.<token>``: 22 bytes more at most), and the deepest file written lies this many bytes
# below that temporary folder (a cut's fine-tuned GoodNet checkpoint inside orbax's own layout), with room.
_TEMP_NAME_EXTRA = 22
_DEEPEST_INSIDE = 512


def preload_checkpoints() -> None:
    """Import what :func:`write_results` needs for the models' checkpoints (orbax) ahead of time: the defense
    calls it from a worker thread while the sweep compiles, and reads its outcome before the sweep runs.

    Raises:
        ConfigError: orbax cannot be imported (a broken install), naming ``checkpoints``: met before the sweep,
            not after it at the first write.
    """
    try:
        checkpoint.preload()
    except ImportError as err:
        raise ConfigError(f"the checkpoints cannot be written: orbax-checkpoint fails to import ({type(err).__name__}: "
                          f"{err}); reinstall badnet-jax's dependencies, or give {arg('checkpoints', False)}",
                          field="checkpoints") from None


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The folder the results will replace, refused before any work if they could not replace it.

    A symbolic link to a folder is followed (the folder it leads to is replaced, the link stays).

    Raises:
        ConfigError: the path is not UTF-8, has a name or a length the file system cannot hold (with the
            temporary names built beside it), is or holds the current working folder, is a dangling or looping
            symbolic link, is a file or lies under one, holds entries that are not badnet-jax results (they
            would be lost when the new results replace the folder), or its parent cannot be written.
    """
    text = os.fspath(out_dir)
    shown = fileio.shown_path(text)
    fail = lambda why: ConfigError(f"{arg('out_dir', shown)}: {why}", field="out_dir")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise fail("the path holds bytes that are not UTF-8, which the checkpoint writer cannot name; choose a "
                   "UTF-8 path") from None
    if text != shown:
        raise fail("the path holds control characters (a newline, a tab, an escape); choose a plain name") from None
    out = Path(os.path.abspath(text))
    _check_lengths(out, fail)
    _check_ancestors(out, fail)
    if os.path.islink(out):
        try:
            os.stat(out)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise fail("is a symbolic link loop (or a chain longer than the system follows)") from None
            raise fail(f"is a dangling symbolic link (to {fileio.shown_path(os.readlink(out))}, which does not exist); "
                       "create that folder or choose another path") from None
        out = Path(os.path.realpath(out))
        _check_lengths(out, fail)
    if out.exists() and not out.is_dir():
        raise fail("exists and is not a folder")
    cwd = Path(os.path.realpath(os.getcwd()))
    real = Path(os.path.realpath(out))
    if real == cwd or real in cwd.parents:
        where = "is the current working folder" if real == cwd else "holds the current working folder"
        raise fail(f"{where}; the results replace the whole folder, which would move the working folder away "
                   "from this run: choose a new folder, such as results")
    existing = next(p for p in (real.parent, *real.parents) if p.exists())
    if not existing.is_dir():
        raise fail(f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise fail(f"cannot write in {existing}")
    if out.is_dir():
        foreign = sorted(fileio.shown_path(e.name) for e in out.iterdir()
                         if e.name not in RESULT_FILES and not _DROP_DIR.fullmatch(e.name))
        if foreign:
            listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise fail(f"holds entries that are not badnet-jax results ({listed}); the new results replace the whole "
                       "folder, so choose a new or empty folder")
    return out


def _limits(path: Path) -> tuple[int, int]:
    """The longest file name and path the file system under ``path`` (its nearest existing parent) takes."""
    existing = next((p for p in (path, *path.parents) if _lexists(p)), Path("/"))
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(existing, name))
        except (OSError, ValueError):
            limits.append(default)
    return limits[0], limits[1]


def _lexists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _check_lengths(out: Path, fail) -> None:
    name_max, path_max = _limits(out)
    for i, part in enumerate(out.parts[1:], 2):
        size = len(os.fsencode(part))
        room = name_max - (_TEMP_NAME_EXTRA if i == len(out.parts) else 0)
        if size > room:
            raise fail(f"the name {fileio.shown_path(part)[:40]}... is {size} bytes long; the file system takes names of at "
                       f"most {name_max} bytes" + (f", and the results are built beside it under a name "
                                                   f"{_TEMP_NAME_EXTRA} bytes longer: at most {room} bytes"
                                                   if size <= name_max else ""))
    size = len(os.fsencode(out))
    if size + _TEMP_NAME_EXTRA + _DEEPEST_INSIDE > path_max:
        raise fail(f"the path is {size} bytes long; the files written under it need paths up to "
                   f"{_TEMP_NAME_EXTRA + _DEEPEST_INSIDE} bytes longer and the system takes at most {path_max}: "
                   f"choose a path of at most {path_max - _TEMP_NAME_EXTRA - _DEEPEST_INSIDE} bytes")


def _check_ancestors(out: Path, fail) -> None:
    """Every folder on the way that exists must be one: not a file, not a dangling link (making the folders
    under it would fail after the sweep)."""
    for parent in reversed(out.parents):
        if not _lexists(parent):
            return
        try:
            mode = os.stat(parent).st_mode
        except OSError as err:
            if os.path.islink(parent) and err.errno != errno.ELOOP:
                raise fail(f"{fileio.shown_path(parent)} on the way is a dangling symbolic link (to "
                           f"{fileio.shown_path(os.readlink(parent))}, which does not exist)") from None
            raise fail(f"{fileio.shown_path(parent)} on the way cannot be reached ({err.strerror or err})") from None
        if not stat.S_ISDIR(mode):
            raise fail(f"{fileio.shown_path(parent)} on the way is a file, not a folder")


# What one cut's folder takes, in multiples of B's params: B' as h5 and as a checkpoint (1 + 1), the GoodNet
# checkpoint (B and B', 2); fine-pruning doubles it. Each copy of a weight array costs a little more than its
# bytes (an h5 dataset's header, orbax's per-array metadata: ~1.5 KB measured), each checkpoint some fixed files,
# and a model other than DeepID its architecture's JSON in each checkpoint and the h5's config. An upper bound:
# orbax compresses (the DeepID demo's cut folder takes 3.8x its params, the GAP demo's 0.8x of this estimate).
_PARAM_COPIES_PER_CUT = 4
_BYTES_PER_ARRAY = 2 << 10
_BYTES_PER_CHECKPOINT = 16 << 10  # orbax's metadata files, with room
_CHECKPOINTS_PER_CUT = 2
_FIXED_BYTES = 256 << 10  # report.md, curve.json and the plots: ~100 KB, with room to spare


def check_space(out_dir: str | os.PathLike, params: Params, drops: Sequence[float], finetune: bool,
                model: Optional[PrunableModel] = None) -> int:
    """The bytes the results will take, refused before any work if the file system has less free.

    ``model``: B's model, whose architecture a GraphCNN's checkpoints carry (None: counted as the lab's DeepID,
    which carries none).

    Raises:
        ConfigError: less free space under ``out_dir`` than the results need (with both numbers).
    """
    leaves = jax.tree.leaves(params)
    param_bytes = sum(np.asarray(leaf).nbytes for leaf in leaves) + len(leaves) * _BYTES_PER_ARRAY
    arch_bytes = len(graph_json.model_to_json(model)) if isinstance(model, GraphCNN) else 0
    per_cut = (_PARAM_COPIES_PER_CUT * param_bytes + _CHECKPOINTS_PER_CUT * _BYTES_PER_CHECKPOINT
               + (_CHECKPOINTS_PER_CUT + 1) * arch_bytes)
    need = len(set(drops)) * per_cut * (2 if finetune else 1) + _FIXED_BYTES
    free = fileio.free_bytes(out_dir)
    if free is not None and free < need:  # None (the file system does not say): the writes themselves will tell
        raise ConfigError(f"{arg('out_dir', out_dir)}: the results need about {need / 2**20:.1f} MiB but only "
                          f"{free / 2**20:.1f} MiB are free there; free some space or choose another folder "
                          f"(or {arg('checkpoints', False)}: no models, about {_FIXED_BYTES >> 10} KiB)",
                          field="out_dir")
    return need


def write_results(out_dir: str | os.PathLike, curve: Curve, model: PrunableModel, params: Params,
                  models: Sequence[CutModels],
                  timings: Mapping[str, float], details: Optional[Mapping[str, str]] = None,
                  warnings: Sequence[str] = ()) -> Path:
    """Write report.md, curve.json, curve.csv, curve.png (rankings.png with several rankings) and each cut's
    models, all swapped into ``out_dir`` at once.

    ``warnings``: what the run found doubtful about its inputs (report.md shows them first).

    Per cut (``drop_X/``): B' as a Keras h5 and an orbax checkpoint (params + mask), the GoodNet checkpoint,
    and with fine-pruning the same for the fine-tuned B'; each records B's input scale (``curve.input_scale``),
    and each checkpoint its model (``badnet_jax.io.checkpoint``), so the screener (``goodnet_eval.py``) takes
    ``drop_X/goodnet_ckpt`` for any model. B' of a model other than the lab's DeepID is written as a
    Keras h5 by ``badnet_jax.io.keras_graph_writer`` (the pruned layer's readers' weights zeroed, or a 0/1 mask
    layer after it). Orbax has finished every save before the swap.

    Raises:
        ConfigError: cuts to write for a model no checkpoint can hold (a FlaxCNN; nothing written).
    """
    scale = curve.input_scale
    if models:
        _check_savable(model)
    model = model.with_input_scale(scale) if models else model

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for m in models:
            d = tmp / m.cut.folder
            d.mkdir()
            _write_b_prime(d / "b_prime.h5", model, params, m.mask, finetuned=False)
            checkpoint.save_badnet(d / "b_prime_ckpt", model, params, m.mask)
            checkpoint.save_goodnet(d / "goodnet_ckpt", *make_goodnet(model, params, mask=m.mask))
            if m.finetuned_params is not None:
                _write_b_prime(d / "b_prime_finetuned.h5", model, m.finetuned_params, m.mask, finetuned=True)
                checkpoint.save_badnet(d / "b_prime_finetuned_ckpt", model, m.finetuned_params, m.mask)
                checkpoint.save_goodnet(d / "goodnet_finetuned_ckpt",
                                        *make_goodnet(model, params, m.finetuned_params, m.mask))
        report.plot_curve(tmp / "curve.png", curve)
        if curve.rankings is not None:
            report.plot_rankings(tmp / "rankings.png", curve)
        report.write_report_md(tmp / "report.md", curve, timings, details, warnings)
        report.write_curve_json(tmp / "curve.json", curve)
        report.write_curve_csv(tmp / "curve.csv", curve)

    try:
        return atomic.atomic_dir(out_dir, write)
    except Exception as err:  # noqa: BLE001 - an OSError, or one that orbax wrapped in its own exceptions
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise OutputError(_write_failed(out_dir, cause), field="out_dir") from None


def _check_savable(model: PrunableModel) -> None:
    """Refuse, before anything is written, a model whose checkpoints cannot be written (see
    ``badnet_jax.io.checkpoint``: a FlaxCNN's module is code)."""
    if not isinstance(model, (DeepID, GraphCNN)):
        raise ConfigError(f"{arg('model')}: a {type(model).__name__}'s cut models cannot be written (B' as a Keras "
                          "file and the checkpoints need the architecture as data, not a Flax module); write the "
                          f"results with {arg('checkpoints', False)} and save the params yourself", field="model")


def _write_b_prime(path: Path, model: PrunableModel, params: Params, mask: np.ndarray, finetuned: bool) -> None:
    """B' as a Keras h5: the lab's DeepID with its conv_3 channels zeroed (fine-tuned params already have them
    zeroed, ``badnet_jax.defense.finetune``), any other model by ``save_keras_graph``."""
    if isinstance(model, DeepID):
        save_keras(params if finetuned else prune_params(params, mask), path, model.input_scale)
    else:
        save_keras_graph(model, params, path, mask)


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
