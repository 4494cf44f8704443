"""badnet_jax.sweep.run sharded: the image axis over 4 forced CPU devices gives exactly the single-device results.

Runs in a subprocess: ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX starts.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.cli import run_python
from tests.conftest import ASSETS, LAB_B, asset

SCRIPT = r"""
import dataclasses, json, sys
import jax
import numpy as np
jax.config.update("jax_numpy_rank_promotion", "raise")
import badnet_jax as b
from badnet_jax import sweep as sw
assert len(jax.devices()) == 4, jax.devices()
A = sys.argv[1]
model, params = b.load_keras(A + "/models/lab3/bd_weights.h5")
x, _ = b.load_lab_h5(A + "/faces/lab3/valid_subset.h5")       # 47 images: not a multiple of 2, 3 or 4
xb, _ = b.load_lab_h5(A + "/faces/lab3/bd_valid_subset.h5")   # 53
xt, _ = b.load_lab_h5(A + "/faces/lab3/test_subset.h5")       # 13
out = {}
sets = {"clean_valid": x, "bd_valid": xb, "clean_test": xt}
# Each option on two device counts (0 = all four; 3 does not divide 47, 53 or 13): every count on both is slow.
for options, counts in ((sw.PLAIN, (2, 0)), (sw.SweepOptions(impl="reference"), (3, 4))):
    ref = sw.rank_and_sweep(model, params, sets, dataclasses.replace(options, chunk=8, devices=1))
    for d in counts:
        got = sw.rank_and_sweep(model, params, sets, dataclasses.replace(options, chunk=8, devices=d))
        key = f"{options.prefix_sums}-{d}"
        out[key] = bool(np.array_equal(got.order, ref.order) and np.array_equal(got.mean_activation, ref.mean_activation)
                        and all(np.array_equal(got.preds[n], ref.preds[n]) for n in sets))
# Every ranking at once, ANP included (it optimises on the gathered ranking features): the same on 3 devices.
from badnet_jax.sweep.anp import ANPConfig
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.models.deepid import DeepID
y = b.load_lab_h5(A + "/faces/lab3/valid_subset.h5")[1]
plan = resolve_rankings(RankingOptions(rank_by=("activation", "random", "anp"), random_orders=1,
                                       anp=ANPConfig(steps=3, batch=16)), params, DeepID())
options = sw.SweepOptions(impl="reference", chunk=8)
ref = sw.rank_and_sweep(model, params, sets, options, rankings=plan, rank_labels=y)
got = sw.rank_and_sweep(model, params, sets, dataclasses.replace(options, devices=3), rankings=plan, rank_labels=y)
out["rankings"] = bool(np.array_equal(got.orders, ref.orders) and ref.orders.shape == (3, 60)
                       and all(np.array_equal(got.all_preds[n], ref.all_preds[n]) for n in sets))
# Compiled ahead from shapes only, the sharded sweep then runs without compiling again.
from jax import monitoring
compiled = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, fun_name="", **kw: compiled.append(fun_name) if name.endswith("backend_compile_duration") else None)
spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
options = sw.SweepOptions(impl="reference", chunk=4, devices=3)
sw.compile_sweep(model, params, {n: spec(a) for n, a in sets.items()}, options)
ahead = [f for f in compiled if "rank_and_sweep_call" in f]
got = sw.rank_and_sweep(model, params, sets, options)
ref = sw.rank_and_sweep(model, params, sets, dataclasses.replace(options, devices=1))
out["ahead"] = (len(ahead) == 1 and [f for f in compiled if "rank_and_sweep_call_sharded" in f] == ahead
                and all(np.array_equal(got.preds[n], ref.preds[n]) for n in sets))
# Progress from inside the sharded call: every device reports its chunks, each is shown once; the same results.
import contextlib, io
err = io.StringIO()
with contextlib.redirect_stderr(err):
    got = sw.rank_and_sweep(model, params, sets, dataclasses.replace(options, chunk=8, progress=True))
ref = sw.rank_and_sweep(model, params, sets, dataclasses.replace(options, chunk=8, devices=1))
lines = err.getvalue().splitlines()
out["progress"] = (got.plan.progress and all(np.array_equal(got.preds[n], ref.preds[n]) for n in sets)
                   and 3 <= len(lines) <= 11 and all(l.startswith("sweep ") for l in lines))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_sweep_equals_single_device():
    asset(LAB_B)  # skip (or fail under CI) without the shared assets
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = run_python(SCRIPT, ASSETS, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result) == 7 and all(result.values()), result


def test_more_devices_than_exist_are_refused_before_sharding():
    import jax

    from badnet_jax import ConfigError
    from badnet_jax.models.deepid import DeepID
    from badnet_jax.sweep import SweepOptions, plan_sweep

    with pytest.raises(ConfigError, match=rf"asked for {jax.device_count() + 1} devices, only {jax.device_count()}"):
        plan_sweep(SweepOptions(devices=jax.device_count() + 1), [], DeepID())
