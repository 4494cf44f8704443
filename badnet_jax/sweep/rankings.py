"""Pruning orders of the pruned layer's channels, side by side: which ranking gives the best trade-off.

Every ranking is an order of the layer's C channels (DeepID's pool_3: 60), pruned first to last:

- ``activation``: the lab's (Fine-Pruning): mean activation on clean validation data, lowest first;
- ``clp``: Channel Lipschitzness (Zheng et al., ECCV 2022), data-free: channel c's upper Lipschitz bound is
  the largest singular value of the producing convolution's kernel for output channel c as an
  (in_channels, kh*kw) matrix, times |gamma / sigma| of a batch norm in between
  (``PrunableModel.producer``; DeepID: conv_3, no batch norm); highest first;
- ``l1``: L1 norm of that kernel for output channel c, smallest first;
- ``random``: R seeded random orders, a baseline (reported as mean and spread);
- ``anp``: Adversarial Neuron Pruning (``badnet_jax.sweep.anp``), smallest mask first;
- ``order_file``: a user's own order, from a file.

``activation`` and ``anp`` need the ranking set's features, so they are computed inside the sweep's
compiled call (the trunk pass is shared); the others come from the weights, a seed or a file and go in as
given orders. :func:`resolve_rankings` decides all of that once, into a :class:`RankingPlan`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.io import fileio
from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import Params, Producer, PrunableModel
from badnet_jax.sweep.anp import ANPConfig

RANKINGS = ("activation", "clp", "l1", "random", "anp", "order_file")
IN_SWEEP = ("activation", "anp")  # computed inside the compiled sweep from the ranking set's pool_3 features
GIVEN = "given"  # source of an order computed before the sweep


@dataclasses.dataclass(frozen=True)
class RankingOptions:
    """Which rankings to sweep, and their settings.

    Attributes:
        rank_by: ranking names (:data:`RANKINGS`), the first one is the defense's (its cut is the one written).
        random_orders: R, the number of seeded random orders of ``random``.
        seed: seed of the random orders and of ANP.
        order_file: the file of ``order_file`` (C channel indices: JSON list, whitespace- or comma-separated
            text, or a curve.json whose ``order`` is used).
        anp: ANP's hyper-parameters (its seed is replaced by ``seed``).
    """

    rank_by: tuple[str, ...] = ("activation",)
    random_orders: int = 5
    seed: int = 0
    order_file: Optional[str] = None
    anp: ANPConfig = ANPConfig()


@dataclasses.dataclass(frozen=True)
class RankingPlan:
    """The orders a sweep evaluates, resolved once.

    Attributes:
        names: the rankings, in the order asked; ``names[0]`` is the primary one.
        labels: one per swept order, e.g. ``("activation", "random/0", "random/1")``.
        sources: per label, where its order comes from: ``activation`` / ``anp`` (inside the sweep) or
            ``given`` (the next row of ``given``).
        given: (G, 60) int32 orders computed before the sweep, in label order. Not part of equality or
            hashing: the compiled sweep takes them as an argument, so a new file or seed does not recompile.
        anp: ANP's settings (None when not asked).
        reads: what ``clp`` and ``l1`` read, in words (:meth:`Producer.describe`; None when neither is asked).
    """

    names: tuple[str, ...]
    labels: tuple[str, ...]
    sources: tuple[str, ...]
    given: np.ndarray = dataclasses.field(compare=False, hash=False, repr=False)
    anp: Optional[ANPConfig] = None
    reads: Optional[str] = dataclasses.field(default=None, compare=False)

    def rows(self, name: str) -> list[int]:
        """Indices (into ``labels``) of ranking ``name``'s orders: one, or R for ``random``."""
        return [i for i, label in enumerate(self.labels) if label.split("/")[0] == name]

    @property
    def needs_ranking_set(self) -> bool:
        return any(s in IN_SWEEP for s in self.sources)

    def with_given(self, label: str, order: np.ndarray) -> "RankingPlan":
        """The same plan with ``label``'s order given (computed already) instead of computed in the sweep."""
        i = self.labels.index(label)
        sources = list(self.sources)
        sources[i] = GIVEN
        before = sum(1 for s in self.sources[:i] if s == GIVEN)
        given = np.insert(self.given, before, np.asarray(order, np.int32), axis=0)
        return dataclasses.replace(self, sources=tuple(sources), given=given)


