"""badnet-prune (scripts/prune.py, badnet_jax.commands.prune): flags checked before any work, one error line and
exit 2 for what is refused (an input file that cannot be read: named by its flag), README's quickstart on the
embedded demo, and signals that end a run with the previous results intact. The defense's results themselves:
tests/defense/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from badnet_jax import load_lab_h5, save_lab_h5
from badnet_jax.commands import processes
from tests.cli import run_cli, start_cli
from tests.conftest import LAB_B, asset, asset_path, require_assets


@pytest.mark.parametrize("args,complaint", [
    (["--drop", "4"], "did you mean 0.04 (4 points)?"),
    (["--drop", "nan"], "is not a finite number"),
    (["--drop", "0.04,0.04"], "is given twice"),
    (["--drop", "0.04", "stray"], "unexpected arguments 'stray'"),
    (["--memory_budget", "nan"], "is not a finite number"),
    (["--devices", "99"], "--devices 99: asked for 99 devices"),
    (["--rank_by", "activation,magic"], "unknown ranking 'magic'"),
    (["--order_file", "nowhere.txt"], "--order_file nowhere.txt: order file not found"),
])
def test_prune_refuses_before_any_work(args, complaint, tmp_path):
    proc = run_cli("prune", *args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert complaint in proc.stderr and "Traceback" not in proc.stderr
    assert "Ranked" not in proc.stderr  # no sweep ran
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_relative_rule_says_relative_in_the_table_and_the_report(tmp_path):
    files = {"--clean_valid": "valid_subset", "--bd_valid": "bd_valid_subset", "--clean_test": "test_subset",
             "--bd_test": "bd_test_subset"}
    args = [a for flag, name in files.items() for a in (flag, str(asset(f"faces/lab3/{name}.h5")))]
    (tmp_path / "mine.txt").write_text(" ".join(map(str, range(59, -1, -1))))
    proc = run_cli("prune", "--drop", "0.1", "--rule", "relative", "--nocheckpoints", "--model",
                   asset("models/lab3/bd_weights.h5"), *args, "--out_dir", tmp_path / "o", "--rank_by", "activation,l1",
                   "--order_file", tmp_path / "mine.txt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].lstrip().startswith("X (% of B's acc)")
    compared = proc.stdout.split("Rankings compared")[1].splitlines()
    assert [line.split()[0] for line in compared[3:6]] == ["activation", "l1", "order_file"], compared
    rankings = json.loads((tmp_path / "o" / "curve.json").read_text())["rankings"]
    assert rankings["order_file"]["order"] == list(range(59, -1, -1))
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Stop rule: relative (first k with validation accuracy more than X percent of B's" in md
    assert "| X (% of B's acc) |" in md and "X (pts)" not in md
    assert json.loads((tmp_path / "o" / "curve.json").read_text())["rule"] == "relative"


def _check_the_time_accounted(stderr: str, wall: float) -> None:
    """The last line counts the whole process, start-up included: it covers the phases the run logs, and all of
    the wall time the test measured but the moment the table takes to print (start-up alone is longer)."""
    phases = [float(m) for m in re.findall(r"(?:Loaded the model and data in|on all sets in one call:|\) in) "
                                           r"([0-9.]+) s", stderr)]
    assert len(phases) == 3, stderr
    done = re.search(r"Done in ([0-9.]+) s since the process started, of which ([0-9.]+) s before the run", stderr)
    assert done is not None, stderr
    total, before = float(done[1]), float(done[2])
    assert 0 < before and before + sum(phases) <= total <= wall + 0.02  # /proc counts in 10 ms ticks
    assert wall - total < before, (wall, total, before)


@pytest.mark.slow
def test_quickstart_runs_on_embedded_demo_without_lab_files(tmp_path):
    """README's first quickstart command, from a directory without the lab's files."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    t = time.perf_counter()
    proc = run_cli("prune", "--drop", "0.04", cwd=tmp_path, env=env)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    _check_the_time_accounted(proc.stderr, wall)
    first_lines = proc.stderr.strip().splitlines()[:3]
    assert any("running on the embedded demo" in line for line in first_lines), first_lines
    # One CPU device per core the process may use, the images sharded over them all.
    assert f"{processes.cpu_cores()} cpu device(s)" in proc.stderr
    curve = json.loads((tmp_path / "results" / "curve.json").read_text())
    assert curve["demo"] is True and curve["num_classes"] == 200
    sel = curve["selected"][0]
    assert sel["crossed"] and curve["valid_acc"][0] - sel["valid_acc"] > 4.0
    assert curve["valid_acc"][sel["channels_pruned"] - 1] >= curve["valid_acc"][0] - 4.0  # the first crossing
    for name in ("report.md", "curve.png", "drop_4/b_prime.h5", "drop_4/b_prime_ckpt", "drop_4/goodnet_ckpt"):
        assert (tmp_path / "results" / name).exists(), name


