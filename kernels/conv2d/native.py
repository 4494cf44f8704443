"""The native kernel's build, cache and registration (``direct_cpu.cc``, an XLA FFI custom call for the CPU).

The kernel is C++ against the XLA FFI headers that jaxlib ships (``jax.ffi.include_dir()``), compiled on first
use by the C++ compiler at hand (``$CXX``, a command with its own arguments if need be, else ``c++``) for the
CPU at hand (``-march=native``; ``$BADNET_JAX_NATIVE_FLAGS`` adds flags after it, e.g. another ``-march``) into
``$BADNET_JAX_CACHE`` (default ``$XDG_CACHE_HOME/badnet-jax``, else ``~/.cache/badnet-jax``), under a name that
hashes the source, the flags, the compiler's version, jaxlib's and the CPU's model and flags: a cache folder
shared between machines or versions never serves another one's build.

A library is used only if it is whole: the build is written beside its final name, checked to be a shared
library, flushed to disk and renamed over it, then its SHA-256 is written beside it the same way; a later
process loads it only if the digest matches and the file is its user's and writable by no one else (a
truncated file from a crash, or one planted in a shared folder, is rebuilt instead of loaded). The compiler
runs in its own process group, killed whole after :data:`BUILD_TIMEOUT_S`.

Where it cannot be built or loaded (no compiler, a compile error, a platform without ``-march=native``) or
``BADNET_JAX_NATIVE`` is 0/false/off/no, :func:`native_kernel` is None, a warning says why once, and
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
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

import jax
import jaxlib

from badnet_jax.io.fileio import atomic_write

SOURCE = Path(__file__).with_name("direct_cpu.cc")
TARGET = "badnet_conv2d_direct"  # the FFI target's registered name (and the C symbol of its handler)
# -fno-predictive-commoning: GCC's -O3 otherwise carries input values between loop steps through the stack
# and the tile's accumulators spill (2.6x slower on DeepID's conv_1). -ffp-contract=fast: fused multiply-adds.
FLAGS = ("-O3", "-march=native", "-fno-predictive-commoning", "-ffp-contract=fast", "-std=c++17", "-shared",
         "-fPIC")
BUILD_TIMEOUT_S = 300
OFF = ("0", "false", "off", "no")
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
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> tuple[str, list[str]]:
    """``$CXX`` (or ``c++``) as (what the user wrote, the command: the executable found on the PATH and its own
    arguments; empty where there is none)."""
    given = os.environ.get("CXX") or "c++"
    words = shlex.split(given)
    found = shutil.which(words[0]) if words else None
    return given, ([found, *words[1:]] if found else [])


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    """``cmd``'s exit code and its output (stdout then stderr, undecodable bytes replaced). It runs in its own
    process group, killed whole at the timeout (a compiler driver's children included)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{cmd[0]} ran past {timeout:.0f} s and was stopped") from None
    return proc.returncode, (out + err).decode("utf-8", errors="replace")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trusted(path: Path) -> bool:
    """Whether ``path`` and its digest beside it say it is a whole build of this user's, writable by no one else."""
    sums = path.with_suffix(".sha256")
    try:
        st = path.stat()
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
            return False
        return sums.read_text().strip() == _digest(path)
    except OSError:
        return False


def _build(compiler: list[str]) -> Path:
    """The library for this source, compiler, jaxlib and CPU: the cached one if it is whole, else a new build."""
    _, version = _run([*compiler, "-v"], min(60, BUILD_TIMEOUT_S))  # `-v`: version and configuration (GCC, Clang)
    flags = [*FLAGS, *shlex.split(os.environ.get("BADNET_JAX_NATIVE_FLAGS", ""))]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(compiler[1:] + flags), version,
                                    jaxlib.__version__, _cpu_identity()]).encode()).hexdigest()[:24]
    path = cache_dir() / f"conv2d_direct-{key}.so"
    if _trusted(path):
        return path
    log.info("Building the native convolution kernel for this CPU (once per machine, ~5 s) into %s", path)

    def compile_to(tmp: Path) -> None:
        code, output = _run([*compiler, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)],
                            BUILD_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"{compiler[0]} exited with {code}: {output.strip()[-800:]}")
        with open(tmp, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise RuntimeError(f"{compiler[0]} exited with 0 but wrote no shared library")

    # Loadable by others, writable by its user only; on disk whole before its name (and its digest's) points at it.
    atomic_write(path, compile_to, mode=0o755, durable=True)
    atomic_write(path.with_suffix(".sha256"), lambda tmp: tmp.write_text(_digest(path) + "\n"), mode=0o644,
                 durable=True)
    return path


@functools.cache
def native_kernel() -> Optional[NativeKernel]:
    """The direct convolution's native kernel, built (once per machine) and registered with XLA for the CPU;
    None where it cannot be (the reason logged once as a warning) or ``BADNET_JAX_NATIVE`` turns it off."""
    if os.environ.get("BADNET_JAX_NATIVE", "1").strip().lower() in OFF:
        return None
    given, compiler = _compiler()
    if not compiler:
        log.warning("no C++ compiler (CXX=%s) on the PATH: the CPU convolutions run XLA's forms, slower on "
                    "few-channel layers (set CXX to a C++17 compiler to build the native kernel)", given)
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
        lanes = int(lib.badnet_conv2d_direct_lanes())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, TARGET)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, ValueError) as e:
        log.warning("the native convolution kernel could not be built or loaded with CXX=%s (%s); the CPU "
                    "convolutions run XLA's forms (CXX must name a C++17 compiler, e.g. g++ or clang++)", given, e)
        return None
    return NativeKernel(path, lanes)


__all__ = ["NativeKernel", "TARGET", "cache_dir", "native_kernel"]
