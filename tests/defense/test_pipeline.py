"""badnet_jax.defense.pipeline: the defense end to end on small lab-layout files (through badnet-prune, as a user
runs it), every output checked against independent computations, and every CSAW-HackML-2020 BadNet through it.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import jax
import numpy as np
import pytest

from badnet_jax import DataFileError, load_images, load_keras, load_lab_h5, mask_from_zeroed, save_lab_h5
from badnet_jax.model import INPUT_HWC
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from badnet_jax.io import checkpoint
from badnet_jax.sweep import SweepOptions
from tests import numpy_ref
from tests.cli import run_cli, run_python
from tests.conftest import LAB_LAYOUT, asset

ROLES = ("clean_valid", "bd_valid", "clean_test", "bd_test")  # the order of LAB_LAYOUT's files


def test_cli_end_to_end_on_lab_layout(lab_dir):
    proc = run_cli("prune", "--drop", "0.02,0.30", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr
    assert "channels pruned" in proc.stdout and "embedded demo" not in proc.stderr
    out = lab_dir / "results"
    curve = json.loads((out / "curve.json").read_text())
    for key in ("order", "mean_activation", "valid_acc", "valid_asr", "test_acc", "test_asr"):
        assert len(curve[key]) == (60 if key in ("order", "mean_activation") else 61), key
    assert sorted(curve["order"]) == list(range(60))
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "bd_weights.h5" in md and "sha256" in md and "| 30 |" in md

    model, params = load_keras(lab_dir / "models" / "bd_weights.h5")
    x_test, y_test = load_lab_h5(lab_dir / "data/cl/test.h5")
    x_bd, y_bd = load_lab_h5(lab_dir / "data/bd/bd_test.h5")
    assert [s["drop"] for s in curve["selected"]] == [0.02, 0.30]
    for sel in curve["selected"]:
        k, d = sel["channels_pruned"], out / f"drop_{100 * sel['drop']:g}"
        assert sel["pruned_channels"] == sorted(curve["order"][:k])
        # The Keras B' has exactly those conv_3 channels zeroed ...
        _, bprime = load_keras(d / "b_prime.h5")
        assert sorted(np.flatnonzero(np.asarray(mask_from_zeroed(bprime)) == 0).tolist()) == sel["pruned_channels"]
        # ... and its test numbers, recomputed with the independent NumPy forward, are the reported ones.
        pb = numpy_ref.forward(params, np.concatenate([x_test, x_bd])).argmax(-1)
        pp = numpy_ref.forward(bprime, np.concatenate([x_test, x_bd])).argmax(-1)
        n = len(x_test)
        assert sel["test_acc"] == pytest.approx(100 * np.mean(pp[:n] == y_test))
        assert sel["test_asr"] == pytest.approx(100 * np.mean(pp[n:] == y_bd))
        g = np.where(pb == pp, pb, 1283)
        assert sel["goodnet"]["acc"] == pytest.approx(100 * np.mean(g[:n] == y_test))
        assert sel["goodnet"]["detection_rate"] == pytest.approx(100 * np.mean(g[n:] == 1283))
        assert sel["goodnet"]["false_alarm_rate"] == pytest.approx(100 * np.mean(g[:n] == 1283))
        # The orbax checkpoints restore to the same B' and a working GoodNet.
        _, ck_params, ck_mask = checkpoint.restore_badnet(d / "b_prime_ckpt")
        assert sorted(np.flatnonzero(np.asarray(ck_mask) == 0).tolist()) == sel["pruned_channels"]
        goodnet, variables = checkpoint.restore_goodnet(d / "goodnet_ckpt")
        np.testing.assert_array_equal(np.asarray(jax.jit(goodnet.apply)(variables, np.concatenate([x_test, x_bd]))), g)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_defense_compiles_the_sweep_once_while_loading(lab_dir, backend_compiles, tmp_path):
    files = {role: str(lab_dir / path) for role, path in zip(ROLES, LAB_LAYOUT)}
    run_defense(DefenseConfig(drops=(0.04,), model=str(lab_dir / "models" / "bd_weights.h5"),
                              out_dir=str(tmp_path / "o"), checkpoints=False, sweep=SweepOptions(chunk=24), **files))
    assert [f for f in backend_compiles if "rank_and_sweep_call" in f] == ["jit(rank_and_sweep_call)"]
    md = (tmp_path / "o" / "report.md").read_text()
    assert "compile (after load)" in md and "curve (one call)" in md


def test_orbax_loads_before_the_writes_when_checkpoints_are_written_and_never_otherwise(lab_dir, tmp_path):
    # In a fresh process: the test's own process has imported orbax long ago.
    code = textwrap.dedent("""
        import importlib.metadata, json, sys
        from badnet_jax.defense import pipeline
        files = dict(zip(sys.argv[3:7], sys.argv[7:11]))
        config = lambda out, checkpoints: pipeline.DefenseConfig(model=sys.argv[1], out_dir=out, checkpoints=checkpoints,
                                                                 **files)
        pipeline.run_defense(config(sys.argv[2] + "/none", False))
        versions = json.load(open(sys.argv[2] + "/none/curve.json"))["versions"]
        print("orbax" in sys.modules, versions["orbax-checkpoint"] == importlib.metadata.version("orbax-checkpoint"))
        write = pipeline.write_results
        def checked(*args, **kwargs):
            print("orbax.checkpoint" in sys.modules)  # loaded before anything is written (nothing else imports it)
            return write(*args, **kwargs)
        pipeline.write_results = checked
        pipeline.run_defense(config(sys.argv[2] + "/with", True))
        import orbax.checkpoint
        print(versions["orbax-checkpoint"] == orbax.checkpoint.__version__)
    """)
    proc = run_python(code, lab_dir / "models" / "bd_weights.h5", tmp_path, *ROLES,
                      *(lab_dir / path for path in LAB_LAYOUT), cwd=None, timeout=200)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True", "True"]
    assert (tmp_path / "with" / "drop_4" / "goodnet_ckpt").is_dir() and not (tmp_path / "none" / "drop_4").exists()


def test_an_orbax_that_fails_to_import_is_refused_before_the_sweep(lab_dir, tmp_path):
    broken = tmp_path / "broken" / "orbax"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this orbax is broken')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(broken.parent), os.environ.get("PYTHONPATH")]))}
    proc = run_cli("prune", "--drop", "0.04", "--out_dir", "out", cwd=lab_dir, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the checkpoints cannot be written: orbax-checkpoint fails to import (ImportError: this orbax is "
        "broken); reinstall badnet-jax's dependencies, or give --nocheckpoints"), proc.stderr
    assert "Ranked the" not in proc.stderr and not (lab_dir / "out").exists()
    proc = run_cli("prune", "--drop", "0.04", "--out_dir", "out", "--nocheckpoints", cwd=lab_dir, env=env)
    assert proc.returncode == 0, proc.stderr  # nothing else needs orbax
    assert "Ranked the" in proc.stderr and not (lab_dir / "out" / "drop_4").exists()


def test_failing_run_leaves_no_files(lab_dir, monkeypatch):
    bad = lab_dir / "data/cl/test.h5"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated test set: found only after the sweep's inputs load
    out = lab_dir / "out"
    with pytest.raises(DataFileError, match="test.h5"):
        run_defense(DefenseConfig(model=str(lab_dir / "models/bd_weights.h5"), out_dir=str(out),
                                  **{r: str(lab_dir / p) for r, p in zip(ROLES, LAB_LAYOUT)}))
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.slow
def test_cli_finetune_adds_fine_pruned_models(lab_dir):
    proc = run_cli("prune", "--drop", "0.30", "--finetune_epochs", "2", "--finetune_lr", "1e-3", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr
    out = lab_dir / "results"
    curve = json.loads((out / "curve.json").read_text())
    sel = curve["selected"][0]
    ft = sel["finetuned"]
    assert set(ft) >= {"test_acc", "test_asr", "test_der", "goodnet", "epochs_run"} and 1 <= ft["epochs_run"] <= 2
    assert "+FT" in (out / "report.md").read_text() and "+FT" in proc.stdout
    d = out / "drop_30"
    _, tuned = load_keras(d / "b_prime_finetuned.h5")
    zeroed = sorted(np.flatnonzero(np.asarray(mask_from_zeroed(tuned)) == 0).tolist())
    assert zeroed == sel["pruned_channels"]  # fine-tuning kept every pruned channel exactly zero
    goodnet, variables = checkpoint.restore_goodnet(d / "goodnet_finetuned_ckpt")
    x, y = load_lab_h5(lab_dir / "data/cl/test.h5")
    g = np.asarray(goodnet.apply(variables, x))
    assert ft["goodnet"]["acc"] == pytest.approx(100 * np.mean(g == y))


@pytest.mark.slow
def test_rerun_gives_byte_identical_curve_json(lab_dir):
    def run():
        proc = run_cli("prune", "--drop", "0.04", "--finetune_epochs", "1", "--nocheckpoints", cwd=lab_dir)
        assert proc.returncode == 0, proc.stderr
        return (lab_dir / "results" / "curve.json").read_bytes(), (lab_dir / "results" / "curve.png").read_bytes()

    (a, png_a), (b, png_b) = run(), run()
    assert a == b  # timings live in report.md, so identical runs write identical bytes
    assert png_a == png_b


@pytest.mark.slow
def test_memory_budget_through_the_cli_changes_only_the_chunking(lab_dir):
    # A tight budget still gives the same curve: only the chunking changes (the budget arithmetic itself:
    # tests/sweep/test_plan.py).
    runs = {}
    for name, budget in (("roomy", "4"), ("tight", "0.05")):
        proc = run_cli("prune", "--drop", "0.04", "--nocheckpoints", "--memory_budget", budget, "--out_dir", name,
                       cwd=lab_dir)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads((lab_dir / name / "curve.json").read_text())
        assert ("Memory budget:" in proc.stderr) == (name == "tight")
    assert runs["tight"] == runs["roomy"]
    proc = run_cli("prune", "--memory_budget", "0.001", cwd=lab_dir)
    assert proc.returncode == 2 and "memory budget" in proc.stderr


@pytest.mark.slow
def test_a_defender_without_poisoned_data_gets_the_same_cut_and_models(lab_dir):
    """The ranking and the cut need clean validation data only: the same cut, B' and G as with poisoned data."""
    with_bd = run_cli("prune", "--drop", "0.04,0.30", "--out_dir", "with", cwd=lab_dir)
    assert with_bd.returncode == 0, with_bd.stderr
    for f in ("data/bd/bd_valid.h5", "data/bd/bd_test.h5"):
        (lab_dir / f).unlink()  # the lab layout without its poisoned sets
    proc = run_cli("prune", "--drop", "0.04,0.30", "--out_dir", "without", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr
    assert "No poisoned data given" in proc.stderr and "n/a" in proc.stdout
    a = json.loads((lab_dir / "with" / "curve.json").read_text())
    b = json.loads((lab_dir / "without" / "curve.json").read_text())
    assert b["order"] == a["order"] and b["valid_acc"] == a["valid_acc"] and b["test_acc"] == a["test_acc"]
    assert b["valid_asr"] is None and b["test_asr"] is None and b["test_der"] is None and b["targets"] == []
    assert b["goodnet_false_alarm_rate"] == a["goodnet_false_alarm_rate"]
    for sa, sb in zip(a["selected"], b["selected"]):
        assert sb["channels_pruned"] == sa["channels_pruned"] and sb["test_acc"] == sa["test_acc"]
        assert sb["test_asr"] is None and sb["goodnet"]["asr"] is None and sb["goodnet"]["detection_rate"] is None
        assert sb["goodnet"]["false_alarm_rate"] == sa["goodnet"]["false_alarm_rate"]
        d = sa["channels_pruned"] and f"drop_{100 * sa['drop']:g}"
        assert ((lab_dir / "without" / d / "b_prime.h5").read_bytes()
                == (lab_dir / "with" / d / "b_prime.h5").read_bytes())  # the very same B'
        assert (lab_dir / "without" / d / "goodnet_ckpt").is_dir()
    md = (lab_dir / "without" / "report.md").read_text()
    assert "validation ASR n/a (no poisoned data)" in md and "| n/a |" in md
    assert (lab_dir / "without" / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_rerun_with_fewer_drops_leaves_no_stale_folders_and_odd_poisoned_data_is_flagged(lab_dir):
    first = run_cli("prune", "--drop", "0.02,0.04", cwd=lab_dir)
    assert first.returncode == 0, first.stderr
    assert {p.name for p in (lab_dir / "results").glob("drop_*")} == {"drop_2", "drop_4"}
    # "Poisoned" sets labelled with the true classes instead of the target: B's ASR is then near 0.
    x, _ = load_lab_h5(lab_dir / "data/bd/bd_test.h5")
    _, y_true = load_lab_h5(lab_dir / "data/cl/test.h5")
    save_lab_h5(lab_dir / "data/bd/bd_test.h5", x, y_true)
    second = run_cli("prune", "--drop", "0.04", cwd=lab_dir)
    assert second.returncode == 0, second.stderr
    assert {p.name for p in (lab_dir / "results").glob("drop_*")} == {"drop_4"}  # drop_2 went with the old run
    assert [s["drop"] for s in json.loads((lab_dir / "results" / "curve.json").read_text())["selected"]] == [0.04]
    assert "B's attack success rate on bd_test is only 0.00%" in second.stderr
    assert "attack success rate on bd_valid" not in second.stderr


MODELS = {  # model -> (its own poisoned PNGs, target) or None where no poisoned face of it is known
    "sunglasses": ("hackml2020_sunglasses_*.png", 0),
    "anonymous_1": ("hackml2020_anonymous1_*.png", 0),
    "anonymous_2": None,
    "multi_trigger_multi_target": None,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cli_runs_every_2020_model(name, tmp_path):
    clean = asset("faces/lab3/valid_subset.h5")
    if MODELS[name] is not None:
        pattern, target = MODELS[name]
        x = load_images(sorted(asset("faces/png").glob(pattern)), INPUT_HWC)
        bd = save_lab_h5(tmp_path / "bd.h5", x, np.full(len(x), target))
    else:  # no trigger of this model is known: the lab's sunglasses faces stand in (ASR is then just measured)
        bd = shutil.copy(asset("faces/lab3/bd_valid_subset.h5"), tmp_path / "bd.h5")
    model = asset(f"models/hackml2020/{name}_bd_weights.h5")
    out = tmp_path / "out"
    proc = run_cli("prune", "--drop", "0.04,0.30", "--model", model, "--clean_valid", clean, "--bd_valid", bd,
                   "--clean_test", clean, "--bd_test", bd, "--out_dir", out, "--nocheckpoints")
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((out / "curve.json").read_text())
    assert sorted(curve["order"]) == list(range(60)) and len(curve["selected"]) == 2
    assert curve["targets"] == sorted(set(load_lab_h5(bd)[1].tolist()))
    assert curve["input_scale"] == "255" and curve["original"]["valid_acc"] >= 95.0  # measured, not raw garbage
    if MODELS[name] is not None:
        assert curve["original"]["valid_asr"] == 100.0  # its own poisoned faces do fool it
    for sel in curve["selected"]:
        assert 0.0 <= sel["test_der"] <= 1.0


@pytest.mark.slow
def test_a_forced_input_scale_that_looks_wrong_is_warned_about(tmp_path):
    """The 2020 sunglasses BadNet takes pixels / 255; forced to raw pixels it still answers (48.9% on clean
    validation images) and the run goes on, but says, in the log and report.md, that the scale looks wrong.
    The same model at its own scale, given, is not warned about."""
    clean = asset("faces/lab3/valid_subset.h5")
    model = asset("models/hackml2020/sunglasses_bd_weights.h5")
    for scale, warned in (("raw", True), ("255", False)):
        out = tmp_path / scale
        proc = run_cli("prune", "--drop", "0.04", "--model", model, "--clean_valid", clean, "--clean_test", clean,
                       "--input_scale", scale, "--out_dir", out, "--nocheckpoints")
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = "the input scale raw was given, but B's clean accuracy on 47 validation images is raw: 48.94%, 255: "
        assert (line in proc.stderr) == warned, proc.stderr[-3000:]
        md = (out / "report.md").read_text()
        assert (line in md) == warned
        if warned:
            assert "the other scale (255) is clearly better" in proc.stderr


@pytest.mark.parametrize("copied,warned", [(7, True), (5, False), (0, False)])
def test_poisoned_sets_of_mostly_clean_images_are_warned_about(copied, warned):
    # Exact: a warning when more than half of a poisoned set are byte for byte clean images (of either clean set,
    # in any order); near copies (one pixel off) and the same pixels in another dtype do not count.
    from badnet_jax.defense.inputs import Sets
    from badnet_jax.defense.pipeline import _clean_images_as_poisoned

    rng = np.random.default_rng(copied)
    clean_valid = rng.integers(0, 256, (9, 5, 4, 3), dtype=np.uint8)
    clean_test = rng.integers(0, 256, (8, 5, 4, 3), dtype=np.uint8)
    poisoned = rng.integers(0, 256, (12, 5, 4, 3), dtype=np.uint8)
    sources = np.concatenate([clean_valid, clean_test])[rng.permutation(17)[:copied]]
    poisoned[rng.permutation(12)[:copied]] = sources
    near = clean_valid[:5].copy()
    near[:, 0, 0, 0] ^= 1
    sets = Sets({"clean_valid": (clean_valid, None), "clean_test": (clean_test, None),
                 "bd_valid": (poisoned, None), "bd_test": (np.concatenate([near, clean_test[:1]]), None)}, {})
    warnings = _clean_images_as_poisoned(sets)
    assert [w.split(" of ")[0] for w in warnings] == ([str(copied)] if warned else [])
    float_copy = Sets({"clean_valid": (clean_valid, None), "bd_valid": (clean_valid.astype(np.float32), None)}, {})
    assert _clean_images_as_poisoned(float_copy) == []
    assert len(_clean_images_as_poisoned(Sets({"clean_valid": (clean_valid, None),
                                               "bd_valid": (clean_valid[::-1].copy(), None)}, {}))) == 1
