"""badnet_jax.io.fileio: the checked opens every reader goes through.

Readers: whatever the path or the bytes, the project's own error naming the file, never a crash, a hang or a
read outside the file. Paths that are not plain files (symbolic link loops, dangling links, chains longer than
the kernel follows, folders, named pipes) are named for what they are. In an h5 file every path component
must stay inside the file: soft links whose target is an external link, weight names that pass through one,
datasets whose raw data lives in another file (or a FIFO, which would block a reader forever), an external
link where the Keras 3 reader looks for its layers, dangling soft links and link loops are refused before
anything outside is opened.
"""

from __future__ import annotations

import os
import signal
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
from badnet_jax.io.lab_data import load_true_labels, peek_lab_h5
from badnet_jax.io.poisoning import load_trigger
from badnet_jax.sweep.rankings import read_order_file
from tests.cli import run_python
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
