"""badnet_jax.sweep.anp: ANP's shortcut (scaling cached pool_3 features) against the paper's form (scaling conv_3's
weights in the full network), and what an ANP ranking needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import BadNet, ConfigError, prune_params
from badnet_jax import sweep as sw
from badnet_jax.sweep.anp import ANPConfig, anp_mask
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.models.deepid import DeepID


def test_anp_on_features_is_anp_on_conv3_weights(lab_b, lab_faces):
    """The shortcut: scaling pool_3 channel c by s >= 0 is scaling conv_3's kernel and bias for c by s.

    Reference: ANP as the paper states it (perturbed weights, the full network on the images, SGD with
    momentum written out), a few steps with eps small enough that every scale stays positive.
    """
    model, params = lab_b
    x, y = lab_faces["valid_subset"]
    config = ANPConfig(eps=0.1, steps=4, batch=8, seed=4)
    feats = model.apply({"params": params}, jnp.asarray(x, jnp.float32), method=BadNet.trunk)
    got = np.asarray(jax.jit(anp_mask, static_argnums=(0, 4))(model, params, feats, jnp.asarray(y), config))

    def loss(scale, xb, yb):
        scaled = prune_params(params, scale)  # conv_3 kernel and bias times the scale, channel by channel
        logits = model.apply({"params": scaled}, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    mask, velocity = jnp.ones(60), jnp.zeros(60)
    for key in jax.random.split(jax.random.PRNGKey(config.seed), config.steps):
        k_batch, k_noise = jax.random.split(key)
        idx = jax.random.randint(k_batch, (config.batch,), 0, len(x))
        xb, yb = jnp.asarray(x, jnp.float32)[idx], jnp.asarray(y)[idx]
        delta = jax.random.uniform(k_noise, (60,), minval=-config.eps, maxval=config.eps)
        delta = jnp.clip(delta + config.eps * jnp.sign(jax.grad(loss)(mask + delta, xb, yb)), -config.eps, config.eps)
        grad = jax.grad(lambda m: config.alpha * loss(m, xb, yb) + (1 - config.alpha) * loss(m + delta, xb, yb))(mask)
        velocity = grad + config.momentum * velocity
        mask = jnp.clip(mask - config.learning_rate * velocity, 0, 1)
    assert np.all(np.asarray(mask) > config.eps)  # the premise: every scale stayed positive
    np.testing.assert_allclose(got, np.asarray(mask), atol=1e-5)
    assert np.abs(got - 1).max() > 1e-3  # it moved


def test_anp_needs_labels_and_a_ranking_set(lab_b, lab_faces):
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    plan = resolve_rankings(RankingOptions(rank_by=("anp",), anp=ANPConfig(steps=1)), params, DeepID())
    with pytest.raises(ConfigError, match="labels") as err:
        sw.rank_and_sweep(model, params, {"clean_valid": x}, rankings=plan)
    assert err.value.field == "rank_labels"
    with pytest.raises(ConfigError, match="ranking set") as err:
        sw.rank_and_sweep(model, params, {"clean_valid": x}, rankings=plan, rank_on=None)
    assert err.value.field == "rank_on"
    with pytest.raises(ConfigError, match="either order or rankings") as err:
        sw.rank_and_sweep(model, params, {"clean_valid": x}, rankings=plan, order=np.arange(60))
    assert err.value.field == "rankings"
    with pytest.raises(ConfigError, match=r"rank_on=clean_valid: no set of that name among the sets \('valid'\)") \
            as err:  # a set named otherwise: what the ranking reads is named, before any work
        sw.rank_and_sweep(model, params, {"valid": x})
    assert err.value.field == "rank_on"
