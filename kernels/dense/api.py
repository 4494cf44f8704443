"""Dispatch for the dense ops: the native CPU kernels where they run, else the JAX reference.

``impl``: ``"auto"`` (the native kernels where the default backend and the lowering platform are the CPU and
the kernels are built, else the reference), ``"native"`` (the same: where the kernels cannot run, the
reference, whose results are the same up to the summation order), or ``"reference"`` (pure JAX). On a 2-core
Xeon the native forms ran DeepID's tail (fc_2, then the 1283-class output layer and its top-2) at 187 and
181 GFLOP/s against XLA's 167 and 137 in 256-row calls, and the lab-scale sweep's device time 7.76 -> 7.3 s
on two CPU devices, 9.3-9.6 -> 7.9-8.2 s on one (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Literal, Optional

import jax

from badnet_jax.kernels.dense.native_dense import dense_native, dense_top2_native
from badnet_jax.kernels.dense.reference import dense_reference, dense_top2_reference
from badnet_jax.kernels.native import native_library

Impl = Literal["auto", "native", "reference"]


def native_runs(platform: Optional[str] = None) -> bool:
    """Whether the native kernels run for programs lowered for ``platform`` (None: the default backend's):
    the CPU, with the CPU the default backend (a CPU branch lowered on an accelerator host builds nothing)
    and the kernels built here."""
    backend = jax.default_backend()
    return (platform or backend) == "cpu" and backend == "cpu" and native_library() is not None


def resolve_impl(impl: Impl = "auto", platform: Optional[str] = None) -> str:
    """The implementation ``impl`` means for ``platform``: ``"native"`` or ``"reference"``."""
    if impl not in ("auto", "native", "reference"):
        raise ValueError(f"impl must be 'auto', 'native' or 'reference', got {impl!r}")
    return "native" if impl != "reference" and native_runs(platform) else "reference"


def dense(x: jax.Array, w_KxN: jax.Array, b_N: jax.Array, add: Optional[jax.Array] = None, relu_in: bool = False,
          relu_out: bool = False, impl: str = "reference") -> jax.Array:
    """``act(act_in(x) @ w + b + add)`` on rows (..., K) -> (..., N); ``impl`` a resolved name
    (:func:`resolve_impl`). Traceable."""
    if impl == "native":
        return dense_native(x, w_KxN, b_N, add, relu_in, relu_out)
    return dense_reference(x, w_KxN, b_N, add, relu_in, relu_out)


def dense_top2(x: jax.Array, w_KxN: jax.Array, b_N: jax.Array,
               impl: str = "reference") -> tuple[jax.Array, jax.Array, jax.Array]:
    """The output layer's (...) argmax, top-2 logit gap and output scale on inputs (..., K); ``impl`` a resolved
    name (:func:`resolve_impl`). Traceable."""
    if impl == "native":
        return dense_top2_native(x, w_KxN, b_N)
    return dense_top2_reference(x, w_KxN, b_N)


__all__ = ["Impl", "dense", "dense_top2", "native_runs", "resolve_impl"]
