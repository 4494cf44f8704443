"""badnet_jax.models.flax_checks through FlaxCNN.build: a module that computes in a narrower dtype than float64 when
given float64, or mixes the images of a batch, is refused naming the method; weight casts, running statistics and
per-image work pass."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.errors import ConfigError
from badnet_jax.models.flax_model import FlaxCNN


class Net(nn.Module):
    """conv -> relu -> conv -> relu (the pruned layer) | flatten -> dense -> relu | output; ``dtype`` passed to the
    layers, as Flax modules often do."""

    dtype: Optional[Any] = None

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", dtype=self.dtype, name="conv1")(self.prepare(x)))
        return nn.relu(nn.Conv(8, (3, 3), strides=2, dtype=self.dtype, name="conv2")(x))

    def prepare(self, x):
        return x

    @nn.compact
    def hidden(self, feats):
        return nn.relu(nn.Dense(12, dtype=self.dtype, name="fc")(feats.reshape(feats.shape[0], -1)))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="output")(self.hidden(self.features(x)))


class CenteredImages(Net):
    """Each image minus the batch's mean image."""

    def prepare(self, x):
        return x - x.mean(axis=0, keepdims=True)


class SizedBatch(Net):
    """Each image scaled by the batch's largest pixel."""

    def prepare(self, x):
        return x / jnp.max(x)


class CenteredHidden(Net):
    @nn.compact
    def hidden(self, feats):
        flat = feats.reshape(feats.shape[0], -1)
        return nn.relu(nn.Dense(12, name="fc")(flat - flat.mean(axis=0, keepdims=True)))


class RoundTrip(Net):
    """float32 and back inside a jitted helper: the output is float64, the values are float32's."""

    def prepare(self, x):
        return jax.jit(lambda y: y.astype(jnp.float32).astype(y.dtype))(x)


class LoopNet(Net):
    """A float32 convolution inside a loop over the images (lax.map): the check follows the loop's body."""

    @nn.compact
    def features(self, x):
        conv = nn.Conv(8, (3, 3), strides=2, dtype=jnp.float32, name="conv2")
        h = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        return nn.relu(jax.lax.map(lambda one: conv(one[None])[0].astype(one.dtype), h))


class CumulativeBatch(Net):
    """Image i gets the sum of images 0..i: the first image is its own, the others are not."""

    def prepare(self, x):
        return jnp.cumsum(x, axis=0)


class FirstAsReference(Net):
    """Each image minus the batch's first."""

    def prepare(self, x):
        return x - x[:1]


class ShiftedByBatchMinimum(Net):
    """Each image minus the batch's smallest pixel."""

    def prepare(self, x):
        return x - jnp.min(x)


class ReducedPrecision(Net):
    """float16's precision kept in a float64 array."""

    def prepare(self, x):
        return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)


class Complex64(Net):
    """A spectral step in complex64, widened before its real part is taken."""

    def prepare(self, x):
        y = jnp.fft.ifft2(jnp.fft.fft2(x.astype(jnp.complex64), axes=(1, 2)), axes=(1, 2))
        return jnp.real(y.astype(jnp.promote_types(x.dtype, jnp.complex64)))  # complex128 under float64


class CarriedCast(Net):
    """A float32 round trip of a scan's carry that holds the image only from the second iteration on."""

    def prepare(self, x):
        def step(carry, _):
            out, held = carry
            return (held.astype(jnp.float32).astype(held.dtype), x), None
        return jax.lax.scan(step, (jnp.zeros_like(x), jnp.zeros_like(x)), None, length=2)[0][0]


class WhileCarriedCast(Net):
    """The same through a while loop."""

    def prepare(self, x):
        def step(carry):
            i, out, held = carry
            return i + 1, held.astype(jnp.float32).astype(held.dtype), x
        return jax.lax.while_loop(lambda c: c[0] < 2, step, (0, jnp.zeros_like(x), jnp.zeros_like(x)))[1]


class HostCallback(Net):
    """The images rounded to float32 on the host and handed back in their own dtype."""

    def prepare(self, x):
        spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(lambda y: np.asarray(y, np.float32).astype(y.dtype), spec, x)


class MantissaZeroed(Net):
    """The low 29 mantissa bits of float64 values zeroed through their bits: float32's precision in float64."""

    def prepare(self, x):
        if x.dtype != jnp.float64:
            return x
        bits = jax.lax.bitcast_convert_type(x, jnp.int64)
        return jax.lax.bitcast_convert_type(bits & jnp.int64(-(1 << 29)), jnp.float64)


class BatchSized(Net):
    """Images scaled by the batch's size."""

    def prepare(self, x):
        return x * (x.shape[0] / 4)


class Looped(Net):
    """Each image smoothed twice by a float64 loop: loops that stay in the input's dtype pass."""

    def prepare(self, x):
        return jax.lax.fori_loop(0, 2, lambda i, y: 0.5 * (y + jnp.roll(y, 1, axis=1)), x)


