"""Dispatch for the masked head: the Pallas kernel where it compiles (GPU/TPU), else the pure-JAX reference.

``impl``: ``"reference"`` (pure JAX, always works), ``"pallas"`` (the kernel; interpret mode on CPU, slow,
for testing), or ``"auto"`` (the kernel on GPU/TPU if a probe compile succeeds on this backend, else the
reference). The probe runs once per backend and is cached, so a kernel that fails to lower on some
jax/jaxlib falls back to the reference instead of failing the sweep.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp

from badnet_jax.kernels.masked_head.pallas_kernel import head_argmax_pallas
from badnet_jax.kernels.masked_head.reference import head_argmax_reference

Impl = Literal["auto", "reference", "pallas"]
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def pallas_available(backend: str) -> bool:
    """Whether the Pallas kernel compiles and agrees with the reference on ``backend`` (cached probe)."""
    if backend == "cpu":
        return False  # only interpret mode there: correct but far slower than XLA
    try:
        key = jax.random.PRNGKey(0)
        k = jax.random.split(key, 6)
        args = (jax.random.normal(k[0], (2, 20, 160)), jax.random.normal(k[1], (2, 20, 960)),
                jax.random.normal(k[2], (960, 160)), jax.random.normal(k[3], (160,)),
                jax.random.normal(k[4], (160, 300)), jax.random.normal(k[5], (300,)))
        got = head_argmax_pallas(*args)
        want = head_argmax_reference(*args)
        return bool(jnp.mean(got == want) > 0.95)  # ties aside
    except Exception as err:  # noqa: BLE001 - any lowering/compile failure means "use the reference"
        log.warning("Pallas masked-head kernel unavailable on %s (%s: %s); using the JAX reference.",
                    backend, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False


def resolve_impl(impl: Impl = "auto") -> str:
    """The implementation ``impl`` means on the default backend: ``"reference"``, ``"pallas"`` or ``"interpret"``."""
    backend = jax.default_backend()
    if impl == "reference":
        return "reference"
    if impl == "pallas":
        return "interpret" if backend == "cpu" else "pallas"
    if impl == "auto":
        return "pallas" if pallas_available(backend) else "reference"
    raise ValueError(f"impl must be 'auto', 'reference' or 'pallas', got {impl!r}")


def head_argmax(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array, wout: jax.Array,
                bout: jax.Array, impl: str = "reference") -> jax.Array:
    """(M, N) int32 argmax of the head's tail for (M, N, 160) / (M, N, 960) pre-activations.

    ``impl`` is a resolved name (see :func:`resolve_impl`); traceable, so it can sit inside a jit.
    """
    if impl == "reference":
        return head_argmax_reference(fc1_pre, c4_pre, w2, b2, wout, bout)
    return head_argmax_pallas(fc1_pre, c4_pre, w2, b2, wout, bout, interpret=(impl == "interpret"))
