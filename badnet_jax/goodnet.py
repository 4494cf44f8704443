"""GoodNet G: the repaired classifier built from the BadNet B and a pruned B', for any model.

G answers B's class where B and B' agree and class N (= num_classes, "backdoor detected") where they
disagree. B' is either B's params under a channel mask of the pruned layer (the pruning defense) or any second
params of the same architecture (e.g. a fine-pruned B'). G holds B's model (``badnet_jax.models``: its
architecture, input scale and pruned layer come with it) and both params as variables, so G is one jit-able
function of a batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.deepid import as_model
from badnet_jax.models.predict import predict_settled
from badnet_jax.models.protocol import Params, PrunableModel
from badnet_jax.numerics.tie_bound import with_measured_tie_rtol


class GoodNet(nn.Module):
    """Repaired classifier G over ``num_classes + 1`` outputs (the last one means "poisoned input").

    Variables: ``params`` = ``{"bad": B params, "pruned": B' params}`` and ``pruning`` = ``{"mask": (C,)}``,
    the mask of the pruned layer's channels applied to B' (all ones when B' carries its own pruned weights).
    ``model`` is B's (a :class:`~badnet_jax.models.protocol.PrunableModel`): G takes pixels 0..255 like every
    badnet-jax model and divides them as B does.
    """

    model: PrunableModel

    @property
    def num_classes(self) -> int:
        """B's classes; G's answer ``num_classes`` means "poisoned"."""
        return self.model.num_classes

    @property
    def input_scale(self) -> str:
        """B's input scale (``raw`` or ``255``)."""
        return self.model.input_scale

    def logits_pair(self, x_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Logits of B and of B' (masked) on a batch of images (pixels 0..255)."""
        params, mask = self.variables["params"], self.variables["pruning"]["mask"]
        x = x_NxHxWxC.astype(jnp.float32)
        return self.model.logits(params["bad"], x), self.model.logits(params["pruned"], x, mask)

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


def make_goodnet(model: Any, bad_params: Optional[Params] = None, pruned_params: Optional[Params] = None,
                 mask: Optional[jax.Array] = None) -> tuple[GoodNet, dict[str, Any]]:
    """Build ``(GoodNet, variables)`` from B's model and params and either a mask or B''s own params (or both).

    Args:
        model: B's model (a ``PrunableModel``: ``load_model``'s first result, or a ``BadNet`` module for the lab's
            DeepID): its architecture, input scale and pruned layer are G's.
        bad_params: B's params.
        pruned_params: B''s params (same architecture), if B' carries its own weights.
        mask: (C,) 0/1 mask of the pruned layer's channels applied to B'.

    Example::

        model, params = load_model("bd_weights.h5")
        goodnet, variables = make_goodnet(model, params, mask=mask)
        preds = jax.jit(goodnet.apply)(variables, x_NHWC)   # in [0, num_classes]

    Raises:
        ConfigError: no model first (params given where the model goes); neither ``pruned_params`` nor ``mask``;
            params that are not the model's or hold NaN or infinite values, or B and B' of different class counts; a
            mask that is not (C,) zeros and ones.
    """
    if isinstance(model, Mapping):
        raise ConfigError(f"make_goodnet takes B's model first: make_goodnet(model, params, mask=...) (the model "
                          f"carries its architecture and input scale); {arg('model')} got a params dict",
                          field="model")
    model = as_model(model)
    if bad_params is None:
        raise ConfigError(f"make_goodnet needs B's params ({arg('bad_params')}) after the model", field="bad_params")
    if pruned_params is None and mask is None:
        raise ConfigError(f"make_goodnet needs {arg('pruned_params')}, a {arg('mask')}, or both", field="mask")
    n = model.check_weights(bad_params, "bad_params")
    if pruned_params is not None:
        n_pruned = model.check_weights(pruned_params, "pruned_params")
        if n_pruned != n:
            raise ConfigError(f"{arg('pruned_params')}: B' has {n_pruned} classes but B ({arg('bad_params')}) has {n}; "
                              "B' must be B with channels pruned", field="pruned_params")
    m = jnp.ones((model.num_channels,), jnp.float32) if mask is None else jnp.asarray(model.check_mask(mask))
    variables = {
        "params": {"bad": bad_params, "pruned": bad_params if pruned_params is None else pruned_params},
        "pruning": {"mask": m},
    }
    return GoodNet(model), variables


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
        n = _classes(goodnet.model, params[who])
        if n is not None and n != goodnet.num_classes:
            clash = "is a real class of" if n > goodnet.num_classes else "is not the class after the last of"
            raise ConfigError(f"{arg('variables')}: {label} has {n} classes but the GoodNet ({arg('goodnet')}) has "
                              f"{goodnet.num_classes}: its \"poisoned\" answer {goodnet.num_classes} {clash} {label}; "
                              "build G and its variables with one make_goodnet call", field="variables")
        goodnet.model.check_params(params[who], f"variables['params']['{who}']")
    goodnet.model.check_mask(pruning["mask"], "variables['pruning']['mask']")


def _classes(model: PrunableModel, params: Any) -> Optional[int]:
    """The class count of params with the model's output layer (its bias), else None (the full check says why)."""
    try:
        return int(np.shape(model.output_layer(params)[1])[0])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def predict_goodnet(goodnet: GoodNet, variables: dict[str, Any], x_NxHxWxC: np.ndarray) -> tuple[np.ndarray, int]:
    """G's predictions in [0, N] with B's and B''s near-ties settled in float64 (as the defense's curve does),
    and how many of their predictions were settled.

    B and B' are settled by :func:`~badnet_jax.models.predict.predict_settled`: for a model other than the lab's
    DeepID whose near-tie bound is unmeasured, each within the bound measured on its own weights (a fine-pruned B'
    errs in float32 as its weights do, not as B's) and on these images.

    Raises:
        ConfigError: variables that are not ``goodnet``'s (:func:`check_goodnet`).
        DataFileError: images the model cannot take.
    """
    check_goodnet(goodnet, variables)
    goodnet.model.check_images(x_NxHxWxC, "x_NxHxWxC", allow_empty=True)
    p = variables["params"]
    model_b = with_measured_tie_rtol(goodnet.model, p["bad"], x_NxHxWxC)
    # B' of B's own weights under a mask errs as B does (the measurement runs masked steps); its own weights are
    # measured on themselves by predict_settled.
    model_p = model_b if p["pruned"] is p["bad"] else goodnet.model
    pred_b, settled_b = predict_settled(model_b, p["bad"], x_NxHxWxC)
    pred_p, settled_p = predict_settled(model_p, p["pruned"], x_NxHxWxC, np.asarray(variables["pruning"]["mask"]))
    return np.where(pred_b == pred_p, pred_b, goodnet.num_classes).astype(np.int32), settled_b + settled_p
