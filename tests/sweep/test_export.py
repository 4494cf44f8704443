"""badnet_jax.sweep.run.export_sweep: the accelerator path proven without an accelerator, the whole sweep lowered
for CUDA with jax.export.

A GPU run of prune.py resolves the plan for its platform (batched steps, 4096-image chunks, the Pallas
kernel); here the same plan is resolved for ``cuda`` and the whole one-call sweep is exported at the lab's
shapes, so a kernel that cannot lower for an NVIDIA GPU (the Mosaic GPU default cannot) fails here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from badnet_jax.model import BadNet, init_params, param_shapes
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.sweep import SweepOptions, plan_sweep
from badnet_jax.sweep.run import export_sweep
from badnet_jax.models.deepid import DeepID
from badnet_jax.kernels.native import DENSE, DENSE_TOP2, TARGETS as NATIVE_TARGETS, native_library

LAB_SETS = {"clean_valid": 11547, "bd_valid": 11547, "clean_test": 12830, "bd_test": 12830}


def _specs(num_classes):
    params = {layer: {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in shapes.items()}
              for layer, shapes in param_shapes(num_classes).items()}
    sets = {name: jax.ShapeDtypeStruct((n, 55, 47, 3), jnp.uint8) for name, n in LAB_SETS.items()}
    return params, sets


# The lab's B as prune.py runs it on a GPU, and the demo with the kernel: its orders one after the other (the
# kernel inside the scan over steps) and vmapped in groups of 4 (the kernel batched under vmap).
@pytest.mark.parametrize("num_classes, impl, groups", [(1283, "auto", 1), (200, "pallas", 1), (200, "pallas", 4)])
def test_the_whole_sweep_lowers_for_cuda_with_and_without_the_kernel(num_classes, impl, groups):
    params, sets = _specs(num_classes)
    plan = plan_sweep(SweepOptions(platform="cuda", impl=impl, orders_per_call=groups), list(sets.values()),
                      DeepID(num_classes))
    # The GPU's defaults as prune.py resolves them: one head call per distinct step (the fastest on the H200),
    # batched calls of 8 only for grouped orders; auto is the JAX reference head (faster on the H200).
    assert (plan.strategy, plan.batch_steps, plan.chunk, plan.impl, plan.platform) == (
        "prefix_batched" if groups > 1 else "prefix_dedupe", 8 if groups > 1 else 0, 4096,
        "reference" if impl == "auto" else "pallas", "cuda")
    rankings, orders = None, 1
    if num_classes == 200:  # every ranking at once, ANP's optimisation inside the same program
        rankings = resolve_rankings(RankingOptions(rank_by=("activation", "clp", "l1", "random", "anp"),
                                                   random_orders=2), init_params(num_classes), DeepID())
        orders = 6
    exported = export_sweep(BadNet(num_classes), params, sets, plan, rankings=rankings)
    assert exported.platforms == ("cuda",)
    targets = set(re.findall(r"custom_call @([^\(\s]+)\(", exported.mlir_module()))
    assert ("__gpu$xla.gpu.triton" in targets) == (impl == "pallas"), targets
    assert not targets & set(NATIVE_TARGETS), targets  # the CPU's native kernels stay out of a GPU program
    # The ranking set alone, the three sets that rank nothing joined into one block (sweep.layout).
    joined = sum(n for name, n in LAB_SETS.items() if name != "clean_valid")
    assert {o.shape for o in exported.out_avals} >= {(orders, 60), (orders, 61, 11547), (orders, 61, joined)}


def test_the_kernel_needs_triton_on_cuda_mosaic_gpu_would_not_fit(monkeypatch):
    """Why the kernel picks Triton: the default Mosaic GPU lowering stages whole weight blocks in shared memory."""
    from badnet_jax.kernels.masked_head import pallas_kernel as pk

    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            ((8, 48, 160), (8, 48, 960), (960, 160), (160,), (160, 211), (211,))]  # shapes traced nowhere else
    fn = jax.jit(lambda *a: pk.head_argmax_pallas(*a, platform="cuda"))
    triton = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert "__gpu$xla.gpu.triton" in triton.mlir_module()
    monkeypatch.setattr(pk, "compiler_params", lambda platform: None)  # JAX's default: Mosaic GPU
    pk.head_top2_pallas.clear_cache()
    default = jax.jit(lambda *a: pk.head_argmax_pallas(*a, platform="cuda"))  # a new function: traced afresh
    with pytest.raises(Exception, match="exceeds available shared memory"):
        jax.export.export(default, platforms=["cuda"])(*args)
    pk.head_top2_pallas.clear_cache()


def test_tpu_cannot_be_lowered_without_a_tpu():
    """Mosaic TPU needs the TPU's device kind at lowering time: documented in BUILD_NOTES, checked here."""
    params, sets = _specs(200)
    small = {k: jax.ShapeDtypeStruct((64, 55, 47, 3), jnp.uint8) for k in sets}
    plan = plan_sweep(SweepOptions(platform="tpu", chunk=64, impl="pallas"), [], DeepID(200))
    with pytest.raises(Exception, match="TPU"):
        export_sweep(BadNet(200), params, small, plan)


def test_progress_callbacks_stay_out_of_an_export():
    """A host callback cannot be serialized: an exported sweep leaves the progress out, whatever the options ask."""
    params, _ = _specs(50)
    small = {"clean_valid": jax.ShapeDtypeStruct((64, 55, 47, 3), jnp.uint8)}
    exported = export_sweep(BadNet(50), params, small, SweepOptions(platform="cuda", progress=True))
    targets = set(re.findall(r"custom_call @([^\(\s]+)\(", exported.mlir_module()))
    assert not any("callback" in t for t in targets), targets


def test_a_cpu_sweep_calls_the_native_tail_where_it_is_built():
    params, _ = _specs(50)
    small = {"clean_valid": jax.ShapeDtypeStruct((64, 55, 47, 3), jnp.uint8)}
    exported = export_sweep(BadNet(50), params, small, SweepOptions(platform="cpu"))
    targets = set(re.findall(r"custom_call @([^\(\s]+)\(", exported.mlir_module()))
    built = native_library() is not None and jax.default_backend() == "cpu"
    assert ({DENSE, DENSE_TOP2} <= targets) == built, targets
    plain = export_sweep(BadNet(50), params, small, SweepOptions(platform="cpu", impl="reference"))
    assert not {DENSE, DENSE_TOP2} & set(re.findall(r"custom_call @([^\(\s]+)\(", plain.mlir_module()))
