"""Orbax checkpoints of a BadNet (optionally with a pruning mask) and of a GoodNet, each carrying its model.

A checkpoint holds the params (B's, or B's and B''s for a GoodNet), the mask of the pruned layer's channels,
the input scale (``input_divisor``) and, for a model other than the lab's DeepID, its architecture
(``architecture``: the JSON of ``badnet_jax.io.graph_json``, as bytes: orbax stores arrays). A checkpoint
without an architecture entry is the lab's DeepID, as every checkpoint written before others could be saved
is. Restoring rebuilds the model and checks the params, the mask and the architecture (untrusted data) against
each other. A ``FlaxCNN`` is not saved: its module is code (save its params with orbax yourself).

Each checkpoint is built in a temporary directory and swapped in whole, so an interrupted save leaves the
previous checkpoint (or nothing), never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.io import atomic, fileio, graph_json
from badnet_jax.errors import CheckpointError, ConfigError, arg
from badnet_jax.goodnet import GoodNet, check_goodnet
from badnet_jax.models.deepid import DeepID, as_model
from badnet_jax.models.graph import GraphCNN
from badnet_jax.models.protocol import PrunableModel
from badnet_jax.model import Params, num_classes_of
from badnet_jax.pixels import INPUT_DIVISORS, input_divisor

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

ARCHITECTURE = "architecture"
"""The checkpoint entry holding a GraphCNN's architecture (UTF-8 JSON bytes, ``badnet_jax.io.graph_json``)."""

# The input scale travels as its divisor (``pixels.input_divisor``; orbax stores arrays); a checkpoint without
# one holds a raw-scale model.


def _scale_entry(input_scale: str) -> np.ndarray:
    return np.float32(input_divisor(input_scale))


def _scale_of(state: dict, path: Path) -> str:
    if "input_divisor" not in state:
        return "raw"
    divisor = float(np.asarray(state["input_divisor"]))
    for name, d in INPUT_DIVISORS.items():
        if divisor == d:
            return name
    expected = " or ".join(f"{d:g}" for d in INPUT_DIVISORS.values())
    raise CheckpointError(f"{path}: unknown input divisor {divisor} (expected {expected})")


def _orbax():
    """``orbax.checkpoint``, imported on first use: ~0.2 s that a run which reads or writes no checkpoint need not
    pay at its start (the defense imports it ahead, beside its compile: :func:`preload`)."""
    import orbax.checkpoint as ocp
    return ocp


def preload() -> None:
    """Import what writing a checkpoint needs, ahead of time (from a worker thread, while other work runs)."""
    _orbax()


def _checkpointer() -> ocp.StandardCheckpointer:
    # In a multi-process run one process writes the results: orbax must neither wait for the others at its
    # barriers nor expect them to write shards (they have nothing to write: every array is on the host).
    ocp, me = _orbax(), jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options) if jax.process_count() > 1 else \
        ocp.StandardCheckpointer()


# tensorstore reports a failed write (ENOSPC, EACCES, ...) as ValueError("RESOURCE_EXHAUSTED: ...
# [os_error_code='28']"); the number is turned back into an OSError so writers report it like any other.
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _quiet_closed_event_loop() -> None:
    """Drop, from now on, the "Event loop is closed" RuntimeErrors that a failed orbax call leaves behind.

    When a save or restore fails, orbax raises on the first failed operation and closes its asyncio loop;
    tensorstore's other operations finish later and call ``loop.call_soon_threadsafe`` on the closed loop from
    their threads, and Python prints each as a traceback (through ``sys.unraisablehook``), long after the real
    error was reported (sometimes before it: the filter goes in before the first orbax call). Installed
    once; every other unraisable exception goes on to the hook that was there before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_badnet_quiet", False):
        return

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook._badnet_quiet = True
    sys.unraisablehook = hook


# The folders of failed orbax calls. A failed restore raises on its first failed read; the reads still in flight
# fail too, and asyncio logs each one's exception ("Task exception was never retrieved", with its traceback) when
# the task is collected, after the one error the user is shown. Those records' exceptions name the folder (a
# tensorstore error: 'OUT_OF_RANGE: Error reading ... at local file "<folder>/"'), and are dropped. A folder is
# held from just before its orbax call (a task may be collected before the call's error reaches us) to the call's
# success; a failed call's folder stays (its tasks may be collected any time later).
_ORBAX_FOLDERS: dict[str, re.Pattern] = {}
_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _SecondaryOrbaxFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None or not str(record.msg).startswith(_NEVER_RETRIEVED):
            return True
        text = str(record.exc_info[1])
        return not any(pattern.search(text) for pattern in tuple(_ORBAX_FOLDERS.values()))


@contextlib.contextmanager
def _secondary_failures_quiet(folder: Path) -> Iterator[None]:
    """Around one orbax call on ``folder``: what its failure leaves behind after the one error it raises (asyncio's
    "never retrieved" records of its reads and writes, :func:`_quiet_closed_event_loop`'s tracebacks) dropped."""
    _quiet_closed_event_loop()
    key = str(folder.resolve())
    # The folder itself or a path inside it, and orbax's own temporary "<folder>.orbax-checkpoint-tmp-*".
    _ORBAX_FOLDERS[key] = re.compile(re.escape(key) + r"(?=[/\\\"'.]|$)")
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _SecondaryOrbaxFailures) for f in asyncio_log.filters):
        asyncio_log.addFilter(_SecondaryOrbaxFailures())
    yield
    _ORBAX_FOLDERS.pop(key, None)  # reached only when the call succeeded


