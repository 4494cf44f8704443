"""badnet_jax.models.flax_convs: a Flax module's plain float32 nn.Conv layers run through badnet_jax.kernels.conv2d
(the native direct kernel where its rule picks it), the same values as the module's own convolutions up to float32
roundings, gradients included; what it cannot pass on exactly runs as written; a GPU program holds none of it."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import sweep as sw
from badnet_jax.kernels.native import CONV2D_DIRECT, native_library
from badnet_jax.models.flax_model import FlaxCNN
from badnet_jax.sweep.run import export_sweep
from tests.models.test_flax_model import Net


class Conv3x3(nn.Conv):
    """A subclass that only sets its fields' defaults: nn.Conv as it runs."""

    kernel_size: tuple = (3, 3)
    use_bias: bool = False


class Conv2x(nn.Conv):
    """A subclass with a method of its own: twice nn.Conv."""

    def __call__(self, inputs):
        return 2 * super().__call__(inputs)


class _DoubledKernel(nn.Module):
    """A mixin after nn.Conv in a subclass's bases: every kernel it reads doubled."""

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        return 2 * value if name == "kernel" else value


class MixedConv(nn.Conv, _DoubledKernel):
    pass


class Convs(Net):
    """Every padding form nn.Conv takes, strides, a dilation, a conv without bias (a subclass setting defaults), one
    called by keyword, a grouped one (passed by); Net's head."""

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="rgb")(x))  # RGB first layer: the direct kernel
        x = nn.relu(Conv3x3(8, padding=1, name="int_pad")(x))
        # An even kernel: SAME_LOWER pads (1, 0) where SAME pads (0, 1).
        x = nn.relu(nn.Conv(8, (2, 2), padding="SAME_LOWER", name="lower")(inputs=x))
        x = nn.relu(nn.Conv(8, (3, 3), padding="CIRCULAR", name="circular")(x))
        x = nn.relu(nn.Conv(8, (3, 2), padding="REFLECT", kernel_dilation=(1, 2), name="reflect")(x))
        x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 0), (0, 1)), kernel_dilation=2, name="pairs")(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, padding="VALID", name="strided")(x))
        return nn.relu(nn.Conv(16, (3, 3), padding=(1, 1), feature_group_count=2, name="grouped")(x))


def _models():
    params = Convs().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    build = lambda fast: FlaxCNN.build(Convs(), params, input_hwc=(16, 16, 3), input_scale="255",  # noqa: E731
                                       layer="grouped", fast_convs=fast)
    return build(True), build(False), params


def _float64_steps(params, x, order) -> np.ndarray:
    """The module run by XLA in float64 (its own convolutions) at every step of ``order``."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        feats = Convs().apply({"params": p64}, jnp.asarray(x, jnp.float64) / 255, method="features")
        out = []
        for k in range(len(order) + 1):
            mask = np.ones(len(order))
            mask[order[:k]] = 0
            hidden = Convs().apply({"params": p64}, feats * mask[None, None, None, :], method="hidden")
            out.append((np.asarray(hidden) @ p64["output"]["kernel"] + p64["output"]["bias"]).argmax(-1))
    return np.stack(out)


def _targets(fn, *args) -> list[str]:
    return re.findall(r"custom_call @([^\(\s]+)\(", jax.jit(fn).lower(*args).as_text())


@pytest.mark.skipif(native_library() is None, reason="the native kernels are not built here")
def test_plain_float32_convolutions_run_through_the_kernels_with_the_modules_values(rng):
    fast, xla, params = _models()
    x = jnp.asarray(rng.integers(0, 256, (6, 16, 16, 3)), jnp.float32)
    # The seven plain convolutions the rule gives the direct kernel (at most 16 channels in and out, or RGB), the
    # grouped one XLA's.
    assert _targets(fast.features, params, x).count(CONV2D_DIRECT) == 7
    assert CONV2D_DIRECT not in _targets(xla.features, params, x)
    got, want = np.asarray(jax.jit(fast.features)(params, x)), np.asarray(jax.jit(xla.features)(params, x))
    assert got.shape == want.shape == (6, 6, 6, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Gradients (fine-tuning) flow through the kernel's tangents: XLA's convolution of them.
    loss = lambda m: lambda p: jnp.sum(m.logits(p, x) ** 2)  # noqa: E731
    g_fast, g_xla = jax.grad(loss(fast))(params), jax.grad(loss(xla))(params)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_the_sweep_through_the_kernels_is_the_float64_networks(rng):
    fast, _, params = _models()
    x = rng.integers(0, 256, (24, 16, 16, 3)).astype(np.uint8)
    sweep = sw.rank_and_sweep(fast, params, {"clean_valid": x})
    want = _float64_steps(params, x, sweep.order)
    np.testing.assert_array_equal(sweep.preds["clean_valid"], want)
    # The float64 network (the settling's) is the module's own: never intercepted.
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64), params)
        assert CONV2D_DIRECT not in _targets(fast.features, p64, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float64))


def test_a_gpu_program_holds_xlas_convolutions_only():
    fast, _, params = _models()
    sets = {"clean_valid": jax.ShapeDtypeStruct((64, 16, 16, 3), jnp.uint8)}
    exported = export_sweep(fast, params, sets, sw.SweepOptions(platform="cuda"))
    assert CONV2D_DIRECT not in set(re.findall(r"custom_call @([^\(\s]+)\(", exported.mlir_module()))


def _halved(*args, **kwargs):
    """A module's own dtype promotion (as quantisation or rescaling would be): the kernel scaled by 0.5."""
    from flax.linen.dtypes import promote_dtype

    x, kernel, bias = promote_dtype(*args, **kwargs)
    return x, kernel * 0.5, bias


class _Doubled:
    """A module's own convolution class (conv_general_dilated_cls): twice lax's."""

    def __call__(self, *args, **kwargs):
        return 2 * jax.lax.conv_general_dilated(*args, **kwargs)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv(8, (3, 3), promote_dtype=_halved, name="own"),
    lambda: nn.Conv(8, (3, 3), conv_general_dilated_cls=_Doubled, name="own"),
    lambda: nn.Conv(8, 3, name="own"),  # an int kernel size: a 1-D convolution over the last spatial axis
    lambda: Conv2x(8, (3, 3), name="own"),
    lambda: MixedConv(8, (3, 3), name="own"),
], ids=["promote_dtype", "conv_general_dilated_cls", "int_kernel_size", "subclass_with_a_method", "mixin_after_conv"])
def test_a_convolution_the_kernels_cannot_reproduce_runs_as_the_module_wrote_it(conv, rng):
    class Own(Net):
        @nn.compact
        def features(self, x):
            return nn.relu(conv()(x))

    params = Own().init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)))["params"]
    x = jnp.asarray(rng.integers(0, 256, (2, 12, 12, 3)), jnp.float32)
    fast, xla = (FlaxCNN.build(Own(), params, input_hwc=(12, 12, 3), input_scale="255", layer="own",
                               fast_convs=f) for f in (True, False))
    assert CONV2D_DIRECT not in _targets(fast.features, params, x)
    np.testing.assert_array_equal(jax.jit(fast.features)(params, x), jax.jit(xla.features)(params, x))
    # Weights of another shape are nn.Conv's to refuse, naming them, not run.
    wrong = jax.tree.map(np.asarray, params)
    wrong["own"]["kernel"] = wrong["own"]["kernel"][..., :5]
    with pytest.raises(Exception, match="kernel"):
        fast.features(wrong, x)
