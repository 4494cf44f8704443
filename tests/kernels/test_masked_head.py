"""Each masked-head implementation against the pure-JAX reference (interpret mode on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.kernels.masked_head import api
from badnet_jax.kernels.masked_head.pallas_kernel import head_argmax_pallas
from badnet_jax.kernels.masked_head.reference import head_argmax_reference


def _inputs(seed, m, n, classes):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return (jax.random.normal(k[0], (m, n, 160)) * 3, jax.random.normal(k[1], (m, n, 960)) * 3,
            jax.random.normal(k[2], (960, 160)) * 0.05, jax.random.normal(k[3], (160,)),
            jax.random.normal(k[4], (160, classes)) * 0.1, jax.random.normal(k[5], (classes,)))


def _numpy_argmax(fc1, c4, w2, b2, wout, bout):
    a = [np.asarray(t, np.float64) for t in (fc1, c4, w2, b2, wout, bout)]
    hidden = np.maximum(np.maximum(a[1], 0) @ a[2] + a[3] + a[0], 0)
    return (hidden @ a[4] + a[5]).argmax(-1)


@pytest.mark.parametrize("m,n,classes,block_n,class_block", [
    (3, 37, 1283, 16, 128),  # lab class count, padded images and classes
    (1, 5, 10, 8, 8),  # tiny: classes in 2 blocks
    (4, 64, 257, 32, 64),
])
def test_pallas_interpret_matches_reference(m, n, classes, block_n, class_block):
    args = _inputs(m * n + classes, m, n, classes)
    ref = np.asarray(head_argmax_reference(*args))
    got = np.asarray(head_argmax_pallas(*args, block_n=block_n, class_block=class_block, interpret=True))
    assert got.shape == (m, n) and got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(ref, _numpy_argmax(*args))  # the reference itself, in float64


def test_ties_resolve_to_the_first_class_like_argmax():
    fc1 = jnp.zeros((1, 3, 160))
    c4 = jnp.zeros((1, 3, 960))
    w2 = jnp.zeros((960, 160))
    b2 = jnp.zeros((160,))
    wout = jnp.zeros((160, 300))
    bout = jnp.zeros((300,)).at[jnp.array([5, 140, 290])].set(1.0)  # equal maxima in 3 class blocks
    for impl in ("reference", "interpret"):
        np.testing.assert_array_equal(np.asarray(api.head_argmax(fc1, c4, w2, b2, wout, bout, impl=impl)), [[5, 5, 5]])


def test_resolve_impl_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only expectations")
    assert api.resolve_impl("auto") == "reference"
    assert api.resolve_impl("pallas") == "interpret"
    assert api.resolve_impl("reference") == "reference"
    with pytest.raises(ValueError):
        api.resolve_impl("cuda")


@pytest.mark.device
def test_pallas_compiles_on_device():
    if jax.default_backend() == "cpu":
        pytest.skip("needs a GPU or TPU")
    args = _inputs(0, 61, 4096, 1283)
    assert api.pallas_available(jax.default_backend())
    got = np.asarray(head_argmax_pallas(*args))
    ref = np.asarray(head_argmax_reference(*args))
    assert (got == ref).mean() > 0.999  # ties aside