def _check_room(folder: Path, state: dict, path: Path) -> None:
    """ENOSPC before orbax starts if ``folder``'s file system cannot hold ``state``: a save that fails midway
    leaves tensorstore writing in the background (see :func:`atomic.atomic_dir`)."""
    need = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state)) + (64 << 10)
    free = fileio.free_bytes(folder)
    if free is not None and free < need:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def _orbax_errors_unlogged() -> Iterator[None]:
    # A failed save makes orbax's threads log the same error with its traceback three times (through absl's
    # logger) before the exception arrives here; the exception alone is reported, once, by the caller.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_log.setLevel(level)


def _save(path: Path, state: dict) -> Path:
    def write(tmp: Path) -> None:
        _check_room(tmp.parent, state, path)
        try:
            with _secondary_failures_quiet(tmp), _orbax_errors_unlogged(), _checkpointer() as ckptr:
                ckptr.save(tmp.resolve(), jax.tree.map(np.asarray, state))
                ckptr.wait_until_finished()
        except (ValueError, RuntimeError) as err:
            code = _OS_ERROR_CODE.search(str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None

    return atomic.atomic_dir(path, write)


def _restore(path: Path) -> dict:
    path = fileio.require_dir(path, CheckpointError, "checkpoint folder")
    try:
        with _secondary_failures_quiet(path), _checkpointer() as ckptr:
            return ckptr.restore(path.resolve())
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({_first_words(err)}); truncated or "
                              "corrupted?") from None


def _first_words(err: BaseException, limit: int = 300) -> str:
    # tensorstore appends its whole JSON spec ("[tensorstore_spec='{...}']", ~700 characters) to every error.
    text = str(err).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _architecture(model: PrunableModel) -> dict[str, np.ndarray]:
    """The entries that carry ``model``'s architecture: none for the lab's DeepID (a checkpoint without one is
    DeepID, as every checkpoint was before others could be saved), the JSON graph for a GraphCNN.

    Raises:
        ConfigError: any other model (a FlaxCNN's module is code, which a checkpoint does not hold).
    """
    if isinstance(model, DeepID):
        return {}
    if isinstance(model, GraphCNN):
        return {ARCHITECTURE: np.frombuffer(graph_json.model_to_json(model).encode("ascii"), np.uint8).copy()}
    raise ConfigError(f"{arg('model')}: a {type(model).__name__} cannot be saved in a badnet-jax checkpoint: a "
                      "checkpoint holds data, and only the lab's DeepID and a GraphCNN are data (a FlaxCNN's "
                      "architecture is its Flax module, code). Save its params yourself "
                      "(orbax.checkpoint.StandardCheckpointer().save(path, params)) and rebuild the model with "
                      "FlaxCNN.build(module, params, ...) after restoring them", field="model")


def _model_of(state: dict, params: Params, path: Path) -> PrunableModel:
    """The model a checkpoint's entries describe, its params checked against it.

    Raises:
        CheckpointError: naming ``path``: an architecture entry that is refused, or params that are not the model's.
    """
    scale = _scale_of(state, path)
    if ARCHITECTURE not in state:
        try:
            model = DeepID(num_classes_of(params), input_scale=scale)
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: holds no architecture entry and its params are not the lab's DeepID's "
                                  "(no output layer)") from None
        try:
            model.check_params(params, "params")
        except ConfigError as err:
            raise CheckpointError(f"{path}: holds no architecture entry, so it is read as the lab's DeepID, whose "
                                  f"params these are not: {err}") from None
        return model
    text = np.asarray(state[ARCHITECTURE])
    if text.dtype != np.uint8 or text.ndim != 1:
        raise CheckpointError(f"{path}: its architecture entry is an array of {text.dtype} {text.shape}, expected "
                              "the bytes of a JSON document (uint8, one axis)")
    return graph_json.model_from_json(text.tobytes(), params, scale, str(path))


