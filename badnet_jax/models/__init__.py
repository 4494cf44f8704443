"""Models the defense can prune: the protocol (:class:`PrunableModel`), the lab's DeepID and any CNN of standard
layers (:class:`GraphCNN`).

Names load on first access, so that ``badnet_jax.model`` can use the protocol module without importing the
implementations.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PrunableModel": "badnet_jax.models.protocol", "input_divisor": "badnet_jax.pixels",
    "INPUT_SCALES": "badnet_jax.pixels",
    "DeepID": "badnet_jax.models.deepid", "as_model": "badnet_jax.models.deepid",
    "GraphCNN": "badnet_jax.models.graph", "Graph": "badnet_jax.models.ir", "Node": "badnet_jax.models.ir",
    "predict_settled": "badnet_jax.models.predict",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'badnet_jax.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
