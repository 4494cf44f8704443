"""badnet_jax.defense.screen: GoodNet's verdict on images from PNG files and lab h5 files, with B' as a Keras
file or a checkpoint, and the inputs it refuses. Through goodnet_eval.py: tests/commands/test_screen.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from badnet_jax import DataFileError, load_keras, mask_from_zeroed, save_lab_h5
from badnet_jax.defense.screen import screen
from badnet_jax.io import checkpoint
from tests.conftest import LAB_B, asset

B_PRIME = "models/lab3_repaired/full_model_drop30.h5"


def test_h5_inputs_and_checkpoint_b_prime(tmp_path):
    _, params = load_keras(asset(LAB_B))
    _, pp = load_keras(asset(B_PRIME))
    ckpt = checkpoint.save_badnet(tmp_path / "bp", params, mask_from_zeroed(pp))
    h5 = asset("faces/lab3/bd_test_subset.h5")
    from_h5 = screen(asset(LAB_B), ckpt, [h5])
    from_keras = screen(asset(LAB_B), asset(B_PRIME), [h5])
    assert [n for n, _ in from_h5] == [f"{h5}[{i}]" for i in range(13)]
    assert [p for _, p in from_h5] == [p for _, p in from_keras]
    assert sum(p == 1283 for _, p in from_h5) >= 12


def test_bad_inputs(tmp_path):
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(DataFileError, match="unsupported input"):
        screen(asset(LAB_B), asset(B_PRIME), [tmp_path / "x.txt"])
    with pytest.raises(DataFileError, match="not found"):
        screen(asset(LAB_B), asset(B_PRIME), [tmp_path / "missing.png"])
    empty = save_lab_h5(tmp_path / "empty.h5", np.zeros((0, 55, 47, 3)), np.zeros(0))
    with pytest.raises(DataFileError, match=f"{empty}: holds no images"):
        screen(asset(LAB_B), asset(B_PRIME), [empty])
