"""badnet_jax.sweep.plan: options resolved once into a plan (strategy, chunk, head, devices), sized to a memory
budget, and options that cannot work refused before any work.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax import sweep as sw
from badnet_jax.sweep import SweepOptions, plan_sweep
from badnet_jax.defense.inputs import EXAMPLES
from badnet_jax.io.model_file import load_model
from badnet_jax.models.deepid import DeepID
from badnet_jax.kernels.native import native_library

# The head "auto" runs on this machine: the native dense kernels on a CPU that built them.
CPU_HEAD = "native" if native_library() is not None and jax.default_backend() == "cpu" else "reference"


@pytest.mark.parametrize("options,field,complaint", [
    (sw.SweepOptions(prefix_sums=False, group=False), "dedupe", "dedupe needs prefix_sums"),
    (sw.SweepOptions(dedupe=False), "group", "group needs dedupe"),
    (sw.SweepOptions(dedupe=False, group=False, batch_steps=4), "batch_steps", "batch_steps=4 needs dedupe"),
    (dataclasses.replace(sw.PLAIN, impl="pallas"), "impl", "impl='pallas' needs prefix_sums"),
    (sw.SweepOptions(impl="fast"), "impl", "impl='fast': expected 'auto', 'reference' or 'pallas'"),
    (sw.SweepOptions(platform="gpu"), "platform", "platform='gpu': expected 'cpu', 'cuda', 'rocm' or 'tpu'"),
    (sw.SweepOptions(chunk=0), "chunk", "chunk=0 must be >= 1"),
    (sw.SweepOptions(devices=-1), "devices", "devices=-1 must be >= 0"),
    (sw.SweepOptions(devices=99), "devices", "asked for 99 devices"),
    (sw.SweepOptions(memory_budget=float("nan")), "memory_budget",
     "memory_budget must be a finite positive size, got nan bytes"),
    (sw.SweepOptions(prefix_sums=False, dedupe=False, group=False, cumulative=True), "cumulative",
     "cumulative needs prefix_sums"),
    (sw.SweepOptions(cumulative=True, batch_steps=4), "cumulative", "nothing to batch"),
])
def test_options_that_would_do_nothing_are_refused(options, field, complaint):
    with pytest.raises(ConfigError, match=re.escape(complaint)) as err:
        sw.plan_sweep(options, [], DeepID())
    assert err.value.field == field  # what a tool maps to its flag


def test_plan_resolves_each_strategy_once():
    assert sw.plan_sweep(sw.PLAIN, [], DeepID()).strategy == "plain"
    assert sw.plan_sweep(sw.SweepOptions(dedupe=False, group=False), [], DeepID()).strategy == "prefix"
    cpu = sw.plan_sweep(sw.SweepOptions(), [], DeepID())
    assert (cpu.strategy, cpu.batch_steps, cpu.chunk, cpu.impl, cpu.devices) == ("prefix_dedupe", 0, 256, CPU_HEAD, 1)
    batched = sw.plan_sweep(sw.SweepOptions(batch_steps=8, chunk=100), [], DeepID())
    assert (batched.strategy, batched.batch_steps, batched.chunk) == ("prefix_batched", 8, 100)
    # The batched path holds a batch of logits: its working memory grows with the class count.
    assert (sw.plan_sweep(sw.SweepOptions(batch_steps=8), [], DeepID()).bytes_per_image
            > sw.plan_sweep(sw.SweepOptions(batch_steps=8), [], DeepID(200)).bytes_per_image)


def test_the_planner_sums_cumulatively_where_the_logits_are_affine_in_the_mask():
    gap, _ = load_model(EXAMPLES["gapnet"][0], "255")  # relu_3 -> global average pooling -> dense
    assert gap.logits_affine and not DeepID().logits_affine
    for platform in ("cpu", "cuda"):
        plan = sw.plan_sweep(sw.SweepOptions(platform=platform), [], gap)
        assert (plan.strategy, plan.group, plan.batch_steps) == ("cumulative", False, 0)
        assert plan.describe().startswith("cumulative, ")
    assert sw.plan_sweep(sw.SweepOptions(cumulative=False), [], gap).strategy == "prefix_dedupe"
    assert sw.plan_sweep(sw.SweepOptions(batch_steps=4), [], gap).strategy == "prefix_batched"  # asked for
    assert sw.plan_sweep(sw.SweepOptions(), [], DeepID()).strategy == "prefix_dedupe"
    assert sw.plan_sweep(sw.SweepOptions(cumulative=True), [], DeepID()).strategy == "cumulative"  # asked for
    # the trunk runs beside the heads for the cumulative sweep only (the scan strategies keep their trunk blocks)
    assert sw.plan_sweep(sw.SweepOptions(), [], gap).fuses_trunk
    assert not sw.plan_sweep(sw.SweepOptions(cumulative=False, dedupe=False, group=False), [], gap).fuses_trunk


def test_steps_per_head_call_default_to_the_fastest_measured_per_platform():
    # One head call per distinct step on a CPU and an NVIDIA GPU (measured fastest on each); batched calls of 8
    # where orders are vmapped together (they need them) and on the platforms not measured.
    for platform, orders, expected in [("cpu", 1, ("prefix_dedupe", 0)), ("cuda", 1, ("prefix_dedupe", 0)),
                                       ("cuda", 5, ("prefix_batched", 8)), ("tpu", 1, ("prefix_batched", 8)),
                                       ("rocm", 1, ("prefix_batched", 8))]:
        plan = sw.plan_sweep(sw.SweepOptions(platform=platform, orders_per_call=orders), [], DeepID())
        assert (plan.strategy, plan.batch_steps) == expected, (platform, orders)
    assert sw.plan_sweep(sw.SweepOptions(platform="cuda", batch_steps=16), [], DeepID()).batch_steps == 16  # asked
    with pytest.raises(ConfigError, match="orders_per_call > 1 needs batch_steps > 0"):
        sw.plan_sweep(sw.SweepOptions(orders_per_call=2), [], DeepID())  # a CPU's default stays unbatched


def test_trunk_blocks_stay_small_on_a_cpu_only():
    cpu = sw.plan_sweep(sw.SweepOptions(), [], DeepID())
    assert (cpu.chunk, cpu.trunk_block) == (256, 64) and "trunk blocks of 64" in cpu.describe()
    small = sw.plan_sweep(sw.SweepOptions(chunk=32), [], DeepID())
    assert small.trunk_block == 32 and "trunk" not in small.describe()
    gpu = sw.plan_sweep(sw.SweepOptions(platform="cuda"), [], DeepID())
    assert gpu.trunk_block == gpu.chunk == 4096


def test_memory_budget_shrinks_the_chunk_and_refuses_what_cannot_fit():
    x = jax.ShapeDtypeStruct((10000, 55, 47, 3), np.uint8)
    fast = sw.SweepOptions(memory_budget=10 * 2**30)
    assert sw.plan_sweep(fast, [x, x], DeepID()).chunk == 256
    small = sw.plan_sweep(dataclasses.replace(fast, memory_budget=450 * 2**20), [x, x], DeepID()).chunk
    assert 1 <= small < 256
    plain = sw.plan_sweep(dataclasses.replace(sw.PLAIN, memory_budget=450 * 2**20), [x, x], DeepID()).chunk
    batched = sw.plan_sweep(dataclasses.replace(fast, memory_budget=450 * 2**20, batch_steps=8), [x, x], DeepID()).chunk
    assert plain < small and batched < small  # both need more memory per image in flight
    with pytest.raises(ConfigError, match="memory budget"):
        sw.plan_sweep(dataclasses.replace(fast, memory_budget=2**20), [x, x], DeepID())
    # A budget the data fits but not one image's activations: the message names the image, not the data.
    one = jax.ShapeDtypeStruct((1, 55, 47, 3), np.uint8)  # conv_1's activations alone: 52 x 44 x 20 floats
    with pytest.raises(ConfigError, match=r"one image takes about [0-9.e-]+ GiB of working memory in the sweep .* "
                                          r"the memory budget is 6.1e-05 GiB; raise .*memory_budget or give a model "
                                          "of smaller feature maps"):
        sw.plan_sweep(dataclasses.replace(fast, memory_budget=2**16), [one, one], DeepID())
    # CPU devices share the host's memory, each with a chunk in flight: two take half the chunk each.
    two = dataclasses.replace(fast, memory_budget=450 * 2**20, devices=2, platform="cpu")
    assert sw.plan_sweep(two, [x, x], DeepID()).chunk in (small // 2, small // 2 + 1)


def test_orders_per_call_needs_batched_steps():
    with pytest.raises(ConfigError, match="orders_per_call > 1 needs batch_steps > 0"):
        sw.plan_sweep(sw.SweepOptions(batch_steps=0, orders_per_call=2), [], DeepID())
    with pytest.raises(ConfigError, match="orders_per_call=0 must be >= 1"):
        sw.plan_sweep(sw.SweepOptions(orders_per_call=0), [], DeepID())


def test_plans_for_a_platform_are_not_probed_and_cpu_runs_its_native_head():
    assert plan_sweep(SweepOptions(), [], DeepID()).impl == CPU_HEAD  # auto on this CPU
    assert plan_sweep(SweepOptions(impl="reference"), [], DeepID()).impl == "reference"
    assert plan_sweep(SweepOptions(platform="cuda"), [], DeepID()).impl == "reference"  # auto: the faster head on the H200
    assert plan_sweep(SweepOptions(platform="cuda", impl="pallas"), [], DeepID()).impl == "pallas"  # unprobed: not running
    assert plan_sweep(SweepOptions(platform="cuda", impl="reference"), [], DeepID()).impl == "reference"
    assert np.isfinite(plan_sweep(SweepOptions(platform="cuda"), [], DeepID()).bytes_per_image)
