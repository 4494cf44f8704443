"""Orbax checkpoints of BadNet params (optionally with a pruning mask) and of GoodNets, with their input scale.

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
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from badnet_jax.io import fileio
from badnet_jax.errors import CheckpointError
from badnet_jax.goodnet import GoodNet, check_goodnet
from badnet_jax.models.deepid import DeepID
from badnet_jax.model import (INPUT_DIVISORS, NUM_POOL3_CHANNELS, BadNet, Params, check_mask, check_params,
                              input_divisor, num_classes_of)

# The input scale travels as its divisor (``model.input_divisor``; orbax stores arrays); a checkpoint without
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


def _checkpointer() -> ocp.StandardCheckpointer:
    # In a multi-process run one process writes the results: orbax must neither wait for the others at its
    # barriers nor expect them to write shards (they have nothing to write: every array is on the host).
    me = jax.process_index()
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


def _check_room(folder: Path, state: dict, path: Path) -> None:
    """ENOSPC before orbax starts if ``folder``'s file system cannot hold ``state``: a save that fails midway
    leaves tensorstore writing in the background (see :func:`fileio.atomic_dir`)."""
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
        _quiet_closed_event_loop()
        try:
            with _orbax_errors_unlogged(), _checkpointer() as ckptr:
                ckptr.save(tmp.resolve(), jax.tree.map(np.asarray, state))
                ckptr.wait_until_finished()
        except (ValueError, RuntimeError) as err:
            code = _OS_ERROR_CODE.search(str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None

    return fileio.atomic_dir(path, write)


def _restore(path: Path) -> dict:
    path = fileio.require_dir(path, CheckpointError, "checkpoint folder")
    _quiet_closed_event_loop()
    try:
        with _checkpointer() as ckptr:
            return ckptr.restore(path.resolve())
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({_first_words(err)}); truncated or "
                              "corrupted?") from None


def _first_words(err: BaseException, limit: int = 300) -> str:
    # tensorstore appends its whole JSON spec ("[tensorstore_spec='{...}']", ~700 characters) to every error.
    text = str(err).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def save_badnet(path: str | os.PathLike, params: Params, mask: Optional[jax.Array] = None,
                input_scale: str = "raw") -> Path:
    """Save B (or B' = params + pool_3 mask) and its input scale as an orbax checkpoint directory.

    Raises:
        ConfigError: params that are not a BadNet's, or a mask that is not (60,) zeros and ones (nothing written).
    """
    check_params(params)
    m = np.ones(NUM_POOL3_CHANNELS, np.float32) if mask is None else check_mask(mask)
    return _save(Path(path), {"params": params, "mask": m, "input_divisor": _scale_entry(input_scale)})


def restore_badnet(path: str | os.PathLike) -> tuple[BadNet, Params, jax.Array]:
    """Restore ``(BadNet, params, mask)`` from :func:`save_badnet`'s checkpoint (the model keeps its input scale)."""
    state = _restore(Path(path))
    if not isinstance(state, dict) or "params" not in state or "mask" not in state or "pruning" in state:
        raise CheckpointError(f"{path}: not a badnet-jax BadNet checkpoint (needs 'params' and 'mask'; a GoodNet "
                              "checkpoint is read by restore_goodnet)")
    params = jax.tree.map(jnp.asarray, state["params"])
    return BadNet(num_classes_of(params), input_scale=_scale_of(state, Path(path))), params, jnp.asarray(state["mask"])


def save_goodnet(path: str | os.PathLike, variables: dict[str, Any], input_scale: str = "raw") -> Path:
    """Save a GoodNet's variables (``make_goodnet``'s second result) and input scale as an orbax checkpoint.

    Raises:
        ConfigError: variables that are not a GoodNet's (nothing written).
    """
    check_goodnet(GoodNet(DeepID(_num_classes_of_variables(variables))), variables)
    return _save(Path(path), {"params": variables["params"], "pruning": variables["pruning"],
                              "input_divisor": _scale_entry(input_scale)})


def _num_classes_of_variables(variables: Any) -> int:
    try:
        return num_classes_of(variables["params"]["bad"])
    except (KeyError, TypeError, IndexError):
        return 0  # check_goodnet then says what is missing


def restore_goodnet(path: str | os.PathLike) -> tuple[GoodNet, dict[str, Any]]:
    """Restore ``(GoodNet, variables)`` saved by :func:`save_goodnet`; ``goodnet.apply(variables, x)`` works."""
    state = _restore(Path(path))
    try:
        variables = {"params": jax.tree.map(jnp.asarray, state["params"]),
                     "pruning": jax.tree.map(jnp.asarray, state["pruning"])}
        n = num_classes_of(variables["params"]["bad"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a badnet-jax GoodNet checkpoint") from None
    return GoodNet(DeepID(n, input_scale=_scale_of(state, Path(path)))), variables


def is_goodnet_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GoodNet checkpoint (rather than a BadNet one), from its saved structure only."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(Path(path).resolve())
    except Exception:  # noqa: BLE001 - anything unreadable is "not a GoodNet"; restoring then says why
        return False
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    return isinstance(tree, dict) and "pruning" in tree
