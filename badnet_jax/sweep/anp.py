"""Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021) on the pool_3 channels, as a ranking.

ANP learns a mask m in [0, 1] over the channels that keeps clean data right even when every channel is
scaled by an adversarial factor m + delta, |delta| <= eps: channels whose perturbation flips the network
(backdoor channels are the sensitive ones) end with small masks. Per step, on a batch of clean images,

    delta   = clip(U(-eps, eps) + eps * sign(grad_delta CE(m + delta)), -eps, eps)   (one ascent step)
    loss(m) = alpha * CE(m) + (1 - alpha) * CE(m + delta)
    m       = clip(SGD-momentum step on loss, 0, 1)

and the channels are pruned smallest mask first. Here the scale multiplies the pool_3 channels (the layer the
defense prunes), so the whole optimisation runs on cached pool_3 features and costs only head passes; the
paper's bias perturbation (1 + xi on conv_3's bias) is left out: for m + delta >= 0, scaling a pool_3
channel is scaling that channel's conv_3 kernel and bias together (relu and max pool commute with positive
scales).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from badnet_jax.models.deepid import as_model
from badnet_jax.models.protocol import Params, PrunableModel


PROGRESS_CALLS = 100


@dataclasses.dataclass(frozen=True)
class ANPConfig:
    """ANP's hyper-parameters (the paper's defaults for eps, alpha, learning rate and momentum).

    Attributes:
        eps: perturbation budget of each channel's scale.
        alpha: weight of the natural loss (1 - alpha on the perturbed one).
        steps: optimiser steps.
        batch: clean images per step, drawn with replacement from the ranking set.
        learning_rate, momentum: SGD on the mask.
        seed: batches and perturbation starts derive from it.
    """

    eps: float = 0.4
    alpha: float = 0.2
    steps: int = 300
    batch: int = 128
    learning_rate: float = 0.2
    momentum: float = 0.9
    seed: int = 0


def anp_mask(model: PrunableModel, params: Params, pool3_NxHxWxC: jax.Array, labels_N: jax.Array,
             config: ANPConfig, on_step: Optional[Callable[[jax.Array, int], None]] = None) -> jax.Array:
    """(C,) float32 ANP mask values from clean features and their labels (traceable; call under jit).

    ``on_step(i, steps)`` is called at the start of every few optimiser steps, at most ``PROGRESS_CALLS``
    times (progress: ``badnet_jax.sweep.progress.chunk_hook``); it must not touch the data.
    """
    model = as_model(model)
    n, channels = pool3_NxHxWxC.shape[0], pool3_NxHxWxC.shape[3]
    opt = optax.sgd(config.learning_rate, momentum=config.momentum)

    def loss(scale_C, feats, labels):
        logits = model.head(params, feats * scale_C[None, None, None, :])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(carry, i_key):
        i, key = i_key
        if on_step is not None:  # a host call costs ~1 ms: at most PROGRESS_CALLS of them
            jax.lax.cond(i % every == 0, lambda: on_step(i, config.steps), lambda: None)
        mask_C, state = carry
        k_batch, k_noise = jax.random.split(key)
        idx = jax.random.randint(k_batch, (config.batch,), 0, n)
        feats, labels = pool3_NxHxWxC[idx], labels_N[idx]
        delta = jax.random.uniform(k_noise, (channels,), minval=-config.eps, maxval=config.eps)
        ascent = jax.grad(loss)(mask_C + delta, feats, labels)
        delta = jnp.clip(delta + config.eps * jnp.sign(ascent), -config.eps, config.eps)
        total = lambda m: config.alpha * loss(m, feats, labels) + (1 - config.alpha) * loss(m + delta, feats, labels)
        updates, state = opt.update(jax.grad(total)(mask_C), state, mask_C)
        return (jnp.clip(optax.apply_updates(mask_C, updates), 0.0, 1.0), state), None

    every = max(1, config.steps // PROGRESS_CALLS)
    mask_C = jnp.ones((channels,), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.steps)
    (mask_C, _), _ = jax.lax.scan(step, (mask_C, opt.init(mask_C)), (jnp.arange(config.steps), keys))
    return mask_C


def anp_order(model: PrunableModel, params: Params, pool3_NxHxWxC: jax.Array, labels_N: jax.Array,
              config: ANPConfig, on_step: Optional[Callable[[jax.Array, int], None]] = None) -> jax.Array:
    """(C,) channels by increasing ANP mask (ties by channel index): the order ANP prunes them in."""
    mask_C = anp_mask(model, params, pool3_NxHxWxC, labels_N, config, on_step)
    return jnp.argsort(mask_C, stable=True).astype(jnp.int32)
