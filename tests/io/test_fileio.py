"""badnet_jax.io.fileio: the checked opens every reader goes through, and the atomic writes.

Readers: whatever the path or the bytes, the project's own error naming the file, never a crash, a hang or a
read outside the file. Paths that are not plain files (symbolic link loops, dangling links, chains longer than
the kernel follows, folders, named pipes) are named for what they are. In an h5 file every path component
must stay inside the file: soft links whose target is an external link, weight names that pass through one,
datasets whose raw data lives in another file (or a FIFO, which would block a reader forever), an external
link where the Keras 3 reader looks for its layers, dangling soft links and link loops are refused before
anything outside is opened.

Writers: an interrupted or killed write leaves the previous results, whole, and nothing beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badnet_jax import (BadNetError, DataFileError, ModelFileError, init_params, load_image, load_keras, load_lab_h5,
                        save_keras, save_lab_h5)
from badnet_jax.model import INPUT_HWC
from badnet_jax.io.fileio import atomic_dir, atomic_write
from badnet_jax.io.lab_data import load_true_labels, peek_lab_h5
from badnet_jax.io.poisoning import load_trigger
from badnet_jax.sweep.rankings import read_order_file
from tests.cli import run_python, start_python
from tests.conftest import REPO
from tests.io.conftest import FUZZ, MAXSYMLINKS, PATH_KINDS, no_hang, odd_path, write_bytes

FILE_READERS = {"model": load_keras, "data": load_lab_h5, "image": lambda p: load_image(p, INPUT_HWC), "trigger": load_trigger,
                "order file": lambda path: read_order_file(path, 60)}


# ---------------------------------------------------------------- any bytes, any path --------------------

@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(tmp_path, data):
    p = write_bytes(tmp_path, "r.h5", data)
    with pytest.raises(ModelFileError):
        load_keras(p)
    with pytest.raises(DataFileError):
        load_lab_h5(p)
    q = write_bytes(tmp_path, "r.png", data)
    with pytest.raises(DataFileError):
        load_image(q, INPUT_HWC)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reader=st.sampled_from(sorted(FILE_READERS)), kind=st.sampled_from(sorted(PATH_KINDS)),
       chain=st.integers(0, MAXSYMLINKS + 3))
def test_every_file_reader_says_what_the_path_is(tmp_path, reader, kind, chain):
    base = Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis runs many examples in one tmp_path
    path = odd_path(base, kind, chain if kind != "under a file" else min(chain, 3))
    no_hang()
    try:
        with pytest.raises(BadNetError) as err:
            FILE_READERS[reader](path)
    finally:
        signal.alarm(0)
    message = str(err.value)
    assert str(path) in message
    # More links than the kernel follows is itself a loop error (ELOOP), whatever lies at the end.
    links = chain + (kind == "dangling")  # the dangling target is a link itself
    if links > MAXSYMLINKS and kind != "under a file":
        expected = PATH_KINDS["loop"]
    elif kind == "missing" and chain > 0:  # links to nothing
        expected = PATH_KINDS["dangling"]
    else:
        expected = PATH_KINDS[kind]
    assert expected in message, message


# ---------------------------------------------------------------- nothing read outside the h5 file ------

def test_external_links_and_virtual_datasets_are_refused(tmp_path, model_bytes, data_bytes):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("kernel", data=np.zeros((4, 4, 3, 20), np.float32))
        f.create_dataset("data", data=np.zeros((2, 3, 55, 47), np.uint8))
    p = write_bytes(tmp_path, "ext.h5", model_bytes)
    with h5py.File(p, "r+") as f:
        del f["conv_1/conv_1/kernel:0"]
        f["conv_1/conv_1/kernel:0"] = h5py.ExternalLink(str(outside), "/kernel")
    with pytest.raises(ModelFileError, match="external link"):
        load_keras(p)
    q = write_bytes(tmp_path, "vds.h5", data_bytes)
    with h5py.File(q, "r+") as f:
        del f["data"]
        layout = h5py.VirtualLayout(shape=(2, 3, 55, 47), dtype=np.uint8)
        layout[:] = h5py.VirtualSource(str(outside), "data", shape=(2, 3, 55, 47))
        f.create_virtual_dataset("data", layout)
    with pytest.raises(DataFileError, match="virtual dataset"):
        load_lab_h5(q)


@pytest.fixture
def files(tmp_path):
    model = save_keras(init_params(num_classes=3, seed=0), tmp_path / "m.h5", full_model=False)
    rng = np.random.default_rng(0)
    data = save_lab_h5(tmp_path / "d.h5", rng.integers(0, 256, (6, 55, 47, 3)), np.arange(6) % 3,
                       true_label=np.arange(6) % 3)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:  # what an attacker would have badnet-jax read instead
        f.create_dataset("conv_1/kernel:0", data=np.ones((4, 4, 3, 20), np.float32))
        f.create_dataset("conv_1/bias:0", data=np.ones((20,), np.float32))
        f.create_dataset("data", data=np.zeros((6, 3, 55, 47), np.uint8))
        f.create_group("layers")
    return model, data, other


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def test_a_soft_link_to_an_external_link_is_refused(files):
    model, data, other = files

    def hide(f, name):
        f.move(name, "moved_away")
        f["zz"] = h5py.ExternalLink(str(other), "/" + name)
        f[name] = h5py.SoftLink("/zz")

    _edit(model, lambda f: hide(f, "conv_1"))
    with pytest.raises(ModelFileError, match=r"m\.h5: 'conv_1' passes through an external link"):
        load_keras(model)
    _edit(data, lambda f: hide(f, "data"))
    for read in (load_lab_h5, peek_lab_h5):
        with pytest.raises(DataFileError, match=r"d\.h5: 'data' passes through an external link"):
            read(data)


def test_a_weight_name_through_an_external_link_is_refused(files):
    model, _, other = files

    def inner(f):
        f.move("conv_1/conv_1", "conv_1/kept")
        f["conv_1/conv_1"] = h5py.ExternalLink(str(other), "/conv_1")  # 'conv_1/kernel:0' goes through it

    _edit(model, inner)
    with pytest.raises(ModelFileError, match="'conv_1/kernel:0' passes through an external link"):
        load_keras(model)


def test_external_raw_storage_is_refused(files, tmp_path):
    model, data, other = files
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones(4 * 4 * 3 * 20, np.float32).tobytes())

    def kernel(f):
        del f["conv_1/conv_1/kernel:0"]
        f["conv_1/conv_1"].create_dataset("kernel:0", shape=(4, 4, 3, 20), dtype=np.float32,
                                          external=[(str(raw), 0, h5py.h5f.UNLIMITED)])

    _edit(model, kernel)
    with pytest.raises(ModelFileError, match="keeps its data in external files"):
        load_keras(model)

    def labels(f):
        del f["true_label"]
        f.create_dataset("true_label", shape=(6,), dtype=np.int32, external=[("/etc/hostname", 0, 24)])

    _edit(data, labels)
    with pytest.raises(DataFileError, match="'true_label' keeps its data in external files"):
        load_true_labels(data)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_behind_the_file_does_not_hang(files, tmp_path):
    """Images stored 'externally' in a FIFO, and the Keras 3 'layers' group linked to a FIFO: a reader that
    followed them would block forever; badnet-jax refuses first (checked in a subprocess with a timeout)."""
    model, data, _ = files
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def images(f):
        del f["data"]
        f.create_dataset("data", shape=(6, 3, 55, 47), dtype=np.uint8, external=[(str(fifo), 0, h5py.h5f.UNLIMITED)])

    _edit(data, images)
    keras3 = tmp_path / "k3.weights.h5"
    with h5py.File(keras3, "w") as f:
        f["layers"] = h5py.ExternalLink(str(fifo), "/layers")
    code = ("import sys\nfrom badnet_jax import load_lab_h5, load_keras, BadNetError\n"
            "for read, p in ((load_lab_h5, sys.argv[1]), (load_keras, sys.argv[2])):\n"
            "    try:\n        read(p)\n    except BadNetError as e:\n        print('refused:', e)\n")
    proc = run_python(code, data, keras3, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "keeps its data in external files" in lines[0], lines
    assert "'layers' passes through an external link" in lines[1], lines


def test_dangling_soft_links_and_link_loops_say_so(files):
    model, data, _ = files
    _edit(model, lambda f: (f.move("fc_2", "gone"), f.__setitem__("fc_2", h5py.SoftLink("/nowhere"))))
    with pytest.raises(ModelFileError, match="'fc_2' is a dangling soft link"):
        load_keras(model)

    def loop(f):
        del f["label"]
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
        f["label"] = h5py.SoftLink("/a")

    _edit(data, loop)
    with pytest.raises(DataFileError, match="more than 32 soft links"):
        load_lab_h5(data)


def test_soft_links_inside_the_file_still_work(files):
    """A soft link that stays in the file is legitimate (some writers use them): it is followed."""
    model, data, _ = files
    want = load_keras(model)[1]
    _edit(model, lambda f: (f.move("conv_2", "real_conv_2"), f.__setitem__("conv_2", h5py.SoftLink("/real_conv_2"))))
    got = load_keras(model)[1]
    np.testing.assert_array_equal(np.asarray(got["conv_2"]["kernel"]), np.asarray(want["conv_2"]["kernel"]))


# ---------------------------------------------------------------- atomic writes -------------------------

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
from badnet_jax.io.fileio import atomic_dir
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
from badnet_jax.io.fileio import atomic_dir, atomic_write
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
from badnet_jax.io.fileio import atomic_dir, atomic_write
root, kind = Path(sys.argv[1]), sys.argv[2]
# The writers' own lines and those of what they call on the way (paths, temporaries, context managers, removal).
WATCHED = ("fileio.py", "tempfile.py", "pathlib.py", "contextlib.py", "shutil.py")

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
        with caplog.at_level("WARNING", logger="badnet_jax.io.fileio"):
            atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("mine")))
        assert _tmp_folders(tmp_path, "results") == theirs
        assert (target / "a").read_text() == "mine"
        assert any(theirs[0] in r.getMessage() and "pid namespace" in r.getMessage() for r in caplog.records)
    finally:
        proc.kill()
        proc.wait(timeout=60)