def single(order: Optional[Sequence[int] | np.ndarray], channels: int, layer: str = "pruned layer") -> RankingPlan:
    """The plan of a one-order sweep over ``channels`` channels: the lab's activation ranking, or ``order`` as given."""
    if order is None:
        return RankingPlan(("activation",), ("activation",), ("activation",), np.zeros((0, channels), np.int32))
    return RankingPlan(("order",), ("order",), (GIVEN,),
                       check_order(order, arg("order"), channels, layer, field="order")[None])


def check_order(order, where: str, channels: int, layer: str = "pruned layer",
                field: Optional[str] = None) -> np.ndarray:
    """``order`` as (C,) int32, refused unless it is a permutation of the ``channels`` channels of ``layer``.

    Args:
        order: the channel indices, pruned first to last.
        where: what the order is, for the message (e.g. ``"order"`` or the file it came from).
        channels: C, the pruned layer's channel count.
        layer: the pruned layer's name, for the message.
        field: the argument or config field it came from, for the error's ``field``.

    Raises:
        ConfigError: not a permutation of 0..C-1 (saying which channels are missing or that one repeats).
    """
    try:
        o = np.asarray(order)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: not an order of channels ({err})", field=field) from None
    if o.shape != (channels,) or not np.issubdtype(o.dtype, np.integer) or \
            sorted(o.tolist()) != list(range(channels)):
        got = f"shape {o.shape}, dtype {o.dtype}"
        if o.ndim == 1 and np.issubdtype(o.dtype, np.integer):
            uniq, counts = np.unique(o, return_counts=True)  # sorted
            inside = (uniq >= 0) & (uniq < channels)
            for what, which in ((f"outside 0..{channels - 1}", uniq[~inside]),
                                ("missing", np.setdiff1d(np.arange(channels), uniq)),
                                ("repeated", uniq[inside & (counts > 1)])):
                if which.size:
                    got += f", {which.size} {what}: {which[:5].tolist()}{'...' if which.size > 5 else ''}"
        raise ConfigError(f"{where}: an order must be a permutation of the {channels} {layer} channels "
                          f"0..{channels - 1}, each once ({got})", field=field)
    return o.astype(np.int32)


def read_order_file(path: str | Path, channels: int, layer: str = "pruned layer") -> np.ndarray:
    """A user's order: C channel indices as a JSON list, as text (whitespace or commas), or a curve.json.

    Raises:
        ConfigError: naming ``order_file`` (the :class:`RankingOptions` field it comes from): the file cannot
            be read, or does not hold a permutation of the ``channels`` channels of ``layer``.
    """
    where = f"{arg('order_file')} {path}"
    try:
        path = fileio.require_file(path, ConfigError, "order file")
    except ConfigError as err:
        raise ConfigError(f"{arg('order_file')} {err}", field="order_file") from None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot be read as text ({err})", field="order_file") from None
    try:
        value = json.loads(text)
    except ValueError:
        value = text.replace(",", " ").split()
    if isinstance(value, dict):
        if "order" not in value:
            raise ConfigError(f"{where}: a JSON object without an 'order' key", field="order_file")
        model = value.get("model")
        # A curve.json names its pruned layer (none: the lab's pool_3); an order of another layer's channels
        # would prune the wrong ones.
        pruned = model.get("layer") if isinstance(model, dict) else "pool_3"
        if layer != "pruned layer" and pruned != layer:
            raise ConfigError(f"{where}: a curve.json of layer {pruned!r}, but {layer!r} is pruned here",
                              field="order_file")
        value = value["order"]
    if not isinstance(value, list) or not all(isinstance(v, int) or (isinstance(v, str) and v.isdigit())
                                              for v in value):
        raise ConfigError(f"{where}: expected {channels} channel indices (integers)", field="order_file")
    return check_order(np.asarray([int(v) for v in value]), where, channels, layer, field="order_file")


def _producer(model: PrunableModel, params: Params, ranking: str) -> Producer:
    producer = model.producer(params)
    if producer is None:
        why = (f"{model.name} has none there (choose another layer or ranking)" if model.layers_known else
               f"{model.name} is a Flax module, whose layers badnet-jax cannot see (rank it by activation, random, "
               "anp or order_file)")
        raise ConfigError(f"{arg('rank_by')}: the ranking {ranking!r} reads the kernel of the convolution that "
                          f"produces {model.layer}'s channels, and {why}", field="rank_by")
    return producer


