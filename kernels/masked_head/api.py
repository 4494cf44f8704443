"""Dispatch for the masked head: the JAX reference or the CPU's native dense kernels by default, the Pallas
kernel when asked for.

``impl``: ``"reference"`` (pure JAX, always works), ``"auto"`` (on a CPU where the native kernels are built,
``"native"``: fc_2 and the output layer's top-2 by ``badnet_jax.kernels.dense``; elsewhere the reference: on
the one accelerator measured, an H200, XLA's reference ran the head call 2.4x faster than the Triton kernel,
1.2 ms against 2.9 ms for 8 masks x 4096 images x 1283 classes; see docs/benchmarks.md), or ``"pallas"``
(the kernel; interpret mode on CPU, slow, for testing; on a GPU/TPU only if a probe at the real call's shapes
compiles and agrees with the reference, else the reference, with a warning that says why). Probes are cached
per (platform, shapes), so a kernel that fails to lower on some jax/jaxlib falls back instead of failing the
sweep.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import jax
import numpy as np

from badnet_jax.kernels.dense import api as dense_api
from badnet_jax.kernels.masked_head.reference import head_argmax_reference, head_top2_reference  # noqa: F401
from badnet_jax.model import CONV4_FEATURES, HIDDEN_UNITS, LAB_NUM_CLASSES
from badnet_jax.numerics.settling import tail64
from badnet_jax.numerics.ties import top2_gap

Impl = Literal["auto", "reference", "pallas"]
log = logging.getLogger(__name__)

# A row whose float64 top-2 logit gap exceeds this must get the same class from the kernel and the
# reference. Both sum ~1100 float32 products of magnitude ~1 per logit in different orders: their logits
# differ by ~1e-5 at most, so 1e-3 leaves two orders of magnitude of margin; closer rows are true near-ties.
CLEAR_GAP = 1e-3


def head_top2_pallas(*args, **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``pallas_kernel.head_top2_pallas``, imported on first use: Pallas and its Triton lowering take ~0.1 s to
    import, which every start would pay for a kernel that only ``impl="pallas"`` runs."""
    from badnet_jax.kernels.masked_head import pallas_kernel
    return pallas_kernel.head_top2_pallas(*args, **kwargs)


def head_argmax_pallas(*args, **kwargs) -> jax.Array:
    """``pallas_kernel.head_argmax_pallas``, imported on first use (see :func:`head_top2_pallas`)."""
    from badnet_jax.kernels.masked_head import pallas_kernel
    return pallas_kernel.head_argmax_pallas(*args, **kwargs)


def random_head_inputs(masks: int, images: int, num_classes: int = LAB_NUM_CLASSES,
                       seed: int = 0) -> tuple[np.ndarray, ...]:
    """Seeded random float32 arguments of a head call (fc1_pre, c4_pre, w2, b2, wout, bout) for ``masks`` x
    ``images`` rows, at the magnitudes of real pre-activations and weights: the probe's, the benchmark's and
    the kernel tests' inputs."""
    rng = np.random.default_rng(seed)
    f32 = lambda shape, scale: (rng.standard_normal(shape) * scale).astype(np.float32)
    return (f32((masks, images, HIDDEN_UNITS), 3.0), f32((masks, images, CONV4_FEATURES), 3.0),
            f32((CONV4_FEATURES, HIDDEN_UNITS), 0.05), f32((HIDDEN_UNITS,), 1.0),
            f32((HIDDEN_UNITS, num_classes), 0.1), f32((num_classes,), 1.0))


def clear_rows(args) -> np.ndarray:
    """(M, N) bool: rows whose float64 top-2 gap (``numerics.settling.tail64``) exceeds :data:`CLEAR_GAP`
    (not near-ties)."""
    return top2_gap(tail64(*args)[0])[1] > CLEAR_GAP


