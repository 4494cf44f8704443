"""What the defense needs of a CNN: :class:`PrunableModel`.

Fine-Pruning prunes the output channels of one layer (the *pruned layer*). A model splits at that layer into

* ``features(params, x)``: pixels 0..255 -> the pruned layer's output ``feats_NxHxWxC`` (the trunk, run once);
* ``hidden(params, feats, mask)``: the masked features -> the output layer's input (N, H);
* ``output_layer(params)``: the output layer's kernel (H, K) and bias (K,): ``logits = hidden @ W + b``.

Every exact shortcut of the sweep rests on one more split of the head: the first operations after the
pruned layer are affine in the 0/1 channel mask, so their values (the *pre-activations*, a pytree) are a
constant plus one contribution per kept channel,

    pre(mask) = preactivation_bias(params) + sum_c mask_c * channel_contribution(params, feats, c),

and ``tail_hidden(params, pre)`` finishes the hidden layer. A model carries its own properties (input shape,
input scale, classes, the pruned layer), so nothing defaults to the lab's DeepID.

Implementations: :class:`~badnet_jax.models.deepid.DeepID` (the lab's network, with its float64 NumPy
network and the masked-head kernels) and :class:`~badnet_jax.models.graph.GraphCNN` (any CNN of standard
layers, e.g. read from a Keras file). The float64 methods here are the generic ones: the model's own JAX
functions run by XLA in float64, a base class of the protocol's (``badnet_jax.models.float64``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, DataFileError, arg
from badnet_jax.kernels.dense.api import dense_top2
from badnet_jax.models.float64 import Float64Network
from badnet_jax.pixels import check_images_of_shape, input_divisor, scaled
from badnet_jax.numerics.ties import HIGHEST, TIE_RTOL

Params = dict[str, Any]
Pytree = Any
# Where a layer stage runs (``Stage.part``): the trunk (once per image), the head's part affine in the channel
# mask (the prefix sweep computes it once per channel), the rest of the head (once per evaluated mask).
STAGE_PARTS = ("trunk", "affine", "tail")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One layer of a model as a benchmark times it: a jittable function of the params and the layer's input.

    Attributes:
        name: the layer's name (its Keras layer name where it has one).
        part: where it runs, one of :data:`STAGE_PARTS`.
        flops: FLOPs per image, 2 per multiply-add of its weights (biases, activations and pooling not
            counted); None where the model cannot say (a benchmark may ask XLA instead).
        fn: ``fn(params, x)``: the layer's input (N, ...) -> its output (N, ...).
    """

    name: str
    part: str
    flops: Optional[int]
    fn: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(compare=False)


@dataclasses.dataclass(frozen=True)
class Producer:
    """The convolution producing the pruned channels, as the data-free rankings (clp, l1) read it.

    Attributes:
        kernel: (kh, kw, in, C) float64, the convolution's kernel scaled per output channel by |gamma / sigma|
            of each batch norm between it and the pruned layer.
        conv: the convolution's name.
        batch_norms: the batch norms in between, nearest the convolution first.
    """

    kernel: np.ndarray = dataclasses.field(compare=False, repr=False)
    conv: str
    batch_norms: tuple[str, ...] = ()

    def describe(self) -> str:
        """In words, e.g. ``conv_3's kernel`` or ``stem_conv's kernel times |gamma / sigma| of stem_bn``."""
        scaled_by = f" times |gamma / sigma| of {', '.join(self.batch_norms)}" if self.batch_norms else ""
        return f"{self.conv}'s kernel{scaled_by}"


class PrunableModel(Float64Network, abc.ABC):
    """A CNN the defense can prune (see the module docstring). Implementations are frozen dataclasses, so a
    model is hashable and can be a static argument of ``jax.jit``.

    Every implementation has the fields ``input_hwc`` (input height, width, channels), ``num_classes``,
    ``input_scale`` (``raw`` or ``255``), ``layer`` (the pruned layer's name), ``feature_hwc`` (its output's
    height, width, channels) and ``tie_rtol`` (the relative float32 error bound of its logits, see
    ``badnet_jax.numerics.ties``).
    """

    input_hwc: tuple[int, int, int]
    num_classes: int
    input_scale: str
    layer: str
    feature_hwc: tuple[int, int, int]
    tie_rtol: float = TIE_RTOL

    # ----- properties
    @property
    def num_channels(self) -> int:
        """Channels of the pruned layer (a mask's length; a curve has one more step)."""
        return int(self.feature_hwc[2])

    @property
    def steps(self) -> int:
        """Steps of a pruning curve: k = 0 .. num_channels channels pruned."""
        return self.num_channels + 1

    @property
    def divisor(self) -> float:
        """What this model divides the pixels 0..255 by (:func:`input_divisor` of its input scale)."""
        return input_divisor(self.input_scale)

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The architecture's name, for logs and reports."""

    def in_program(self) -> "PrunableModel":
        """The model as a compiled program holds it (a static argument, part of the program's cache key), with
        the values its programs take as traced arguments fixed: the input scale (the pixels' divisor) and the
        near-tie bound (measured on a model's own images after the sweep has compiled). One program then
        serves every scale and every bound."""
        fixed = {"input_scale": "raw", "tie_rtol": TIE_RTOL}
        if "tie_rtol_measured" in {f.name for f in dataclasses.fields(self)}:
            fixed["tie_rtol_measured"] = False
        return dataclasses.replace(self, **fixed)

    def describe(self) -> str:
        """One line: architecture, input shape, classes, the pruned layer (the input scale has its own line)."""
        h, w, c = self.input_hwc
        channels = f"{self.num_channels} channel{'' if self.num_channels == 1 else 's'}"
        return f"{self.name} ({h}x{w}x{c} input, {self.num_classes} classes), pruning {self.layer} ({channels})"

    @abc.abstractmethod
    def with_input_scale(self, input_scale: str) -> "PrunableModel":
        """The same model taking another input scale."""

    @abc.abstractmethod
    def check_params(self, params: Any, name: str = "params") -> int:
        """Refuse params that are not this model's (shapes only); returns the class count.

        Raises:
            ConfigError: naming ``name``, the layer and the expected shape.
        """

    @abc.abstractmethod
    def init_params(self, seed: int = 0) -> Params:
        """Random params of this architecture (tests, training from scratch)."""

    def multiply_adds(self) -> dict[str, int]:
        """Multiply-adds per image of each weighted layer (benchmarks' FLOP counts)."""
        return {}

    def layer_stages(self) -> tuple[Stage, ...]:
        """The model's layers as :class:`Stage` s, in order: the trunk's, then the head's (per-layer benchmarks).

        What a stage's input is comes from :meth:`stage_inputs`. The default knows nothing inside the model:
        two stages, the trunk (scaled pixels -> the features, named after the pruned layer) and the head (the
        features -> logits, named ``head``), FLOPs unknown (a benchmark may ask XLA).
        """
        return (Stage(self.layer, "trunk", None, lambda p, x: self.features(p, x, 1.0)),
                Stage("head", "tail", None, lambda p, f: self.head(p, f)))

    def stage_inputs(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> dict[str, jax.Array]:
        """Each stage's real input for these pixels 0..255 (one run of the network keeping what the stages
        read), by stage name; the first trunk stage reads the scaled pixels. ``divisor`` as in :meth:`features`.
        A model that overrides :meth:`layer_stages` overrides this too (the default knows only its two stages)."""
        x = scaled(x_NxHxWxC, self.divisor if divisor is None else divisor)
        trunk, head = self.layer_stages()
        return {trunk.name: x, head.name: self.features(params, x, 1.0)}

    def counted(self) -> "PrunableModel":
        """This network with every computation one XLA's cost analysis counts (a benchmark's FLOPs where the
        model knows none): the model itself by default; one whose programs call native kernels (opaque to XLA)
        gives the same network through XLA's own operations."""
        return self

    has_kernels = False  # whether ``tail_top2`` dispatches to kernels of ``badnet_jax.kernels`` (the plan probes them)

    @property
    @abc.abstractmethod
    def preactivation_size(self) -> int:
        """Numbers per image in the pre-activations (all leaves of :meth:`preactivation_bias` together)."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int:
        """The output layer's input width H."""

    @property
    def logits_affine(self) -> bool:
        """Whether the logits are affine in the channel mask: the pre-activations are the output layer's input
        (:meth:`tail_hidden` only reshapes), e.g. ``conv -> global average pooling -> dense``. The sweep's
        planner then builds every step at once by a cumulative sum (``SweepOptions.cumulative``)."""
        return False

    def trunk_bytes_per_image(self) -> int:
        """Working memory per image of the trunk in float32 (the sweep's memory model): a generous default of
        four copies of the input and two of the features. A model that knows its tensors gives
        :func:`working_bytes` of them."""
        return 4 * (4 * int(np.prod(self.input_hwc)) + 2 * int(np.prod(self.feature_hwc)))

    def call_bytes(self) -> int:
        """Working memory one device's sweep holds once, whatever its chunk (the sweep's memory model): none by
        default. A Flax head split's linear map is one such (``badnet_jax.models.flax_split``)."""
        return 0

    def plain_head_bytes_per_image(self) -> int:
        """Working memory per image of the head vmapped over every step's mask (the plain sweep)."""
        per_mask = int(np.prod(self.feature_hwc)) + self.preactivation_size + self.hidden_size + 2 * self.num_classes
        return 4 * self.steps * per_mask

    def step_bytes_per_image(self) -> int:
        """Working memory per image of one step of the prefix sweep (its carries and one head evaluation)."""
        return 4 * (2 * self.preactivation_size + self.hidden_size + 2 * self.num_classes)

    # Whether the model's layers are known to badnet-jax (a graph of layers, the lab's DeepID); a FlaxCNN's module
    # is code: no producer, no per-layer stages, whatever the module holds.
    layers_known = True

    def producer(self, params: Params) -> Optional[Producer]:
        """The convolution producing the pruned channels, its kernel scaled by the batch norms in between (what
        the data-free rankings clp and l1 read); None if no convolution does, or the model cannot tell
        (:attr:`layers_known` False)."""
        return None

    # ----- the trunk
    @abc.abstractmethod
    def features(self, params: Params, x_NxHxWxC: jax.Array, divisor: Any = None) -> jax.Array:
        """Pixels 0..255 (float) -> the pruned layer's output (N, H, W, C). ``divisor``: None divides by the
        model's own; a number or traced scalar divides by that instead (one program for both scales).
        Runs in the pixels' float dtype (float64 under ``jax.enable_x64``)."""

    def features_with_margins(self, params: Params, x_NxHxWxC: jax.Array,
                              divisor: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The features and how far each channel is from dead: (feats, (N, C) margin, (N,) or (N, C) scale).

        Reduced by a max over the images, the margins go to :meth:`undecided_channels`. The default says no
        channel is ever undecided (+inf margins).
        """
        feats = self.features(params, x_NxHxWxC, divisor)
        n = feats.shape[0]
        return feats, jnp.full((n, self.num_channels), jnp.inf, feats.dtype), jnp.ones((n,), feats.dtype)

    def undecided_channels(self, params: Params, margin_C: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """(C,) bool: channels whose dead-or-alive verdict float32 may get wrong, from the margins' max over
        the ranking set (see :meth:`features_with_margins`)."""
        return np.zeros(self.num_channels, bool)

    # ----- the head
    @abc.abstractmethod
    def hidden(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """The features, optionally masked (a (C,) 0/1 mask) -> the output layer's input (N, H)."""

    @abc.abstractmethod
    def output_layer(self, params: Params) -> tuple[jax.Array, jax.Array]:
        """The output layer's kernel (H, K) and bias (K,)."""

    def head(self, params: Params, feats_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """The features, optionally masked -> logits (N, K)."""
        w, b = self.output_layer(params)
        return jnp.dot(self.hidden(params, feats_NxHxWxC, mask), w, precision=HIGHEST) + b[None, :]

    def logits(self, params: Params, x_NxHxWxC: jax.Array, mask: Optional[jax.Array] = None,
               divisor: Any = None) -> jax.Array:
        """Pixels 0..255 -> logits (N, K) of B, or of B' under a (C,) channel mask.

        Raises:
            DataFileError: images of another size than the model's input.
            ConfigError: a mask that is not (C,) zeros and ones.
        """
        if tuple(np.shape(x_NxHxWxC)[1:]) != tuple(self.input_hwc):
            raise DataFileError(f"{arg('x_NxHxWxC')}: images of shape {tuple(np.shape(x_NxHxWxC))}, expected (N, "
                                f"{', '.join(map(str, self.input_hwc))}) for {self.name}", field="x_NxHxWxC")
        if mask is not None:
            self.check_mask(mask)
        return self.head(params, self.features(params, x_NxHxWxC, divisor), mask)

    # ----- the affine split of the head (the sweep's shortcuts)
    @abc.abstractmethod
    def preactivation_bias(self, params: Params) -> Pytree:
        """The pre-activations with every channel pruned, per image (a pytree of arrays without a batch axis)."""

    @abc.abstractmethod
    def channel_contribution(self, params: Params, feats_NxHxWxC: jax.Array, c: jax.Array) -> Pytree:
        """Channel ``c``'s (maybe traced) contribution to the pre-activations (a pytree of (N, ...) arrays)."""

    def contributor(self, params: Params) -> Callable[[jax.Array, jax.Array], Pytree]:
        """:meth:`channel_contribution` as a function of (features, c), with what it reads of the params alone
        prepared once (traceable). The sweep makes it outside its loop over the steps: XLA does not move work
        out of a step that runs under a condition (a dead channel's step is skipped). By default nothing is
        prepared."""
        return lambda feats_NxHxWxC, c: self.channel_contribution(params, feats_NxHxWxC, c)

    def channelwise_preactivations(self, params: Params, feats_NxHxWxC: jax.Array) -> Optional[Pytree]:
        """Every channel's contribution at once, when the pre-activations are per-channel images of the features.

        When only per-channel operations (ReLU, pooling, batch norm, global pooling ...) lie between the pruned
        layer and the pre-activations, channel c contributes to channel c of every leaf alone, and
        ``pre(mask) = preactivation_bias + mask * P`` along each leaf's last axis: P (a pytree of (N, ..., C)
        arrays) is returned. None (the default) where a channel's contribution spreads over other entries (a
        dense layer or a convolution reads several channels): the sweep then builds each channel's
        contribution with :meth:`channel_contribution`.
        """
        return None

    @abc.abstractmethod
    def tail_hidden(self, params: Params, pre: Pytree) -> jax.Array:
        """Pre-activations (leading axes ``...``) -> the output layer's input (..., H)."""

    def tail_top2(self, params: Params, pre: Pytree, impl: str = "reference",
                  platform: str = "cpu") -> tuple[jax.Array, jax.Array, jax.Array]:
        """(...) argmax, top-2 logit gap and output scale S from pre-activations of leading axes ``...``.

        ``impl``/``platform``: a model with its own kernels dispatches on them; by default the output layer's
        top-2 runs by the native kernel where ``impl`` is ``"native"`` (``badnet_jax.kernels.dense``), else
        pure JAX.
        """
        del platform
        hidden = self.tail_hidden(params, pre)
        w, b = self.output_layer(params)
        native = impl == "native" and all(jnp.dtype(a.dtype) == jnp.float32 for a in (hidden, w, b))  # float32 only
        return dense_top2(hidden, w, b, impl="native" if native else "reference")

    # ----- masks and images
    def check_mask(self, mask: Any, name: str = "mask") -> Any:
        """A (C,) channel mask as float32, refused unless every entry is 0 (pruned) or 1 (kept); a traced mask
        is checked for its shape only.

        Raises:
            ConfigError: another shape, or an entry other than 0 or 1.
        """
        c = self.num_channels
        shape = tuple(np.shape(mask))
        if shape != (c,):
            raise ConfigError(f"{arg(name)}: shape {shape}, expected ({c},): one entry per {self.layer} channel, 0 "
                              "pruned or 1 kept", field=name)
        if isinstance(mask, jax.core.Tracer):
            return mask
        m = np.asarray(mask, np.float32)
        bad = np.flatnonzero((m != 0) & (m != 1))
        if len(bad):
            raise ConfigError(f"{arg(name)}: channel {int(bad[0])} is {m[bad[0]]:g} ({len(bad)} of {c} entries are "
                              "neither 0 nor 1); expected 0 (pruned) or 1 (kept): a mask prunes, it does not scale",
                              field=name)
        return m

    def check_images(self, x_NxHxWxC: Any, name: str = "x", allow_empty: bool = False,
                     field: Optional[str] = None) -> None:
        """Refuse images this model cannot take: not (N, *input_hwc), not real pixels 0..255.

        Raises:
            DataFileError: naming ``name`` and what was expected.
        """
        check_images_of_shape(x_NxHxWxC, self.input_hwc, name, allow_empty, field)

    def check_weights(self, params: Any, name: str = "params") -> int:
        """:meth:`check_params` (shapes) and :meth:`check_finite` (values), as every entry point asks; the classes.

        Raises:
            ConfigError: naming ``name`` (see both).
        """
        classes = self.check_params(params, name)
        self.check_finite(params, name)
        return classes

    def check_finite(self, params: Params, name: str = "params") -> None:
        """Refuse weights holding NaN or infinite values (read on the host; shapes and traced params pass):
        every output would be NaN, and an argmax of NaN is an answer like any other.

        Raises:
            ConfigError: naming ``name``, the array and how many of its values.
        """
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if isinstance(leaf, (jax.ShapeDtypeStruct, jax.core.Tracer)) \
                    or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                continue
            bad = int(np.size(leaf) - np.isfinite(np.asarray(leaf)).sum())
            if bad:
                raise ConfigError(f"{arg(name)}: {path_name(path)} holds NaN or infinite values ({bad} of "
                                  f"{np.size(leaf)}); {self.name}'s outputs would be NaN (weights of a training run "
                                  "that diverged?)", field=name)


def path_name(path: Iterable[Any]) -> str:
    """A params tree path (``jax.tree_util`` keys) as errors name it: ``conv1/kernel``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def working_bytes(sizes: Iterable[int]) -> int:
    """Float32 working memory per image of a trunk whose tensors hold ``sizes`` values per image: the two
    largest (a layer's input and output), three times over for XLA's temporaries and slack."""
    return 4 * 3 * sum(sorted(sizes, reverse=True)[:2])
