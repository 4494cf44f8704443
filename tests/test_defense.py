"""The defense end to end: the CLI on small lab-layout files, every output checked, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from badnet_jax import ConfigError, DataFileError, load_keras, load_lab_h5, mask_from_zeroed
from badnet_jax.io import checkpoint
from badnet_jax.defense import report
from badnet_jax.defense.curve import Curve
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from badnet_jax.sweep import SweepOptions
from tests import numpy_ref
from tests.conftest import LAB_B, REPO, asset

FACES = {"data/cl/valid.h5": "faces/lab3/valid_subset.h5", "data/bd/bd_valid.h5": "faces/lab3/bd_valid_subset.h5",
         "data/cl/test.h5": "faces/lab3/test_subset.h5", "data/bd/bd_test.h5": "faces/lab3/bd_test_subset.h5"}


@pytest.fixture
def lab_dir(tmp_path):
    """A directory in the lab's layout (models/, data/cl, data/bd) holding the real B and real faces."""
    (tmp_path / "models").mkdir()
    shutil.copy(asset(LAB_B), tmp_path / "models" / "bd_weights.h5")
    for dst, src in FACES.items():
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(asset(src), tmp_path / dst)
    return tmp_path


def test_cli_end_to_end_on_lab_layout(lab_dir):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.02,0.30"],
                          cwd=lab_dir, capture_output=True, text=True, timeout=600)
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
    files = {role: str(lab_dir / path) for role, path in zip(
        ("clean_valid", "bd_valid", "clean_test", "bd_test"), FACES)}
    run_defense(DefenseConfig(drops=(0.04,), model=str(lab_dir / "models" / "bd_weights.h5"),
                              out_dir=str(tmp_path / "o"), checkpoints=False, sweep=SweepOptions(chunk=24), **files))
    assert [f for f in backend_compiles if "_rank_and_sweep" in f] == ["jit(_rank_and_sweep)"]
    md = (tmp_path / "o" / "report.md").read_text()
    assert "compile (after load)" in md and "curve (one call)" in md


def test_some_but_not_all_data_files_is_an_error(lab_dir, tmp_path):
    with pytest.raises(ConfigError, match="missing --clean_test"):
        run_defense(DefenseConfig(clean_valid=str(lab_dir / "data/cl/valid.h5"), out_dir=str(tmp_path / "o")))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--bd_valid", "x.h5"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: give the clean sets --clean_valid and --clean_test" in proc.stderr
    assert "missing --clean_valid, --clean_test" in proc.stderr


def test_failing_run_leaves_no_files(lab_dir, monkeypatch):
    bad = lab_dir / "data/cl/test.h5"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated test set: found only after the sweep's inputs load
    out = lab_dir / "out"
    with pytest.raises(DataFileError, match="test.h5"):
        run_defense(DefenseConfig(model=str(lab_dir / "models/bd_weights.h5"), out_dir=str(out),
                                  **{r: str(lab_dir / p) for r, p in zip(
                                      ("clean_valid", "bd_valid", "clean_test", "bd_test"), FACES)}))
    assert not out.exists() or not any(out.rglob("*"))


def _flat_curve() -> Curve:
    ones = np.ones(61)
    return Curve(title="t", num_classes=3, input_scale="raw", rule="absolute", demo=False, order=np.arange(60),
                 mean_activation=np.zeros(60), counts={}, valid_acc=ones, valid_asr=ones, test_acc=ones,
                 test_asr=ones, goodnet_test_acc=ones, goodnet_test_asr=ones, goodnet_detection_rate=ones,
                 goodnet_false_alarm_rate=ones, test_der=ones, targets=(0,))


def test_curve_json_round_trips(lab_dir):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04,0.30",
                           "--nocheckpoints"], cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    path = lab_dir / "results" / "curve.json"
    assert report.curve_json_text(report.read_curve_json(path)) == path.read_text()
    assert report.curve_json_text(_flat_curve()) == report.curve_json_text(
        Curve.from_json(json.loads(report.curve_json_text(_flat_curve()))))