@functools.lru_cache(maxsize=None)
def pallas_available(platform: str, masks: int = 8, images: int = 256, num_classes: int = LAB_NUM_CLASSES) -> bool:
    """Whether the Pallas kernel compiles on ``platform`` at these shapes and agrees with the reference.

    Agreement must be total on every row that is not a float32 near-tie (:func:`clear_rows`), and every top-2
    gap and output scale must match the reference's to float32 accuracy (they decide which predictions are
    settled in float64). Cached.
    """
    if platform == "cpu":
        return False  # only interpret mode there: correct but far slower than XLA
    try:
        args = random_head_inputs(masks, images, num_classes)
        got = [np.asarray(a) for a in head_top2_pallas(*args, platform=platform)]
        want = [np.asarray(a) for a in head_top2_reference(*args)]
        clear = clear_rows(args)
        off = lambda g, w: np.abs(g - w) > 1e-4 * (1.0 + np.abs(w))
        bad = int((((got[0] != want[0]) & clear) | off(got[1], want[1]) | off(got[2], want[2])).sum())
        if bad:
            log.warning("Pallas masked-head kernel disagrees with the reference on %d of %d clear rows on %s at "
                        "%d x %d x %d classes; using the JAX reference.", bad, int(clear.sum()), platform, masks,
                        images, num_classes)
        return bad == 0
    except Exception as err:  # noqa: BLE001 - any lowering/compile failure means "use the reference"
        log.warning("Pallas masked-head kernel unavailable on %s at %d x %d x %d classes (%s: %s); using the JAX "
                    "reference.", platform, masks, images, num_classes, type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        return False


def default_platform() -> str:
    """The lowering platform of the default backend: ``cpu``, ``cuda``, ``rocm`` or ``tpu``."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return backend


def resolve_impl(impl: Impl = "auto", platform: str | None = None, masks: int = 8, images: int = 256,
                 num_classes: int = LAB_NUM_CLASSES) -> str:
    """The implementation ``impl`` means on ``platform`` for head calls of (masks, images, classes).

    Returns ``"reference"``, ``"native"``, ``"pallas"`` or ``"interpret"``. ``platform`` None is the default
    backend's. ``pallas`` for another platform than the running one (lowering for export) is the kernel,
    unprobed.
    """
    running = default_platform()
    platform = platform or running
    if impl == "auto":
        return dense_api.resolve_impl("auto", platform)
    if impl == "reference":
        return "reference"
    if impl == "pallas":
        if platform == "cpu":
            return "interpret"
        if platform != running:
            return "pallas"
        return "pallas" if pallas_available(platform, masks, images, num_classes) else "reference"
    raise ValueError(f"impl must be 'auto', 'reference' or 'pallas', got {impl!r}")


def head_top2(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array, wout: jax.Array,
              bout: jax.Array, impl: str = "reference", platform: str = "cuda") -> tuple[jax.Array, jax.Array, jax.Array]:
    """(M, N) argmax, top-2 logit gap and output scale of the head's tail (see reference.py); traceable."""
    if impl == "reference":
        return head_top2_reference(fc1_pre, c4_pre, w2, b2, wout, bout)
    if impl == "native":
        hidden = dense_api.dense(c4_pre, w2, b2, add=fc1_pre, relu_in=True, relu_out=True, impl="native")
        return dense_api.dense_top2(hidden, wout, bout, impl="native")
    return head_top2_pallas(fc1_pre, c4_pre, w2, b2, wout, bout, interpret=(impl == "interpret"), platform=platform)


def head_argmax(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array, wout: jax.Array,
                bout: jax.Array, impl: str = "reference", platform: str = "cuda") -> jax.Array:
    """(M, N) int32 argmax of the head's tail for (M, N, 160) / (M, N, 960) pre-activations.

    ``impl`` is a resolved name (see :func:`resolve_impl`), ``platform`` the one the kernel is lowered for;
    traceable, so it can sit inside a jit.
    """
    if impl == "reference":
        return head_argmax_reference(fc1_pre, c4_pre, w2, b2, wout, bout)
    if impl == "native":
        return head_top2(fc1_pre, c4_pre, w2, b2, wout, bout, impl="native")[0]
    return head_argmax_pallas(fc1_pre, c4_pre, w2, b2, wout, bout, interpret=(impl == "interpret"),
                              platform=platform)
