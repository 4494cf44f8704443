"""badnet_jax.commands.cli: what every command-line tool shares. Numbers parsed from flags, the installed console
tools, --help with each tool's own flags, one ``error:`` line and exit 2 for a refused input (a flag absl refuses
too), a stdout that is closed or whose reader left, JAX_PLATFORMS naming a platform that is not here, and
signals that end a run as an interrupt (130) however they surface.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from badnet_jax import ConfigError
from badnet_jax.commands import cli
from badnet_jax.defense.curve import check_drops
from badnet_jax.errors import arg
from tests.cli import cli_argv, run_cli, run_python, start_cli
from tests.conftest import LAB_B, asset, asset_path, require_assets
from tests.io.conftest import PATH_KINDS, odd_path


def test_parse_floats_and_ints():
    assert cli.parse_floats("drop", "0.02, 0.04,") == (0.02, 0.04)
    with pytest.raises(ConfigError, match="not a finite number"):
        cli.parse_floats("drop", "0.02,nan")
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        cli.parse_floats("drop", "0.02;0.04")
    assert cli.parse_ints("scaling", "1,2,4") == (1, 2, 4)
    with pytest.raises(ConfigError, match="comma-separated integers"):
        cli.parse_ints("scaling", "1,x")


def test_library_errors_name_config_fields_and_a_tool_shows_its_flags():
    with pytest.raises(ConfigError) as err:
        check_drops((4.0,))
    assert err.value.field == "drops" and str(err.value).startswith("drops=4 is not a fraction between 0 and 1")
    assert cli.as_flags(err.value, {"drops": "drop"}).startswith("--drop 4 is not a fraction between 0 and 1")
    both = ConfigError(f"{arg('checkpoints', False)} or {arg('checkpoints', True)}; {arg('seed', 3)}")
    assert cli.as_flags(both, {"checkpoints": "checkpoints"}) == "--nocheckpoints or --checkpoints; seed=3"


@pytest.mark.slow
def test_console_entry_points_work_outside_the_repository(tmp_path):
    """pip install puts badnet-prune/-screen/-poison/-bench on the PATH; they run from any folder."""
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


def test_the_user_sees_one_line_for_each(tmp_path):
    """The commands print the same messages, one ``error:`` line, exit 2, no traceback."""
    from badnet_jax.attack.demo import DEMO_MODEL

    loop = odd_path(tmp_path / "a", "loop", 0)
    fifo = odd_path(tmp_path / "b", "fifo", 0)
    runs = {
        "loop": ("prune", "--clean_valid", loop, "--clean_test", loop, "--model", DEMO_MODEL,
                 "--out_dir", tmp_path / "o"),
        "fifo": ("goodnet_eval", "--goodnet", tmp_path, fifo),
    }
    for kind, (tool, *args) in runs.items():
        res = run_cli(tool, *args, timeout=120)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and PATH_KINDS[kind] in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr


_SWALLOWED = """
import gc, os, signal, sys, time
from pathlib import Path
from badnet_jax.commands import cli
from badnet_jax.io import atomic

out = Path(sys.argv[1])

class Collected:  # a signal that lands in a __del__ run by the garbage collector cannot be raised by Python
    def __del__(self):
        print("collected", flush=True)
        os.kill(os.getpid(), signal.SIGINT)

def main():
    a, b = Collected(), Collected()
    a.other, b.other = b, a  # a cycle: only gc.collect() runs the __del__
    del a, b
    gc.collect()
    time.sleep(float(sys.argv[2]))  # work after the swallowed signal: it is raised again within it
    atomic.atomic_write_text(out, "new")  # the results of a run that was interrupted: never swapped in
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
    """A signal can surface as another error (SIGINT during matplotlib's import comes up as 'ImportError:
    initialization failed', and the interpreter may then die in teardown); an error after a noted signal must end
    like the interrupt, 130."""
    proc = run_python(_CONVERTED, cwd=None)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted: nothing written"
    ok = run_python(_CONVERTED.replace("os.kill(os.getpid(), signal.SIGTERM)", "pass")
                    .replace("time.sleep(5)", "raise KeyboardInterrupt"), cwd=None)
    assert ok.returncode != 130 and "ImportError: initialization failed" in ok.stderr  # no signal: a real error