def _clp(kernel: np.ndarray) -> np.ndarray:
    kh, kw, cin, cout = kernel.shape
    per_channel = np.moveaxis(kernel, 3, 0).reshape(cout, kh * kw, cin).transpose(0, 2, 1)  # (out, in, kh*kw)
    return np.linalg.svd(per_channel, compute_uv=False)[:, 0]


def _l1(kernel: np.ndarray) -> np.ndarray:
    return np.abs(kernel).sum(axis=(0, 1, 2))


def clp_scores(model: PrunableModel, params: Params) -> np.ndarray:
    """(C,) CLP upper bound per output channel: the largest singular value of its (in, kh*kw) kernel."""
    return _clp(_producer(model, params, "clp").kernel)


def l1_scores(model: PrunableModel, params: Params) -> np.ndarray:
    """(C,) L1 norm of the producing convolution's kernel for each output channel."""
    return _l1(_producer(model, params, "l1").kernel)


def random_orders(count: int, seed: int, channels: int) -> np.ndarray:
    """(count, C) seeded random orders (NumPy's PCG64: the same on every machine)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(channels) for _ in range(count)]).astype(np.int32).reshape(count, channels)


def _ascending(scores: np.ndarray) -> np.ndarray:
    return np.argsort(scores, kind="stable").astype(np.int32)


def resolve_rankings(options: RankingOptions, params: Params, model: PrunableModel) -> RankingPlan:
    """Check ``options`` and compute every order of ``model``'s pruned layer that does not need data.

    Raises:
        ConfigError: an unknown or repeated name, ``random`` with R < 1, ``order_file`` without a file (or a
            file without ``order_file``), or an unreadable / invalid order file; ``clp`` or ``l1`` for a layer
            no convolution produces.
    """
    model = as_model(model)
    channels = model.num_channels
    # One name alone is one ranking (tuple("random") would be its letters).
    names = (options.rank_by,) if isinstance(options.rank_by, str) else tuple(options.rank_by)
    if options.order_file is not None and "order_file" not in names:
        names = names + ("order_file",)  # giving the file asks for its ranking
    if not names:
        raise ConfigError(f"{arg('rank_by')}: give at least one ranking", field="rank_by")
    for name in names:
        if name not in RANKINGS:
            raise ConfigError(f"{arg('rank_by')}: unknown ranking {name!r}; choose from {', '.join(RANKINGS)}",
                              field="rank_by")
    if len(set(names)) != len(names):
        raise ConfigError(f"{arg('rank_by')}: a ranking is given twice ({','.join(names)})", field="rank_by")
    if "random" in names and options.random_orders < 1:
        raise ConfigError(f"{arg('random_orders')} must be >= 1, got {options.random_orders}", field="random_orders")
    if "anp" in names and options.anp.steps < 1:
        raise ConfigError(f"{arg('anp.steps')} must be >= 1 (with none, every mask stays 1 and the order says "
                          f"nothing), got {options.anp.steps}", field="anp.steps")
    if "order_file" in names and options.order_file is None:
        raise ConfigError(f"the ranking 'order_file' in {arg('rank_by')} needs {arg('order_file')}, the file of "
                          "your order", field="order_file")
    # clp and l1 read the same producing convolution: found once.
    data_free = [n for n in names if n in ("clp", "l1")]
    producer = _producer(model, params, data_free[0]) if data_free else None
    labels, sources, given = [], [], []
    for name in names:
        if name in IN_SWEEP:
            labels.append(name)
            sources.append(name)
            continue
        if name == "random":
            orders = list(random_orders(options.random_orders, options.seed, channels))
            labels += [f"random/{i}" for i in range(len(orders))]
        elif name == "clp":
            orders = [_ascending(-_clp(producer.kernel))]  # highest bound first: stable on the negated scores
            labels.append(name)
        elif name == "l1":
            orders = [_ascending(_l1(producer.kernel))]
            labels.append(name)
        else:
            orders = [read_order_file(options.order_file, channels, model.layer)]
            labels.append(name)
        sources += [GIVEN] * len(orders)
        given += orders
    anp = dataclasses.replace(options.anp, seed=options.seed) if "anp" in names else None
    stacked = np.stack(given).astype(np.int32) if given else np.zeros((0, channels), np.int32)
    return RankingPlan(names, tuple(labels), tuple(sources), stacked, anp,
                       None if producer is None else producer.describe())
