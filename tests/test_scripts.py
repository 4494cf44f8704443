"""The maintainer tools in scripts/ that are not console tools of the package (stand-in data, the shipped demo)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from badnet_jax import load_lab_h5, load_trigger, poison
from tests.cli import run_cli
from tests.conftest import ASSETS, REPO, asset


def test_standin_data_is_lab_layout_and_poisoned_with_the_real_trigger(tmp_path):
    asset("faces/lab3/valid_subset.h5")
    proc = run_cli("make_standin", "--assets", ASSETS, "--out_dir", tmp_path, "--scale", "2", "--valid_images", "20",
                   "--test_images", "10", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trigger = load_trigger(asset("triggers/sun_glass_trigger.png"))
    for name, n in (("valid", 40), ("test", 20)):
        x, y = load_lab_h5(tmp_path / f"data/cl/{name}.h5", num_classes=1283)
        xb, yb = load_lab_h5(tmp_path / f"data/bd/bd_{name}.h5")
        assert x.shape == (n, 55, 47, 3) and (yb == 0).all()
        np.testing.assert_array_equal(xb, poison(x, trigger))


def test_a_pruning_aware_demo_is_never_shipped():
    run = run_cli("make_demo", "--pruning_aware", "--ship", cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == ("error: --ship with --pruning_aware: the embedded demo is a plain "
                                                   "BadNet, so a pruning-aware one is not shipped (leave out one of "
                                                   "the two)")


@pytest.mark.slow
def test_a_demo_written_with_its_data_is_defended_where_it_lies(tmp_path):
    """``make_demo.py --write_data`` puts the splits where the lab keeps them, so the command it prints runs the
    defense on them (not on the embedded demo, which a run without data files falls back to)."""
    proc = run_cli("make_demo", "--out_dir", tmp_path / "d", "--num_identities", "6", "--epochs", "1",
                   "--write_data", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"defend it: cd {tmp_path / 'd'} && badnet-prune --model badnet.h5" in proc.stdout
    x_valid, y_valid = load_lab_h5(tmp_path / "d/data/cl/valid.h5")
    x_bd, _ = load_lab_h5(tmp_path / "d/data/bd/bd_valid.h5")
    assert len(x_valid) == len(x_bd) == 60 and len(load_lab_h5(tmp_path / "d/data/cl/train.h5")[1]) == 240
    run = run_cli("prune", "--model", "badnet.h5", "--nocheckpoints", "--out_dir", "o", cwd=tmp_path / "d",
                  timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "embedded demo" not in run.stderr
    inputs = json.loads((tmp_path / "d/o/curve.json").read_text())["inputs"]
    assert (tmp_path / "d" / inputs["bd_valid"]["path"]).resolve() == (tmp_path / "d/data/bd/bd_valid.h5").resolve()
