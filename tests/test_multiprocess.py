"""Multi-process runs on one machine: jax.distributed on localhost with CPU collectives (gloo), real processes.

Several processes of prune.py share one --out_dir: the curve must be the single-process one, written once by
process 0; a process that dies must make the others stop with an error in bounded time, never hang.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import LAB_B, REPO, asset

FACES = {"--clean_valid": "valid_subset", "--bd_valid": "bd_valid_subset", "--clean_test": "test_subset",
         "--bd_test": "bd_test_subset"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune(out, extra=(), files=None):
    files = files or {flag: str(asset(f"faces/lab3/{name}.h5")) for flag, name in FACES.items()}
    return [sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04,0.30", "--model", str(asset(LAB_B)),
            *[a for kv in files.items() for a in kv], "--out_dir", str(out), *extra]


def _launch(n, out, timeout_s=60, files=None):
    port = _port()
    return [subprocess.Popen(_prune(out, ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(n),
                                          "--process_id", str(i), "--distributed_timeout", str(timeout_s)], files),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The one-process run both multi-process runs are compared with."""
    out = tmp_path_factory.mktemp("single") / "single"
    single = subprocess.run(_prune(out), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_processes_give_the_single_process_curve_written_once(n, tmp_path, single_run):
    procs = _launch(n, tmp_path / "multi")
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
    proc = subprocess.run(_prune(tmp_path / "o", ["--coordinator_address", f"127.0.0.1:{_port()}",
                                                  "--num_processes", "2", "--process_id", "1",
                                                  "--distributed_timeout", "5"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not join the distributed run at 127.0.0.1:" in proc.stderr
    assert time.time() - t < 120
