"""Paths that are not plain files: every reader says what the path is instead, names it, and never blocks.

A symbolic link loop, a dangling link, a chain of links longer than the kernel follows, a folder or a named
pipe (FIFO) given where a model, data file, image, trigger, order file or checkpoint is expected. Before,
all of these read "file not found" (or, for a FIFO, could block forever).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badnet_jax.io import checkpoint
from badnet_jax.io.keras import load_keras
from badnet_jax.io.lab_data import load_image, load_lab_h5, load_trigger
from badnet_jax.errors import BadNetError
from badnet_jax.sweep.rankings import read_order_file
from tests.conftest import REPO

FILE_READERS = {"model": load_keras, "data": load_lab_h5, "image": load_image, "trigger": load_trigger,
                "order file": read_order_file}
EXPECTED = {  # what the message must say for each kind of path
    "loop": "too many levels of symbolic links",
    "dangling": "dangling symbolic link",
    "fifo": "named pipe",
    "folder": "is a folder",
    "missing": "not found",
    "under a file": "not found (a component of the path is a file",
}
MAXSYMLINKS = 40  # Linux follows at most 40 links in one lookup, then ELOOP


def _make(base: Path, kind: str, chain: int) -> Path:
    """A path of ``kind``, reached through ``chain`` further symbolic links."""
    base.mkdir(parents=True, exist_ok=True)
    target = base / "target.png"
    if kind == "loop":
        os.symlink("target.png", target)  # points at itself
    elif kind == "dangling":
        os.symlink("nowhere.png", target)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    elif kind == "under a file":
        (base / "plain").write_bytes(b"x")
        target = base / "plain" / "target.png"
    for i in range(chain):
        link = base / f"link{i}.png"
        os.symlink(target.name if target.parent == base else target, link)
        target = link
    return target


def _no_hang(seconds: int = 20):
    def alarm(signum, frame):
        raise TimeoutError("a reader blocked (it opened a FIFO?)")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reader=st.sampled_from(sorted(FILE_READERS)), kind=st.sampled_from(sorted(EXPECTED)),
       chain=st.integers(0, MAXSYMLINKS + 3))
def test_every_file_reader_says_what_the_path_is(tmp_path, reader, kind, chain):
    base = Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis runs many examples in one tmp_path
    path = _make(base, kind, chain if kind != "under a file" else min(chain, 3))
    _no_hang()
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
        expected = EXPECTED["loop"]
    elif kind == "missing" and chain > 0:  # links to nothing
        expected = EXPECTED["dangling"]
    else:
        expected = EXPECTED[kind]
    assert expected in message, message


@pytest.mark.parametrize("kind", ["loop", "dangling", "fifo", "missing"])
def test_checkpoint_reader_says_what_the_path_is(tmp_path, kind):
    path = _make(tmp_path, kind, 0)
    _no_hang()
    try:
        with pytest.raises(BadNetError) as err:
            checkpoint.restore_goodnet(path)
    finally:
        signal.alarm(0)
    assert str(path) in str(err.value) and EXPECTED[kind] in str(err.value)
    plain = tmp_path / "plain_file"
    plain.write_bytes(b"not a folder")
    with pytest.raises(BadNetError, match="is a file, not a checkpoint folder"):
        checkpoint.restore_badnet(plain)


def test_the_user_sees_one_line_for_each(tmp_path):
    """The commands print the same messages, one ``error:`` line, exit 2, no traceback."""
    loop = _make(tmp_path / "a", "loop", 0)
    fifo = _make(tmp_path / "b", "fifo", 0)
    runs = {
        "loop": [str(REPO / "scripts" / "prune.py"), "--clean_valid", str(loop), "--clean_test", str(loop),
                 "--model", str(REPO / "badnet_jax" / "assets" / "demo_badnet.h5"), "--out_dir", str(tmp_path / "o")],
        "fifo": [str(REPO / "scripts" / "goodnet_eval.py"), "--goodnet", str(tmp_path), str(fifo)],
    }
    for kind, argv in runs.items():
        res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and EXPECTED[kind] in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr
