"""What a user may ask of the sweep (:class:`SweepOptions`) resolved once into what it does (:class:`SweepPlan`).

Every sweep decision lives here and nowhere else: the strategy, the masked-head implementation, how many
distinct steps go into one head call, the chunk (from the backend default and the memory budget) and the
device count. The rest of the sweep reads the plan; the defense computes it once and hands it on.

Memory model (bytes per image in flight, float32), from the model (``badnet_jax.models.protocol``): the
trunk's largest intermediates (``trunk_bytes_per_image``; DeepID: conv_1's output 52x44x20, its pool and
conv_2's output, ~350 KB); the plain sweep's vmapped head over every mask (``plain_head_bytes_per_image``);
the prefix sweep's per-step carries (``step_bytes_per_image``); without dedupe every step's pre-activations
and logits; when it batches steps, every step's pre-activations and one batch of logits. Resident: every
set's images (twice on a CPU: host array and device buffer), C + 1 int32 predictions per image, and every
set's features: the sets that rank nothing are swept as one block (``badnet_jax.sweep.layout``), whose
features are stored whole beside the ranking set's (grouping gathers each chunk's rows, it copies no set),
and what each device's call holds whatever its chunk (``call_bytes``: a Flax head split's linear map).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal, Optional, Sequence

import jax
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.io.fileio import memory_bytes
from badnet_jax.kernels.dense import api as dense_api
from badnet_jax.kernels.masked_head.api import default_platform, resolve_impl
from badnet_jax.sweep.progress import stderr_is_terminal
from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import PrunableModel

log = logging.getLogger(__name__)

Strategy = Literal["plain", "prefix", "prefix_dedupe", "prefix_batched", "cumulative"]

CPU_CHUNK = 256  # per-step GEMMs of 256 rows run near a CPU's matmul peak, and dedupe stays fine-grained
ACCELERATOR_CHUNK = 4096  # GPU/TPU: few, large calls
# The trunk's blocks on a CPU: 64 images keep a block's conv_1 output and pool in the caches (DeepID's trunk
# ran 1.3x faster at 64 than at 256 on a 2-core Xeon); it runs before the head, so its block is its own.
CPU_TRUNK_CHUNK = 64
# How to get more CPU devices, for a refusal of more devices than there are.
CPU_DEVICES_HINT = ("on a CPU, the environment's JAX_NUM_CPU_DEVICES=N, or XLA's xla_force_host_platform_device_count "
                    "flag, makes N devices")
# Distinct steps per head call where the options leave it open. 0 (one head call per distinct step inside the
# scan, which skips a chunk's dead steps) is the fastest measured on a CPU and on the H200: the whole curve of
# the lab-scale validation sets took 107.6 ms at 0, 112.8 at 1 and 120.8 at 8 (chunk 4096; docs/benchmarks.md,
# "H200 (2026-12-04)"). Orders vmapped together need batched calls: 8 then, as on a platform not yet measured
# (TPU, ROCm), where few large calls are reasoned to pay.
MEASURED_BATCH_STEPS = {"cpu": 0, "cuda": 0}
ACCELERATOR_BATCH_STEPS = 8



@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """What a user may ask of the sweep. Every shortcut is exact: all give the plain sweep's predictions.

    Attributes:
        prefix_sums: build every step's fc_1/conv_4 pre-activations from per-channel contributions with
            suffix sums over the order (``badnet_jax.models.affine``) instead of re-running the masked head.
        dedupe: (needs ``prefix_sums``) evaluate each distinct effective mask once per chunk: a step that only
            prunes channels that are zero on every image of the chunk reuses the previous step's predictions.
        cumulative: (needs ``prefix_sums``) build every step's pre-activations at once (all channels'
            contributions in one call, a reverse cumulative sum) and evaluate the tail at every step in one call,
            instead of a scan over the steps (``dedupe``, ``group`` and ``batch_steps`` then have nothing to do).
            None: for a model whose logits are affine in the mask (``PrunableModel.logits_affine``, e.g.
            ``conv -> global average pooling -> dense``), where the per-step tail is one small matmul and a
            scan's per-step overhead would cost more than the work, unless ``batch_steps`` > 0 or
            ``orders_per_call`` > 1 ask for the batched strategy.
        group: (needs ``dedupe``) sort the images by their alive channels before chunking (the ranking set's,
            and the other sets' together: ``badnet_jax.sweep.layout``), so a chunk's images share dead channels
            and skip more steps.
        impl: (needs ``prefix_sums`` unless ``auto``/``reference``) masked-head implementation: ``auto`` (on a CPU
            with the native kernels built, ``native``: the tail's dense layers and top-2 by
            ``badnet_jax.kernels.dense``; elsewhere the JAX reference, faster than the Pallas kernel on the one
            GPU measured), ``reference`` (pure JAX), or ``pallas`` (the kernel where it compiles and agrees with
            the reference, else the reference with a warning).
        batch_steps: (needs ``dedupe`` when > 0) 0 evaluates a chunk's distinct steps one head call each inside
            the scan over steps; B > 0 gathers the distinct steps and evaluates B per head call (few large
            calls). None: 0 on a CPU and an NVIDIA GPU (the fastest measured on each), except 8 on the GPU with
            ``orders_per_call`` > 1 (which needs batched calls); 8 on a TPU or ROCm GPU (unmeasured).
        chunk: images per chunk inside the jitted call; None: 256 on CPU, 4096 on GPU/TPU. Shrunk to fit
            ``memory_budget``.
        orders_per_call: (needs ``batch_steps`` > 0 when > 1) with several rankings, how many orders one head
            call serves: 1 sweeps the orders one after the other inside each chunk; G > 1 vmaps groups of G
            (their distinct steps in the same head calls, working memory G times). 1 by default: on the H200,
            five orders in one group took 1.08x as long as one after the other.
        devices: shard the image axis over this many devices (0 = all, across hosts too); results are the
            single-device ones.
        memory_budget: bytes the sweep may use (None: half of the device's memory). Data that cannot fit is
            refused up front.
        platform: resolve for this platform (``cpu``, ``cuda``, ``rocm``, ``tpu``) instead of the running
            backend's, e.g. to lower the sweep for a GPU with ``jax.export`` on a machine without one.
        progress: show the sweep's progress on stderr, chunk by chunk, from inside the compiled call
            (``badnet_jax.sweep.progress``; results are the same either way). None: when stderr is a terminal
            in a single-process run. A multi-process run shows it (on process 0) only when asked with True:
            every process must compile the same program, whatever its own stderr is.
    """

    prefix_sums: bool = True
    dedupe: bool = True
    group: bool = True
    impl: str = "auto"
    batch_steps: Optional[int] = None
    chunk: Optional[int] = None
    orders_per_call: int = 1
    devices: int = 1
    memory_budget: Optional[int] = None
    platform: Optional[str] = None
    progress: Optional[bool] = None
    cumulative: Optional[bool] = None


PLAIN = SweepOptions(prefix_sums=False, dedupe=False, group=False, impl="reference", cumulative=False)


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """The sweep as it will run, resolved once from :class:`SweepOptions` for a backend and data.

    Attributes:
        strategy: ``plain`` (masked head vmapped over the C + 1 masks), ``prefix`` (suffix sums, every step
            evaluated), ``prefix_dedupe`` (reverse scan, dead steps skipped), ``prefix_batched`` (distinct
            steps gathered, ``batch_steps`` per head call) or ``cumulative`` (every step at once: a cumulative
            sum over the order, the tail in one call).
        group: images sorted by alive channels before chunking.
        impl: resolved masked-head implementation: ``reference``, ``native``, ``pallas`` or ``interpret``.
        batch_steps: distinct steps per head call (``prefix_batched`` only; else 0).
        chunk: images per chunk.
        trunk_chunk: images per block of the trunk (features); at most ``chunk``.
        orders_per_call: orders vmapped together (``prefix_batched`` only; else 1).
        devices: devices the image axis is sharded over (1: no sharding).
        bytes_per_image: working memory per image in flight, as budgeted.
        platform: the platform it is lowered for (the kernel's backend follows it).
        progress: the compiled call reports each chunk to the host (``badnet_jax.sweep.progress``).
    """

    strategy: Strategy
    group: bool
    impl: str
    batch_steps: int
    chunk: int
    devices: int
    bytes_per_image: int
    platform: str = "cpu"
    orders_per_call: int = 1
    progress: bool = False
    trunk_chunk: int = 0  # 0: chunk

    @property
    def fuses_trunk(self) -> bool:
        """Whether the sets that rank nothing (``badnet_jax.sweep.layout``'s blocks after the ranking set) run
        their trunk chunk by chunk beside their heads, their features never stored whole
        (``strategies.sweep_images``). The cumulative strategy's head is a few reductions that XLA fuses the
        trunk's last layers into (a GAP model's trunk ran 2x faster so on a 2-core Xeon); the scan strategies
        keep the trunk's own small blocks, and grouping needs a whole block's features to sort its images."""
        return self.strategy == "cumulative" and not self.group

    @property
    def trunk_block(self) -> int:
        """Images per block of the trunk (:attr:`trunk_chunk`, or :attr:`chunk` when 0)."""
        return self.trunk_chunk or self.chunk

    def describe(self) -> str:
        """One line for logs and reports."""
        extra = f", {self.batch_steps} steps per head call" if self.batch_steps else ""
        extra += f", {self.orders_per_call} orders per call" if self.orders_per_call > 1 else ""
        extra += f", trunk blocks of {self.trunk_block}" if self.trunk_block != self.chunk else ""
        extra += ", later sets' trunks beside their heads" if self.fuses_trunk else ""
        return (f"{self.strategy}{' + grouping' if self.group else ''}, head {self.impl}{extra}, "
                f"chunk {self.chunk}, {self.devices} {self.platform} device(s)")


def check_options(options: SweepOptions) -> None:
    """Refuse values out of range and combinations that would silently do nothing (:func:`plan_sweep` does too;
    a caller checks up front, before loading anything).

    Raises:
        ConfigError: naming the field.
    """
    if options.cumulative and not options.prefix_sums:
        raise ConfigError(f"{arg('cumulative')} needs {arg('prefix_sums')} (it sums the channels' contributions over "
                          "the order)", field="cumulative")
    if options.cumulative and (options.batch_steps or options.orders_per_call > 1):
        raise ConfigError(f"{arg('cumulative')} evaluates every step in one call: {arg('batch_steps')} > 0 and "
                          f"{arg('orders_per_call')} > 1 have nothing to batch", field="cumulative")
    if options.dedupe and not options.prefix_sums:
        raise ConfigError(f"{arg('dedupe')} needs {arg('prefix_sums')} (the plain sweep evaluates every step)",
                          field="dedupe")
    if options.group and not options.dedupe:
        raise ConfigError(f"{arg('group')} needs {arg('dedupe')} (grouping only helps deciding dead steps per chunk)",
                          field="group")
    if options.impl not in ("auto", "reference", "pallas"):
        raise ConfigError(f"{arg('impl', repr(options.impl))}: expected 'auto', 'reference' or 'pallas'", field="impl")
    if options.impl == "pallas" and not options.prefix_sums:
        raise ConfigError(f"{arg('impl', repr('pallas'))} needs {arg('prefix_sums')} (the kernel evaluates the tail "
                          "after the suffix sums)", field="impl")
    if options.batch_steps is not None and options.batch_steps < 0:
        raise ConfigError(f"{arg('batch_steps', options.batch_steps)} must be >= 0", field="batch_steps")
    if options.batch_steps and not options.dedupe:
        raise ConfigError(f"{arg('batch_steps', options.batch_steps)} needs {arg('dedupe')} (it batches a chunk's "
                          "distinct steps)", field="batch_steps")
    if options.orders_per_call < 1:
        raise ConfigError(f"{arg('orders_per_call', options.orders_per_call)} must be >= 1", field="orders_per_call")
    if options.chunk is not None and options.chunk < 1:
        raise ConfigError(f"{arg('chunk', options.chunk)} must be >= 1", field="chunk")
    if options.devices < 0:
        raise ConfigError(f"{arg('devices', options.devices)} must be >= 0 (0 = all)", field="devices")
    if options.platform not in (None, "cpu", "cuda", "rocm", "tpu"):
        raise ConfigError(f"{arg('platform', repr(options.platform))}: expected 'cpu', 'cuda', 'rocm' or 'tpu'",
                          field="platform")
    if not (options.progress is None or isinstance(options.progress, bool)):
        raise ConfigError(f"{arg('progress', str(options.progress))}: expected True, False or None (a terminal)",
                          field="progress")
    budget = options.memory_budget
    if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ConfigError(f"{arg('memory_budget')} must be a finite positive size, got {budget!r} bytes",
                          field="memory_budget")


def default_budget() -> int:
    """Half of the default device's memory (GPU/TPU: its allocator limit; CPU: physical memory)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may not implement memory_stats
        stats = None
    return int((stats or {}).get("bytes_limit") or memory_bytes()) // 2


def plan_sweep(options: SweepOptions, sets: Sequence, model: PrunableModel) -> SweepPlan:
    """Resolve ``options`` for the default backend, these image sets and this model, once.

    Args:
        options: what the user asked.
        sets: the image arrays, or only their shapes and dtypes (anything with ``.shape`` and ``.dtype``),
            the ranking set first; they size the memory budget. Empty: no budget check.
        model: the model swept (a ``PrunableModel``, or a ``BadNet`` module for the lab's DeepID): its
            sizes are the memory model's.

    Raises:
        ConfigError: a combination that does nothing, more devices than exist, or data that cannot fit.
    """
    check_options(options)
    model = as_model(model)
    num_classes, steps = model.num_classes, model.steps
    platform = options.platform or default_platform()
    accelerator = platform != "cpu"
    cumulative = options.cumulative if options.cumulative is not None else (
        options.prefix_sums and model.logits_affine and not options.batch_steps and options.orders_per_call == 1)
    if not options.prefix_sums:
        strategy, batch = "plain", 0
    elif cumulative:
        strategy, batch = "cumulative", 0
    elif not options.dedupe:
        strategy, batch = "prefix", 0
    else:
        batch = options.batch_steps
        if batch is None:
            batch = MEASURED_BATCH_STEPS.get(platform, ACCELERATOR_BATCH_STEPS)
            if options.orders_per_call > 1 and platform != "cpu":
                batch = ACCELERATOR_BATCH_STEPS
        strategy = "prefix_batched" if batch else "prefix_dedupe"
    orders = options.orders_per_call
    if orders > 1 and strategy != "prefix_batched":
        # vmapped, the scan's skip of dead steps (lax.cond) would become a select that evaluates every step
        raise ConfigError(f"orders_per_call > 1 needs batch_steps > 0 (orders share the batched head calls); this "
                          f"plan's strategy is {strategy}")
    available = jax.device_count()
    devices = available if options.devices == 0 else options.devices
    if devices > available and options.platform is None:
        more = f" ({CPU_DEVICES_HINT}; more than the cores run slower)" if platform == "cpu" else ""
        raise ConfigError(f"{arg('devices', devices)}: asked for {devices} devices, only {available} available{more}",
                          field="devices")
    pre = model.preactivation_size
    head = {"plain": model.plain_head_bytes_per_image(), "prefix": steps * (pre + num_classes) * 4,
            "prefix_dedupe": model.step_bytes_per_image(),
            "prefix_batched": orders * (steps * pre * 4 + batch * num_classes * 4),
            "cumulative": steps * (2 * pre + model.hidden_size + 2 * num_classes) * 4}[strategy]
    per_image = model.trunk_bytes_per_image() + head
    wanted = options.chunk or (ACCELERATOR_CHUNK if accelerator else CPU_CHUNK)
    feature_bytes = 4 * int(np.prod(model.feature_hwc))
    # CPU devices share the host's memory and each works on a chunk at once; an accelerator has its own.
    in_flight = 1 if accelerator else devices
    chunk = _chunk_for_budget(sets, options.memory_budget, per_image * in_flight, wanted, accelerator, feature_bytes,
                              steps * 4, model.call_bytes() * in_flight)
    if chunk < wanted:
        log.info("Memory budget: %d images per chunk (instead of %d).", chunk, wanted)
    # The kernel is probed at the shapes of this plan's head calls: batch_steps (or 1) masks x a chunk.
    impl = "reference"
    if options.prefix_sums and model.has_kernels:
        impl = resolve_impl(options.impl, platform, max(batch, 1), chunk, num_classes)
    elif options.impl == "pallas":
        log.warning("No Pallas masked-head kernel for %s; using the JAX reference.", model.name)
    elif options.prefix_sums and options.impl == "auto":
        impl = dense_api.resolve_impl("auto", platform)  # the output layer's top-2 by the native kernel
    progress = options.progress
    if progress is None:
        progress = jax.process_count() == 1 and stderr_is_terminal()
    trunk_chunk = chunk if accelerator else min(chunk, CPU_TRUNK_CHUNK)
    group = options.group and strategy != "cumulative"  # grouping serves dedupe, which a cumulative sum has no use for
    return SweepPlan(strategy=strategy, group=group, impl=impl, batch_steps=batch, chunk=chunk, devices=devices,
                     bytes_per_image=per_image, platform=platform, orders_per_call=orders, progress=progress,
                     trunk_chunk=trunk_chunk)


def _chunk_for_budget(sets: Sequence, budget: Optional[float], per_image: int, wanted: int,
                      accelerator: bool, feature_bytes: int, preds_bytes: int, call_bytes: int) -> int:
    """The largest chunk <= ``wanted`` whose working memory fits ``budget`` beside the resident data
    (``per_image``: the working bytes of one image of a chunk, times the chunks in flight at once;
    ``call_bytes``: what the calls hold whatever their chunk, ``PrunableModel.call_bytes`` per device)."""
    if not sets:
        return wanted
    sizes = [(int(x.shape[0]), int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize) for x in sets]
    budget = default_budget() if budget is None else int(budget)
    copies = 1 if accelerator else 2  # a CPU holds the host array and the device buffer
    feats = sum(n for n, _ in sizes) * feature_bytes
    resident = sum(copies * nbytes + n * preds_bytes for n, nbytes in sizes) + feats + call_bytes
    room = budget - resident
    if room < per_image and per_image > resident:  # one image's working memory, not the data, is what does not fit
        raise ConfigError(f"one image takes about {per_image / 2**30:.3g} GiB of working memory in the sweep (the "
                          "model's activations for it, in every chunk in flight) but the memory budget is "
                          f"{budget / 2**30:.3g} GiB; raise {arg('memory_budget')} or give a model of smaller "
                          "feature maps", field="memory_budget")
    if room < per_image:
        held = (f" ({call_bytes / 2**30:.3g} GiB of it the model's own working memory, held by each device's call "
                "whatever its images: a head split's linear map)" if call_bytes else "")
        fewer = f", fewer images or fewer {arg('devices')}" if call_bytes else " or use fewer images"
        raise ConfigError(f"the data needs about {resident / 2**30:.3g} GiB resident{held} but the memory budget is "
                          f"{budget / 2**30:.3g} GiB; raise {arg('memory_budget')}{fewer}", field="memory_budget")
    return int(max(1, min(wanted, room // per_image)))
