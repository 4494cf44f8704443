"""Memory budget of the sweep: how many images may be in flight at once, and whether the data fits at all.

Estimates (bytes per image, float32): the trunk's largest intermediates (conv_1 output 52x44x20 and its
pool, conv_2 output) ~350 KB; the plain sweep's vmapped head over 61 masks ~920 KB; the prefix sweep's
per-step carries and logits ~15 KB (~330 KB when it batches steps: all 61 steps' pre-activations).
Resident: every set's images (uint8: 7.8 KB, float32: 31 KB) and 61 int32 predictions per image, plus
pool_3 features (4.8 KB per image) of the clean set and, twice, of the set being swept.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from badnet_jax.errors import ConfigError
from badnet_jax.fileio import memory_bytes

TRUNK_WORKING = 350_000
PLAIN_HEAD_WORKING = 920_000
PREFIX_WORKING = 15_000
PREFIX_BATCHED_WORKING = 61 * 1120 * 4 + 16 * 1283 * 4  # every step's pre-activations + a batch's logits
POOL3_BYTES = 1200 * 4
PREDS_BYTES = 61 * 4


def default_budget() -> int:
    """Half of the default device's memory (GPU/TPU: its allocator limit; CPU: physical memory)."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may not implement memory_stats
        stats = None
    total = (stats or {}).get("bytes_limit") or memory_bytes()
    return int(total) // 2


def chunk_for_budget(sets: Sequence[np.ndarray | jax.ShapeDtypeStruct], budget: Optional[int], prefix_sums: bool,
                     max_chunk: int, batched: bool = False) -> int:
    """The largest chunk <= ``max_chunk`` whose working memory fits ``budget`` beside the resident data.

    ``sets`` are the image arrays, or only their shapes and dtypes (anything with ``.shape`` and ``.dtype``).
    ``batched``: the prefix sweep evaluates distinct steps in batches (``SweepOptions.batch_steps`` > 0).

    Raises:
        ConfigError: the data alone does not fit the budget.
    """
    sizes = [(int(x.shape[0]), int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize) for x in sets]
    budget = default_budget() if budget is None else int(budget)
    # On CPU the arrays exist twice (host numpy + device buffer); on accelerators once on device.
    copies = 2 if jax.default_backend() == "cpu" else 1
    # pool_3 features: the clean set's (ranking), and the set being swept plus its copy sorted by alive
    # channels (SweepOptions.group).
    pool3 = (sizes[0][0] + 2 * max(n for n, _ in sizes)) * POOL3_BYTES
    resident = sum(copies * nbytes + n * PREDS_BYTES for n, nbytes in sizes) + pool3
    head = (PREFIX_BATCHED_WORKING if batched else PREFIX_WORKING) if prefix_sums else PLAIN_HEAD_WORKING
    per_image = TRUNK_WORKING + head
    room = budget - resident
    if room < per_image:
        raise ConfigError(f"the data needs about {resident / 2**30:.2f} GiB resident but the memory budget is "
                          f"{budget / 2**30:.2f} GiB; raise --memory_budget or use fewer images")
    return int(max(1, min(max_chunk, room // per_image)))
