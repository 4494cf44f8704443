"""goodnet_eval.py (badnet-screen, badnet_jax.commands.screen) on the real PNG faces, against an independent NumPy
forward, straight from a defense run's GoodNet checkpoint, and a damaged checkpoint as one error line.
"""

from __future__ import annotations

import json
import logging
import zipfile

import h5py
import numpy as np
import pytest

from badnet_jax import init_params, load_images, load_keras, mask_from_zeroed, save_keras, save_lab_h5
from badnet_jax.defense.screen import screen
from badnet_jax.io import checkpoint
from badnet_jax.model import INPUT_HWC, prune_params
from badnet_jax.models.deepid import DeepID
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
    x = load_images(clean + sunglasses, INPUT_HWC)
    pb, pp = numpy_ref.forward(pb_params, x).argmax(-1), numpy_ref.forward(pp_params, x).argmax(-1)
    np.testing.assert_array_equal(preds, np.where(pb == pp, pb, 1283))
    assert (pb[len(clean):] == 0).all() and (preds[len(clean):] == 1283).all()  # every sunglasses face flagged
    labels = np.array([int(p.stem.split("label")[1]) for p in clean])
    kept = preds[:len(clean)] == labels
    assert (kept | (preds[:len(clean)] == 1283)).all()  # a clean face keeps its class or is flagged, never mislabelled
    assert kept.sum() >= 3


