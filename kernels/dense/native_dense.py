"""The dense ops by the native XLA:CPU kernels (``dense_cpu.cc``, built by ``kernels/native.py``) as JAX
functions, with ``vmap`` rules and, for :func:`dense_native`, a differentiation rule.

Each output is its bias plus its terms in k order with fused multiply-adds (then the addend), whatever thread
or batch computes it. They run inside ``jit``, ``lax.scan``, ``vmap`` (a batch of inputs folded into the rows;
batched weights run one call per batch element) and ``shard_map`` (the results vary as the inputs do).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from badnet_jax.kernels.dense.reference import dense_reference, dense_top2_reference
from badnet_jax.kernels.native import DENSE, DENSE_TOP2, map_over_batch, native_library, varying_like
from badnet_jax.numerics.ties import output_scale_weights

F32 = jnp.float32


def _rows(axis_size: int, a: jax.Array, batched: bool) -> jax.Array:
    """A row-wise argument with ``vmap``'s batch folded into its rows: (batch * rows, ...)."""
    a = a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
    return a.reshape(axis_size * a.shape[1], *a.shape[2:])


@functools.cache
def _dense_call(relu_in: bool, relu_out: bool, has_add: bool):
    """The FFI call on (M, K) rows for one epilogue; ``vmap`` folds a batch into the rows."""

    @jax.custom_batching.custom_vmap
    def call(x, w, b, add):
        out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), F32)
        return jax.ffi.ffi_call(DENSE, out)(x, w, b, add, relu_in=int(relu_in), relu_out=int(relu_out),
                                             has_add=int(has_add))

    @call.def_vmap
    def _batched(axis_size, in_batched, x, w, b, add):
        if in_batched[1] or in_batched[2] or (in_batched[3] and not has_add):
            return map_over_batch(call, axis_size, in_batched, (x, w, b, add)), True
        rows = x.shape[1] if in_batched[0] else x.shape[0]
        add = _rows(axis_size, add, in_batched[3]) if has_add else add
        y = call(_rows(axis_size, x, in_batched[0]), w, b, add)
        return y.reshape(axis_size, rows, y.shape[-1]), True

    @jax.custom_jvp
    def dense(x, w, b, add):
        return call(x, w, b, add)

    @dense.defjvp
    def _jvp(primals, tangents):
        # The tangent through the reference (XLA's products; the ReLUs' masks from its own pre-activations).
        ref = functools.partial(_reference_rows, relu_in=relu_in, relu_out=relu_out, has_add=has_add)
        _, t = jax.jvp(ref, primals, tangents)
        return dense(*primals), t

    return dense


def _reference_rows(x, w, b, add, relu_in, relu_out, has_add):
    return dense_reference(x, w, b, add if has_add else None, relu_in, relu_out)


@jax.custom_batching.custom_vmap
def _top2_call(x, w, b, wmax, bmax):
    m = x.shape[0]
    outs = (jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m,), F32), jax.ShapeDtypeStruct((m,), F32))
    return tuple(jax.ffi.ffi_call(DENSE_TOP2, outs)(x, w, b, wmax, bmax))


@_top2_call.def_vmap
def _top2_batched(axis_size, in_batched, x, w, b, wmax, bmax):
    if any(in_batched[1:]):
        return map_over_batch(_top2_call, axis_size, in_batched, (x, w, b, wmax, bmax)), (True, True, True)
    rows = x.shape[1]
    outs = _top2_call(_rows(axis_size, x, True), w, b, wmax, bmax)
    return tuple(o.reshape(axis_size, rows) for o in outs), (True, True, True)


def dense_native(x: jax.Array, w_KxN: jax.Array, b_N: jax.Array, add: Optional[jax.Array] = None,
                 relu_in: bool = False, relu_out: bool = False) -> jax.Array:
    """What :func:`~badnet_jax.kernels.dense.reference.dense_reference` computes, by the native kernel; traceable.

    Args:
        x: (..., K) float32 rows.
        w_KxN, b_N: the layer's float32 kernel and bias.
        add: (..., N) added before the output activation (None: nothing).
        relu_in, relu_out: ``max(., 0)`` on the inputs / on the outputs.

    Returns:
        (..., N): each output its bias plus its terms in k order (fused multiply-adds), then ``add``.

    Raises:
        ValueError: the native kernels could not be built here (the warning logged says why), or the arguments'
            dtypes or shapes do not fit.
    """
    _check_native()
    _check(x, w_KxN, b_N)
    lead, (k, n) = x.shape[:-1], w_KxN.shape
    if add is not None and (tuple(add.shape) != (*lead, n) or jnp.dtype(add.dtype) != F32):
        raise ValueError(f"add must be float32 {(*lead, n)}, like the output, got {add.dtype} {tuple(add.shape)}")
    m = math.prod(lead)
    if 0 in (m, k, n):  # nothing to multiply: the reference's bias (and addend) alone
        return dense_reference(x, w_KxN, b_N, add, relu_in, relu_out)
    rows = x.reshape(m, k)
    addend = jnp.zeros((1, 1), F32) if add is None else add.reshape(m, n)
    out = _dense_call(bool(relu_in), bool(relu_out), add is not None)(rows, w_KxN, b_N, addend)
    return varying_like(out, rows, w_KxN, b_N, addend).reshape(*lead, n)


def dense_top2_native(x: jax.Array, w_KxN: jax.Array, b_N: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What :func:`~badnet_jax.kernels.dense.reference.dense_top2_reference` computes, by the native kernel,
    without writing the logits to memory; traceable (an argmax: not differentiable).

    Args:
        x: (..., K) float32 inputs of the output layer.
        w_KxN, b_N: the output layer's float32 kernel and bias (N >= 1 classes).

    Returns:
        (...) int32 argmax (the first column on ties; the first NaN where there is one), (...) float32 gap
        between the two largest logits (0 on an exact tie, NaN with a NaN), (...) float32 output scale S
        (``badnet_jax.numerics.ties.output_scale``). Each logit is its bias plus its terms in k order.

    Raises:
        ValueError: as :func:`dense_native`, or N = 0.
    """
    _check_native()
    _check(x, w_KxN, b_N)
    lead, (k, n) = x.shape[:-1], w_KxN.shape
    if n == 0:
        raise ValueError("w_KxN has no columns: an output layer needs at least one class")
    m = math.prod(lead)
    if 0 in (m, k):
        return dense_top2_reference(x, w_KxN, b_N)
    rows = x.reshape(m, k)
    wmax_K, bmax = output_scale_weights(w_KxN, b_N)
    outs = _top2_call(rows, w_KxN, b_N, wmax_K, bmax.reshape(1))
    # Inside shard_map the results vary as any of the inputs does (images or, per device, weights).
    return tuple(varying_like(o, rows, w_KxN, b_N).reshape(lead) for o in outs)


def _check_native() -> None:
    if native_library() is None:
        raise ValueError("the native dense kernels could not be built here (the warning logged says why; "
                         "BADNET_JAX_NATIVE=0 turns them off)")


def _check(x, w, b) -> None:
    """Refuse, naming the argument, what the native kernel could only refuse at run time."""
    if any(jnp.dtype(a.dtype) != F32 for a in (x, w, b)):
        raise ValueError(f"the native dense kernels compute float32, got x {x.dtype}, w_KxN {w.dtype}, b_N {b.dtype}")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x (..., K) and w_KxN (K, N) must agree on K, got shapes {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if tuple(b.shape) != (w.shape[1],):
        raise ValueError(f"b_N must be ({w.shape[1]},), one per output column, got {tuple(b.shape)}")


__all__ = ["dense_native", "dense_top2_native"]
