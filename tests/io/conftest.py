"""What the readers' hostile-input tests share: small valid files to damage, paths that are not plain files, and
the one check of a refusal (:func:`refused`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from badnet_jax import BadNetError, ModelFileError, init_params, save_keras, save_lab_h5

# Property-based cases per hostile-input test (BUILD_NOTES.md counts them): each example writes a file in the
# test's one tmp_path, so the function-scoped fixture is meant.
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A valid Keras 2.3 weights-only file of a 3-class DeepID."""
    return save_keras(init_params(num_classes=3, seed=0), tmp_path_factory.mktemp("m") / "m.h5",
                      full_model=False).read_bytes()


@pytest.fixture(scope="module")
def data_bytes(tmp_path_factory) -> bytes:
    """A valid lab h5 file of 20 images."""
    rng = np.random.default_rng(0)
    path = save_lab_h5(tmp_path_factory.mktemp("d") / "d.h5", rng.integers(0, 256, (20, 55, 47, 3)), np.arange(20) % 3)
    return path.read_bytes()


# Arrays no weight or image dataset may hold: strings, complex, empty, NaN/inf, scalar, int8, bool.
WEIRD_ARRAYS = st.sampled_from([
    np.array([b"abc", b"de"]), np.array(["x", "y"], dtype=h5py.string_dtype()), np.zeros((2, 2), np.complex64),
    np.zeros((0,), np.float32), np.zeros((3, 0, 7), np.float32), np.full((4,), np.nan, np.float32),
    np.full((4,), np.inf, np.float64), np.zeros((), np.float32), np.zeros((5, 5), np.int8), np.zeros(3, bool),
])


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


PATH_KINDS = {  # a kind of path that is not a plain file -> what a reader's message must say
    "loop": "too many levels of symbolic links",
    "dangling": "dangling symbolic link",
    "fifo": "named pipe",
    "folder": "is a folder",
    "missing": "not found",
    "under a file": "not found (a component of the path is a file",
}
MAXSYMLINKS = 40  # Linux follows at most 40 links in one lookup, then ELOOP


def odd_path(base: Path, kind: str, chain: int) -> Path:
    """A path of ``kind`` (a key of PATH_KINDS), reached through ``chain`` further symbolic links."""
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


def no_hang(seconds: int = 20) -> None:
    """Fail the test if it has not called ``signal.alarm(0)`` within ``seconds`` (pytest.fail raises a
    BaseException: no reader's ``except OSError`` can turn it into a refusal)."""
    def alarm(signum, frame):
        pytest.fail("a reader blocked (it opened a FIFO?)")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)


def refused_naming_the_file(read, path: Path, seconds: int = 20) -> None:
    """``read(path)`` raises the project's error naming ``path`` within ``seconds`` (from the header, not the data)."""
    def alarm(signum, frame):
        # pytest.fail raises a BaseException: no reader's `except OSError` can turn it into a refusal.
        pytest.fail(f"reading {path} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        with pytest.raises(BadNetError) as err:
            read(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(path) in str(err.value)


def refused(read: Callable[[Path], Any], path: Path, *fragments: str, or_named: Path | None = None) -> str:
    """``read(path)`` raises ModelFileError whose message begins with ``path`` (or ``or_named``: a second file the
    read takes) and holds every fragment; returns the message."""
    with pytest.raises(ModelFileError) as err:
        read(path)
    message = str(err.value)
    assert message.startswith(tuple(str(p) for p in (path, or_named) if p is not None)), message
    for fragment in fragments:
        assert fragment in message, message
    return message


HUGE = 10**10  # a declared size far beyond any real file


def declared_h5(path: Path, shapes: dict) -> Path:
    """An h5 whose datasets declare ``shapes`` ({name: (shape, dtype)}; chunked, never written: a few KB on disk)."""
    with h5py.File(path, "w") as f:
        for name, (shape, dtype) in shapes.items():
            if np.prod(shape, dtype=float) < 1e6:
                f.create_dataset(name, data=np.zeros(shape, dtype))
            else:
                f.create_dataset(name, shape=shape, dtype=dtype, chunks=tuple(min(s, 64) for s in shape))
    return path
