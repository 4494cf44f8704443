"""The defense as a user runs it: inputs resolved and loaded (``inputs``), the input scale (``scale``), the
curve and its cuts (``curve``, ``ranking_curves``), fine-pruning (``finetune``), results written whole
(``outputs``, ``report``), the whole pipeline (``pipeline.run_defense``) and image screening (``screen``).

``DefenseConfig`` and ``run_defense`` load on first access, so that importing one module of the defense (the
input scale, the curve) does not load the whole pipeline, the sweep and the writers with it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DefenseConfig", "run_defense"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'badnet_jax.defense' has no attribute {name!r}")
    value = getattr(importlib.import_module("badnet_jax.defense.pipeline"), name)
    globals()[name] = value
    return value