def test_interrupted_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    curve = _flat_curve()
    report.write_curve_json(tmp_path / "curve.json", curve)
    before = (tmp_path / "curve.json").read_bytes()
    import matplotlib.figure

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(KeyboardInterrupt):
        report.plot_curve(tmp_path / "curve.png", curve)
    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        report.write_curve_json(tmp_path / "curve.json", curve)
    assert (tmp_path / "curve.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.json"]


def test_quickstart_runs_on_embedded_demo_without_lab_files(tmp_path):
    """README's first quickstart command, from a directory without the lab's files."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    first_lines = proc.stderr.strip().splitlines()[:3]
    assert any("running on the embedded demo" in line for line in first_lines), first_lines
    curve = json.loads((tmp_path / "results" / "curve.json").read_text())
    assert curve["demo"] is True and curve["num_classes"] == 200
    sel = curve["selected"][0]
    assert sel["crossed"] and curve["valid_acc"][0] - sel["valid_acc"] > 4.0
    assert curve["valid_acc"][sel["channels_pruned"] - 1] >= curve["valid_acc"][0] - 4.0  # the first crossing
    for name in ("report.md", "curve.png", "drop_4/b_prime.h5", "drop_4/b_prime_ckpt", "drop_4/goodnet_ckpt"):
        assert (tmp_path / "results" / name).exists(), name


def test_cli_finetune_adds_fine_pruned_models(lab_dir):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.30",
                           "--finetune_epochs", "2", "--finetune_lr", "1e-3"],
                          cwd=lab_dir, capture_output=True, text=True, timeout=600)
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


def test_rerun_gives_byte_identical_curve_json(lab_dir):
    def run():
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04",
                               "--finetune_epochs", "1", "--nocheckpoints"],
                              cwd=lab_dir, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return (lab_dir / "results" / "curve.json").read_bytes(), (lab_dir / "results" / "curve.png").read_bytes()

    (a, png_a), (b, png_b) = run(), run()
    assert a == b  # timings live in report.md, so identical runs write identical bytes
    assert png_a == png_b


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_run_keeps_previous_results(lab_dir, sig):
    import signal
    import time

    script = [sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04"]
    first = subprocess.run(script, cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    out = lab_dir / "results"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A larger validation set keeps the second run in its sweep long enough to be interrupted there.
    x, y = load_lab_h5(lab_dir / "data/cl/valid.h5")
    from badnet_jax import save_lab_h5

    save_lab_h5(lab_dir / "data/cl/valid.h5", np.repeat(x, 200, axis=0), np.repeat(y, 200))
    proc = subprocess.Popen(script, cwd=lab_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    for line in proc.stderr:  # wait until the sweep has started
        if "Model:" in line or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # previous results intact, byte for byte, and nothing added
    assert not [p for p in lab_dir.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_dir_interrupted_keeps_old_directory(tmp_path):
    from badnet_jax.io.fileio import atomic_dir

    target = tmp_path / "ckpt"
    atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("old")))

    def half_written(d):
        d.mkdir()
        (d / "a").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(target, half_written)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


KILLED_WRITER = r"""
import os, signal, sys, time
from pathlib import Path
from badnet_jax.io.fileio import atomic_dir
target, stage = Path(sys.argv[1]), sys.argv[2]

def write(d):
    d.mkdir()
    (d / "a").write_text("new")
    if stage == "writing":
        print("ready", flush=True)
        time.sleep(600)

if stage == "swapping":  # killed after moving the earlier results aside, before moving the new ones in
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if ".old." in str(dst):
            print("ready", flush=True)
            time.sleep(600)
    os.replace = replace