@pytest.mark.slow  # two runs, and the native kernels built again for the run's own cache folder
def test_a_second_run_loads_the_programs_the_first_compiled(tmp_path):
    """The demo twice with one cache folder: the first run keeps its compiled sweep (a program that compiles for
    a second or more) in the folder, the second loads it, compiles nothing new and gives the same curve."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "BADNET_JAX_XLA_CACHE")}
    env["BADNET_JAX_CACHE"] = str(tmp_path / "cache")
    kept, curves = [], []
    for run in ("first", "second"):
        proc = run_cli("prune", "--drop", "0.04", "--nocheckpoints", "--out_dir", tmp_path / run, cwd=tmp_path,
                       env=env)
        assert proc.returncode == 0, proc.stderr
        kept.append(sorted(f.name for f in (tmp_path / "cache" / "xla").rglob("*") if f.is_file()))
        curves.append((tmp_path / run / "curve.csv").read_bytes())
    assert any(name.startswith("jit_rank_and_sweep") for name in kept[0]), kept[0]
    assert kept[1] == kept[0] and curves[1] == curves[0]


def test_cli_refuses_a_nan_learning_rate_before_any_work(tmp_path):
    proc = run_cli("prune", "--finetune_epochs", "2", "--finetune_lr", "nan", "--model",
                   str(asset("models/lab3/bd_weights.h5")), "--clean_valid", str(asset("faces/lab3/valid_subset.h5")),
                   "--clean_test", str(asset("faces/lab3/test_subset.h5")), "--out_dir", str(tmp_path / "o"),
                   timeout=300)
    assert proc.returncode == 2 and "--finetune_lr nan is not a finite positive number" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_run_keeps_previous_results(lab_dir, sig):
    first = run_cli("prune", "--drop", "0.04", cwd=lab_dir)
    assert first.returncode == 0, first.stderr
    out = lab_dir / "results"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A larger validation set keeps the second run in its sweep long enough to be interrupted there.
    x, y = load_lab_h5(lab_dir / "data/cl/valid.h5")
    save_lab_h5(lab_dir / "data/cl/valid.h5", np.repeat(x, 200, axis=0), np.repeat(y, 200))
    proc = start_cli("prune", "--drop", "0.04", cwd=lab_dir)
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


@pytest.mark.slow
def test_a_signal_after_the_curve_leaves_one_whole_result_and_ends_non_zero(lab_dir):
    """Signals while the results are written (0.2-1.5 s after the curve): never a mix of two runs' files."""
    first = run_cli("prune", "--drop", "0.02,0.30", cwd=lab_dir)
    assert first.returncode == 0, first.stderr
    out = lab_dir / "results"
    for sig, delay, drop in (("SIGINT", 0.2, "0.04"), ("SIGTERM", 0.7, "0.1"), ("SIGINT", 1.5, "0.04")):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        proc = start_cli("prune", "--drop", drop, cwd=lab_dir)
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
            assert {p.name for p in out.iterdir()} == {"curve.json", "curve.csv", "report.md", "curve.png", folder}
        assert not [p for p in lab_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_the_lab_layout_takes_a_full_model_bd_net_h5_first(lab_dir):
    """README's lab layout: ``models/bd_net.h5`` (a full Keras model, as the lab ships B) is the model a run
    in that folder takes without flags, before ``models/bd_weights.h5``; the cuts are B's either way."""
    from badnet_jax.io.keras import load_keras, save_keras

    weights = lab_dir / "models" / "bd_weights.h5"
    _, params = load_keras(weights)
    full = save_keras(params, lab_dir / "models" / "bd_net.h5", full_model=True)
    proc = run_cli("prune", "--drop", "0.04,0.30", "--nocheckpoints", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    curve = json.loads((lab_dir / "results" / "curve.json").read_text())
    assert curve["inputs"]["model"]["path"] == "models/bd_net.h5"
    assert curve["inputs"]["model"]["sha256"] == hashlib.sha256(full.read_bytes()).hexdigest()
    full.unlink()
    proc = run_cli("prune", "--drop", "0.04,0.30", "--nocheckpoints", "--out_dir", "from_weights", cwd=lab_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = json.loads((lab_dir / "from_weights" / "curve.json").read_text())
    assert other["inputs"]["model"]["path"] == "models/bd_weights.h5"
    assert [c["channels_pruned"] for c in other["selected"]] == [c["channels_pruned"] for c in curve["selected"]]
    assert other["valid_acc"] == curve["valid_acc"] and other["order"] == curve["order"]


def _lab_files(**given) -> list:
    files = {"--model": asset(LAB_B), "--clean_valid": asset("faces/lab3/valid_subset.h5"),
             "--clean_test": asset("faces/lab3/test_subset.h5"), **given}
    return [a for kv in files.items() for a in kv]


def _rankings_run(tmp_path, name: str, seed: int) -> tuple[dict, str]:
    given = _lab_files(**{"--bd_valid": asset("faces/lab3/bd_valid_subset.h5"),
                          "--bd_test": asset("faces/lab3/bd_test_subset.h5")})
    proc = run_cli("prune", *given, "--drop", "0.04,0.30", "--rank_by", "activation,random,anp", "--random_orders",
                   "3", "--seed", str(seed), "--anp_steps", "4", "--nocheckpoints", "--out_dir", tmp_path / name,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((tmp_path / name / "curve.json").read_text()), (tmp_path / name / "report.md").read_text()


@pytest.mark.slow
def test_random_and_anp_rankings_from_the_command_line(tmp_path):
    """README's ``--rank_by ...,random,anp`` with ``--random_orders``, ``--seed`` and ``--anp_steps``: R seeded
    orders (the same for the same seed, others for another), one ANP order, and report.md's rows for random as
    mean [min, max] over its orders, computed here from curve.json's per-order cuts."""
    curve, report = _rankings_run(tmp_path, "a", seed=7)
    assert curve["rank_by"] == ["activation", "random", "anp"]
    random_orders, anp_order = curve["rankings"]["random"]["order"], curve["rankings"]["anp"]["order"]
    assert len(random_orders) == 3 and len({tuple(o) for o in random_orders}) == 3
    assert all(sorted(o) == list(range(60)) for o in [*random_orders, anp_order])
    for j, cut in enumerate(curve["rankings"]["random"]["selected"]):
        acc = cut["valid_acc"]
        ks = [float(k) for k in cut["channels_pruned"]]
        row = (f"| random (R=3) | {np.mean(ks):.1f} [{min(ks):.1f}, {max(ks):.1f}] | "
               f"{np.mean(acc):.2f} [{min(acc):.2f}, {max(acc):.2f}] |")
        assert row in report, (j, row)
        for valid, k, a in zip(curve["rankings"]["random"]["valid_acc"], cut["channels_pruned"], acc):
            # each order's own cut: the first k more than X points below its k = 0 (the last k if none)
            below = [i for i, v in enumerate(valid) if valid[0] - v > 100 * cut["drop"] + 1e-9]
            assert k == (below[0] if below else 60) and valid[k] == a
    again, _ = _rankings_run(tmp_path, "b", seed=7)
    other, _ = _rankings_run(tmp_path, "c", seed=8)
    assert again["rankings"] == curve["rankings"]
    assert other["rankings"]["random"]["order"] != random_orders
    assert other["rankings"]["activation"] == curve["rankings"]["activation"]


@pytest.mark.parametrize("args,complaint", [
    (["--chunk", "0"], "error: --chunk 0 must be >= 1"),
    (["--devices", "-1"], "error: --devices -1 must be >= 0 (0 = all)"),
    (["--memory_budget", "-1"], "error: --memory_budget -1.0 must be a positive number of GiB"),
    (["--memory_budget", "0.001"], "error: the data needs about"),
    (["--finetune_lr", "1e-3"],
     "error: --finetune_lr 0.001 needs --finetune_epochs > 0: without it no fine-tuning runs"),
])
def test_sweep_settings_out_of_range_are_refused_naming_the_flag(args, complaint, tmp_path):
    """Refused before anything is read (no log line comes first), except a budget too small for the data,
    which needs the data's size; each says the flag, and the budget in the unit the flag takes."""
    proc = run_cli("prune", *args, "--out_dir", "o", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(complaint), proc.stderr[-2000:]
    if "needs about" in complaint:
        assert lines[-1].endswith("GiB resident but the memory budget is 0.001 GiB; raise --memory_budget or use "
                                  "fewer images")
    else:
        assert len(lines) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("given,complaint", [
    ({"--model": "bd_weight.h5"}, "error: --model bd_weight.h5: file not found"),
    ({"--clean_test": asset_path("triggers/sun_glass_trigger.png")},
     f"error: --clean_test {asset_path('triggers/sun_glass_trigger.png')}: is not an HDF5 file"),
    ({"--clean_valid": asset_path("faces/lab3")}, f"error: --clean_valid {asset_path('faces/lab3')}: is a folder"),
    ({"--bd_valid": "bd_valid.h5"}, "error: data files not found: --bd_valid (bd_valid.h5)"),
    ({"--clean_valid": "empty.h5"}, "error: --clean_valid empty.h5: holds no images (its 'data' has 0 rows)"),
])
def test_an_input_file_that_cannot_be_read_names_its_flag_and_nothing_else_first(given, complaint, tmp_path):
    """Of the five files a run reads, the error says which flag gave the one at fault; no note about the
    poisoned sets not given comes before or after an error about the files that were (the images load in
    another thread, which goes on reading while the error is reported)."""
    require_assets(*given.values())
    save_lab_h5(tmp_path / "empty.h5", np.zeros((0, 55, 47, 3), np.uint8), np.zeros(0))
    proc = run_cli("prune", *_lab_files(**{k: str(v) for k, v in given.items()}), "--out_dir", "o", cwd=tmp_path,
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(complaint), proc.stderr[-2000:]
    assert "No poisoned data given" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_progress_on_request_shows_the_sweep_and_changes_no_result(tmp_path):
    """``--progress`` shows the sweep's progress on stderr even when it is not a terminal; the curve is the one
    a run without it writes."""
    shown = run_cli("prune", "--drop", "0.04", "--nocheckpoints", "--progress", "--out_dir", "a", cwd=tmp_path)
    quiet = run_cli("prune", "--drop", "0.04", "--nocheckpoints", "--out_dir", "b", cwd=tmp_path)
    assert shown.returncode == 0 and quiet.returncode == 0, shown.stderr[-2000:] + quiet.stderr[-2000:]
    progress = lambda proc: [line for line in proc.stderr.splitlines() if line.startswith("sweep ") and "chunk" in line]
    assert len(progress(shown)) >= 5
    assert not progress(quiet)  # stderr is a pipe here: off by default
    a, b = (json.loads((tmp_path / d / "curve.json").read_text()) for d in ("a", "b"))
    a.pop("inputs"), b.pop("inputs")
    assert a == b


@pytest.mark.slow
def test_progress_is_on_by_default_when_stderr_is_a_terminal(tmp_path):
    """README: ``--progress`` defaults to on where stderr is a terminal; here a real pseudo-terminal."""
    import pty
    import subprocess

    from tests.cli import cli_argv

    main, follower = pty.openpty()
    proc = subprocess.Popen(cli_argv("prune", "--drop", "0.04", "--nocheckpoints", "--out_dir", "a"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the process closed the terminal's last handle
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(timeout=300) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert re.search(r"sweep +\d+%.*chunk", shown), shown[-2000:]
    assert (tmp_path / "a" / "curve.json").exists()
