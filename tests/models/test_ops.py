"""badnet_jax.models.ops: the JAX meaning of the IR's ops against the float64 NumPy interpreter (tests/numpy_ref.py).

The depthwise convolution is a sum of shifted per-channel products (XLA's grouped convolution is 5-3000x slower on
a CPU): every padding, stride, dilation and depth multiplier Keras takes, in float64 to rounding and in float32 to
float32's, and no grouped convolution in its program.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.models.ir import Node
from badnet_jax.models.ops import apply_op
from tests import numpy_ref

CASES = [((h, w), (kh, kw), s, d, pad, mult)
         for (h, w), (kh, kw), s, d, pad, mult in itertools.product(
             [(7, 6), (8, 8)], [(3, 3), (2, 3), (1, 1), (5, 5)], [(1, 1), (2, 2), (2, 1)], [(1, 1), (2, 2)],
             ["same", "valid"], [1, 2])
         if pad == "same" or ((kh - 1) * d[0] < h and (kw - 1) * d[1] < w)]


@pytest.mark.parametrize("hw, k, strides, dilation, padding, mult", CASES)
def test_the_depthwise_convolution_is_the_float64_reference(hw, k, strides, dilation, padding, mult, rng):
    node = Node.make("dw", "depthwise_conv", ("x",), "dw", strides=strides, padding=padding, dilation=dilation)
    x = rng.standard_normal((2, *hw, 3))
    p = {"kernel": rng.standard_normal((*k, 3, mult)), "bias": rng.standard_normal(3 * mult)}
    want = numpy_ref._depthwise64(x, p["kernel"], dict(node.attrs)) + p["bias"]
    with jax.enable_x64(True):
        got = np.asarray(apply_op(node, {"dw": p}, [jnp.asarray(x)]))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
    got32 = np.asarray(apply_op(node, {"dw": p}, [jnp.asarray(x, jnp.float32)]))
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_the_depthwise_convolution_runs_no_grouped_convolution():
    node = Node.make("dw", "depthwise_conv", ("x",), "dw", strides=(2, 2), padding="same")
    p = {"dw": {"kernel": np.ones((3, 3, 1152, 1), np.float32)}}
    hlo = jax.jit(lambda x: apply_op(node, p, [x])).lower(jnp.zeros((4, 4, 4, 1152))).as_text()
    assert "convolution" not in hlo and "feature_group_count" not in hlo