@pytest.mark.parametrize("work_s", [0, 20])
def test_a_signal_swallowed_in_a_garbage_collection_callback_still_stops_the_run(tmp_path, work_s):
    """Python cannot raise a KeyboardInterrupt inside a __del__ (it hands it to sys.unraisablehook): it is raised
    again outside, so the run stops at once (not after its 20 s of work), swaps no results in, ends 130, not 0,
    and prints no traceback of it."""
    out = tmp_path / "result.txt"
    out.write_text("earlier")
    t = time.monotonic()
    proc = run_python(_SWALLOWED, out, work_s, cwd=None)
    assert time.monotonic() - t < 15
    assert proc.stdout.splitlines() == ["collected", "collected"]  # both signals came inside the collector
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 130, proc.stderr
    assert out.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["result.txt"]


_HELD_AT_IMPORT = """
import os, signal
from badnet_jax.commands import cli

for name in os.environ["SIGNALS"].split(","):  # sent while the tool imports: held until run's handler
    os.kill(os.getpid(), getattr(signal, name))

def main(argv):
    return cli.run(lambda: print("ran") or 0, "interrupted: nothing written")
"""


@pytest.mark.parametrize("signals", ["SIGINT", "SIGTERM", "SIGINT,SIGTERM"])
def test_signals_held_during_the_imports_end_the_run_once(tmp_path, signals):
    """Held signals are delivered as the run starts: one ends it as an interrupt, and a second, held with it,
    does not raise again inside the first's clean-up (a traceback and death by SIGINT, not 130)."""
    (tmp_path / "held_tool.py").write_text(_HELD_AT_IMPORT)
    proc = run_python("import sys; from badnet_jax.commands import cli; sys.path.insert(0, sys.argv[1]); "
                      "cli.launch('held_tool', ['held_tool'])", tmp_path, cwd=None,
                      env={**os.environ, "SIGNALS": signals})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted: nothing written", proc.stderr
    assert "Traceback" not in proc.stderr and "ran" not in proc.stdout


def _holds_interrupts(pid: int) -> bool:
    """Whether process ``pid`` blocks SIGINT and SIGTERM now (Linux: /proc/PID/status, SigBlk)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return all(blocked >> (int(s) - 1) & 1 for s in cli.INTERRUPTS)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads SigBlk from /proc")
@pytest.mark.parametrize("how", ["script", "console"])
def test_a_signal_during_the_imports_ends_the_run_as_an_interrupt(tmp_path, how):
    """A Ctrl-C in a tool's first seconds (importing JAX) waits for the tool's handler: exit 130, no traceback,
    nothing written. Unheld, it would be raised wherever Python is; inside JAX's garbage-collection callback
    Python drops it and the run would go on to write its results and exit 0."""
    if how == "script":
        argv = cli_argv("prune", "--drop", "0.04", "--out_dir", "out")
    else:
        found = shutil.which("badnet-prune", path=sysconfig.get_path("scripts")) or shutil.which("badnet-prune")
        assert found, "pip install puts badnet-prune on the PATH"
        argv = [found, "--drop", "0.04", "--out_dir", "out"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _holds_interrupts(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    held = _holds_interrupts(proc.pid)
    modules = Path(f"/proc/{proc.pid}/maps").read_text() if held else ""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert held, "the tool never held SIGINT and SIGTERM"
    assert "xla_extension" not in modules and "jaxlib" not in modules  # held before JAX was loaded
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: --out_dir holds"), err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not (tmp_path / "out").exists() and not out.strip()


def test_the_package_imports_without_jax():
    """What lets a tool hold its signals before the seconds of JAX's import (the names load on first use)."""
    proc = run_python("import sys, badnet_jax; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                      "('jax', 'jaxlib', 'flax', 'h5py', 'numpy'))); print(badnet_jax.BadNet.__name__, "
                      "'load_model' in dir(badnet_jax)); print(badnet_jax.model.__name__, badnet_jax.io.__name__)",
                      cwd=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "BadNet True", "badnet_jax.model badnet_jax.io"]


