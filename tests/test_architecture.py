"""The package's shape: no import cycle between its modules, the wheel holds every module of the package and no
tests, the library names no command-line flag, and the quick test loop reaches every test file."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO

# Module name -> source file, as pyproject's package-dir installs them (kernels/ -> badnet_jax.kernels).
ROOTS = {"badnet_jax": REPO / "badnet_jax", "badnet_jax.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from pkg import mod`` imports the module; ``from mod import name`` imports mod itself.
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if subs else [base]
        else:
            continue
        out |= {t for t in targets if t in known}
    return out - {name}


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # A package's __init__ re-exports its modules; an edge *into* an __init__ from its own submodules is what
    # would make a cycle, so edges are kept as written and every strongly connected component must be trivial.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
    assert "badnet_jax.sweep.run" in graph and "badnet_jax.kernels.masked_head.api" in graph  # the walk saw them


# docs/architecture.md's layers, top (9) to bottom (1), by a module's first name under badnet_jax.
LAYERS = {"commands": 9, "defense": 8, "attack": 7, "bench": 7, "sweep": 6, "train": 6, "io": 5, "goodnet": 4,
          "models": 3, "numerics": 2, "kernels": 2, "model": 1, "pixels": 1, "errors": 1, "metrics": 1}
# The imports up a layer that docs/architecture.md names, and why each is there.
UPWARD = {
    ("badnet_jax.model", "badnet_jax.kernels.conv2d"),  # DeepID's Flax module runs its convolutions there
    ("badnet_jax.kernels.native", "badnet_jax.io.atomic"),  # the native build lands whole or not at all
    ("badnet_jax.numerics.settling", "badnet_jax.models.protocol"),  # settles any PrunableModel in float64
    ("badnet_jax.numerics.tie_bound", "badnet_jax.models.protocol"),  # measures a PrunableModel's float32 error
    ("badnet_jax.numerics.tie_bound", "badnet_jax.models.affine"),  # ... at every step's masks
}


def test_modules_import_down_the_documented_layers():
    modules = _modules()
    layer = lambda m: LAYERS.get(m.split(".")[1]) if m != "badnet_jax" else None
    unplaced = sorted(m for m in modules if m != "badnet_jax" and layer(m) is None)
    assert not unplaced, f"modules in no layer of docs/architecture.md: {unplaced}"
    imports = {m: _imports(m, path, set(modules)) for m, path in modules.items() if m != "badnet_jax"}
    upward = {(m, t) for m, targets in imports.items() for t in targets if t != "badnet_jax" and layer(t) > layer(m)}
    assert upward == UPWARD, (f"undocumented: {sorted(upward - UPWARD)}; "
                              f"documented but gone: {sorted(UPWARD - upward)}")
    # The root re-exports every layer (lazily, by strings this walk cannot follow): below commands/ nothing
    # imports from it but the defense's report of versions (``badnet_jax.__version__``).
    from_root = {m for m, targets in imports.items() if "badnet_jax" in targets and layer(m) < LAYERS["commands"]}
    assert from_root == {"badnet_jax.defense.pipeline"}, f"imports from the package root below commands/: {from_root}"
    assert not imports["badnet_jax.io.atomic"]  # as the doc says: it imports nothing of the package


def test_wheel_installs_kernels_inside_the_package_and_ships_no_tests(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("badnet_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    want = {name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
            for name, path in _modules().items()}
    assert want - set(names) == set(), "modules left out of the wheel (pyproject's packages list)"
    assert "badnet_jax/assets/demo_badnet.h5" in names
    # The native kernels build from the installed sources and headers.
    assert {"badnet_jax/kernels/conv2d/direct_cpu.cc", "badnet_jax/kernels/dense/dense_cpu.cc",
            "badnet_jax/kernels/parallel_for.h"} <= set(names)
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"badnet_jax", *{t for t in tops if t.endswith(".dist-info")}}, tops
    assert not [n for n in names if "test" in Path(n).name], [n for n in names if "test" in Path(n).name]


FLAG = re.compile(r"--[a-z][a-z_]{2,}")


def test_the_library_names_no_command_line_flag():
    """A library caller reads the names it typed: outside badnet_jax/commands, no string literal names a flag
    (messages mark arguments with errors.arg and the commands show them as flags)."""
    found = []
    for name, path in _modules().items():
        if name.startswith("badnet_jax.commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and FLAG.search(node.value):
                if node.value.strip().startswith(("--xla", "XLA_FLAGS", "--param=")):
                    continue  # an XLA flag or a compiler's parameter, not one of ours
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {FLAG.search(node.value).group()}")
    assert not found, found


def test_the_quick_loop_reaches_every_test_file():
    """``pytest -m "not slow"`` (the loop README gives) keeps at least one test of every test file."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not slow", str(REPO / "tests")], capture_output=True, text=True, timeout=240,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reached = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    files = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    assert files - reached == set()


def test_every_test_file_collects_on_a_machine_without_the_shared_assets(tmp_path):
    """A fresh clone without ../shared/assets: tests that read them skip one by one; none is read while the
    tests are collected (a skip there would end the whole module in a collection error)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"BADNET_ASSETS": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests")], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reached = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert reached == {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
