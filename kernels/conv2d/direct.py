"""The direct convolution: the native XLA:CPU kernel (``direct_cpu.cc``, built by ``kernels/native.py``) as a JAX
function, with its fused epilogue, ``vmap`` and differentiation rules.

The kernel vectorises the output channels, or for few of them the output columns (``form``): each output is
its bias plus its terms in (dy, dx, c) order with fused multiply-adds, whatever layout, thread or batch computes
it. It runs inside ``jit``, ``lax.map``, ``vmap`` (the
batch folded into the images) and ``shard_map`` (its output marked varying like its images); under automatic
(GSPMD) sharding XLA cannot split a custom call and runs it on whole arrays, so the sweep shards with
``shard_map``.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from badnet_jax.kernels.native import CONV2D_DIRECT, map_over_batch, native_library, varying_like
from badnet_jax.kernels.conv2d.reference import Padding, conv2d_reference, epilogue
from badnet_jax.kernels.conv2d.width_blocked import explicit_pads


def _out_size(size: int, k: int, stride: int, dilation: int) -> int:
    return max(0, (size - ((k - 1) * dilation + 1)) // stride + 1)


FORMS = {"auto": 0, "channels": 1, "columns": 2}  # the kernel's inner layouts (its `form` attribute)


@functools.cache
def _direct_call(strides: tuple[int, int], dilation: tuple[int, int], relu: bool, pool: tuple[int, int],
                 form: str = "auto"):
    """The FFI call for one stride, dilation and epilogue, batched under ``vmap`` by folding the batch into the
    images (a batched kernel or bias runs one call per batch element) and differentiated through XLA's
    convolution of the tangents."""
    (sh, sw), (dh, dw), (ph, pw) = strides, dilation, pool

    @jax.custom_batching.custom_vmap
    def call(x, k, b):
        n, h, w, _ = x.shape
        kh, kw, _, f = k.shape
        out = jax.ShapeDtypeStruct((n, _out_size(h, kh, sh, dh) // ph, _out_size(w, kw, sw, dw) // pw, f), x.dtype)
        return jax.ffi.ffi_call(CONV2D_DIRECT, out)(x, k, b, sh=sh, sw=sw, dh=dh, dw=dw, ph=ph, pw=pw, relu=int(relu),
                                                     form=FORMS[form])

    @call.def_vmap
    def _batched(axis_size, in_batched, x, k, b):
        if in_batched[1] or in_batched[2]:
            return map_over_batch(call, axis_size, in_batched, (x, k, b)), True
        y = call(x.reshape(axis_size * x.shape[1], *x.shape[2:]), k, b)
        return y.reshape(axis_size, x.shape[1], *y.shape[1:]), True

    plain = _direct_call(strides, dilation, False, (1, 1), form) if relu or pool != (1, 1) else None

    @jax.custom_jvp
    def direct(x, k, b):
        return call(x, k, b)

    @direct.defjvp
    def _jvp(primals, tangents):
        # Linear in the images and the kernel: the tangent is XLA's convolution of the tangents. The epilogue's
        # maxima select from the kernel's own convolution (no second forward), and give the fused values.
        (x, k, b), (tx, tk, tb) = primals, tangents
        conv = functools.partial(conv2d_reference, strides=strides, dilation=dilation)
        t = conv(tx, k) + conv(x, tk) + tb[None, None, None, :]
        if plain is None:
            return direct(x, k, b), t
        return jax.jvp(lambda y: epilogue(y, relu, pool), (plain(x, k, b),), (t,))

    return direct


def conv2d_direct(x_NxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = "VALID", dilation: Sequence[int] = (1, 1),
                  bias: Optional[jax.Array] = None, relu: bool = False,
                  pool: Optional[Sequence[int]] = None, form: str = "auto") -> jax.Array:
    """The convolution :func:`conv2d_reference` computes (plus ``bias``, then :func:`epilogue`), by the native
    kernel; traceable.

    float32 only, CPU only (the FFI target is registered for the CPU; :func:`~badnet_jax.kernels.native.native_library` builds and registers
    it on the first call). Padding is applied to the images first (zeros, like the convolution's own).

    Args:
        x_NxHxWxC: float32 images.
        kernel_HxWxIxO: the float32 kernel (kh, kw, C, F).
        strides, padding, dilation: as :func:`conv2d_reference` (explicit padding >= 0).
        bias: (F,) added to every output (None: zeros).
        relu, pool: the fused epilogue: the max over (ph, pw) windows (stride = window, VALID; None: none),
            then ``max(., 0)`` if ``relu``.
        form: the kernel's inner layout, the same bits in each (a NaN pixel times a NaN weight is NaN in
            each, its payload either operand's): ``"channels"`` (vectors over the output channels),
            ``"columns"`` (over the output columns, for few channels; unit column stride) or ``"auto"`` (the
            kernel's rule, measured per vector width: the columns where they fill clearly more of the vector
            lanes with 16; with 8, where they fill more and the input has fewer than 4 channels;
            ``ColumnsPay`` in ``direct_cpu.cc``).

    Returns:
        (N, Ho // ph, Wo // pw, F): each convolution output its bias plus its terms in (dy, dx, c) order, fused
        multiply-adds; the epilogue's maxima exact.

    Raises:
        ValueError: the native kernel could not be built here (the warning logged says why), or the images are
            not float32.
    """
    if native_library() is None:
        raise ValueError("the direct convolution needs the native kernel, which could not be built here (the "
                         "warning logged says why; BADNET_JAX_NATIVE=0 turns it off)")
    strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
    pool = (1, 1) if pool is None else tuple(int(p) for p in pool)
    _check(x_NxHxWxC, kernel_HxWxIxO, bias, strides, dilation, pool)
    if form not in FORMS or (form == "columns" and strides[1] != 1):
        raise ValueError(f"form must be one of {sorted(FORMS)} ('columns' with a column stride of 1), got {form!r} "
                         f"with strides {strides}")
    kh, kw, _, f = kernel_HxWxIxO.shape
    pads = [explicit_pads(x_NxHxWxC.shape[1 + a], (kh, kw)[a], strides[a], dilation[a], padding, a) for a in (0, 1)]
    x = x_NxHxWxC
    if any(p != 0 for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    b = jnp.zeros((f,), x.dtype) if bias is None else bias.astype(x.dtype)
    ho, wo = (_out_size(x.shape[1], kh, strides[0], dilation[0]), _out_size(x.shape[2], kw, strides[1], dilation[1]))
    if 0 in (x.shape[0], ho // pool[0], wo // pool[1]):
        y = conv2d_reference(x, kernel_HxWxIxO, strides, "VALID", dilation) + b[None, None, None, :]
        return epilogue(y, relu, pool)
    out = _direct_call(strides, dilation, bool(relu), pool, form)(x, kernel_HxWxIxO, b)
    return varying_like(out, x, kernel_HxWxIxO, b)  # inside shard_map: varies as any input does


def _check(x, k, bias, strides, dilation, pool) -> None:
    """Refuse, naming the argument, what the native kernel could only refuse at run time."""
    if jnp.dtype(x.dtype) != jnp.float32 or jnp.dtype(k.dtype) != jnp.float32:
        raise ValueError(f"the direct convolution computes float32, got {x.dtype} images and a {k.dtype} kernel")
    if x.ndim != 4 or k.ndim != 4:
        raise ValueError(f"x_NxHxWxC must be (N, H, W, C) and kernel_HxWxIxO (kh, kw, C, F), got shapes "
                         f"{x.shape} and {k.shape}")
    if k.shape[2] != x.shape[3] or min(k.shape[:2]) < 1:
        raise ValueError(f"kernel_HxWxIxO {k.shape} does not fit images of {x.shape[3]} channels")
    if bias is not None and tuple(bias.shape) != (k.shape[3],):
        raise ValueError(f"bias must be ({k.shape[3]},), one per output channel, got {tuple(bias.shape)}")
    for name, pair in (("strides", strides), ("dilation", dilation), ("pool", pool)):
        if len(pair) != 2 or min(pair) < 1:
            raise ValueError(f"{name} must be two integers >= 1, got {pair}")


__all__ = ["conv2d_direct"]
