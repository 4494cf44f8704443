"""Maintainer tool: badnet-jax end to end against the lab's Keras loop, side by side on the same data in one run.

    python scripts/versus_keras.py --lab_dir /tmp/labscale --keras_python /work/venvs/tf/bin/python --steps 3
    python scripts/versus_keras.py --lab_dir /tmp/labscale --keras_python /work/venvs/tf/bin/python --repeats 3

(a) ``scripts/prune.py --drop 0.02,0.04,0.10,0.30`` in a fresh process with every output (curve.json, report,
plots, B' and GoodNet checkpoints, B' as Keras h5) written to a temporary folder: its wall time. (b)
``scripts/keras_loop.py`` (the seed's algorithm in Keras, independent of badnet_jax) under ``--keras_python``
with ``KERAS_BACKEND=--keras_backend``, saving B' at each drop's cut: its wall time, and with ``--steps`` below
60 its wall time scaled to all steps (the steps not run cost the mean of the run's steps after the first). Both
wall times include the interpreter's start and imports. With ``--repeats`` > 1 the runs interleave (A B A B ...)
and the medians are reported. The ratio is Keras' (scaled) time over badnet-jax's; the JSON (written
atomically to ``--out``) also gives the machine (CPU model, logical CPUs, load average), the versions, each
run's own phases (``timings``, in the order of ``wall_s``), and whether the two curves agree over the steps both
ran (the same order and the same rates, exactly).

Not part of the package: it times the package's command from outside, as a user runs it. tensorflow is not a
dependency of badnet-jax; put it in its own virtual environment (BUILD_NOTES.md, dependency pins).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from badnet_jax.commands import cli
from badnet_jax.defense.curve import check_drops
from badnet_jax.errors import BadNetError, ConfigError
from badnet_jax.io import atomic

SCRIPTS = Path(__file__).resolve().parent
ALL_STEPS = 60  # pool_3's channels: the steps of the lab's curve

LAB_DIR = flags.DEFINE_string("lab_dir", ".", "A folder in the lab's layout (models/, data/cl, data/bd) that the "
                              "file flags default to.")
MODEL = flags.DEFINE_string("model", None, "The BadNet (default models/bd_net.h5 or models/bd_weights.h5).")
CLEAN_VALID = flags.DEFINE_string("clean_valid", None, "Clean validation h5 (default data/cl/valid.h5).")
BD_VALID = flags.DEFINE_string("bd_valid", None, "Poisoned validation h5 (default data/bd/bd_valid.h5).")
CLEAN_TEST = flags.DEFINE_string("clean_test", None, "Clean test h5 (default data/cl/test.h5).")
BD_TEST = flags.DEFINE_string("bd_test", None, "Poisoned test h5 (default data/bd/bd_test.h5).")
DROP = flags.DEFINE_string("drop", "0.02,0.04,0.10,0.30", "The drops X both runs cut at.")
STEPS = flags.DEFINE_integer("steps", ALL_STEPS, "Pruning steps the Keras loop runs (its time is scaled to all).",
                             lower_bound=1, upper_bound=ALL_STEPS)
KERAS_PYTHON = flags.DEFINE_string("keras_python", sys.executable, "The interpreter that runs the Keras loop.")
KERAS_BACKEND = flags.DEFINE_string("keras_backend", "tensorflow", "KERAS_BACKEND of the Keras loop.")
REPEATS = flags.DEFINE_integer("repeats", 1, "Runs of each, interleaved; medians reported.", lower_bound=1)
OUT = flags.DEFINE_string("out", "versus_keras.json", "Where to write the JSON results.")

LAYOUT = {"clean_valid": "data/cl/valid.h5", "bd_valid": "data/bd/bd_valid.h5", "clean_test": "data/cl/test.h5",
          "bd_test": "data/bd/bd_test.h5"}
RATES = ("valid_acc", "valid_asr", "test_acc", "test_asr")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def input_files() -> dict[str, str]:
    """The five files both runs read: the flags, else the lab's layout under ``--lab_dir``."""
    lab = Path(LAB_DIR.value)
    given = {"model": MODEL.value, "clean_valid": CLEAN_VALID.value, "bd_valid": BD_VALID.value,
             "clean_test": CLEAN_TEST.value, "bd_test": BD_TEST.value}
    files = {}
    for role, path in given.items():
        if path is None:
            if role == "model":
                found = [lab / "models" / n for n in ("bd_net.h5", "bd_weights.h5") if (lab / "models" / n).exists()]
                path = str(found[0]) if found else str(lab / "models/bd_net.h5")
            else:
                path = str(lab / LAYOUT[role])
        if not Path(path).is_file():
            raise ConfigError(f"{role}: {path}: file not found (give --{role} or a --lab_dir in the lab's layout)")
        files[role] = str(Path(path).resolve())
    return files