@pytest.mark.parametrize("tool", ["prune", "screen", "poison", "bench"])
def test_the_tools_import_orbax_and_the_pallas_kernel_only_when_they_use_them(tool):
    """Every start pays its imports: orbax (~0.2 s) loads where a checkpoint is read or written, the Pallas kernel
    and its Triton lowering (~0.1 s) where ``impl="pallas"`` runs; no tool imports either up front."""
    unused = ("lambda: sorted(m for m in sys.modules if m.startswith(('orbax', 'jax.experimental.pallas.triton', "
              "'badnet_jax.kernels.masked_head.pallas_kernel')))")
    code = (f"import sys; import badnet_jax.commands.{tool}; from badnet_jax.kernels.masked_head import api\n"
            f"unused = {unused}; print(unused())\n"
            "args = api.random_head_inputs(2, 8, 16)\n"
            "print(bool((api.head_top2(*args, impl='interpret', platform='cpu')[0] ==\n"
            "            api.head_top2(*args, impl='reference')[0]).all()))\n"
            "print('badnet_jax.kernels.masked_head.pallas_kernel' in unused())\n")
    proc = run_python(code, cwd=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "True", "True"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process's start is read from /proc")
def test_process_seconds_counts_from_the_process_start_not_the_call():
    """Python's own start and a sleep before the first call are counted: the run's wall time from its start."""
    t = time.perf_counter()
    proc = run_python("import time; time.sleep(1.0); from badnet_jax.commands import cli; "
                      "a = cli.process_seconds(); time.sleep(0.3); print(a, cli.process_seconds())", cwd=None)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    first, second = map(float, proc.stdout.split())
    assert 1.0 <= first <= second - 0.29 and second <= wall + 0.02, (first, second, wall)  # 10 ms ticks


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _clean_sets() -> list:
    # Built at collection as well: unchecked paths, each test checks them (require_assets).
    return ["--model", asset_path(LAB_B), "--clean_valid", asset_path("faces/lab3/valid_subset.h5"),
            "--clean_test", asset_path("faces/lab3/test_subset.h5")]


@pytest.mark.parametrize("tool,own,help_text", [
    ("prune", ("--drop", "--rule", "--model", "--clean_valid", "--out_dir", "--rank_by", "--coordinator_address"),
     "Accuracy drop(s) X as fractions"),
    ("benchmark", ("--model", "--clean_valid", "--impl", "--rank_by", "--out"), "Masked-head implementation."),
    ("goodnet_eval", ("--model", "--pruned", "--goodnet", "--input_scale"), "Keras h5 of the BadNet B"),
    ("poison", ("--source", "--trigger", "--target", "--at", "--out"), "The attacker's label."),
])
def test_help_lists_the_tools_own_flags_with_their_help(tool, own, help_text):
    """--help (and -h) is the tool's description and its own flags with their help, on stdout, exit 0; absl's
    and JAX's flags only under --helpfull."""
    for ask in ("--help", "-h"):
        proc = run_cli(tool, ask, timeout=120)
        assert proc.returncode == 0, proc.stderr
        listed = [line.split(":")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  --")]
        assert all(any(flag in name for name in listed) for flag in own), proc.stdout
        assert help_text in proc.stdout and "--helpfull" in proc.stdout
        assert "--verbosity" not in proc.stdout and "--jax_" not in proc.stdout  # not absl's, not JAX's
    full = run_cli(tool, "--helpfull", timeout=120)
    assert full.returncode == 0 and "--verbosity" in full.stdout and help_text in full.stdout


@pytest.mark.parametrize("tool,args,complaint", [
    ("prune", ["--modle", "x.h5"], "error: Unknown command line flag 'modle'"),
    ("prune", ["--chunk", "many"], "error: flag --chunk=many: invalid literal for int()"),
    ("prune", ["--rule", "lab"], "error: flag --rule=lab: value should be one of <absolute|relative>"),
    # Out of range whether or not the option is used in this run: refused, not ignored.
    ("prune", ["--finetune_epochs", "-1"], "error: flag --finetune_epochs=-1: -1 is not a non-negative integer"),
    ("prune", ["--random_orders", "-3"], "error: flag --random_orders=-3: -3 is not a positive integer"),
    ("prune", ["--anp_steps", "0"], "error: flag --anp_steps=0: 0 is not a positive integer"),
    ("benchmark", ["--random_orders", "0"], "error: flag --random_orders=0: 0 is not a positive integer"),
    ("benchmark", ["--repeats"], "error: Missing value for flag --repeats"),
    ("goodnet_eval", ["x.png", "--modle", "b.h5"], "error: Unknown command line flag 'modle'"),
    ("poison", ["--trigger", "t.png", "--target", "0", "--out", "bd.h5"],
     "error: flag --source=None: Flag --source must have a value other than None."),
])
def test_a_flag_absl_refuses_is_one_error_line_and_exit_2_like_every_usage_error(tool, args, complaint, tmp_path):
    proc = run_cli(tool, *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert _errors(proc.stderr) == [line for line in proc.stderr.splitlines() if line.strip()], proc.stderr
    assert _errors(proc.stderr)[0].startswith(complaint) and "--help" in proc.stderr
    assert "FATAL" not in proc.stderr and "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("tool,args,written", [
    ("goodnet_eval", [asset_path("faces/lab3/bd_test_subset.h5"), "--model", asset_path(LAB_B), "--pruned",
                      asset_path("models/lab3_repaired/full_model_drop30.h5")], None),
    ("prune", [*_clean_sets(), "--out_dir", "o", "--nocheckpoints"], "o/curve.json"),
])
def test_a_reader_that_goes_away_ends_the_tool_quietly(tool, args, written, tmp_path):
    """`tool ... | head -1`: the reader closes the pipe before the output comes; no BrokenPipeError traceback,
    the exit status a shell reports for SIGPIPE (141), and the results on disk are written whole."""
    require_assets(*args)
    proc = start_cli(tool, *args, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the tool writes its first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    assert written is None or (tmp_path / written).is_file()


@pytest.mark.parametrize("tool,args", [
    ("goodnet_eval", [asset_path("faces/lab3/bd_test_subset.h5"), "--model", asset_path(LAB_B), "--pruned",
                      asset_path("models/lab3_repaired/full_model_drop30.h5")]),
    ("prune", [*_clean_sets(), "--out_dir", "o"]),
])
def test_a_closed_stdout_is_refused_before_any_work(tool, args, tmp_path):
    """`tool ... >&-`: Python prints into nothing, so every verdict would be lost behind an exit 0."""
    require_assets(*args)
    closed = ["bash", "-c", 'exec "$@" >&-', "bash", *cli_argv(tool, *args)]
    proc = subprocess.run(closed, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _errors(proc.stderr) == ["error: standard output is closed, so nothing this tool prints would reach "
                                    "anyone; redirect it (to a file, or to /dev/null to discard it) instead of "
                                    "closing it"], proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_jax_platforms_naming_a_platform_not_here_is_one_line_naming_the_variable(tmp_path):
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU: JAX_PLATFORMS=gpu is right here")
    require_assets(*_clean_sets())
    proc = run_cli("prune", *_clean_sets(), "--out_dir", "o", cwd=tmp_path,
                   env={**os.environ, "JAX_PLATFORMS": "gpu"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _errors(proc.stderr) == [line for line in proc.stderr.splitlines() if line.startswith("error")]
    [line] = _errors(proc.stderr)
    assert line.startswith("error: JAX_PLATFORMS=gpu asks JAX for a platform it cannot start on this machine")
    assert "rocm" not in proc.stderr and "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


# A tool whose main prints many lines and a log line, with an atexit handler of its own; argv[1] picks its ending.
LEAVING_TOOL = """
import atexit, logging, sys
import jax.numpy as jnp
from badnet_jax.commands import cli

atexit.register(lambda: print("atexit ran", file=sys.stderr, flush=True))

def main(argv):
    print(int(jnp.sum(jnp.arange(4))))  # JAX has run: its client and threads are up
    for i in range(100000):
        print(f"line {i}")
    logging.getLogger("badnet_jax").info("done")
    return {"ok": 0, "fail": 2}[argv[1]]

cli.start(main)
"""


@pytest.mark.parametrize("ending,code", [("ok", 0), ("fail", 2)])
def test_a_finished_tool_leaves_with_every_line_written_and_its_exit_code(ending, code):
    # A run that ends well skips the interpreter's teardown (os._exit after flushing and the atexit handlers):
    # every line still reaches the reader, the handlers still run, and a failing run exits as before.
    done = run_python(LEAVING_TOOL, ending)
    assert done.returncode == code, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "6" and len(lines) == 100001 and lines[-1] == "line 99999"
    assert "atexit ran" in done.stderr and "done" in done.stderr
