"""Pallas kernel for the masked head's tail + argmax (GPU via Triton, TPU via Mosaic, CPU interpret).

Grid: (masks, image blocks). Each program takes ``block_n`` images under one mask, computes fc_2 with a
K-loop (so no 960x160 tile has to sit in on-chip memory at once), adds fc_1, applies relu, then walks the
classes in blocks of ``class_block`` keeping a running (max, second max, argmax): the (masks x images x
classes) logits never reach device memory, only (masks x images) predictions, top-2 gaps and output scales do
(the gap and scale tell near-ties, which are settled in float64: ``badnet_jax.numerics.ties``). The scale is
``ties.output_scale``'s S: the kernel sums hidden x ``ties.output_scale_weights`` in its loop, the bias term is
added outside.

Feature widths are zero-padded to powers of two (Triton's block shapes must be): padded hidden units are
relu(0 + 0) = 0 with zero weights, and padded classes get a -inf bias, so results are unchanged.

On NVIDIA GPUs the Triton backend is chosen explicitly (``compiler_params``): from JAX 0.10 on a plain
``pallas_call`` lowers with Mosaic GPU, which stages every whole-array block (the 960x160 fc_2 and 160xC
output weights) in shared memory and exceeds the 227 KiB an H100/H200 block has. Triton instead reads
those blocks from global memory through pointers, one ``k_block`` x 256 and 256 x ``class_block`` tile
at a time, so the kernel lowers at the lab's shapes (1283 classes) and any other class count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from badnet_jax.numerics.ties import HIGHEST, output_scale_weights


def _next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()


def _kernel(fc1_ref, c4_ref, w2_ref, b2_ref, wout_ref, bout_ref, wmax_ref, arg_ref, gap_ref, scale_ref, *,
            k_block: int, num_k: int, class_block: int, num_classes_blocks: int):
    block_n, hidden_w = fc1_ref.shape[1], fc1_ref.shape[2]

    def fc2_step(k, acc):
        start = pl.multiple_of(k * k_block, k_block)
        c4 = jnp.maximum(c4_ref[0, :, pl.ds(start, k_block)], 0.0)
        return acc + jnp.dot(c4, w2_ref[pl.ds(start, k_block), :], precision=HIGHEST)

    acc = jax.lax.fori_loop(0, num_k, fc2_step, jnp.zeros((block_n, hidden_w), jnp.float32))
    hidden = jnp.maximum(acc + b2_ref[...][None, :] + fc1_ref[0], 0.0)

    def class_step(j, carry):
        best, second, arg = carry
        start = pl.multiple_of(j * class_block, class_block)
        logits = jnp.dot(hidden, wout_ref[:, pl.ds(start, class_block)], precision=HIGHEST)
        logits = logits + bout_ref[pl.ds(start, class_block)][None, :]
        m = jnp.max(logits, axis=1)
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + start
        first = jnp.min(jnp.where(logits == m[:, None], ids, jnp.int32(2**30)), axis=1)  # first max, as argmax
        m2 = jnp.max(jnp.where(ids == first[:, None], -jnp.inf, logits), axis=1)  # the block's runner-up
        better = m > best  # strict: an earlier block keeps ties
        # Running second max: the loser of (best, m), or the best runner-up seen so far.
        second = jnp.maximum(jnp.minimum(best, m), jnp.maximum(second, m2))
        return jnp.where(better, m, best), second, jnp.where(better, first, arg)

    minus_inf = jnp.full((block_n,), -jnp.inf, jnp.float32)
    best, second, arg = jax.lax.fori_loop(0, num_classes_blocks, class_step,
                                          (minus_inf, minus_inf, jnp.zeros((block_n,), jnp.int32)))
    arg_ref[0, :] = arg
    gap_ref[0, :] = best - second
    scale_ref[0, :] = jnp.sum(hidden * wmax_ref[...][None, :], axis=1)  # S less its bias term (ties.output_scale)


def _pad_to(a: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    pad = size - a.shape[axis]
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths, constant_values=value)


GPU_PLATFORMS = ("cuda", "rocm", "gpu")


def compiler_params(platform: str):
    """Pallas compiler parameters for ``platform``: Triton's on a GPU (see the module doc), else the default."""
    if platform in GPU_PLATFORMS:
        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return None


@functools.partial(jax.jit, static_argnames=("block_n", "class_block", "k_block", "interpret", "platform"))
def head_top2_pallas(fc1_pre: jax.Array, c4_pre: jax.Array, w2: jax.Array, b2: jax.Array, wout: jax.Array,
                     bout: jax.Array, *, block_n: int = 16, class_block: int = 128, k_block: int = 64,
                     interpret: bool = False, platform: str = "cuda") -> tuple[jax.Array, jax.Array, jax.Array]:
    """(M, N) argmax, top-2 gap and output scale for fc1_pre (M, N, 160) and c4_pre (M, N, 960); see reference.py.

    The class loop keeps a running max and second max, so the gap costs no second pass over the logits.
    ``platform``: the platform the kernel is lowered for (``cuda``/``rocm``: Triton; ``tpu``: Mosaic TPU);
    ignored with ``interpret``.
    """
    m, n, _ = fc1_pre.shape
    hid = _next_pow2(fc1_pre.shape[-1])
    k_w = max(_next_pow2(c4_pre.shape[-1]), k_block)
    n_pad = -(-n // block_n) * block_n
    c_pad = -(-wout.shape[1] // class_block) * class_block
    fc1 = _pad_to(_pad_to(fc1_pre, 2, hid), 1, n_pad)
    c4 = _pad_to(_pad_to(c4_pre, 2, k_w), 1, n_pad)
    w2p = _pad_to(_pad_to(w2, 0, k_w), 1, hid)
    b2p = _pad_to(b2, 0, hid)
    woutp = _pad_to(_pad_to(wout, 0, hid), 1, c_pad)
    boutp = _pad_to(bout, 0, c_pad, value=-jnp.inf)
    wmax, bmax = output_scale_weights(wout, bout)
    wmax = _pad_to(wmax, 0, hid)
    kernel = functools.partial(_kernel, k_block=k_block, num_k=k_w // k_block, class_block=class_block,
                               num_classes_blocks=c_pad // class_block)
    row = pl.BlockSpec((1, block_n), lambda i, j: (i, j))
    arg, gap, scale = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, n_pad), jnp.int32), jax.ShapeDtypeStruct((m, n_pad), jnp.float32),
                   jax.ShapeDtypeStruct((m, n_pad), jnp.float32)),
        grid=(m, n_pad // block_n),
        in_specs=[
            pl.BlockSpec((1, block_n, hid), lambda i, j: (i, j, 0)),
            pl.BlockSpec((1, block_n, k_w), lambda i, j: (i, j, 0)),
            pl.BlockSpec((k_w, hid), lambda i, j: (0, 0)),
            pl.BlockSpec((hid,), lambda i, j: (0,)),
            pl.BlockSpec((hid, c_pad), lambda i, j: (0, 0)),
            pl.BlockSpec((c_pad,), lambda i, j: (0,)),
            pl.BlockSpec((hid,), lambda i, j: (0,)),
        ],
        out_specs=(row, row, row),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(platform),
    )(fc1, c4, w2p, b2p, woutp, boutp, wmax)
    return arg[:, :n], gap[:, :n], scale[:, :n] + bmax


def head_argmax_pallas(*args, **kwargs) -> jax.Array:
    """The argmax of :func:`head_top2_pallas` alone."""
    return head_top2_pallas(*args, **kwargs)[0]
