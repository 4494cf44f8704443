"""badnet_jax.io.atomic: the atomic writes.

An interrupted or killed write leaves the previous results, whole, and nothing beside them: an exception or a
signal at any line of the writer, a SIGKILL (put right by the next run), a run in another pid namespace or a
sibling output folder (never touched).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from badnet_jax.io.atomic import atomic_dir, atomic_write
from tests.cli import run_python, start_python
from tests.conftest import REPO


def test_atomic_write_gives_the_mode_asked_less_the_umask_and_leaves_no_temporary(tmp_path, monkeypatch):
    mask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "lib.so", lambda tmp: tmp.write_bytes(b"\x7fELF"), mode=0o755, durable=True)
        atomic_write(tmp_path / "plain.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "lib.so").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640  # open()'s 0o666 less the umask
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    atomic_write(tmp_path / "lib.so", lambda tmp: tmp.write_bytes(b"new"), durable=True)
    atomic_write(tmp_path / "plain.txt", lambda tmp: tmp.write_text("y"))
    assert len(synced) == 1 and (tmp_path / "lib.so").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so", "plain.txt"]


def test_atomic_dir_interrupted_keeps_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("old")))

    def half_written(d):
        d.mkdir()
        (d / "a").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(target, half_written)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


KILLED_WRITER = r"""
import os, signal, sys, time
from pathlib import Path
from badnet_jax.io.atomic import atomic_dir
target, stage = Path(sys.argv[1]), sys.argv[2]

def write(d):
    d.mkdir()
    (d / "a").write_text("new")
    if stage == "writing":
        print("ready", flush=True)
        time.sleep(600)

if stage == "swapping":  # killed after moving the earlier results aside, before moving the new ones in
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if ".old." in str(dst):
            print("ready", flush=True)
            time.sleep(600)
    os.replace = replace
atomic_dir(target, write)
"""


@pytest.mark.parametrize("stage", ["writing", "swapping"])
def test_what_a_sigkilled_run_left_is_cleaned_up_by_the_next(stage, tmp_path):
    """SIGKILL cannot be caught: the next run removes the killed one's temporary folder, and puts the earlier
    results back if the killed run had moved them aside."""
    target = tmp_path / "results"
    atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("old")))
    proc = start_python(KILLED_WRITER, target, stage)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and (stage == "writing") == ("results" in left), left  # the mess a kill leaves
    alive = start_python(KILLED_WRITER, tmp_path / "other", "writing")  # a live run beside it is left alone
    assert alive.stdout.readline().strip() == "ready"
    try:
        seen = []
        atomic_dir(target, lambda d: (seen.append((target / "a").read_text()), d.mkdir(), (d / "a").write_text("next")))
        assert seen == ["old"]  # the earlier results were back in place before the new run wrote
        assert (target / "a").read_text() == "next"
        assert sorted(p.name for p in tmp_path.iterdir() if "other" not in p.name) == ["results"]
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".other.")]  # the live run's temp folder
    finally:
        alive.kill()
        alive.wait(timeout=60)


SIGNALLED_WRITER = r"""
import os, shutil, signal, sys
from pathlib import Path
from badnet_jax.commands import cli
from badnet_jax.io.atomic import atomic_dir, atomic_write
target, stage = Path(sys.argv[1]), sys.argv[2]

def signal_after(real, when):  # SIGTERM to this process right after the first call that `when` picks
    def call(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args) and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler at the next bytecode, in this frame
        return out
    return call

sent = []
if stage == "moved aside":  # the earlier results just moved aside, the new ones not yet in
    os.replace = signal_after(os.replace, lambda src, dst: ".old." in str(dst))
elif stage == "removing the earlier":  # the new results in, the earlier ones being deleted
    shutil.rmtree = signal_after(shutil.rmtree, lambda p, *a, **k: ".old." in str(p))
elif stage == "removing a failed write":
    shutil.rmtree = signal_after(shutil.rmtree, lambda p, *a, **k: True)
elif stage == "file renamed":
    os.replace = signal_after(os.replace, lambda src, dst: str(dst).endswith("a"))

def write(d):
    if stage == "file renamed":
        return atomic_write(d, lambda tmp: tmp.write_text("new"))
    d.mkdir()
    (d / "a").write_text("new")
    if stage == "removing a failed write":
        raise OSError("disk full")

def main():
    atomic_dir(target, write) if stage != "file renamed" else write(target / "a")
    print("returned", flush=True)
    return 0

