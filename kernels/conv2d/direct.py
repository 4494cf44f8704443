"""The direct convolution: a native XLA:CPU kernel (``direct_cpu.cc``), built on first use and cached.

The kernel is C++ against the XLA FFI headers that jaxlib ships (``jax.ffi.include_dir()``), compiled once per
machine by the C++ compiler at hand (``$CXX``, else ``c++``) for the CPU at hand (``-march=native``) into
``$BADNET_JAX_CACHE`` (default ``~/.cache/badnet-jax``), under a name that hashes the source, the flags, the
compiler's version, jaxlib's and the CPU's model and flags: a cache folder shared between machines or versions
never serves another one's build. The build is written beside its final name and renamed over it, so
processes that build at once each see a whole library.

Where it cannot be built (no compiler, a compile error, a platform without ``-march=native``) or
``BADNET_JAX_NATIVE=0`` turns it off, :func:`native_kernel` is None, a warning says why once, and
``conv2d`` runs XLA's forms: slower on a CPU's few-channel layers, never wrong.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib

from badnet_jax.kernels.conv2d.reference import Padding, conv2d_reference, epilogue
from badnet_jax.kernels.conv2d.width_blocked import explicit_pads

SOURCE = Path(__file__).with_name("direct_cpu.cc")
TARGET = "badnet_conv2d_direct"  # the FFI target's registered name (and the C symbol of its handler)
# -fno-predictive-commoning: GCC's -O3 otherwise carries input values between loop steps through the stack
# and the tile's accumulators spill (measured 2.6x slower). -ffp-contract=fast: fused multiply-adds.
FLAGS = ("-O3", "-march=native", "-fno-predictive-commoning", "-ffp-contract=fast", "-std=c++17", "-shared",
         "-fPIC")
BUILD_TIMEOUT_S = 300
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NativeKernel:
    """The built kernel, registered with XLA for the CPU.

    Attributes:
        path: the shared library.
        lanes: float32 lanes per vector of this build (16 with AVX-512, else 8): the kernel pads each pixel's
            output channels to whole vectors of this many.
    """

    path: Path
    lanes: int


def cache_dir() -> Path:
    """Where built kernels are kept: ``$BADNET_JAX_CACHE``, else ``$XDG_CACHE_HOME/badnet-jax``, else
    ``~/.cache/badnet-jax``."""
    if os.environ.get("BADNET_JAX_CACHE"):
        return Path(os.environ["BADNET_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "badnet-jax"


def _cpu_identity() -> str:
    # -march=native targets this CPU: its model and feature flags are part of the build's name.
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX") or "c++")


def _build(compiler: str) -> Path:
    # `-v`: the version and configuration on stderr, in GCC and Clang alike.
    shown = subprocess.run([compiler, "-v"], capture_output=True, text=True, timeout=60)
    version = shown.stdout + shown.stderr
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, jaxlib.__version__,
                                    _cpu_identity()]).encode()).hexdigest()[:24]
    path = cache_dir() / f"conv2d_direct-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


@functools.cache
def native_kernel() -> Optional[NativeKernel]:
    """The direct convolution's native kernel, built (once per machine) and registered; None where it cannot
    be (the reason logged once as a warning) or ``BADNET_JAX_NATIVE=0`` turns it off."""
    if os.environ.get("BADNET_JAX_NATIVE", "1").strip() == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (%s) on the PATH: the CPU convolutions run XLA's forms, slower on few-channel "
                    "layers (set CXX to a compiler to build the native kernel)", os.environ.get("CXX") or "c++")
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
        lanes = int(lib.badnet_conv2d_direct_lanes())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, TARGET)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("the native convolution kernel could not be built or loaded (%s); the CPU convolutions run "
                    "XLA's forms", e)
        return None
    return NativeKernel(path, lanes)


def _out_size(size: int, k: int, stride: int, dilation: int) -> int:
    return max(0, (size - ((k - 1) * dilation + 1)) // stride + 1)


@functools.cache
def _direct_call(strides: tuple[int, int], dilation: tuple[int, int], relu: bool, pool: tuple[int, int]):
    """The FFI call for one stride, dilation and epilogue, batched under ``vmap`` by folding the batch into the
    images (a batched kernel or bias runs one call per batch element) and differentiated through XLA's
    convolution (the tangent of the reference form: linear in the images and the kernel, the pool's and
    ReLU's selections taken from the reference's values)."""
    (sh, sw), (dh, dw), (ph, pw) = strides, dilation, pool

    @jax.custom_batching.custom_vmap
    def call(x, k, b):
        n, h, w, _ = x.shape
        kh, kw, _, f = k.shape
        out = jax.ShapeDtypeStruct((n, _out_size(h, kh, sh, dh) // ph, _out_size(w, kw, sw, dw) // pw, f), x.dtype)
        return jax.ffi.ffi_call(TARGET, out)(x, k, b, sh=sh, sw=sw, dh=dh, dw=dw, ph=ph, pw=pw, relu=int(relu))

    @call.def_vmap
    def _batched(axis_size, in_batched, x, k, b):
        if in_batched[1] or in_batched[2]:
            x, k, b = (a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                       for a, batched in zip((x, k, b), in_batched))
            return jax.lax.map(lambda a: call(*a), (x, k, b)), True
        y = call(x.reshape(-1, *x.shape[2:]), k, b)
        return y.reshape(axis_size, -1, *y.shape[1:]), True

    def reference(x, k, b):
        y = conv2d_reference(x, k, strides, "VALID", dilation) + b[None, None, None, :]
        return epilogue(y, relu, pool)

    @jax.custom_jvp
    def direct(x, k, b):
        return call(x, k, b)

    @direct.defjvp
    def _jvp(primals, tangents):
        return direct(*primals), jax.jvp(reference, primals, tangents)[1]

    return direct


def conv2d_direct(x_NxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = "VALID", dilation: Sequence[int] = (1, 1),
                  bias: Optional[jax.Array] = None, relu: bool = False,
                  pool: Optional[Sequence[int]] = None) -> jax.Array:
    """The convolution :func:`conv2d_reference` computes (plus ``bias``, then :func:`epilogue`), by the native
    kernel; traceable.

    float32 only, CPU only (the FFI target is registered for the CPU; :func:`native_kernel` builds and registers
    it on the first call). Padding is applied to the images first (zeros, like the convolution's own).

    Args:
        x_NxHxWxC: float32 images.
        kernel_HxWxIxO: the float32 kernel (kh, kw, C, F).
        strides, padding, dilation: as :func:`conv2d_reference` (explicit padding >= 0).
        bias: (F,) added to every output (None: zeros).
        relu, pool: the fused epilogue: the max over (ph, pw) windows (stride = window, VALID; None: none),
            then ``max(., 0)`` if ``relu``.

    Returns:
        (N, Ho // ph, Wo // pw, F): each convolution output its bias plus its terms in (dy, dx, c) order, fused
        multiply-adds; the epilogue's maxima exact.

    Raises:
        ValueError: the native kernel could not be built here (the warning logged says why), or the images are
            not float32.
    """
    if native_kernel() is None:
        raise ValueError("the direct convolution needs the native kernel, which could not be built here (the "
                         "warning logged says why; BADNET_JAX_NATIVE=0 turns it off)")
    if jnp.dtype(x_NxHxWxC.dtype) != jnp.float32 or jnp.dtype(kernel_HxWxIxO.dtype) != jnp.float32:
        raise ValueError(f"the direct convolution computes float32, got {x_NxHxWxC.dtype} images and a "
                         f"{kernel_HxWxIxO.dtype} kernel")
    strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
    pool = (1, 1) if pool is None else tuple(int(p) for p in pool)
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
    return _direct_call(strides, dilation, bool(relu), pool)(x, kernel_HxWxIxO, b)


__all__ = ["NativeKernel", "cache_dir", "conv2d_direct", "native_kernel"]
