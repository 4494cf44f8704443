"""badnet_jax.models.affine: DeepID's affine split against the masked head itself (float64 NumPy), the step
masks, the suffix sums of the reverse scan at every step (dead channels skipped or not), and a constant bias kept
from XLA's constant folding."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax import init_params
from badnet_jax import sweep as sw
from badnet_jax.models import affine
from badnet_jax.models.deepid import DeepID
from badnet_jax.models.flax_model import FlaxCNN
from badnet_jax.sweep.run import _abstract_call
from tests import numpy_ref


def test_contributions_sum_to_the_unpruned_preactivations(rng):
    params = init_params(num_classes=9, seed=4)
    x = rng.integers(0, 256, size=(5, 55, 47, 3)).astype(np.float32)
    pool3 = numpy_ref.pool3(params, x).astype(np.float32)
    model = DeepID(9)
    f, g = jax.vmap(lambda c: model.channel_contribution(params, jnp.asarray(pool3), c), out_axes=1)(jnp.arange(60))
    assert f.shape == (5, 60, 160) and g.shape == (5, 60, 960)
    fc1, conv4 = numpy_ref.head_preactivations(params, pool3, bias=False)
    np.testing.assert_allclose(np.asarray(f).sum(1), fc1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(g).sum(1), conv4, rtol=1e-4, atol=1e-3)
    # One channel alone: its contribution is the pre-activation of pool_3 masked to that channel.
    only7 = np.zeros(60, np.float32)
    only7[7] = 1
    _, conv4_7 = numpy_ref.head_preactivations(params, pool3, only7, bias=False)
    np.testing.assert_allclose(np.asarray(g)[:, 7], conv4_7, rtol=1e-4, atol=1e-3)


def test_step_preactivations_equal_masked_network_at_every_step(rng):
    params = init_params(num_classes=9, seed=5)
    x = rng.integers(0, 256, size=(4, 55, 47, 3)).astype(np.float32)
    pool3 = numpy_ref.pool3(params, x)
    order = rng.permutation(60)
    fc1, c4 = affine.step_preactivations(DeepID(9), params, jnp.asarray(pool3, jnp.float32), jnp.asarray(order))
    assert fc1.shape == (61, 4, 160) and c4.shape == (61, 4, 960)
    for k in (0, 1, 17, 59, 60):
        want_fc1, want_c4 = numpy_ref.head_preactivations(params, pool3, numpy_ref.step_mask(order, k))
        np.testing.assert_allclose(np.asarray(fc1[k]), want_fc1, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(np.asarray(c4[k]), want_c4, rtol=1e-4, atol=1e-3)


def test_skipping_dead_steps_changes_nothing(rng):
    params = init_params(num_classes=9, seed=6)
    pool3 = rng.random((6, 5, 4, 60)).astype(np.float32)
    pool3[..., rng.choice(60, 25, replace=False)] = 0.0  # dead on every image
    order = jnp.asarray(rng.permutation(60))
    fn = lambda k, pre: jnp.concatenate(pre, axis=1)
    full = affine.reverse_steps(DeepID(9), params, jnp.asarray(pool3), order, fn)
    skipped = affine.reverse_steps(DeepID(9), params, jnp.asarray(pool3), order, fn, skip_dead=True)
    np.testing.assert_array_equal(np.asarray(skipped), np.asarray(full))


def test_prefix_masks():
    order = np.array([3, 0, 2, 1])
    expected = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    host = affine.prefix_masks(order)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_array_equal(host, expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(affine.prefix_masks)(order)), expected)  # traced


def test_a_constant_bias_is_not_folded_into_the_program():
    # A Flax module without a head split has the masked features as its pre-activations: its bias (step C, every
    # channel pruned) is zeros, a constant of the program. XLA folded the head on it into a constant at compile
    # time, for every image of a chunk: seconds for 200 images (a warning on stderr), growing with the chunk.
    class Pooled(nn.Module):
        @nn.compact
        def features(self, x):
            return nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv")(x))

        @nn.compact
        def hidden(self, feats):
            return jnp.mean(nn.avg_pool(feats, (2, 2), strides=(2, 2)), axis=(1, 2))

        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="output")(self.hidden(self.features(x)))

    params = Pooled().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    model = FlaxCNN.build(Pooled(), params, input_hwc=(32, 32, 3), input_scale="255", layer="conv")
    seconds = {}
    for n in (32, 1024):
        sets = {"clean_valid": jax.ShapeDtypeStruct((n, 32, 32, 3), jnp.uint8)}
        _, fn, args, static = _abstract_call(model, params, sets, sw.SweepOptions(chunk=n), None, "clean_valid", None)
        lowered = fn.lower(*args, **static)
        t = time.perf_counter()
        lowered.compile()
        seconds[n] = time.perf_counter() - t
    # The same program for 32 times the images compiles in about the same time (folded: 15.8 s against 0.8 s).
    assert seconds[1024] < 3 * seconds[32] + 1.0, seconds
