"""GoodNet G: the repaired classifier built from the BadNet B and a pruned B'.

G answers B's class where B and B' agree and class N (= num_classes, "backdoor detected") where they
disagree. B' is either B's params under a pool_3 mask (the pruning defense) or any second params (e.g. a
fine-pruned B'); both are held as variables of one Flax module, so G is one jit-able function of a batch.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.numerics.settling import predict_settled
from badnet_jax.model import NUM_POOL3_CHANNELS, BadNet, Params, num_classes_of


class GoodNet(nn.Module):
    """Repaired classifier G over ``num_classes + 1`` outputs (the last one means "poisoned input").

    Variables: ``params`` = ``{"bad": B params, "pruned": B' params}`` and ``pruning`` = ``{"mask": (60,)}``,
    the pool_3 mask applied to B' (all ones when B' carries its own pruned weights). ``input_scale`` is B's
    (see :class:`~badnet_jax.model.BadNet`): G takes pixels 0..255 like every badnet-jax model.
    """

    num_classes: int
    input_scale: str = "raw"
    precision: Any = jax.lax.Precision.HIGHEST

    def setup(self) -> None:
        self.bad = BadNet(self.num_classes, input_scale=self.input_scale, precision=self.precision)
        self.pruned = BadNet(self.num_classes, input_scale=self.input_scale, precision=self.precision)
        self.mask = self.variable("pruning", "mask", lambda: jnp.ones((NUM_POOL3_CHANNELS,), jnp.float32))

    def logits_pair(self, x_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Logits of B and of B' (masked) on a batch of images (pixels 0..255)."""
        return self.bad(x_NxHxWxC), self.pruned(x_NxHxWxC, mask=self.mask.value)

    def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
        """Predictions in [0, N] (int32), N = num_classes where B and B' disagree."""
        logits_b, logits_p = self.logits_pair(x_NxHxWxC)
        pred_b = jnp.argmax(logits_b, axis=-1).astype(jnp.int32)
        pred_p = jnp.argmax(logits_p, axis=-1).astype(jnp.int32)
        return jnp.where(pred_b == pred_p, pred_b, jnp.int32(self.num_classes))

    def scores(self, x_NxHxWxC: jax.Array) -> jax.Array:
        """(N+1)-way scores: B's softmax where B and B' agree, a one-hot on class N where they disagree."""
        logits_b, logits_p = self.logits_pair(x_NxHxWxC)
        agree = jnp.argmax(logits_b, -1) == jnp.argmax(logits_p, -1)
        probs = jax.nn.softmax(logits_b, axis=-1) * agree[:, None]
        return jnp.concatenate([probs, (~agree)[:, None].astype(probs.dtype)], axis=-1)


def make_goodnet(bad_params: Params, pruned_params: Optional[Params] = None,
                 mask: Optional[jax.Array] = None, input_scale: str = "raw") -> tuple[GoodNet, dict[str, Any]]:
    """Build ``(GoodNet, variables)`` from B's params and either a mask or B''s own params (or both).

    Example::

        goodnet, variables = make_goodnet(params, mask=mask_60)
        preds = jax.jit(goodnet.apply)(variables, x_NHWC)   # in [0, num_classes]
    """
    if pruned_params is None and mask is None:
        raise ValueError("make_goodnet needs pruned_params, a mask, or both")
    n = num_classes_of(bad_params)
    if pruned_params is not None and num_classes_of(pruned_params) != n:
        raise ValueError(f"B has {n} classes but B' has {num_classes_of(pruned_params)}")
    m = jnp.ones((NUM_POOL3_CHANNELS,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if m.shape != (NUM_POOL3_CHANNELS,):
        raise ValueError(f"mask has shape {m.shape}, expected ({NUM_POOL3_CHANNELS},)")
    variables = {
        "params": {"bad": bad_params, "pruned": bad_params if pruned_params is None else pruned_params},
        "pruning": {"mask": m},
    }
    return GoodNet(num_classes=n, input_scale=input_scale), variables


def predict_goodnet(goodnet: GoodNet, variables: dict[str, Any], x_NxHxWxC: np.ndarray) -> tuple[np.ndarray, int]:
    """G's predictions in [0, N] with B's and B''s near-ties settled in float64 (as the defense's curve does),
    and how many of their predictions were settled."""
    p = variables["params"]
    bad = BadNet(goodnet.num_classes, input_scale=goodnet.input_scale)
    pred_b, settled_b = predict_settled(bad, p["bad"], x_NxHxWxC)
    pred_p, settled_p = predict_settled(bad, p["pruned"], x_NxHxWxC, np.asarray(variables["pruning"]["mask"]))
    return np.where(pred_b == pred_p, pred_b, goodnet.num_classes).astype(np.int32), settled_b + settled_p