atomic_dir(target, write)
"""


@pytest.mark.parametrize("stage", ["writing", "swapping"])
def test_what_a_sigkilled_run_left_is_cleaned_up_by_the_next(stage, tmp_path):
    """SIGKILL cannot be caught: the next run removes the killed one's temporary folder, and puts the earlier
    results back if the killed run had moved them aside."""
    import signal

    from badnet_jax.io.fileio import atomic_dir

    target = tmp_path / "results"
    atomic_dir(target, lambda d: (d.mkdir(), (d / "a").write_text("old")))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), stage], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and (stage == "writing") == ("results" in left), left  # the mess a kill leaves
    alive = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "other"), "writing"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)  # a live run beside it is left alone
    assert alive.stdout.readline().strip() == "ready"
    try:
        seen = []
        atomic_dir(target, lambda d: (seen.append((target / "a").read_text()), d.mkdir(), (d / "a").write_text("next")))
        assert seen == ["old"]  # the earlier results were back in place before the new run wrote
        assert (target / "a").read_text() == "next"
        assert sorted(p.name for p in tmp_path.iterdir() if "other" not in p.name) == ["results"]
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".other.")]  # the live run's temp folder
    finally:
        alive.kill()
        alive.wait(timeout=60)


def test_memory_budget_through_the_cli_changes_only_the_chunking(lab_dir):
    # Through the CLI (the budget arithmetic itself: tests/test_sweep.py): a tight budget still gives the same curve (only the chunking changes).
    runs = {}
    for name, budget in (("roomy", "4"), ("tight", "0.05")):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04", "--nocheckpoints",
                               "--memory_budget", budget, "--out_dir", name], cwd=lab_dir, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads((lab_dir / name / "curve.json").read_text())
        assert ("Memory budget:" in proc.stderr) == (name == "tight")
    assert runs["tight"] == runs["roomy"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--memory_budget", "0.001"],
                          cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "memory budget" in proc.stderr


def test_a_defender_without_poisoned_data_gets_the_same_cut_and_models(lab_dir):
    """The ranking and the cut need clean validation data only: the same cut, B' and G as with poisoned data."""
    with_bd = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04,0.30",
                              "--out_dir", "with"], cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert with_bd.returncode == 0, with_bd.stderr
    for f in ("data/bd/bd_valid.h5", "data/bd/bd_test.h5"):
        (lab_dir / f).unlink()  # the lab layout without its poisoned sets
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04,0.30",
                           "--out_dir", "without"], cwd=lab_dir, capture_output=True, text=True, timeout=600)
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


def test_a_rerun_with_fewer_drops_leaves_no_stale_folders_and_odd_poisoned_data_is_flagged(lab_dir):
    first = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.02,0.04"],
                           cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert {p.name for p in (lab_dir / "results").glob("drop_*")} == {"drop_2", "drop_4"}
    # "Poisoned" sets labelled with the true classes instead of the target: B's ASR is then near 0.
    x, _ = load_lab_h5(lab_dir / "data/bd/bd_test.h5")
    _, y_true = load_lab_h5(lab_dir / "data/cl/test.h5")
    from badnet_jax import save_lab_h5

    save_lab_h5(lab_dir / "data/bd/bd_test.h5", x, y_true)
    second = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.04"],
                            cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert {p.name for p in (lab_dir / "results").glob("drop_*")} == {"drop_4"}  # drop_2 went with the old run
    assert [s["drop"] for s in json.loads((lab_dir / "results" / "curve.json").read_text())["selected"]] == [0.04]
    assert "B's attack success rate on --bd_test is only 0.00%" in second.stderr
    assert "attack success rate on --bd_valid" not in second.stderr


def test_a_signal_after_the_curve_leaves_one_whole_result_and_ends_non_zero(lab_dir):
    """Signals while the results are written (0.2-1.5 s after the curve): never a mix of two runs' files."""
    import signal
    import time

    first = subprocess.run([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", "0.02,0.30"],
                           cwd=lab_dir, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    out = lab_dir / "results"
    for sig, delay, drop in (("SIGINT", 0.2, "0.04"), ("SIGTERM", 0.7, "0.1"), ("SIGINT", 1.5, "0.04")):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "prune.py"), "--drop", drop], cwd=lab_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if "Ranked the 60 channels" in line:
                break
        time.sleep(delay)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=300)
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        # 130 from our handler; once the interpreter is exiting the signal may kill with its own code; 0 if it
        # came after the exit.
        assert proc.returncode in (130, 0, -getattr(signal, sig)), err[-2000:]
        if after != before:  # not the earlier results byte for byte: then this run's, whole
            folder = f"drop_{100 * float(drop):g}"
            curve = json.loads((out / "curve.json").read_text())
            assert [s["drop"] for s in curve["selected"]] == [float(drop)]
            assert {p.name for p in out.iterdir()} == {"curve.json", "report.md", "curve.png", folder}
        assert not [p for p in lab_dir.rglob("*") if p.name.endswith(".tmp")]
