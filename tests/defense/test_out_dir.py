"""The defense's ``out_dir`` as users type it: every path the results cannot replace is refused before any
work, in one ``error:`` line naming it; a symbolic link to a folder is followed and stays a link; an unusable
``MPLBACKEND`` does not cost the run its results.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.cli import run_cli


def _refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--out_dir" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Ranked the 60 channels" not in proc.stderr  # before the sweep
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def _out_dir(tmp_path: Path, case: str) -> str | bytes:
    if case == "dot":
        return "."
    if case == "pwd":
        return str(tmp_path)
    if case == "parent of pwd":
        return str(tmp_path.parent)
    if case == "dangling link":
        os.symlink(tmp_path / "gone", tmp_path / "out")
        return "out"
    if case == "dangling link on the way":
        os.symlink(tmp_path / "gone", tmp_path / "via")
        return "via/out"
    if case == "name over 255 bytes":
        return "r" * 300
    if case == "name that fits only without the temporary names":
        return "r" * 250
    if case == "path over 4096 bytes":
        return "/".join(["d" * 200] * 21)
    if case == "not UTF-8":
        return os.fsdecode(b"out\xff")
    if case == "a folder of other files":
        (tmp_path / "out" / "drop_4").mkdir(parents=True)  # a result's name: not what is refused
        (tmp_path / "out" / "thesis.tex").write_text("months of work")
        return "out"
    raise AssertionError(case)


@pytest.mark.parametrize("case,words", [
    ("dot", ["--out_dir .:", "is the current working folder"]),
    ("pwd", ["is the current working folder"]),
    ("parent of pwd", ["holds the current working folder"]),
    ("dangling link", ["--out_dir out:", "dangling symbolic link", "gone"]),
    ("dangling link on the way", ["via", "dangling symbolic link"]),
    ("name over 255 bytes", ["300 bytes long", "at most 255 bytes"]),
    ("name that fits only without the temporary names", ["250 bytes long", "at most 233 bytes"]),
    ("path over 4096 bytes", ["bytes long", "at most 4096"]),
    ("not UTF-8", ["out\\xff", "not UTF-8"]),
    ("a folder of other files", ["--out_dir out:", "not badnet-jax results (thesis.tex)", "new or empty folder"]),
])
def test_an_out_dir_the_results_cannot_replace_is_refused_up_front(tmp_path, case, words):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("prune", "--drop", "0.04", "--out_dir", _out_dir(work, case), cwd=work)
    _refused(proc, *words)
    if case == "a folder of other files":  # left as it was
        assert sorted(p.name for p in (work / "out").iterdir()) == ["drop_4", "thesis.tex"]
        assert (work / "out" / "thesis.tex").read_text() == "months of work"
        assert not any((work / "out" / "drop_4").iterdir())
        (work / "out" / "drop_4").rmdir()
        (work / "out" / "thesis.tex").unlink()
        (work / "out").rmdir()
    assert sorted(p.name for p in work.iterdir()) == sorted(
        p.name for p in work.iterdir() if p.is_symlink())  # nothing written (the links are the test's own)


@pytest.mark.slow
def test_a_symlinked_out_dir_stays_a_link_and_a_broken_mplbackend_costs_nothing(tmp_path):
    real = tmp_path / "store" / "results"
    real.mkdir(parents=True)
    (tmp_path / "work").mkdir()
    link = tmp_path / "work" / "results"
    os.symlink(real, link)
    env = {**os.environ, "MPLBACKEND": "invalid"}
    for run in range(2):  # the second run replaces the first one's results through the same link
        proc = run_cli("prune", "--drop", "0.04", "--rank_by", "activation,l1", "--nocheckpoints",
                       "--out_dir", "results", cwd=tmp_path / "work", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.path.islink(link) and os.readlink(link) == str(real)
        assert {p.name for p in real.iterdir()} == {"curve.json", "curve.csv", "report.md", "curve.png",
                                                   "rankings.png"}
        assert (real / "rankings.png").read_bytes()[:4] == b"\x89PNG"
        assert "activation, l1 (of conv_3's kernel); the first one's" in (real / "report.md").read_text()
        assert "Wrote results (curve.csv, curve.json, curve.png, rankings.png, report.md) in" in proc.stderr
        assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["results"]  # no .results.old.* left
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["results"]