@pytest.mark.slow
def test_goodnet_checkpoint_of_a_2020_badnet_screens_quietly_at_its_scale(tmp_path, caplog):
    """The defense's goodnet_ckpt goes straight into the screener (it knows its /255 input scale)."""
    model = asset("models/hackml2020/sunglasses_bd_weights.h5")
    xb = load_images(sorted(asset("faces/png").glob("hackml2020_sunglasses_*.png")), INPUT_HWC)
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
    x = load_images(faces, INPUT_HWC) / 255.0
    pb, pp = numpy_ref.forward(params, x).argmax(-1), numpy_ref.forward(params, x, mask).argmax(-1)
    np.testing.assert_array_equal(got, np.where(pb == pp, pb, 1283))
    # With B and B' instead, the screener measures the scale on the faces' labels in their names: same answers.
    via_files = screen(model, out / "drop_30" / "b_prime.h5", faces)
    assert [p for _, p in via_files] == got
    with pytest.raises(Exception, match="GoodNet checkpoint; pass it as goodnet_path"):
        screen(model, out / "drop_30" / "goodnet_ckpt", faces)
    # A scale given against the recorded one is used, and said: the recorded 255 named with the checkpoint.
    ckpt = out / "drop_30" / "goodnet_ckpt"
    proc = run_cli("goodnet_eval", *map(str, faces), "--goodnet", str(ckpt), "--input_scale", "raw", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"Input scale raw, as given, instead of 255, which {ckpt} records" in proc.stderr
    x_raw = load_images(faces, INPUT_HWC)
    pb, pp = numpy_ref.forward(params, x_raw).argmax(-1), numpy_ref.forward(params, x_raw, mask).argmax(-1)
    got_raw = [int(line.split("\t")[1]) for line in proc.stdout.strip().splitlines()]
    np.testing.assert_array_equal(got_raw, np.where(pb == pp, pb, 1283))
    # B and B': the scale is B''s record (B, the 2020 file, records none), and the warning names B'.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="badnet_jax"):
        via_raw = screen(model, out / "drop_30" / "b_prime.h5", faces, input_scale="raw")
    assert f"instead of 255, which {out / 'drop_30' / 'b_prime.h5'} records" in caplog.text
    assert [p for _, p in via_raw] == got_raw


def test_a_truncated_checkpoint_is_one_line_for_the_user(tmp_path, demo_goodnet_ckpt):
    src, _ = demo_goodnet_ckpt
    biggest = max((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged = damaged_copy(src, tmp_path / "c", biggest.relative_to(src), 100)
    face = sorted(asset("faces/png").glob("*.png"))[0]
    proc = run_cli("goodnet_eval", str(face), "--goodnet", str(damaged), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --goodnet {damaged}: not a readable orbax checkpoint")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr  # no asyncio noise


def test_no_images_to_screen_is_one_error_line_naming_the_program():
    proc = run_cli("goodnet_eval", "--goodnet", "g_ckpt")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: give the images to screen: goodnet_eval.py IMAGE|FOLDER|H5... (--goodnet G_ckpt | "
                           "--model B.h5 --pruned B_prime)\n")


def _lines(proc):
    assert proc.returncode == 0, proc.stderr
    return [tuple(line.split("\t")) for line in proc.stdout.strip().splitlines()]


def _error(proc):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stdout == "", proc.stderr
    return errors[0]


def test_unlabelled_h5_images_need_the_scale_said_and_then_screen(tmp_path):
    x = load_images(sorted(asset("faces/png").glob("lab3_valid*.png")), INPUT_HWC)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("data", data=x.transpose(0, 3, 1, 2).astype(np.uint8))
    args = (bare, "--model", asset(LAB_B), "--pruned", asset(B_PRIME))
    line = _error(run_cli("goodnet_eval", *args, timeout=300))
    assert line.startswith(f"error: cannot tell the input scale of {asset(LAB_B)} without labelled clean images: "
                           "pass --input_scale raw"), line
    lines = _lines(run_cli("goodnet_eval", *args, "--input_scale", "raw", timeout=300))
    assert [n for n, _ in lines] == [f"{bare}[{i}]" for i in range(len(x))]
    _, pb_params = load_keras(asset(LAB_B))
    _, pp_params = load_keras(asset(B_PRIME))
    pb, pp = numpy_ref.forward(pb_params, x).argmax(-1), numpy_ref.forward(pp_params, x).argmax(-1)
    np.testing.assert_array_equal([int(p) for _, p in lines], np.where(pb == pp, pb, 1283))


@pytest.mark.slow
def test_a_folder_is_screened_sorted_one_line_per_image(tmp_path):
    folder = asset("faces/png")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    h5 = asset("faces/lab3/bd_test_subset.h5")
    args = ("--model", asset(LAB_B), "--pruned", asset(B_PRIME))
    by_folder = _lines(run_cli("goodnet_eval", folder, h5, *args, timeout=300))
    by_files = _lines(run_cli("goodnet_eval", *files, h5, *args, timeout=300))
    assert by_folder == by_files
    assert [n for n, _ in by_folder] == [str(p) for p in files] + [f"{h5}[{i}]" for i in range(13)]
    (tmp_path / "notes.txt").write_text("not a face")
    line = _error(run_cli("goodnet_eval", tmp_path, *args, timeout=300))
    assert line == f"error: {tmp_path}: holds no .png/.jpg/.jpeg faces"


@pytest.mark.slow
def test_jpeg_faces_are_screened_as_pil_decodes_them(tmp_path):
    """README's ``face.png more.jpg``: .jpg and .jpeg files (a folder of them too) are screened on the pixels
    PIL decodes, against the NumPy forward of B and B' on those pixels."""
    from PIL import Image

    clean, sunglasses = _faces()
    sources = clean[:3] + sunglasses[:3]
    jpegs = []
    for i, src in enumerate(sources):
        dst = tmp_path / f"{i}_{src.stem}.{'jpg' if i % 2 else 'jpeg'}"
        Image.open(src).convert("RGB").save(dst, quality=90)
        jpegs.append(dst)
    args = ("--model", asset(LAB_B), "--pruned", asset(B_PRIME))
    by_files = _lines(run_cli("goodnet_eval", *jpegs, *args, timeout=300))
    assert _lines(run_cli("goodnet_eval", tmp_path, *args, timeout=300)) == by_files
    assert [n for n, _ in by_files] == [str(p) for p in jpegs]
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in jpegs])
    assert x.shape[1:] == INPUT_HWC and not np.array_equal(x, load_images(sources, INPUT_HWC))  # lossy: new pixels
    _, pb_params = load_keras(asset(LAB_B))
    _, pp_params = load_keras(asset(B_PRIME))
    pb, pp = numpy_ref.forward(pb_params, x).argmax(-1), numpy_ref.forward(pp_params, x).argmax(-1)
    assert [int(c) for _, c in by_files] == np.where(pb == pp, pb, 1283).tolist()


@pytest.mark.slow
def test_a_recorded_scale_is_used_and_a_measurement_says_what_it_measured_on(tmp_path):
    """B' recording /255 screens a folder of mostly poisoned faces at /255, without measuring on them."""
    model = asset("models/hackml2020/sunglasses_bd_weights.h5")
    _, params = load_keras(model)
    mask = np.ones(60)
    mask[[0, 5, 7]] = 0
    b_prime = save_keras(prune_params(params, mask), tmp_path / "b_prime.h5", input_scale="255")
    folder = asset("faces/png")
    proc = run_cli("goodnet_eval", folder, "--model", model, "--pruned", b_prime, timeout=300)
    got = np.array([int(p) for _, p in _lines(proc)])
    assert f"Input scale 255, recorded in {b_prime}." in proc.stderr and "measured" not in proc.stderr
    x = load_images(sorted(folder.glob("*.png")), INPUT_HWC) / 255.0
    pb, pp = numpy_ref.forward(params, x).argmax(-1), numpy_ref.forward(params, x, mask).argmax(-1)
    np.testing.assert_array_equal(got, np.where(pb == pp, pb, 1283))
    # Nothing recorded (the public B'): measured on the labelled inputs, and the log says which and how labelled.
    proc = run_cli("goodnet_eval", folder, "--model", asset(LAB_B), "--pruned", asset(B_PRIME), timeout=300)
    assert _lines(proc)
    assert (f"Input scale raw (measured on 15 inputs from {folder}/hackml2020_anonymous1_0_label0.png, "
            f"{folder}/hackml2020_anonymous1_1_label0.png, {folder}/hackml2020_anonymous1_2_label0.png and 12 more, "
            "labelled by h5 'label' or label<class> in the file name, poisoned ones included: raw: "
            in proc.stderr), proc.stderr
    assert "clean images" not in proc.stderr


@pytest.mark.slow
def test_a_b_prime_of_another_badnet_is_refused_naming_both_files(tmp_path):
    face = asset("faces/png/lab3_valid0_label43.png")
    lab_b, other = asset(LAB_B), asset("models/hackml2020/sunglasses_bd_weights.h5")
    line = _error(run_cli("goodnet_eval", face, "--model", lab_b, "--pruned", other, timeout=300))
    assert line.startswith(f"error: --pruned {other} is not B (--model {lab_b}) with channels pruned: layer 'conv_1' "
                           "kernel differs in 960 of 960 weights (only conv_3 channels may be zeroed)"), line
    _, params = load_keras(other)
    mask = np.ones(60)
    mask[:10] = 0
    ckpt = checkpoint.save_badnet(tmp_path / "other_ckpt", DeepID(1283), params, mask)
    line = _error(run_cli("goodnet_eval", face, "--model", lab_b, "--pruned", ckpt, timeout=300))
    assert line.startswith(f"error: --pruned {ckpt} is not B (--model {lab_b}) with channels pruned"), line
    # conv_3 alone: a kept channel that is not B's is refused too.
    _, lab = load_keras(lab_b)
    lab_mask = np.asarray(mask_from_zeroed(load_keras(asset(B_PRIME))[1]))
    tampered = prune_params(lab, lab_mask)
    kept = int(np.argmax(lab_mask))
    tampered["conv_3"]["bias"] = np.asarray(tampered["conv_3"]["bias"]).copy()
    tampered["conv_3"]["bias"][kept] += 0.5
    bad = save_keras(tampered, tmp_path / "tampered.h5")
    line = _error(run_cli("goodnet_eval", face, "--model", lab_b, "--pruned", bad, timeout=300))
    assert f"conv_3 bias differs in 1 channel(s) that are neither B's nor zeroed (first: {kept})" in line
    # B and B' recording different scales: refused, not run at either.
    b_file = save_keras(lab, tmp_path / "b.h5", input_scale="raw")
    bp_file = save_keras(prune_params(lab, lab_mask), tmp_path / "bp.h5", input_scale="255")
    line = _error(run_cli("goodnet_eval", face, "--model", b_file, "--pruned", bp_file, timeout=300))
    assert line == (f"error: --pruned {bp_file} records input scale 255 but B (--model {b_file}) records raw: B' "
                    "must be B with channels pruned, at B's scale")
    # A file that is both an h5 and a zip.
    both = tmp_path / "both.h5"
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
    both.write_bytes(asset(B_PRIME).read_bytes() + archive.read_bytes())
    line = _error(run_cli("goodnet_eval", face, "--model", lab_b, "--pruned", both, timeout=300))
    assert line.startswith(f"error: --pruned {both}: is both an HDF5 file and a zip archive"), line
    # The real pair still screens.
    assert _lines(run_cli("goodnet_eval", face, "--model", lab_b, "--pruned", asset(B_PRIME), timeout=300))


def test_labels_outside_the_models_classes_are_named_before_the_scale(tmp_path):
    m10 = save_keras(init_params(10, seed=0), tmp_path / "m10.h5")
    with h5py.File(m10, "a") as f:  # a Keras file as Keras writes it: no recorded scale, so it is measured
        del f.attrs["badnet_jax_input_scale"]
    line = _error(run_cli("goodnet_eval", asset("faces/lab3/valid_subset.h5"), "--model", m10, "--pruned", m10,
                          timeout=300))
    assert line == (f"error: the inputs from {asset('faces/lab3/valid_subset.h5')}, labelled by h5 'label' or "
                    f"label<class> in the file name, poisoned ones included do not fit {m10}: label 43 is outside "
                    "[0, 10) for a 10-class model")


def test_a_missing_model_or_checkpoint_names_its_flag(tmp_path):
    face = asset("faces/png")
    for args, flag in ((("--model", tmp_path / "b.h5", "--pruned", tmp_path / "p.h5"), "--model"),
                       (("--model", asset(LAB_B), "--pruned", tmp_path / "p.h5"), "--pruned"),
                       (("--goodnet", tmp_path / "g_ckpt"), "--goodnet")):
        proc = run_cli("goodnet_eval", face, *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {flag} "), proc.stderr
        assert "not found" in proc.stderr and not proc.stdout


def test_a_keras_b_prime_of_another_cnn_without_its_pruning_asks_for_the_checkpoint():
    """Any CNN screens (tests/commands/test_screen_any_cnn.py); a Keras B' that does not record which channels were
    pruned cannot be checked against B, and the message says what to pass instead."""
    from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL

    line = _error(run_cli("goodnet_eval", asset("faces/png"), "--model", GAP_DEMO_MODEL, "--pruned", GAP_DEMO_MODEL))
    assert line == (f"error: --pruned {GAP_DEMO_MODEL}: a Keras file of a model other than the lab's DeepID that does "
                    "not record which channels were pruned (a file prune.py writes does); pass the drop_X/b_prime_ckpt "
                    "that prune.py writes beside it as --pruned, or drop_X/goodnet_ckpt as --goodnet")
