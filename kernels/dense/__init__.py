"""Dense layers for a CNN's tail (the sweep evaluates it once per image and pruning step), fast on a CPU.

A native XLA:CPU kernel (``dense_cpu.cc``, built by ``kernels/native.py``) computes ``act(act_in(x) @ w + b +
add)`` in register tiles, and the output layer's argmax, top-2 gap and output scale without writing its
logits to memory; the pure-JAX reference is the same in XLA's summation order. Which runs: ``api.py``.
"""

from badnet_jax.kernels.dense.api import dense, dense_top2, native_runs, resolve_impl
from badnet_jax.kernels.dense.native_dense import dense_native, dense_top2_native
from badnet_jax.kernels.dense.reference import dense_reference, dense_top2_reference

__all__ = ["dense", "dense_native", "dense_reference", "dense_top2", "dense_top2_native", "dense_top2_reference",
           "native_runs", "resolve_impl"]