class BF16Algorithm(Net):
    """A dense layer of float64 values with the dot algorithm pinned to bfloat16 products (a TPU setting)."""

    @nn.compact
    def hidden(self, feats):
        dense = nn.Dense(12, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32, name="fc")
        return nn.relu(dense(feats.reshape(feats.shape[0], -1)))


class NarrowExponent(Net):
    """float64's mantissa with a 2-bit exponent: large and small values clipped."""

    def prepare(self, x):
        return jax.lax.reduce_precision(x, exponent_bits=2, mantissa_bits=52)


class ThroughARef(Net):
    """The images written into a mutable array, read back and rounded to float32."""

    def prepare(self, x):
        ref = jax.new_ref(jnp.zeros_like(x))
        ref[...] = x
        return ref[...].astype(jnp.float32).astype(x.dtype)


class FloatNaN(Net):
    """The log of a value that is 0 somewhere: -inf."""

    def prepare(self, x):
        return jnp.log(x * 0.0)


class Float32Aside(Net):
    """float32 values that never reach the outputs: a printed copy, a dropped loop carry, a jitted helper's unused
    output, a float32 copy handed to a helper that drops it or to a loop that only prints it, and a float32 weight
    carried beside the images through a loop."""

    def prepare(self, x):
        jax.debug.print("{}", x.astype(jnp.float32).sum(), ordered=False)
        w = jnp.float32(0.5)
        step = lambda i, c: (c[0] + 0.25 * c[1] * x, c[1] * 2, c[2] + x.astype(jnp.float32))  # noqa: E731
        y, _, _ = jax.lax.fori_loop(0, 2, step, (x, w, jnp.zeros(x.shape, jnp.float32)))
        y, _ = jax.jit(lambda a: (a * 2, w.astype(jnp.float32) * a.astype(jnp.float32)))(y)
        y, _ = jax.jit(lambda a, b: (a, b * 2))(y, y.astype(jnp.float32))

        def printing(i, c):
            jax.debug.print("{}", c[1].sum())
            return c[0] * 1.5, c[1]
        return jax.lax.fori_loop(0, 2, printing, (y, y.astype(jnp.float32)))[0]


class ExactBits(Net):
    """jnp functions whose bodies read float64's bits and are exact (copysign, frexp, ldexp, signbit)."""

    def prepare(self, x):
        m, e = jnp.frexp(x + 1.0)
        return jnp.where(jnp.signbit(x - 0.5), jnp.copysign(jnp.ldexp(m, e), -1.0), x)


class CustomReducer(Net):
    """A reduction whose combiner rounds each element it adds to float32."""

    def prepare(self, x):
        total = jax.lax.reduce(x, jnp.zeros((), x.dtype), lambda a, b: a + b.astype(jnp.float32).astype(a.dtype), (3,))
        return x + 0.3 * total[..., None]


class StepsByTheImage(Net):
    """A scale shrunk in float32 as many times as the image's brightness says (a loop whose trip count the input
    decides: every carry depends on the image)."""

    def prepare(self, x):
        def one(image):
            shrink = lambda i, s: (s.astype(jnp.float32) * jnp.float32(0.9)).astype(s.dtype)  # noqa: E731
            return image * jax.lax.fori_loop(0, (image.mean() * 8).astype(jnp.int32), shrink, jnp.ones((), image.dtype))
        return jax.lax.map(one, x)


class NamedLikeFrexp(Net):
    """A user's jitted function named frexp that zeroes float64's low mantissa bits: jnp's trusted functions are
    trusted for their program, not their name."""

    def prepare(self, x):
        if x.dtype != jnp.float64:
            return x

        @jax.jit
        def frexp(y):
            bits = jax.lax.bitcast_convert_type(y, jnp.int64)
            return jax.lax.bitcast_convert_type(bits & jnp.int64(-(1 << 29)), jnp.float64)
        return frexp(x)


class ChosenWeights(Net):
    """float32 weights chosen by the input (jnp.where, a lookup table) and a float32 one-hot mask: exact."""

    def prepare(self, x):
        table = jnp.linspace(0, 1, 10, dtype=jnp.float32)
        x = x * jnp.where(x > 0.5, jnp.float32(0.3), jnp.float32(0.7))
        x = x + jnp.take(table, jnp.clip((x * 9).astype(jnp.int32), 0, 9))
        return x * jax.nn.one_hot(jnp.argmax(x, -1), 3, dtype=jnp.float32)


class ExactMask(Net):
    """A 0/1 mask cast to float32 (exact in any dtype) multiplying float64 values."""

    def prepare(self, x):
        return x * (x > 0.5).astype(jnp.float32)


class SownFloat32(Net):
    """A float32 copy sown into a collection that is not kept: not part of the network."""

    def prepare(self, x):
        self.sow("intermediates", "input32", x.astype(jnp.float32))
        return x


