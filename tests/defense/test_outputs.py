"""badnet_jax.defense.outputs on a full disk, met for real: a small tmpfs mounted in a private mount namespace
(``unshare``).

Up front, ``run_defense`` refuses an ``--out_dir`` whose file system has less room than the results need,
before any sweep. If the disk fills anyway (another writer), whichever writer meets ENOSPC first (the
in-memory-built h5, orbax/tensorstore, the plot, the JSON), the run ends with one ``error:`` line, no
traceback, and the earlier results byte-identical with nothing left beside them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli import cli_argv
from tests.conftest import GOLDEN

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) to mount a small tmpfs")


def _in_small_fs(tmp_path: Path, size: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` with a fresh tmpfs of ``size`` mounted at ``tmp_path/fs`` (seen by that process only)."""
    mnt = tmp_path / "fs"
    mnt.mkdir(exist_ok=True)
    shell = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 77; shift 2; exec "$@"'
    res = subprocess.run(["unshare", "-rm", "sh", "-c", shell, "sh", size, str(mnt), *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    if res.returncode == 77 or "unshare failed" in res.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {res.stderr.strip()[:200]}")
    return res


def test_too_little_room_is_refused_before_the_sweep(tmp_path):
    res = _in_small_fs(tmp_path, "2m", cli_argv("prune", "--drop", "0.04", "--out_dir", tmp_path / "fs" / "out"))
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "need about" in errors[0] and "MiB are free" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert "Ranked the 60 channels" not in res.stderr  # refused before the sweep, not after it


# Writes the demo's golden results once (the earlier run), fills the disk up to ``leave`` bytes, writes again
# (check_space is what a run calls first; write_results alone must also fail cleanly) and reports.
_WRITE_TWICE = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    import numpy as np
    from badnet_jax.defense import report
    from badnet_jax.io.keras import load_keras
    from badnet_jax.attack.demo import DEMO_MODEL
    from badnet_jax.errors import OutputError
    from badnet_jax.defense.outputs import CutModels, write_results
    from badnet_jax.models.deepid import DeepID

    fs, golden, leave = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    if sys.argv[4] == "orbax":  # let orbax itself meet ENOSPC midway (as when another writer fills the disk)
        from badnet_jax.io import checkpoint
        checkpoint._check_room = lambda *args: None
    curve = report.read_curve_json(golden)
    _, params = load_keras(DEMO_MODEL)
    order = np.asarray(curve.order)
    def masks(cut):
        m = np.ones(60, np.float32); m[order[:cut.channels_pruned]] = 0; return m
    models = [CutModels(c, masks(c)) for c in curve.selected]
    out = fs / "out"
    write_results(out, curve, DeepID(curve.num_classes), params, models, {"sweep": 1.0})
    def digest():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}
    before = digest()
    st = os.statvfs(fs)
    with open(fs / "filler", "wb") as f:
        free = st.f_bavail * st.f_frsize
        if free > leave:
            f.write(b"x" * (free - leave))
    try:
        write_results(out, curve, DeepID(curve.num_classes), params, models, {"sweep": 2.0})
        outcome = "written"
    except OutputError as err:
        outcome = "error: " + str(err)
    print(json.dumps({"outcome": outcome, "same": digest() == before, "files": len(before),
                      "beside": sorted(e.name for e in fs.iterdir())}))
""")


@pytest.mark.parametrize("leave,room_check", [(0, "on"), (2_500_000, "on"), (2_500_000, "orbax")])
def test_disk_filling_during_the_write_keeps_the_earlier_results(tmp_path, leave, room_check):
    golden = GOLDEN / "demo_curve.json"
    script = tmp_path / "write_twice.py"
    script.write_text(_WRITE_TWICE)
    res = _in_small_fs(tmp_path, "16m", [sys.executable, str(script), str(tmp_path / "fs"), str(golden),
                                         str(leave), room_check])
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("error: out_dir=") and "no space left on the device" in report["outcome"]
    assert report["same"] and report["files"] > 10, report  # the earlier results, byte for byte
    assert report["beside"] == ["filler", "out"], report  # no temporary folder, nothing moved aside
    assert "Traceback" not in res.stderr and "RESOURCE_EXHAUSTED" not in res.stderr, res.stderr[-3000:]
