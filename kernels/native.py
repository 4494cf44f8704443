"""The native kernels' build, cache and registration: XLA FFI custom calls for the CPU, in C++.

Each op that has a native form keeps its source beside its JAX binding (:data:`SOURCES`:
``conv2d/direct_cpu.cc``, ``dense/dense_cpu.cc``); they are compiled into one shared library against the XLA
FFI headers that jaxlib ships (``jax.ffi.include_dir()``), on first use, by the C++ compiler at hand (``$CXX``,
a command with its own arguments if need be, else ``c++``; one compiler process per source, in parallel, then
one link) for the CPU at hand (``-march=native``; ``$BADNET_JAX_NATIVE_FLAGS`` adds flags after it, e.g.
another ``-march``) into ``$BADNET_JAX_CACHE`` (default ``$XDG_CACHE_HOME/badnet-jax``, else
``~/.cache/badnet-jax``), under a name that hashes the sources, the flags, the compiler's version, jaxlib's and
the CPU's model and flags: a cache folder shared between machines or versions never serves another one's build.

A library is used only if it is whole: the build is written beside its final name, checked to be a shared
library, flushed to disk and renamed over it, then its SHA-256 is written beside it the same way; a later
process loads it only if the digest matches and the file is its user's and writable by no one else (a
truncated file from a crash, or one planted in a shared folder, is rebuilt instead of loaded). Each compiler
runs in its own process group, killed whole after :data:`BUILD_TIMEOUT_S`.

Where it cannot be built or loaded (no compiler, a compile error, a platform without ``-march=native``) or
``BADNET_JAX_NATIVE`` is 0/false/off/no, :func:`native_library` is None, a warning says why once, and every
op runs its XLA forms: slower where the native kernels are faster, never wrong.
"""

from __future__ import annotations

import concurrent.futures
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
import jax.numpy as jnp
import jaxlib

from badnet_jax.io.atomic import atomic_write

HERE = Path(__file__).parent
SOURCES = (HERE / "conv2d" / "direct_cpu.cc", HERE / "dense" / "dense_cpu.cc")
HEADERS = (HERE / "parallel_for.h",)  # included by the sources (from -I HERE)
# The FFI targets' registered names (each the C symbol of its handler).
CONV2D_DIRECT = "badnet_conv2d_direct"
DENSE = "badnet_dense"
DENSE_TOP2 = "badnet_dense_top2"
TARGETS = (CONV2D_DIRECT, DENSE, DENSE_TOP2)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# Fused multiply-adds where a statement multiplies and adds (`acc += x * w`), the same places for both compilers,
# so both builds compute the same bits. GCC: -ffp-contract=fast (it has no "on"); --param=avoid-fma-max-bits=0:
# tuned for AMD Zen (-march=native there), GCC otherwise leaves a loop's chain of 256-bit multiply-adds on one
# accumulator unfused, so an 8-lane build's one-vector tiles would round twice and disagree in the last bit with
# the other tiles; -fno-predictive-commoning (Clang refuses it): GCC's -O3 otherwise carries input values between
# loop steps through the stack and the tile's accumulators spill (2.6x slower on DeepID's conv_1). Clang: "on"
# (its "fast" would also fuse across statements, pragmas disregarded).
GCC_FLAGS = ("-ffp-contract=fast", "--param=avoid-fma-max-bits=0", "-fno-predictive-commoning")
CLANG_FLAGS = ("-ffp-contract=on",)
BUILD_TIMEOUT_S = 300
OFF = ("0", "false", "off", "no")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NativeLibrary:
    """The built kernels, registered with XLA for the CPU (:data:`TARGETS`).

    Attributes:
        path: the shared library.
        lanes: float32 lanes per vector of this build (16 with AVX-512, else 8): the convolution pads each
            pixel's output channels to whole vectors of this many.
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


def cpu_identity() -> str:
    """This CPU's vendor, model and feature flags (``/proc/cpuinfo``), for names of builds made for it."""
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


def private(st: os.stat_result) -> bool:
    """Whether a file or folder of this status is this user's own and writable by no one else: what may hold code
    this user runs (a build here, XLA's compiled programs in ``badnet_jax.commands.processes``)."""
    return not (hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022))


def _trusted(path: Path) -> bool:
    """Whether ``path`` and its digest beside it say it is a whole build of this user's, writable by no one else."""
    sums = path.with_suffix(".sha256")
    try:
        return private(path.stat()) and sums.read_text().strip() == _digest(path)
    except OSError:
        return False