class WeightCast(Net):
    """A per-channel weight rounded to float32 and multiplied into the features: a weight like any other."""

    @nn.compact
    def hidden(self, feats):
        scale = self.param("scale", nn.initializers.ones, (feats.shape[-1],)).astype(jnp.float32)
        return nn.relu(nn.Dense(12, name="fc")((feats * scale[None, None, None, :]).reshape(feats.shape[0], -1)))


class RunningStats(Net):
    """A batch norm in inference mode: running statistics, not the batch's."""

    @nn.compact
    def hidden(self, feats):
        feats = nn.BatchNorm(use_running_average=True, name="bn")(feats)
        return nn.relu(nn.Dense(12, name="fc")(feats.reshape(feats.shape[0], -1)))


def _build(module: nn.Module):
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)))
    variables = variables if len(variables) > 1 else variables["params"]
    return FlaxCNN.build(module, variables, input_hwc=(12, 12, 3), input_scale="255", layer="conv2")


@pytest.mark.parametrize("module, complaint", [
    (Net(dtype=jnp.float32), r"Net.features computes in float32 \(\w+\) when given float64 inputs and weights"),
    (Net(dtype=jnp.bfloat16), r"Net.features computes in bfloat16"),
    (RoundTrip(), r"RoundTrip.features computes in float32"),
    (LoopNet(), r"LoopNet.features computes in float32"),
    (CenteredImages(), r"CenteredImages.features gives an image other values in a batch of other images than alone "
                       r"or in a batch of copies of itself \(off by [\d.e+-]+ of their size\): it mixes the images"),
    (SizedBatch(), r"SizedBatch.features gives an image other values in a batch of other images"),
    (CenteredHidden(), r"CenteredHidden.hidden gives an image other values in a batch of other images"),
    (CumulativeBatch(), r"CumulativeBatch.features gives an image other values in a batch of other images"),
    (FirstAsReference(), r"FirstAsReference.features gives an image other values in a batch of other images"),
    (ShiftedByBatchMinimum(), r"ShiftedByBatchMinimum.features gives an image other values in a batch of other"),
    (ReducedPrecision(), r"ReducedPrecision.features computes in 5 exponent and 10 mantissa bits "
                          r"\(reduce_precision\)"),
    (Complex64(), r"Complex64.features computes in complex64"),
    (CarriedCast(), r"CarriedCast.features computes in float32 \(convert_element_type\)"),
    (WhileCarriedCast(), r"WhileCarriedCast.features computes in float32 \(convert_element_type\)"),
    (HostCallback(), r"HostCallback.features runs host code \(pure_callback\), whose precision badnet-jax cannot "
                     r"check, when given float64"),
    (MantissaZeroed(), r"MantissaZeroed.features reads its values' bits as another type \(bitcast_convert_type\)"),
    (BatchSized(), r"BatchSized.features gives an image other values in a batch of other images than alone"),
    (BF16Algorithm(), r"BF16Algorithm.hidden computes with the algorithm BF16_BF16_F32 \(dot_general\)"),
    (NarrowExponent(), r"NarrowExponent.features computes in 2 exponent and 52 mantissa bits"),
    (ThroughARef(), r"ThroughARef.features writes into a mutable array \(swap\)"),
    (FloatNaN(), r"FloatNaN.features gives NaN or infinite values in float64 on random inputs"),
    (CustomReducer(), r"CustomReducer.features computes in float32 \(convert_element_type\)"),
    (StepsByTheImage(), r"StepsByTheImage.features computes in float32 \(convert_element_type\)"),
    (NamedLikeFrexp(), r"NamedLikeFrexp.features reads its values' bits as another type"),
])
def test_a_module_the_float64_settling_cannot_trust_is_refused(module, complaint):
    with pytest.raises(ConfigError, match=r"module: " + complaint) as err:
        _build(module)
    assert err.value.field == "module"


@pytest.mark.parametrize("module", [Net(), WeightCast(), RunningStats(), ExactMask(), SownFloat32(), Looped(),
                                    Float32Aside(), ExactBits(), ChosenWeights()])
def test_a_module_that_computes_each_image_in_float64_is_accepted(module, rng):
    model = _build(module)
    assert model.feature_hwc == (6, 6, 8)
    # Its float64 network is float64: the settling's features differ from float32's by float32 roundings.
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)))
    params = variables if len(variables) > 1 else variables["params"]
    x = rng.integers(0, 256, (4, 12, 12, 3)).astype(np.uint8)
    f64 = model.features64(params, x, model.divisor)
    f32 = np.asarray(model.features(params, jnp.asarray(x, jnp.float32)))
    assert f64.dtype == np.float64 and np.abs(f64 - f32).max() < 1e-4 * np.abs(f64).max()
    assert not np.array_equal(f64, f32.astype(np.float64))
