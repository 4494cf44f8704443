"""badnet_jax.defense.screen: GoodNet's verdict on images from PNG files, folders and lab h5 files, with B' as a
Keras file or a checkpoint, and the inputs and B' it refuses. Through goodnet_eval.py: tests/commands/test_screen.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from badnet_jax import (ConfigError, DataFileError, ModelFileError, load_keras, load_lab_h5, mask_from_zeroed,
                        save_lab_h5)
from badnet_jax.model import INPUT_HWC
from badnet_jax.defense.b_prime import check_pruned_from
from badnet_jax.defense.screen import gather_inputs, screen
from badnet_jax.io import checkpoint
from badnet_jax.models.deepid import DeepID
from tests.conftest import LAB_B, asset

B_PRIME = "models/lab3_repaired/full_model_drop30.h5"


def test_h5_inputs_and_checkpoint_b_prime(tmp_path):
    _, params = load_keras(asset(LAB_B))
    _, pp = load_keras(asset(B_PRIME))
    ckpt = checkpoint.save_badnet(tmp_path / "bp", DeepID(1283), params, mask_from_zeroed(pp))
    h5 = asset("faces/lab3/bd_test_subset.h5")
    from_h5 = screen(asset(LAB_B), ckpt, [h5])
    from_keras = screen(asset(LAB_B), asset(B_PRIME), [h5])
    assert [n for n, _ in from_h5] == [f"{h5}[{i}]" for i in range(13)]
    assert [p for _, p in from_h5] == [p for _, p in from_keras]
    assert sum(p == 1283 for _, p in from_h5) >= 12


def test_h5_inputs_without_labels_are_screened(tmp_path):
    h5 = asset("faces/lab3/bd_test_subset.h5")
    x, _ = load_lab_h5(h5)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:  # the lab layout's images only: screening needs no labels
        f.create_dataset("data", data=x.transpose(0, 3, 1, 2).astype(np.uint8))
    labelled = [p for _, p in screen(asset(LAB_B), asset(B_PRIME), [h5])]
    assert [p for _, p in screen(asset(LAB_B), asset(B_PRIME), [bare], input_scale="raw")] == labelled
    # nothing records the lab B's scale and no input is labelled: the user is told how to give it
    with pytest.raises(ConfigError, match="without labelled clean images: pass input_scale=raw"):
        screen(asset(LAB_B), asset(B_PRIME), [bare])
    # labelled inputs beside it measure the scale for all
    both = screen(asset(LAB_B), asset(B_PRIME), [bare, h5])
    assert [p for _, p in both] == labelled + labelled


def test_bad_inputs(tmp_path):
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(DataFileError, match="unsupported input"):
        screen(asset(LAB_B), asset(B_PRIME), [tmp_path / "x.txt"])
    with pytest.raises(DataFileError, match="not found"):
        screen(asset(LAB_B), asset(B_PRIME), [tmp_path / "missing.png"])
    empty = save_lab_h5(tmp_path / "empty.h5", np.zeros((0, 55, 47, 3)), np.zeros(0))
    with pytest.raises(DataFileError, match=f"{empty}: holds no images"):
        screen(asset(LAB_B), asset(B_PRIME), [empty])


def test_folders_expand_sorted_beside_files_and_h5(tmp_path):
    folder = asset("faces/lab3/test/clean")
    files = sorted(folder.glob("*.png"))
    (tmp_path / "a_label3.png").write_bytes(files[0].read_bytes())
    names, x, labels = gather_inputs([tmp_path, folder, asset("faces/lab3/test_subset.h5")], INPUT_HWC)
    assert names == [str(tmp_path / "a_label3.png"), *map(str, files),
                     *(f"{asset('faces/lab3/test_subset.h5')}[{i}]" for i in range(13))]
    assert len(x) == len(labels) == 1 + len(files) + 13 and labels[0] == 3
    np.testing.assert_array_equal(x[1:1 + len(files)], x[1 + len(files):])  # the PNGs are the h5's faces


def test_b_prime_must_be_b_with_conv3_channels_pruned():
    _, params = load_keras(asset(LAB_B))
    _, pp = load_keras(asset(B_PRIME))
    mask = mask_from_zeroed(pp)
    check_pruned_from(params, pp, mask, "b.h5", "bp.h5")  # the public B': zeroed channels
    check_pruned_from(params, params, mask, "b.h5", "bp_ckpt")  # a checkpoint: B's weights beside its mask
    pruned = int(np.argmin(np.asarray(mask)))
    odd = {**pp, "conv_3": {"kernel": np.asarray(pp["conv_3"]["kernel"]).copy(), "bias": pp["conv_3"]["bias"]}}
    odd["conv_3"]["kernel"][0, 0, 0, pruned] = 0.25  # a pruned channel neither B's nor zero
    with pytest.raises(ModelFileError, match=f"pruned_path=bp.h5 is not B \\(model_path=b.h5\\) with channels pruned: "
                                             f"conv_3 kernel differs in 1 channel\\(s\\) .* \\(first: {pruned}\\)"):
        check_pruned_from(params, odd, mask, "b.h5", "bp.h5")
    moved = {**pp, "output": {"kernel": pp["output"]["kernel"], "bias": np.asarray(pp["output"]["bias"]) + 1e-6}}
    with pytest.raises(ModelFileError, match="layer 'output' bias differs in 1283 of 1283 weights"):
        check_pruned_from(params, moved, mask, "b.h5", "bp.h5")
