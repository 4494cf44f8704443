"""Shared fixtures: strict JAX numerics and the real lab assets in ../shared/assets.

The assets are read in place from ``$BADNET_ASSETS`` (default ``../shared/assets`` beside the repository).
Tests that need them skip with a reason on a machine without them, but fail under CI (``CI=true``), where
they must be present.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

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

LAB_B = "models/lab3/bd_weights.h5"
ALL_BADNETS = (
    LAB_B,
    "models/hackml2020/sunglasses_bd_weights.h5",
    "models/hackml2020/anonymous_1_bd_weights.h5",
    "models/hackml2020/anonymous_2_bd_weights.h5",
    "models/hackml2020/multi_trigger_multi_target_bd_weights.h5",
)
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
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " -- CI must have the shared assets")
        pytest.skip(msg)
    return path


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
