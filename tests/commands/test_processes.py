"""badnet_jax.commands.processes: one CPU device per physical core unless the user set a count, the cores
counted against /proc/cpuinfo and capped by a container's CPU quota. Joining a multi-host run is tested end to
end in test_distributed.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from badnet_jax.commands import processes
from tests.cli import run_python


_DEVICES = ("import jax\nfrom badnet_jax.commands import processes\n{before}set_ = processes.use_cpu_cores()\n"
            "print(set_, jax.device_count(), processes.cpu_cores())")


@pytest.mark.parametrize("env,before,want", [
    ({}, "", "cores"),  # one CPU device per core
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, "", 3),  # the user's count stands
    ({"JAX_NUM_CPU_DEVICES": "1"}, "", 1),
    ({}, "jax.numpy.zeros(1).block_until_ready()\n", 1),  # the backend is up: left as it is
])
def test_use_cpu_cores_gives_one_device_per_core_unless_the_count_is_set(env, before, want):
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = run_python(_DEVICES.format(before=before), env={**clean, "JAX_PLATFORMS": "cpu", **env})
    assert proc.returncode == 0, proc.stderr
    set_, devices, cores = map(int, proc.stdout.split())
    want = cores if want == "cores" else want
    assert devices == want
    assert set_ == (cores if not env and not before else 0)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or not hasattr(os, "sched_getaffinity"),
                    reason="Linux's /proc/cpuinfo is the reference")
def test_cpu_cores_counts_physical_cores_not_hyperthreads():
    """Against /proc/cpuinfo: the (physical id, core id) pairs of the CPUs this process may run on."""
    allowed, cores = os.sched_getaffinity(0), set()
    fields = {}
    for line in open("/proc/cpuinfo").read().splitlines() + [""]:
        if not line.strip():
            if fields.get("processor") is not None and int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
            fields = {}
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    quota_files = ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    got = processes.cpu_cores()
    assert 1 <= got <= len(cores) <= len(allowed)
    if not any(os.path.exists(f) for f in quota_files):
        assert got == len(cores)


@pytest.mark.parametrize("files,cpus", [
    ({"/sys/fs/cgroup/cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2
    ({"/sys/fs/cgroup/cpu.max": "max 100000\n"}, None),  # no quota
    ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"/sys/fs/cgroup/cpu.max": "garbage\n"}, None),
    ({}, None),
])
def test_a_cgroup_cpu_quota_caps_the_cores(files, cpus, monkeypatch):
    """A container's CPU quota (cgroup v2 or v1 files, read as the kernel writes them) caps the cores used."""
    def read_text(path, *args, **kwargs):
        if str(path) in files:
            return files[str(path)]
        raise FileNotFoundError(str(path))
    monkeypatch.setattr(processes.Path, "read_text", read_text)
    assert processes._cgroup_cpu_quota() == cpus
    if cpus is not None:
        assert processes.cpu_cores() <= cpus


_CACHE = ("import jax, jax.numpy as jnp\nfrom badnet_jax.commands import processes\nevents = []\n"
          "jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))\n"
          "print(processes.use_compile_cache())\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # keep even this tiny program\n"
          "jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.float32(2)).block_until_ready()\n"
          "print(sum(e == '/jax/compilation_cache/cache_hits' for e in events))")


def _cache_run(tmp_path, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "BADNET_JAX_XLA_CACHE")}
    proc = run_python(_CACHE, env={**clean, "JAX_PLATFORMS": "cpu", "BADNET_JAX_CACHE": str(tmp_path / "c"), **env})
    assert proc.returncode == 0, proc.stderr
    folder, hits = proc.stdout.split()
    return folder, int(hits), proc.stderr


def test_the_compile_cache_keeps_programs_for_the_next_process(tmp_path):
    """A second process loads the program the first compiled, from the user's cache folder, kept private."""
    folder, hits, _ = _cache_run(tmp_path)
    # A folder per CPU and jaxlib: a cache in a home directory several machines share serves each its own code.
    assert Path(folder).parent == tmp_path / "c" / "xla" and len(Path(folder).name) == 16 and hits == 0
    assert any(f.name.startswith("jit__lambda") for f in Path(folder).iterdir())
    assert Path(folder).stat().st_mode & 0o077 == 0 and Path(folder).parent.stat().st_mode & 0o022 == 0
    again, hits, _ = _cache_run(tmp_path)
    assert again == folder and hits >= 1  # the second process loads what the first compiled


@pytest.mark.parametrize("case", ["user's own folder", "turned off", "group-writable folder"])
def test_the_compile_cache_is_left_alone_where_the_user_chose_or_the_folder_is_shared(tmp_path, case):
    if case == "user's own folder":
        folder, _, _ = _cache_run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))
        assert folder == "None" and any((tmp_path / "mine").iterdir())
    elif case == "turned off":
        folder, hits, _ = _cache_run(tmp_path, BADNET_JAX_XLA_CACHE="off")
        assert folder == "None" and not (tmp_path / "c" / "xla").exists()
    else:
        (tmp_path / "c" / "xla").mkdir(parents=True)
        os.chmod(tmp_path / "c" / "xla", 0o777)  # anyone could plant a program, or a machine's folder, there
        folder, hits, stderr = _cache_run(tmp_path)
        assert folder == "None" and not any(f.is_file() for f in (tmp_path / "c" / "xla").rglob("*"))
        assert "compile cache is off" in stderr and "writable by others" in stderr
