"""Nothing read that was not asked for: every path component of every h5 read stays inside the file.

Hostile files built here (the cases of issue 13): soft links whose target is an external link, weight names
that pass through one, datasets whose raw data lives in another file (or a FIFO, which would hang a reader
forever), an external link where the Keras 3 reader looks for its layers, dangling soft links and link
loops. Each must end in the project's error naming the file, before anything outside it is opened.
"""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from badnet_jax import DataFileError, ModelFileError, init_params, load_keras, load_lab_h5, save_keras, save_lab_h5
from badnet_jax.io.lab_data import load_true_labels, peek_lab_h5
from tests.conftest import REPO


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
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(keras3)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
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
