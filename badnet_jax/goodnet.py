"""GoodNet G: the repaired classifier built from the BadNet B and a pruned B'.

G answers B's class where B and B' agree and class N (= num_classes, "backdoor detected") where they
disagree. B' is either B's params under a pool_3 mask (the pruning defense) or any second params (e.g. a
fine-pruned B'); both are held as variables of one Flax module, so G is one jit-able function of a batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.predict import predict_settled
from badnet_jax.model import (NUM_POOL3_CHANNELS, BadNet, Params, check_images, check_mask, check_params,
                              input_divisor)


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

    Raises:
        ConfigError: neither ``pruned_params`` nor ``mask``; params that are not a BadNet's, or B and B' of
            different class counts; a mask that is not (60,) zeros and ones; an unknown ``input_scale``.
    """
    if pruned_params is None and mask is None:
        raise ConfigError(f"make_goodnet needs {arg('pruned_params')}, a {arg('mask')}, or both", field="mask")
    n = check_params(bad_params, "bad_params")
    if pruned_params is not None:
        n_pruned = check_params(pruned_params, "pruned_params")
        if n_pruned != n:
            raise ConfigError(f"{arg('pruned_params')}: B' has {n_pruned} classes but B ({arg('bad_params')}) has {n}; "
                              "B' must be B with channels pruned", field="pruned_params")
    input_divisor(input_scale)  # refuses an unknown scale here rather than at the first apply
    m = jnp.ones((NUM_POOL3_CHANNELS,), jnp.float32) if mask is None else jnp.asarray(check_mask(mask))
    variables = {
        "params": {"bad": bad_params, "pruned": bad_params if pruned_params is None else pruned_params},
        "pruning": {"mask": m},
    }
    return GoodNet(num_classes=n, input_scale=input_scale), variables


def check_goodnet(goodnet: GoodNet, variables: Any) -> None:
    """Refuse variables that are not this GoodNet's: G's "poisoned" answer is class ``goodnet.num_classes``,
    so B and B' must have exactly that many classes, or the answer would collide with a real class.

    Raises:
        ConfigError: naming ``variables`` (or ``goodnet``) and what was expected.
    """
    if not isinstance(goodnet, GoodNet):
        raise ConfigError(f"{arg('goodnet')}: expected a GoodNet (make_goodnet's first result), got "
                          f"{type(goodnet).__name__}", field="goodnet")
    params = variables.get("params") if isinstance(variables, Mapping) else None
    pruning = variables.get("pruning") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping) or not {"bad", "pruned"} <= set(params) or not isinstance(pruning, Mapping) \
            or "mask" not in pruning:
        raise ConfigError(f"{arg('variables')}: expected a GoodNet's variables ({{'params': {{'bad', 'pruned'}}, "
                          "'pruning': {'mask'}}, make_goodnet's second result)", field="variables")
    for who, label in (("bad", "B"), ("pruned", "B'")):
        n = check_params(params[who], f"variables['params']['{who}']")
        if n != goodnet.num_classes:
            clash = "is a real class of" if n > goodnet.num_classes else "is not the class after the last of"
            raise ConfigError(f"{arg('variables')}: {label} has {n} classes but the GoodNet ({arg('goodnet')}) has "
                              f"{goodnet.num_classes}: its \"poisoned\" answer {goodnet.num_classes} {clash} {label}; "
                              "build G and its variables with one make_goodnet call", field="variables")
    check_mask(pruning["mask"], "variables['pruning']['mask']")


def predict_goodnet(goodnet: GoodNet, variables: dict[str, Any], x_NxHxWxC: np.ndarray) -> tuple[np.ndarray, int]:
    """G's predictions in [0, N] with B's and B''s near-ties settled in float64 (as the defense's curve does),
    and how many of their predictions were settled.

    Raises:
        ConfigError: variables that are not ``goodnet``'s (:func:`check_goodnet`).
        DataFileError: images that are not (N, 55, 47, 3) finite pixels.
    """
    check_goodnet(goodnet, variables)
    check_images(x_NxHxWxC, "x_NxHxWxC", allow_empty=True)
    p = variables["params"]
    bad = BadNet(goodnet.num_classes, input_scale=goodnet.input_scale)
    pred_b, settled_b = predict_settled(bad, p["bad"], x_NxHxWxC)
    pred_p, settled_p = predict_settled(bad, p["pruned"], x_NxHxWxC, np.asarray(variables["pruning"]["mask"]))
    return np.where(pred_b == pred_p, pred_b, goodnet.num_classes).astype(np.int32), settled_b + settled_p
