"""goodnet_eval.py / badnet_jax.defense.screen on the real PNG faces, against an independent NumPy forward."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badnet_jax import DataFileError, load_images, load_keras
from badnet_jax.defense.screen import screen
from tests import numpy_ref
from tests.conftest import LAB_B, REPO, asset

B_PRIME = "models/lab3_repaired/full_model_drop30.h5"


def _faces():
    folder = asset("faces/png")
    return sorted(folder.glob("lab3_valid*.png")), sorted(folder.glob("hackml2020_sunglasses_*.png"))


def test_cli_flags_sunglasses_and_keeps_clean_classes():
    clean, sunglasses = _faces()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "goodnet_eval.py"), *map(str, clean + sunglasses),
                           "--model", str(asset(LAB_B)), "--pruned", str(asset(B_PRIME))],
                          capture_output=True, text=True, timeout=300)
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


def test_h5_inputs_and_checkpoint_b_prime(tmp_path):
    from badnet_jax import mask_from_zeroed
    from badnet_jax.io import checkpoint

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
    from badnet_jax import save_lab_h5

    empty = save_lab_h5(tmp_path / "empty.h5", np.zeros((0, 55, 47, 3)), np.zeros(0))
    with pytest.raises(DataFileError, match=f"{empty}: holds no images"):
        screen(asset(LAB_B), asset(B_PRIME), [empty])


def test_goodnet_checkpoint_of_a_2020_badnet_screens_quietly_at_its_scale(tmp_path):
    """The defense's goodnet_ckpt goes straight into the screener (it knows its /255 input scale)."""
    import json

    from badnet_jax import save_lab_h5

    model = asset("models/hackml2020/sunglasses_bd_weights.h5")
    xb = load_images(sorted(asset("faces/png").glob("hackml2020_sunglasses_*.png")))
    bd = save_lab_h5(tmp_path / "bd.h5", xb, np.zeros(len(xb)))
    clean, test = asset("faces/lab3/valid_subset.h5"), asset("faces/lab3/test_subset.h5")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.30", "--model", str(model),
                           "--clean_valid", str(clean), "--bd_valid", str(bd), "--clean_test", str(test),
                           "--bd_test", str(bd), "--out_dir", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    sel = json.loads((out / "curve.json").read_text())["selected"][0]
    faces = sorted(asset("faces/png").glob("*.png"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "goodnet_eval.py"), *map(str, faces),
                           "--goodnet", str(out / "drop_30" / "goodnet_ckpt")], capture_output=True, text=True,
                          timeout=300)
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
    with pytest.raises(Exception, match="GoodNet checkpoint; pass it as --goodnet"):
        screen(model, out / "drop_30" / "goodnet_ckpt", faces)


@pytest.fixture(scope="module")
def demo_goodnet_ckpt(tmp_path_factory):
    from badnet_jax.io import checkpoint
    from badnet_jax.attack.demo import DEMO_MODEL
    from badnet_jax.goodnet import make_goodnet

    _, params = load_keras(DEMO_MODEL)
    mask = np.ones(60, np.float32)
    mask[:30] = 0
    variables = make_goodnet(params, mask=mask)[1]
    return checkpoint.save_goodnet(tmp_path_factory.mktemp("g") / "goodnet_ckpt", variables), variables


def _damaged_copy(src, dst, rel, size):
    import shutil

    shutil.copytree(src, dst)
    if size is None:
        (dst / rel).unlink()
    else:
        with open(dst / rel, "r+b") as f:
            f.truncate(size)
    return dst


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_restores_exactly_or_is_refused(tmp_path, demo_goodnet_ckpt, data):
    """Any file of a GoodNet checkpoint truncated or removed: the same variables come back, or CheckpointError."""
    import jax

    from badnet_jax.io import checkpoint
    from badnet_jax.errors import CheckpointError

    src, variables = demo_goodnet_ckpt
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    rel = data.draw(st.sampled_from(files))
    full = (src / rel).stat().st_size
    size = data.draw(st.one_of(st.none(), st.integers(0, max(full - 1, 0))))
    damaged = _damaged_copy(src, tmp_path / f"c{len(list(tmp_path.iterdir()))}", rel, size)
    try:
        _, got = checkpoint.restore_goodnet(damaged)
    except CheckpointError as err:
        assert str(damaged) in str(err) and "tensorstore_spec" not in str(err) and len(str(err)) < 600
        return
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_truncated_checkpoint_is_one_line_for_the_user(tmp_path, demo_goodnet_ckpt):
    src, _ = demo_goodnet_ckpt
    biggest = max((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged = _damaged_copy(src, tmp_path / "c", biggest.relative_to(src), 100)
    face = sorted(asset("faces/png").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "goodnet_eval.py"), str(face), "--goodnet",
                           str(damaged)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {damaged}: not a readable orbax checkpoint")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr  # no asyncio noise
