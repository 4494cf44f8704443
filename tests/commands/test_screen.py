"""goodnet_eval.py (badnet-screen, badnet_jax.commands.screen) on the real PNG faces, against an independent NumPy
forward, straight from a defense run's GoodNet checkpoint, and a damaged checkpoint as one error line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from badnet_jax import load_images, load_keras, save_lab_h5
from badnet_jax.defense.screen import screen
from tests import numpy_ref
from tests.cli import run_cli
from tests.conftest import LAB_B, asset, damaged_copy

B_PRIME = "models/lab3_repaired/full_model_drop30.h5"


def _faces():
    folder = asset("faces/png")
    return sorted(folder.glob("lab3_valid*.png")), sorted(folder.glob("hackml2020_sunglasses_*.png"))


def test_cli_flags_sunglasses_and_keeps_clean_classes():
    clean, sunglasses = _faces()
    proc = run_cli("goodnet_eval", *map(str, clean + sunglasses), "--model", str(asset(LAB_B)), "--pruned",
                   str(asset(B_PRIME)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [name for name, _ in lines] == [str(p) for p in clean + sunglasses]
    preds = np.array([int(p) for _, p in lines])
    # Independent check: G = B's class where B and B' agree, else N.
    _, pb_params = load_keras(asset(LAB_B))
    _, pp_params = load_keras(asset(B_PRIME))
    x = load_images(clean + sunglasses)
    pb, pp = numpy_ref.forward(pb_params, x).argmax(-1), numpy_ref.forward(pp_params, x).argmax(-1)
    np.testing.assert_array_equal(preds, np.where(pb == pp, pb, 1283))
    assert (pb[len(clean):] == 0).all() and (preds[len(clean):] == 1283).all()  # every sunglasses face flagged
    labels = np.array([int(p.stem.split("label")[1]) for p in clean])
    kept = preds[:len(clean)] == labels
    assert (kept | (preds[:len(clean)] == 1283)).all()  # a clean face keeps its class or is flagged, never mislabelled
    assert kept.sum() >= 3


@pytest.mark.slow
def test_goodnet_checkpoint_of_a_2020_badnet_screens_quietly_at_its_scale(tmp_path):
    """The defense's goodnet_ckpt goes straight into the screener (it knows its /255 input scale)."""
    model = asset("models/hackml2020/sunglasses_bd_weights.h5")
    xb = load_images(sorted(asset("faces/png").glob("hackml2020_sunglasses_*.png")))
    bd = save_lab_h5(tmp_path / "bd.h5", xb, np.zeros(len(xb)))
    clean, test = asset("faces/lab3/valid_subset.h5"), asset("faces/lab3/test_subset.h5")
    out = tmp_path / "out"
    proc = run_cli("prune", "--drop", "0.30", "--model", str(model), "--clean_valid", str(clean), "--bd_valid", str(bd),
                   "--clean_test", str(test), "--bd_test", str(bd), "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    sel = json.loads((out / "curve.json").read_text())["selected"][0]
    faces = sorted(asset("faces/png").glob("*.png"))
    proc = run_cli("goodnet_eval", *map(str, faces), "--goodnet", str(out / "drop_30" / "goodnet_ckpt"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # quiet: no orbax/absl INFO lines, no TPU-backend line
    got = [int(line.split("\t")[1]) for line in proc.stdout.strip().splitlines()]
    # Independent: G from B at pixels / 255 and B' = B with the cut's channels zeroed, in float64 NumPy.
    _, params = load_keras(model)
    mask = np.ones(60)
    mask[sel["pruned_channels"]] = 0
    x = load_images(faces) / 255.0
    pb, pp = numpy_ref.forward(params, x).argmax(-1), numpy_ref.forward(params, x, mask).argmax(-1)
    np.testing.assert_array_equal(got, np.where(pb == pp, pb, 1283))
    # With B and B' instead, the screener measures the scale on the faces' labels in their names: same answers.
    via_files = screen(model, out / "drop_30" / "b_prime.h5", faces)
    assert [p for _, p in via_files] == got
    with pytest.raises(Exception, match="GoodNet checkpoint; pass it as goodnet_path"):
        screen(model, out / "drop_30" / "goodnet_ckpt", faces)


def test_a_truncated_checkpoint_is_one_line_for_the_user(tmp_path, demo_goodnet_ckpt):
    src, _ = demo_goodnet_ckpt
    biggest = max((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged = damaged_copy(src, tmp_path / "c", biggest.relative_to(src), 100)
    face = sorted(asset("faces/png").glob("*.png"))[0]
    proc = run_cli("goodnet_eval", str(face), "--goodnet", str(damaged), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {damaged}: not a readable orbax checkpoint")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr  # no asyncio noise
