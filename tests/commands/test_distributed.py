"""Devices and processes through badnet-prune (badnet_jax.commands.processes.init_distributed): forced CPU devices and
jax.distributed on localhost with CPU collectives (gloo), real processes.

--devices 4 and a one-process jax.distributed run give the single-device curve. Several processes of prune.py
share one --out_dir: the curve must be the single-process one, written once by process 0; a process that dies
must make the others stop with an error in bounded time, never hang.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest

from tests.cli import run_cli, start_cli
from tests.conftest import LAB_B, asset

FACES = {"--clean_valid": "valid_subset", "--bd_valid": "bd_valid_subset", "--clean_test": "test_subset",
         "--bd_test": "bd_test_subset"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune_args(out, extra=(), files=None):
    files = files or {flag: str(asset(f"faces/lab3/{name}.h5")) for flag, name in FACES.items()}
    return ["--drop", "0.04,0.30", "--model", asset(LAB_B), *[a for kv in files.items() for a in kv], "--out_dir", out,
            *extra]


def _launch(n, out, timeout_s=60, files=None, extra=()):
    port = _port()
    return [start_cli("prune", *_prune_args(out, ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", n,
                                                  "--process_id", i, "--distributed_timeout", timeout_s, *extra], files))
            for i in range(n)]


@pytest.mark.slow
def test_cli_on_four_devices_and_through_jax_distributed(tmp_path):
    """The CLI with --devices 4 and a one-process jax.distributed run give the single-device curve."""
    faces = {flag: str(asset(f"faces/lab3/{name}.h5")) for flag, name in FACES.items()}
    base = ["--drop", "0.04,0.30", "--model", asset(LAB_B), "--nocheckpoints", *[a for kv in faces.items() for a in kv]]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    runs = {"one": (["--devices", "1"], None),
            "four": (["--devices", "4"], env),
            "distributed": (["--devices", "0", "--coordinator_address", f"127.0.0.1:{_port()}", "--num_processes", "1",
                             "--process_id", "0"], env)}
    curves = {}
    for name, (flags, run_env) in runs.items():
        proc = run_cli("prune", *base, *flags, "--out_dir", tmp_path / name, env=run_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curve = json.loads((tmp_path / name / "curve.json").read_text())
        for key in ("inputs", "versions"):
            curve.pop(key)
        curves[name] = curve
    assert curves["four"] == curves["one"] and curves["distributed"] == curves["one"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The one-process run both multi-process runs are compared with."""
    out = tmp_path_factory.mktemp("single") / "single"
    single = run_cli("prune", *_prune_args(out))
    assert single.returncode == 0, single.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n, devices", [(2, 0), (3, 0), (2, 1)])
def test_processes_give_the_single_process_curve_written_once(n, devices, tmp_path, single_run):
    """Sharded over every process's device (--devices 0), or each process sweeping on its own (--devices 1)."""
    procs = _launch(n, tmp_path / "multi", extra=["--devices", devices])
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
        assert f"jax.distributed: process {i} of {n}, {n} global devices" in err
    ours = lambda out: [line for line in out.splitlines() if not line.startswith("[Gloo]")]  # gloo's own C++ line
    assert "channels pruned" in outs[0][0] and all(not ours(out) for out, _ in outs[1:])  # one table, from 0
    a, b = single_run, tmp_path / "multi"
    assert (b / "curve.json").read_bytes() == (a / "curve.json").read_bytes()  # the same curve, byte for byte
    # The same files and folders (inside an orbax checkpoint, its data files have random names).
    names = lambda d: sorted(str(p.relative_to(d)) for p in list(d.glob("*")) + list(d.glob("*/*")))
    assert names(b) == names(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi"]  # no stray temp folders
    assert (b / "drop_4" / "b_prime.h5").read_bytes() == (a / "drop_4" / "b_prime.h5").read_bytes()


@pytest.mark.slow
def test_a_process_killed_mid_run_makes_the_others_fail_in_bounded_time(tmp_path):
    from badnet_jax import load_lab_h5, save_lab_h5

    # A larger clean validation set keeps the sweep busy long enough to kill a process inside it.
    x, y = load_lab_h5(asset("faces/lab3/valid_subset.h5"))
    big = save_lab_h5(tmp_path / "valid.h5", np.repeat(x, 300, axis=0), np.repeat(y, 300))
    files = {flag: str(asset(f"faces/lab3/{name}.h5")) for flag, name in FACES.items()}
    files["--clean_valid"] = str(big)
    procs = _launch(2, tmp_path / "out", timeout_s=10, files=files)
    deadline = time.time() + 300
    for line in procs[1].stderr:  # wait until process 1 has joined and is loading
        if "Loaded the model" in line or time.time() > deadline:
            break
    procs[1].kill()
    t = time.time()
    _, err = procs[0].communicate(timeout=180)  # a hang fails here
    waited = time.time() - t
    assert procs[0].returncode != 0
    assert waited < 120, waited  # --distributed_timeout 10: noticed by heartbeats, not after minutes
    # JAX's own fatal handler ends the survivor (SIGABRT) with a message naming the dead task.
    assert "another task died" in err and "stopped sending heartbeats" in err, err[:3000]
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path):
    t = time.time()
    proc = run_cli("prune", *_prune_args(tmp_path / "o", ["--coordinator_address", f"127.0.0.1:{_port()}",
                                                          "--num_processes", "2", "--process_id", "1",
                                                          "--distributed_timeout", "5"]), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not join the distributed run at 127.0.0.1:" in proc.stderr
    assert time.time() - t < 120


@pytest.mark.parametrize("process_id", ["0", "1"])
def test_a_coordinator_host_that_does_not_resolve_is_one_line_at_once_in_every_process(process_id, tmp_path):
    """jaxlib would abort (SIGABRT, a C++ stack) after its timeout; the host is looked up first, in process 0 too."""
    t = time.time()
    proc = run_cli("prune", *_prune_args(tmp_path / "o", ["--coordinator_address", "no.such.host.invalid:12355",
                                                          "--num_processes", "2", "--process_id", process_id]),
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --coordinator_address no.such.host.invalid:12355: the "
                                                     "host 'no.such.host.invalid' does not resolve"), proc.stderr
    assert "Traceback" not in proc.stderr and "Fatal" not in proc.stderr and not (tmp_path / "o").exists()
    assert time.time() - t < 30  # a lookup, not jaxlib's 60 s join timeout