def timed(argv: list[str], env: dict[str, str], what: str) -> tuple[float, str]:
    """Run ``argv`` to the end: its wall time and stderr; a failed run is an error naming ``what``."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BadNetError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return wall, proc.stderr


def run_badnet_jax(files: dict[str, str], work: Path) -> dict:
    """``prune.py`` end to end with every output: wall time and curve.json."""
    out_dir = work / "badnet_jax_out"
    argv = [sys.executable, str(SCRIPTS / "prune.py"), "--drop", DROP.value, "--out_dir", str(out_dir),
            *(f"--{role}={path}" for role, path in files.items())]
    wall, log = timed(argv, dict(os.environ), "prune.py")
    curve = json.loads((out_dir / "curve.json").read_text())
    timings = report_timings(out_dir / "report.md")
    written = re.search(r"Wrote .* in ([0-9.]+) s\.", log)
    if written:
        timings["write (all outputs)"] = float(written.group(1))
    return {"argv": argv, "wall_s": wall, "curve": curve, "timings": timings}


def report_timings(report_md: Path) -> dict[str, float]:
    """The "Timings (s)" section of prune.py's report.md (``- name: seconds`` lines) as a dict."""
    timings, inside = {}, False
    for line in report_md.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Timings (s)"
        elif inside and line.startswith("- ") and ": " in line:
            name, value = line[2:].rsplit(": ", 1)
            timings[name] = float(value)
    return timings


def run_keras(files: dict[str, str], work: Path, repeat: int) -> dict:
    """``keras_loop.py`` (saving B' at each cut): wall time, scaled to all steps, and its JSON."""
    out = work / f"keras_{repeat}.json"
    argv = [KERAS_PYTHON.value, str(SCRIPTS / "keras_loop.py"), "--steps", str(STEPS.value), "--drops", DROP.value,
            "--save_dir", str(work / f"keras_out_{repeat}"), "--out", str(out),
            *(f"--{role}={path}" for role, path in files.items())]
    env = {**os.environ, "KERAS_BACKEND": KERAS_BACKEND.value, "TF_CPP_MIN_LOG_LEVEL": "2"}
    wall, _ = timed(argv, env, "keras_loop.py")
    result = json.loads(out.read_text())
    steps = result["timings"]["step_s"]
    steady = statistics.fmean(steps[1:] if len(steps) > 1 else steps)
    return {"argv": argv, "wall_s": wall, "scaled_s": wall + (result["channels"] - len(steps)) * steady,
            "steady_step_s": steady, "result": result}


def agreement(curve: dict, keras: dict) -> dict:
    """Whether the two curves agree over the steps both ran: the same order and rates equal to 1e-6 points."""
    k = keras["steps_run"]
    mismatches = [f"{key}[{i}]: badnet-jax {curve[key][i]} keras {keras[key][i]}"
                  for key in RATES for i in range(k + 1) if abs(curve[key][i] - keras[key][i]) > 1e-6]
    same_order = curve["order"][:k] == keras["order"][:k]
    jax_cuts = {float(s["drop"]): s["channels_pruned"] for s in curve["selected"]
                if s["crossed"] and s["channels_pruned"] <= k}
    keras_cuts = {float(d): c for d, c in keras["cuts"].items()}
    return {"steps_compared": k, "same_order": same_order, "rate_mismatches": mismatches,
            "same_cuts": jax_cuts == keras_cuts,
            "agree": same_order and not mismatches and jax_cuts == keras_cuts}