sys.exit(cli.run(main))
"""


@pytest.mark.parametrize("stage", ["moved aside", "removing the earlier", "removing a failed write", "file renamed"])
def test_a_signal_inside_a_swap_lets_it_finish_then_ends_the_run(stage, tmp_path):
    """SIGTERM (or SIGINT) while a swap into place or its clean-up is under way: the swap and the clean-up run
    whole, then the command exits 130; nothing is left beside the target."""
    target = tmp_path / "results"
    atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("old")))
    done = run_python(SIGNALLED_WRITER, target, stage)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "returned" not in done.stdout  # the signal ended the run right after the swap
    expected = "old" if stage == "removing a failed write" else "new"
    assert (target / "a").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert sorted(p.name for p in target.iterdir()) == ["a"]


EVERY_LINE = r"""
import json, os, shutil, signal, sys
from pathlib import Path
from badnet_jax.commands import cli
from badnet_jax.io.atomic import atomic_dir, atomic_write
root, kind = Path(sys.argv[1]), sys.argv[2]
# The writers' own lines and those of what they call on the way (paths, temporaries, context managers, removal).
WATCHED = ("atomic.py", "tempfile.py", "pathlib.py", "contextlib.py", "shutil.py")

def child(n):  # SIGTERM at the n-th traced line of the write, under the commands' handler
    seen = [0]
    def line(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return line
    def main():
        sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename.endswith(WATCHED) else None)
        if kind == "dir":
            atomic_dir(root / "results", lambda d: (d.mkdir(), (d / "a").write_text("new")))
        else:
            atomic_write(root / "results" / "a", lambda t: t.write_text("new"))
        return 0
    code = cli.run(main)
    sys.settrace(None)
    os._exit(code if seen[0] >= n else 99)  # 99: the write ended before line n

found = []
for n in range(1, 5000):
    shutil.rmtree(root / "results", ignore_errors=True)
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (root / "results").mkdir()
    (root / "results" / "a").write_text("old")
    pid = os.fork()
    if pid == 0:
        child(n)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 99:
        break
    found.append([n, code, sorted(p.name for p in root.iterdir()), sorted(p.name for p in (root / "results").iterdir()),
                  (root / "results" / "a").read_text()])
print(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~800 forked runs of a write: ~90 s on an idle core
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_signal_at_any_line_of_a_write_leaves_one_whole_result(kind, tmp_path):
    """SIGTERM at every line the writer runs (its own, pathlib's, tempfile's, contextlib's, shutil's), one run
    each (forked): exit 130, the earlier result or the new one, nothing beside it."""
    root = tmp_path / "out"
    root.mkdir()
    done = run_python(EVERY_LINE, root, kind, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) > 50  # the write's every line was a place to signal
    bad = [f for f in found if f[1] != 130 or f[2] != ["results"] or f[3] != ["a"] or f[4] not in ("old", "new")]
    assert not bad, bad[:5]
    assert {f[4] for f in found} == {"old", "new"}  # early signals keep the earlier result, late ones the new


def _tmp_folders(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def test_a_live_sibling_output_folder_is_never_touched(tmp_path):
    """``out`` beside a running ``out.20241202``: that run's temporary folder (``.out.20241202.<pid>...``) is not
    ``out``'s (the date is no pid), so a run on ``out`` leaves it alone, whatever becomes of the other run."""
    sibling = start_python(KILLED_WRITER, tmp_path / "out.20241202", "writing")
    try:
        assert sibling.stdout.readline().strip() == "ready"
        before = _tmp_folders(tmp_path, "out.20241202")
        assert len(before) == 1
        atomic_dir(tmp_path / "out", lambda d: (d.mkdir(), (d / "a").write_text("mine")))
        assert _tmp_folders(tmp_path, "out.20241202") == before
        assert (tmp_path / before[0] / "d" / "a").read_text() == "new"
    finally:
        sibling.kill()
        sibling.wait(timeout=60)
    atomic_dir(tmp_path / "out", lambda d: (d.mkdir(), (d / "a").write_text("again")))
    assert _tmp_folders(tmp_path, "out.20241202") == before  # dead, but not this path's run: still not ours


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a second pid namespace")
def test_a_run_in_another_pid_namespace_is_left_alone(tmp_path, caplog):
    """A run in a container sharing the folder has pids of its own namespace, which mean nothing here (a live
    run looks dead): its folder is left, and named in a warning."""
    target = tmp_path / "results"
    atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("old")))
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); exec({KILLED_WRITER!r})"
    argv = ["unshare", "-rpf", "--mount-proc", sys.executable, "-c", code, str(target), "writing"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if line != "ready":
            pytest.skip(f"cannot start a process in a new pid namespace here: {proc.stderr.read()[:200]}")
        theirs = _tmp_folders(tmp_path, "results")
        assert len(theirs) == 1
        with caplog.at_level("WARNING", logger="badnet_jax.io.atomic"):
            atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("mine")))
        assert _tmp_folders(tmp_path, "results") == theirs
        assert (target / "a").read_text() == "mine"
        assert any(theirs[0] in r.getMessage() and "pid namespace" in r.getMessage() for r in caplog.records)
    finally:
        proc.kill()
        proc.wait(timeout=60)
