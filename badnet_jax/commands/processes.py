"""The processes of a command's run: the CPU cores it may use, XLA's compile cache, and joining a multi-host run.

All happen before any JAX computation: :func:`use_cpu_cores` gives the CPU backend one device per physical
core (the sweep shards its images over them), :func:`use_compile_cache` keeps compiled programs between runs,
and :func:`init_distributed` joins a run of several processes (TPU slice, GPU cluster, or processes on one
machine), checking first what jaxlib would abort on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Optional

from badnet_jax.errors import ConfigError

log = logging.getLogger("badnet_jax")

DISTRIBUTED_TIMEOUT_S = 60


def cpu_cores() -> int:
    """The physical cores this process may run on: its CPU affinity with SMT siblings counted once (Linux's
    sysfs topology), capped by a cgroup CPU quota (a container's ``--cpus``); ``os.cpu_count()`` where there
    is no affinity to read. At least 1."""
    if not hasattr(os, "sched_getaffinity"):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology to read: each logical CPU is a core
    quota = _cgroup_cpu_quota()
    return max(1, min(len(cores), quota) if quota else len(cores))


def _cgroup_cpu_quota() -> Optional[int]:
    """The CPUs a cgroup quota allows, rounded up (cgroup v2 ``cpu.max``: "quota period"; v1: the quota and the
    period in two files), or None (no quota, or none readable)."""
    v1 = "/sys/fs/cgroup/cpu/cpu.cfs_"
    for files in (("/sys/fs/cgroup/cpu.max",), (f"{v1}quota_us", f"{v1}period_us")):
        try:
            words = " ".join(Path(f).read_text() for f in files).split()
            quota, period = words[0], words[1]
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, IndexError, ValueError, ZeroDivisionError):
            continue
    return None


def use_cpu_cores() -> int:
    """Give JAX's CPU backend one device per physical core this process may run on (:func:`cpu_cores`);
    returns the CPU device count set (0: left as it was). Call before any JAX computation, in a
    single-process run.

    The sweep shards its images over every device by default (``--devices 0``), and XLA:CPU runs each device's
    share on its own thread, where one device splits each operation between the cores: the lab-scale curve's
    one call took 12.35 s on one CPU device, 10.18 s on two and 11.00 s on four (a 2-core Xeon without SMT,
    the same curve.json; seven devices on it took 1.7x two: more devices than cores cost). Computations that
    are not sharded run as before. Left as it was where the count is set already
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or ``JAX_NUM_CPU_DEVICES``) or the backend is up.
    """
    import jax

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or \
            jax.config.jax_num_cpu_devices != -1:
        return 0
    cores = cpu_cores()
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # the backend is up already (a caller in the same process ran JAX first)
        return 0
    return cores


def use_compile_cache() -> Optional[Path]:
    """Keep the programs XLA compiles for a second or more between runs, in the user's cache folder (``xla/<this
    CPU and jaxlib>`` beside the native kernels, ``badnet_jax.kernels.native.cache_dir``); returns that folder,
    or None where it is left alone. Call before any JAX computation.

    A later run of a model of the same architecture and data shapes loads its programs instead of compiling
    them (Keras' EfficientNetB0 at 32x32 on 4 x 1000 images: 38.5 -> 24.9 s, about 28 s of compiling on two
    cores). The results are the same programs' results. Left alone where a cache folder is set already
    (``JAX_COMPILATION_CACHE_DIR``), where ``BADNET_JAX_XLA_CACHE`` is 0/false/off/no, and where the folder or
    the one holding it is not this user's own or is writable by others: a program read from it runs as this
    user's code, so one planted in a shared folder must not be (a warning says why).
    """
    import jax
    import jaxlib

    from badnet_jax.kernels.native import OFF, cache_dir, cpu_identity, private

    if jax.config.jax_compilation_cache_dir or os.environ.get("BADNET_JAX_XLA_CACHE", "1").strip().lower() in OFF:
        return None
    # One folder per CPU model and flags and jaxlib, as the native library's name: XLA compiles for the CPU at
    # hand, and a cache folder in a home directory that several machines share must not serve another's code.
    machine = hashlib.sha256(f"{cpu_identity()}\0{jaxlib.__version__}".encode()).hexdigest()[:16]
    folder = cache_dir() / "xla" / machine
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        unsafe = [str(f) for f in (folder.parent.parent, folder.parent, folder) if not private(f.stat())]
    except OSError as err:
        log.warning("XLA's compile cache is off: %s", err)
        return None
    if unsafe:
        log.warning("XLA's compile cache is off: %s is not only this user's (another user's, or writable by "
                    "others); set BADNET_JAX_CACHE to a folder of your own", unsafe[0])
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def init_distributed(coordinator_address: Optional[str], num_processes: int, process_id: int,
                     timeout_s: int = DISTRIBUTED_TIMEOUT_S) -> None:
    """Join a multi-host run (TPU slice, GPU cluster, or processes on one machine) before any JAX computation.

    No-op without an address. Every process runs the same command with the same files; the sweep's mesh
    then spans all processes' devices, process 0 writes the results and the others write nothing. Bounded
    waits: joining gives up after ``timeout_s`` (an unreachable coordinator), and a process that dies is
    noticed by the others within about ``timeout_s`` (heartbeats), which then stop with an error.

    Raises:
        ConfigError: bad process counts or ids, or the coordinator could not be joined in time.
    """
    if not coordinator_address:
        return
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id must be in [0, --num_processes), got {process_id} of {num_processes}")
    if timeout_s < 1:
        raise ConfigError(f"--distributed_timeout must be at least 1 s, got {timeout_s}")
    host, port = _resolve_coordinator(coordinator_address)
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, host, port, timeout_s)
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=timeout_s)
    except Exception as err:  # noqa: BLE001 - jaxlib raises plain RuntimeErrors/XlaRuntimeErrors here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"could not join the distributed run at {coordinator_address} as process {process_id} of "
                          f"{num_processes} within {timeout_s} s ({first})") from None
    log.info("jax.distributed: process %d of %d, %d global devices (%d local).", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())


def _resolve_coordinator(address: str) -> tuple[str, int]:
    """``address`` split into host and port, the host resolved: every process checks this before joining.

    jaxlib aborts the whole process (SIGABRT, a C++ stack, after its timeout) on a host it cannot resolve, in
    process 0 as in the others; a lookup first turns that into one line, at once.

    Raises:
        ConfigError: not ``host:port``, or a host name that does not resolve.
    """
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:1234
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator_address must be host:port (a port in 1..65535), got {address!r}")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) and err.strerror else str(err)
        raise ConfigError(f"--coordinator_address {address}: the host {host!r} does not resolve ({reason}); "
                          "give the coordinator's host name or IP address as every process can reach it") from None
    return host, int(port)


def _wait_for_coordinator(address: str, host: str, port: int, timeout_s: int) -> None:
    """Connect to the coordinator's port until it answers or ``timeout_s`` passes.

    jaxlib aborts the whole process (SIGABRT, a C++ stack) when it cannot reach the coordinator; checking
    first turns that into an error a user can act on.
    """
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"could not join the distributed run at {address}: no coordinator answered within "
                                  f"{timeout_s} s ({err.strerror or err}); start process 0 there, or raise "
                                  "--distributed_timeout") from None
            time.sleep(0.5)
