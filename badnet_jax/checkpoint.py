"""Orbax checkpoints of BadNet params (optionally with a pruning mask) and of GoodNets.

Each checkpoint is built in a temporary directory and swapped in whole, so an interrupted save leaves the
previous checkpoint (or nothing), never a half-written one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from badnet_jax import fileio
from badnet_jax.errors import CheckpointError
from badnet_jax.goodnet import GoodNet
from badnet_jax.model import NUM_POOL3_CHANNELS, BadNet, Params, num_classes_of


def _save(path: Path, state: dict) -> Path:
    def write(tmp: Path) -> None:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.resolve(), jax.tree.map(np.asarray, state))
            ckptr.wait_until_finished()

    return fileio.atomic_dir(path, write)


def _restore(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path.resolve())
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({err})") from None


def save_badnet(path: str | os.PathLike, params: Params, mask: Optional[jax.Array] = None) -> Path:
    """Save B (or B' = params + pool_3 mask) as an orbax checkpoint directory."""
    m = np.ones(NUM_POOL3_CHANNELS, np.float32) if mask is None else np.asarray(mask, np.float32)
    return _save(Path(path), {"params": params, "mask": m})


def restore_badnet(path: str | os.PathLike) -> tuple[BadNet, Params, jax.Array]:
    """Restore ``(BadNet, params, mask)`` from :func:`save_badnet`'s checkpoint."""
    state = _restore(Path(path))
    if not isinstance(state, dict) or "params" not in state or "mask" not in state:
        raise CheckpointError(f"{path}: not a badnet-jax BadNet checkpoint (needs 'params' and 'mask')")
    params = jax.tree.map(jnp.asarray, state["params"])
    return BadNet(num_classes_of(params)), params, jnp.asarray(state["mask"])


def save_goodnet(path: str | os.PathLike, variables: dict[str, Any]) -> Path:
    """Save a GoodNet's variables (``make_goodnet``'s second result) as an orbax checkpoint directory."""
    return _save(Path(path), {"params": variables["params"], "pruning": variables["pruning"]})


def restore_goodnet(path: str | os.PathLike) -> tuple[GoodNet, dict[str, Any]]:
    """Restore ``(GoodNet, variables)`` saved by :func:`save_goodnet`; ``goodnet.apply(variables, x)`` works."""
    state = _restore(Path(path))
    try:
        variables = {"params": jax.tree.map(jnp.asarray, state["params"]),
                     "pruning": jax.tree.map(jnp.asarray, state["pruning"])}
        n = num_classes_of(variables["params"]["bad"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a badnet-jax GoodNet checkpoint") from None
    return GoodNet(num_classes=n), variables
