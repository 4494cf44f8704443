"""What every command-line tool shares (badnet_jax/commands/cli.py) and the checks made before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from badnet_jax import ConfigError

from badnet_jax.commands import cli
from badnet_jax.defense.curve import check_drops
from tests.conftest import REPO, asset

PRUNE = [sys.executable, str(REPO / "scripts" / "prune.py")]


@pytest.mark.parametrize("drops,complaint", [
    ((4.0,), "did you mean 0.04 (4 points)?"),
    ((0.0,), "not a fraction between 0 and 1"),
    ((-0.1,), "not a fraction between 0 and 1"),
    ((1.0,), "did you mean 0.01 (1 points)?"),
    ((float("nan"),), "not a finite number"),
    ((float("inf"),), "not a finite number"),
    ((0.04, 0.04), "is given twice"),
    ((0.041, 0.0410000001), "would share drop_4.1/"),
    ((), "no drop threshold given"),
])
def test_drops_are_checked(drops, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        check_drops(drops)


def test_good_drops_pass():
    assert check_drops((0.02, 0.04, 0.1, 0.3)) == (0.02, 0.04, 0.1, 0.3)


def test_parse_floats_and_ints():
    assert cli.parse_floats("drop", "0.02, 0.04,") == (0.02, 0.04)
    with pytest.raises(ConfigError, match="not a finite number"):
        cli.parse_floats("drop", "0.02,nan")
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        cli.parse_floats("drop", "0.02;0.04")
    assert cli.parse_ints("scaling", "1,2,4") == (1, 2, 4)
    with pytest.raises(ConfigError, match="comma-separated integers"):
        cli.parse_ints("scaling", "1,x")


@pytest.mark.parametrize("args,complaint", [
    (["--drop", "4"], "did you mean 0.04 (4 points)?"),
    (["--drop", "nan"], "is not a finite number"),
    (["--drop", "0.04,0.04"], "is given twice"),
    (["--drop", "0.04", "stray"], "unexpected arguments 'stray'"),
    (["--memory_budget", "nan"], "is not a finite number"),
    (["--devices", "99"], "asked for 99 devices"),
    (["--rank_by", "activation,magic"], "unknown ranking 'magic'"),
    (["--order_file", "nowhere.txt"], "--order_file nowhere.txt: order file not found"),
])
def test_prune_refuses_before_any_work(args, complaint, tmp_path):
    proc = subprocess.run(PRUNE + args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert complaint in proc.stderr and "Traceback" not in proc.stderr
    assert "Ranked" not in proc.stderr  # no sweep ran
    assert not (tmp_path / "results").exists()


def test_relative_rule_says_relative_in_the_table_and_the_report(tmp_path):
    files = {"--clean_valid": "valid_subset", "--bd_valid": "bd_valid_subset", "--clean_test": "test_subset",
             "--bd_test": "bd_test_subset"}
    args = [a for flag, name in files.items() for a in (flag, str(asset(f"faces/lab3/{name}.h5")))]
    (tmp_path / "mine.txt").write_text(" ".join(map(str, range(59, -1, -1))))
    proc = subprocess.run(PRUNE + ["--drop", "0.1", "--rule", "relative", "--nocheckpoints", "--model",
                                   str(asset("models/lab3/bd_weights.h5")), *args, "--out_dir", str(tmp_path / "o"),
                                   "--rank_by", "activation,l1", "--order_file", str(tmp_path / "mine.txt")],
                          capture_output=True, text=True, timeout=600)
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


def test_console_entry_points_work_outside_the_repository(tmp_path):
    """pip install puts badnet-prune/-screen/-poison/-bench on the PATH; they run from any folder."""
    import shutil
    import sysconfig

    found = {n: shutil.which(n, path=sysconfig.get_path("scripts")) or shutil.which(n)
             for n in ("badnet-prune", "badnet-screen", "badnet-poison", "badnet-bench")}
    assert all(found.values()), found
    proc = subprocess.run([found["badnet-prune"], "--drop", "4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "did you mean 0.04" in proc.stderr
    proc = subprocess.run([found["badnet-poison"], "--source", str(asset("faces/lab3/test_subset.h5")),
                           "--trigger", str(asset("triggers/sun_glass_trigger.png")), "--target", "0",
                           "--out", "bd.h5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "bd.h5").is_file(), proc.stderr
    proc = subprocess.run([found["badnet-screen"], str(tmp_path / "bd.h5"), "--model",
                           str(asset("models/lab3/bd_weights.h5")), "--pruned",
                           str(asset("models/lab3_repaired/full_model_drop30.h5"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 13, proc.stderr


_SWALLOWED = """
import gc, os, signal, sys
from pathlib import Path
from badnet_jax.commands import cli
from badnet_jax.io import fileio

out = Path(sys.argv[1])

class Collected:  # a signal that lands in a __del__ run by the garbage collector is only printed by Python
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)

def main():
    a, b = Collected(), Collected()
    a.other, b.other = b, a  # a cycle: only gc.collect() runs the __del__
    del a, b
    gc.collect()
    fileio.atomic_write_text(out, "new")  # the results of a run that was interrupted: never swapped in
    return 0

sys.exit(cli.run(main))
"""


_CONVERTED = """
import os, signal, sys, time
from badnet_jax.commands import cli

def main():
    try:  # a real signal, turned into another error on its way up, as a C extension's init does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except KeyboardInterrupt:
        raise ImportError("initialization failed")
    return 0

sys.exit(cli.run(main, "interrupted: nothing written"))
"""


def test_a_signal_that_comes_up_as_another_error_still_ends_as_an_interrupt():
    """Seen in CI: SIGINT during matplotlib's import surfaced as 'ImportError: initialization failed' and the
    interpreter then died in teardown; an error after a noted signal must end like the interrupt, 130."""
    proc = subprocess.run([sys.executable, "-c", _CONVERTED], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted: nothing written"
    ok = subprocess.run([sys.executable, "-c", _CONVERTED.replace("os.kill(os.getpid(), signal.SIGTERM)", "pass")
                         .replace("time.sleep(5)", "raise KeyboardInterrupt")], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode != 130 and "ImportError: initialization failed" in ok.stderr  # no signal: a real error


def test_a_signal_swallowed_in_a_garbage_collection_callback_still_stops_the_run(tmp_path):
    """Python only prints a KeyboardInterrupt raised inside a __del__; the run must still not swap results in,
    and must end 130, not 0."""
    out = tmp_path / "result.txt"
    out.write_text("earlier")
    proc = subprocess.run([sys.executable, "-c", _SWALLOWED, str(out)], capture_output=True, text=True, timeout=120)
    assert "KeyboardInterrupt" in proc.stderr  # the interrupt was indeed swallowed (printed, not raised)
    assert proc.returncode == 130, proc.stderr
    assert out.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["result.txt"]
