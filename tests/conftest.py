"""Shared fixtures: strict JAX numerics, the real lab assets in ../shared/assets, and the suite's limits.

The assets are read in place from ``$BADNET_ASSETS`` (default ``../shared/assets`` beside the repository).
Tests that need them skip with a reason on a machine without them, but fail under CI (``CI=true``), where
they must be present. Under CI, hypothesis is derandomized (the same examples on every run) and prints the
blob that reproduces a failure.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

CI = os.environ.get("CI", "").lower() == "true"

# Loaded before any test module is imported, so every ``@settings(...)`` in the tests inherits it.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci" if CI else "default")

# The many CLI tests start fresh processes that compile the same programs: they share a persistent compilation
# cache, new for each test session (set after jax's import, so this process itself compiles as a user's
# would and its compile-count tests see real compiles).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="badnet-jax-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("BADNET_ASSETS", REPO.parent / "shared" / "assets"))
GOLDEN = REPO / "tests" / "golden"  # the pinned curve.json files (tests/defense/test_regression.py)

LAB_B = "models/lab3/bd_weights.h5"
ALL_BADNETS = (
    LAB_B,
    "models/hackml2020/sunglasses_bd_weights.h5",
    "models/hackml2020/anonymous_1_bd_weights.h5",
    "models/hackml2020/anonymous_2_bd_weights.h5",
    "models/hackml2020/multi_trigger_multi_target_bd_weights.h5",
)
LAB_FILES = {"clean_valid": "faces/lab3/valid_subset.h5", "bd_valid": "faces/lab3/bd_valid_subset.h5",
             "clean_test": "faces/lab3/test_subset.h5", "bd_test": "faces/lab3/bd_test_subset.h5"}
LAB_LAYOUT = {"data/cl/valid.h5": LAB_FILES["clean_valid"], "data/bd/bd_valid.h5": LAB_FILES["bd_valid"],
              "data/cl/test.h5": LAB_FILES["clean_test"], "data/bd/bd_test.h5": LAB_FILES["bd_test"]}
REPAIRED = {  # file -> channels the public solution pruned
    "models/lab3_repaired/full_model_drop2.h5": 45,
    "models/lab3_repaired/full_model_drop4.h5": 48,
    "models/lab3_repaired/full_model_drop10.h5": 52,
    "models/lab3_repaired/full_model_drop30.h5": 54,
    "models/lab3_repaired/weights_drop2.h5": 45,
    "models/lab3_repaired/weights_drop4.h5": 48,
    "models/lab3_repaired/weights_drop10.h5": 52,
}


def asset(rel: str) -> Path:
    """Path of a shared asset; skips the test (fails under CI) if it is not there."""
    path = ASSETS / rel
    if not path.exists():
        msg = f"shared asset {path} not found (set BADNET_ASSETS to the shared/assets folder)"
        if CI:
            pytest.fail(msg + " -- CI must have the shared assets")
        pytest.skip(msg)
    return path


def asset_path(rel: str) -> Path:
    """Path of a shared asset, unchecked: for test parameters, built when the tests are collected (where a skip
    would skip the whole module); the test passes them through :func:`require_assets`."""
    return ASSETS / rel


def require_assets(*args: object) -> None:
    """Skip the test (fail under CI) if a shared asset among ``args`` (paths from :func:`asset_path`) is missing."""
    for a in args:
        if isinstance(a, Path) and ASSETS in a.parents:
            asset(str(a.relative_to(ASSETS)))


@pytest.fixture(scope="session")
def lab_b():
    from badnet_jax import load_keras

    return load_keras(asset(LAB_B))


@pytest.fixture(scope="session")
def lab_faces():
    """Real lab faces: dict split -> (x, y) for clean and sunglasses valid/test subsets."""
    from badnet_jax import load_lab_h5

    return {name: load_lab_h5(asset(f"faces/lab3/{name}.h5"))
            for name in ("valid_subset", "bd_valid_subset", "test_subset", "bd_test_subset")}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def backend_compiles():
    """Names of the functions XLA compiles while the test runs (jax.monitoring events)."""
    from jax import monitoring

    seen: list[str] = []

    def listen(name, secs, fun_name="", **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            seen.append(fun_name)

    monitoring.register_event_duration_secs_listener(listen)
    yield seen
    monitoring.unregister_event_duration_listener(listen)


@pytest.fixture
def lab_dir(tmp_path):
    """A directory in the lab's layout (models/, data/cl, data/bd) holding the real B and real faces."""
    (tmp_path / "models").mkdir()
    shutil.copy(asset(LAB_B), tmp_path / "models" / "bd_weights.h5")
    for dst, src in LAB_LAYOUT.items():
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(asset(src), tmp_path / dst)
    return tmp_path


@pytest.fixture(scope="session")
def demo_goodnet_ckpt(tmp_path_factory):
    """An orbax GoodNet checkpoint of the embedded demo BadNet (30 channels pruned) and its variables."""
    from badnet_jax.attack.demo import DEMO_MODEL
    from badnet_jax.goodnet import make_goodnet
    from badnet_jax.io import checkpoint
    from badnet_jax.io.keras import load_keras

    model, params = load_keras(DEMO_MODEL)
    mask = np.ones(60, np.float32)
    mask[:30] = 0
    goodnet, variables = make_goodnet(model, params, mask=mask)
    return checkpoint.save_goodnet(tmp_path_factory.mktemp("g") / "goodnet_ckpt", goodnet, variables), variables


def damaged_copy(src: Path, dst: Path, rel: str | Path, size: int | None) -> Path:
    """A copy of the folder ``src`` at ``dst`` with its file ``rel`` removed (``size`` None) or truncated."""
    shutil.copytree(src, dst)
    if size is None:
        (dst / rel).unlink()
    else:
        with open(dst / rel, "r+b") as f:
            f.truncate(size)
    return dst


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A hard stop a minute after pytest-timeout's limit, for a hang pytest-timeout cannot interrupt.

    pytest-timeout's alarm runs Python code, which cannot run while C code holds the interpreter (a corrupted
    HDF5 heap can loop forever inside one h5py call). faulthandler's watchdog is a C thread: it prints every
    thread's stack and ends the process; under xdist that fails the one test and the worker is replaced.
    """
    try:
        limit = float(item.config.getini("timeout") or 0)
    except ValueError:  # pytest-timeout not installed: no limit to back up
        limit = 0.0
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        limit = float(marker.args[0])
    if limit > 0:
        faulthandler.dump_traceback_later(limit + 60, exit=True)
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()