def _checked(path: Path, check, *args) -> Any:
    """``check(*args)``, a ConfigError of the saved values turned into a CheckpointError naming ``path``."""
    try:
        return check(*args)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def save_badnet(path: str | os.PathLike, model: Any, params: Any = None, mask: Optional[Any] = None) -> Path:
    """Save B (or B' = params + a mask of the pruned layer's channels) with its model as an orbax checkpoint.

    The checkpoint carries what :func:`restore_badnet` needs to rebuild the model: its input scale, and for a
    :class:`~badnet_jax.models.graph.GraphCNN` its graph and pruned layer (``badnet_jax.io.graph_json``); the lab's
    DeepID needs no more than its params. A ``FlaxCNN`` is refused: its module is code.

    Args:
        path: the checkpoint folder (replaced whole, atomically).
        model: B's model (a ``PrunableModel``, or a ``BadNet`` module for the lab's DeepID).
        params: B's params.
        mask: (C,) 0/1 mask of the pruned layer's channels (None: all kept, B itself).

    Raises:
        ConfigError: no model first (params where the model goes), params that are not the model's, a mask that
            is not (C,) zeros and ones, a model that cannot be saved (a FlaxCNN) (nothing written).

    Example::

        model, params = load_model("resnet_tiny.h5", input_scale="255")
        save_badnet("b_prime_ckpt", model, params, mask)
        model, params, mask = restore_badnet("b_prime_ckpt")
    """
    _model_first("save_badnet(path, model, params, mask)", model)
    model = as_model(model)
    arch = _architecture(model)  # a model that cannot be saved is refused first
    if params is None:
        raise ConfigError(f"save_badnet needs B's {arg('params')} after the model", field="params")
    model.check_params(params, "params")
    m = np.ones(model.num_channels, np.float32) if mask is None else model.check_mask(mask)
    return _save(Path(path), {"params": params, "mask": m, "input_divisor": _scale_entry(model.input_scale), **arch})


def _model_first(form: str, model: Any) -> None:
    """Refuse params or variables where the model goes: the model carries the architecture and input scale."""
    if isinstance(model, Mapping):
        raise ConfigError(f"{arg('model')}: got a params dict; the model comes first, {form} (the model carries its "
                          "architecture and input scale: load_model's first result)", field="model")


def restore_badnet(path: str | os.PathLike) -> tuple[PrunableModel, Params, jax.Array]:
    """Restore ``(model, params, mask)`` from :func:`save_badnet`'s checkpoint: the model it was saved with (a
    ``DeepID`` for a checkpoint without an architecture entry), with its input scale.

    Raises:
        CheckpointError: naming ``path``: not a BadNet checkpoint, unreadable, or an architecture, params or mask
            that do not fit together.
    """
    path = Path(path)
    state = _restore(path)
    if not isinstance(state, dict) or "params" not in state or "mask" not in state or "pruning" in state:
        raise CheckpointError(f"{path}: not a badnet-jax BadNet checkpoint (needs 'params' and 'mask'; a GoodNet "
                              "checkpoint is read by restore_goodnet)")
    params = jax.tree.map(jnp.asarray, state["params"])
    model = _model_of(state, params, path)
    mask = jnp.asarray(_checked(path, model.check_mask, np.asarray(state["mask"]), "mask"))
    return model, params, mask


def save_goodnet(path: str | os.PathLike, goodnet: Any, variables: Optional[dict[str, Any]] = None) -> Path:
    """Save a GoodNet (``make_goodnet``'s two results) with its model as an orbax checkpoint.

    Like :func:`save_badnet`, the checkpoint carries the model (its input scale, and a GraphCNN's graph); a
    FlaxCNN's GoodNet is refused.

    Raises:
        ConfigError: variables that are not the GoodNet's, or a model that cannot be saved (nothing written).

    Example::

        goodnet, variables = make_goodnet(model, params, mask=mask)
        save_goodnet("goodnet_ckpt", goodnet, variables)
        goodnet, variables = restore_goodnet("goodnet_ckpt")
    """
    _model_first("save_goodnet(path, goodnet, variables) with make_goodnet's two results", goodnet)
    arch = _architecture(goodnet.model) if isinstance(goodnet, GoodNet) else {}  # refused first, as save_badnet's
    check_goodnet(goodnet, variables)
    return _save(Path(path), {"params": variables["params"], "pruning": variables["pruning"],
                              "input_divisor": _scale_entry(goodnet.model.input_scale), **arch})


def restore_goodnet(path: str | os.PathLike) -> tuple[GoodNet, dict[str, Any]]:
    """Restore ``(GoodNet, variables)`` saved by :func:`save_goodnet`; ``goodnet.apply(variables, x)`` works.

    Raises:
        CheckpointError: naming ``path``: not a GoodNet checkpoint, unreadable, or an architecture and variables
            that do not fit together.
    """
    path = Path(path)
    state = _restore(path)
    try:
        variables = {"params": {"bad": jax.tree.map(jnp.asarray, state["params"]["bad"]),
                                "pruned": jax.tree.map(jnp.asarray, state["params"]["pruned"])},
                     "pruning": {"mask": jnp.asarray(state["pruning"]["mask"])}}
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a badnet-jax GoodNet checkpoint") from None
    model = _model_of(state, variables["params"]["bad"], path)
    if ARCHITECTURE in state:
        graph_json.check_params(model, variables["params"]["pruned"], f"{path} (B')")
    goodnet = GoodNet(model)
    _checked(path, check_goodnet, goodnet, variables)
    return goodnet, variables


def is_goodnet_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GoodNet checkpoint (rather than a BadNet one), from its saved structure only."""
    ocp = _orbax()  # outside the try: a broken orbax is its own error, not "not a GoodNet"
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(Path(path).resolve())
    except Exception:  # noqa: BLE001 - anything unreadable is "not a GoodNet"; restoring then says why
        return False
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    return isinstance(tree, dict) and "pruning" in tree