def _compile_all(commands: list[list[str]], timeout: float) -> None:
    """Run the compiler commands at once (each in its own process group, see :func:`_run`); the first failure
    raises, naming the compiler and its output."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(commands)) as pool:
        for cmd, (code, output) in zip(commands, pool.map(lambda c: _run(c, timeout), commands)):
            if code != 0:
                raise RuntimeError(f"{cmd[0]} exited with {code}: {output.strip()[-800:]}")


def _build(compiler: list[str]) -> Path:
    """The library for these sources, compiler, jaxlib and CPU: the cached one if it is whole, else a new build."""
    _, version = _run([*compiler, "-v"], min(60, BUILD_TIMEOUT_S))  # `-v`: version and configuration (GCC, Clang)
    gcc = "clang version" not in version  # Clang's `-v` names itself; GCC's says "gcc version"
    flags = [*FLAGS, *(GCC_FLAGS if gcc else CLANG_FLAGS), *shlex.split(os.environ.get("BADNET_JAX_NATIVE_FLAGS", ""))]
    key = hashlib.sha256("\0".join([*(s.read_text() for s in (*SOURCES, *HEADERS)), " ".join(compiler[1:] + flags), version,
                                    jaxlib.__version__, cpu_identity()]).encode()).hexdigest()[:24]
    path = cache_dir() / f"native-{key}.so"
    if _trusted(path):
        return path
    log.info("Building the native kernels for this CPU (once per machine, ~10 s) into %s", path)

    def compile_to(tmp: Path) -> None:
        objects = [tmp.with_name(f"{tmp.name}.{i}.o") for i in range(len(SOURCES))]
        try:
            _compile_all([[*compiler, *flags, "-c", "-I", str(HERE), "-I", jax.ffi.include_dir(), str(src), "-o", str(obj)]
                          for src, obj in zip(SOURCES, objects)], BUILD_TIMEOUT_S)
            _compile_all([[*compiler, *flags, *map(str, objects), "-o", str(tmp)]], BUILD_TIMEOUT_S)
        finally:
            for obj in objects:
                obj.unlink(missing_ok=True)
        with open(tmp, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise RuntimeError(f"{compiler[0]} exited with 0 but wrote no shared library")

    # Loadable by others, writable by its user only; on disk whole before its name (and its digest's) points at it.
    atomic_write(path, compile_to, mode=0o755, durable=True)
    atomic_write(path.with_suffix(".sha256"), lambda tmp: tmp.write_text(_digest(path) + "\n"), mode=0o644,
                 durable=True)
    return path


@functools.cache
def native_library() -> Optional[NativeLibrary]:
    """The native kernels, built (once per machine) and registered with XLA for the CPU; None where they cannot
    be (the reason logged once as a warning) or ``BADNET_JAX_NATIVE`` turns them off."""
    if os.environ.get("BADNET_JAX_NATIVE", "1").strip().lower() in OFF:
        return None
    given, compiler = _compiler()
    if not compiler:
        log.warning("no C++ compiler (CXX=%s) on the PATH: the CPU runs XLA's forms, slower on few-channel "
                    "convolutions and a CNN's dense tail (set CXX to a C++17 compiler to build the native kernels)",
                    given)
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
        lanes = int(lib.badnet_conv2d_direct_lanes())
        for target in TARGETS:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, ValueError) as e:
        log.warning("the native kernels could not be built or loaded with CXX=%s (%s); the CPU runs XLA's forms "
                    "(CXX must name a C++17 compiler, e.g. g++ or clang++)", given, e)
        return None
    return NativeLibrary(path, lanes)


def map_over_batch(call, axis_size: int, in_batched, args: tuple):
    """A native call under ``vmap`` where the batch cannot be folded into its rows (batched weights): one call
    per batch element in turn (``lax.map``), the arguments without the batch axis broadcast to it.

    Args:
        call: the custom call, taking ``args``' elements unbatched.
        axis_size, in_batched: what ``custom_vmap`` hands its rule.
        args: the call's arguments as the rule received them.

    Returns:
        ``call``'s output(s) with the batch axis leading.
    """
    full = tuple(a if batched else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, batched in zip(args, in_batched))
    return jax.lax.map(lambda a: call(*a), full)


def varying_like(out: jax.Array, *inputs: jax.Array) -> jax.Array:
    """``out`` of a custom call, marked varying over the mesh axes its inputs vary over inside ``shard_map``
    (a custom call's result carries none; outside ``shard_map`` it is returned as is)."""
    missing = tuple(sorted(frozenset().union(*map(_varying, inputs)) - _varying(out)))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _varying(a: jax.Array) -> frozenset:
    """The mesh axes ``a`` varies over inside ``shard_map`` (none outside)."""
    aval = jax.typeof(a)
    axes = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier and later releases name it vma
    return frozenset(axes.varying if axes is not None else getattr(aval, "vma", ()))


__all__ = ["CONV2D_DIRECT", "DENSE", "DENSE_TOP2", "HEADERS", "NativeLibrary", "SOURCES", "TARGETS", "cache_dir",
           "cpu_identity", "map_over_batch", "native_library", "private", "varying_like"]