def compare() -> dict:
    """Both runs, interleaved ``--repeats`` times; medians and the ratio."""
    check_drops(cli.parse_floats("drop", DROP.value))  # refused before any run, as prune.py refuses them
    files = input_files()
    machine = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "loadavg_before": list(os.getloadavg()),
               "jax_compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR")}
    jax_runs, keras_runs = [], []
    with tempfile.TemporaryDirectory(prefix="versus-keras-") as tmp:
        for repeat in range(REPEATS.value):
            work = Path(tmp) / str(repeat)
            jax_runs.append(run_badnet_jax(files, work))
            print(f"[{repeat}] badnet-jax end to end: {jax_runs[-1]['wall_s']:.1f} s", flush=True)
            keras_runs.append(run_keras(files, work, repeat))
            print(f"[{repeat}] Keras loop: {keras_runs[-1]['wall_s']:.1f} s for {STEPS.value} steps, "
                  f"{keras_runs[-1]['scaled_s']:.1f} s scaled to {ALL_STEPS}", flush=True)
    machine["loadavg_after"] = list(os.getloadavg())
    jax_s = statistics.median(r["wall_s"] for r in jax_runs)
    keras_s = statistics.median(r["scaled_s"] for r in keras_runs)
    last_keras = keras_runs[-1]["result"]
    curve = jax_runs[-1]["curve"]
    return {
        "machine": machine,
        "inputs": files,
        "counts": curve["counts"],
        "drops": DROP.value,
        "repeats": REPEATS.value,
        "badnet_jax": {"argv": jax_runs[0]["argv"], "wall_s": [r["wall_s"] for r in jax_runs], "median_s": jax_s,
                       "timings": [r["timings"] for r in jax_runs], "versions": curve.get("versions")},
        "keras": {"argv": keras_runs[0]["argv"], "backend": last_keras["backend"], "versions": last_keras["versions"],
                  "steps_run": last_keras["steps_run"], "wall_s": [r["wall_s"] for r in keras_runs],
                  "scaled_60_s": [r["scaled_s"] for r in keras_runs], "median_scaled_60_s": keras_s,
                  "steady_step_s": [r["steady_step_s"] for r in keras_runs],
                  "median_step_s": statistics.median(r["steady_step_s"] for r in keras_runs),
                  "timings": [r["result"]["timings"] for r in keras_runs]},
        "ratio": keras_s / jax_s,
        "agreement": agreement(curve, last_keras),
    }


def main(argv: list[str]) -> int:

    def measure() -> int:
        cli.refuse_extra_args(argv)
        result = compare()
        atomic.atomic_write_text(OUT.value, json.dumps(result, indent=1) + "\n")
        k, m, jax_s = result["keras"], result["machine"], result["badnet_jax"]["median_s"]
        print(f"{m['cpu']} ({m['logical_cpus']} logical CPUs), {result['counts']}\n"
              f"badnet-jax end to end (drops {result['drops']}, all outputs): {jax_s:.1f} s\n"
              f"Keras loop ({k['backend']}, {k['steps_run']} steps, {k['median_step_s']:.2f} s/step): "
              f"{k['median_scaled_60_s']:.1f} s scaled to {ALL_STEPS} steps\n"
              f"ratio {result['ratio']:.1f}x; curves agree over {k['steps_run']} steps: "
              f"{result['agreement']['agree']}; wrote {OUT.value}")
        return 0

    return cli.run(measure, flags={"drops": DROP.name})


if __name__ == "__main__":
    app.run(main)
