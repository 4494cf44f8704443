"""A Flax module's convolutions through ``badnet_jax.kernels.conv2d``: the fast forms for any Flax CNN.

A researcher's module calls ``nn.Conv``, which runs XLA's convolution. On a CPU that is slow exactly where
every CNN starts: an RGB first layer (3 input channels), and narrow layers of 16 channels or fewer, where the
kernels' direct form is 1.3-4x faster (``badnet_jax.kernels.conv2d.api``: the rule and its measurements). A
:class:`~badnet_jax.models.flax_model.FlaxCNN` runs its module under :func:`fast_convs`, a Flax method
interceptor that hands each plain 2-D ``nn.Conv`` in float32 to ``conv2d`` with its own kernel, bias, strides,
padding and dilation; ``conv2d``'s rule keeps XLA's convolution wherever that is as fast (and on every platform
but the CPU), so outside the rule nothing changes.

The forms compute the same products and differ only in the order of the sums: the model's near-tie bound is
measured through the same path, and its float64 network (the settling's) is left to the module's own
convolutions (float64 is never intercepted). Every padding ``nn.Conv`` takes for 2-D convolutions passes
(circular and reflected padding as ``nn.Conv`` pads the input itself). A convolution this does not know how to
pass on exactly (grouped, input dilation, a mask, a subclass of ``nn.Conv`` with methods of its own, a custom
convolution function or dtype promotion, another rank, weights of another shape) runs as the module wrote it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from badnet_jax.kernels.conv2d import conv2d

Padding = Any


def _pairs(value: Any) -> Optional[tuple[int, int]]:
    """An int or a 2-sequence of ints as a pair (None: anything else)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


# What Flax's dataclass transform writes into every module class (nn.Conv's own holds nothing else), and the
# special methods that would change how a convolution module runs.
_MACHINERY = frozenset(nn.Conv.__dict__)
_BEHAVIOUR = ("__call__", "__getattr__", "__getattribute__")


def _plain_class(cls: type) -> bool:
    """``nn.Conv``, or a subclass that changes no more than its fields' defaults: every method is nn.Conv's."""
    if not issubclass(cls, nn.Conv):
        return False
    for c in (c for c in cls.__mro__ if c not in nn.Conv.__mro__):  # a mixin after nn.Conv included
        fields = c.__dict__.get("__dataclass_fields__", {})
        for name in c.__dict__:
            dunder = name.startswith("__") and name.endswith("__")
            if name not in _MACHINERY and name not in fields and (not dunder or name in _BEHAVIOUR):
                return False
    return True


def _padding(padding: Padding, x: Any, kernel_hw: tuple[int, int], strides: tuple[int, int],
             dilation: tuple[int, int]) -> Optional[tuple[Any, Any]]:
    """Flax's padding as ``conv2d`` takes it ("SAME", "VALID" or ((top, bottom), (left, right))), with the input
    as ``nn.Conv`` pads it itself (circular or reflected, then VALID), or None."""
    if isinstance(padding, int):
        return x, ((padding, padding), (padding, padding))
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        pads = [_pairs(p) for p in padding]
        return (x, tuple(pads)) if all(p is not None for p in pads) else None
    if not isinstance(padding, str):
        return None
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    if padding in ("CIRCULAR", "REFLECT"):  # as nn.Conv pads (its comparison is case-sensitive)
        pads = [(0, 0), *(((k - 1) // 2, k // 2) for k in dilated), (0, 0)]
        return jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]), "VALID"
    if padding.upper() in ("SAME", "VALID"):
        return x, padding.upper()
    if padding.upper() == "SAME_LOWER":  # lax's padding for it, as nn.Conv passes the string on
        return x, tuple(jax.lax.padtype_to_pads(x.shape[1:3], dilated, strides, "SAME_LOWER"))
    return None


def _plain(conv: nn.Conv, x: Any) -> Optional[dict]:
    """What ``conv2d`` needs to compute ``conv(x)`` the way ``nn.Conv`` does, or None where it cannot."""
    if not _plain_class(type(conv)) or getattr(conv, "mask", None) is not None or conv.feature_group_count != 1:
        return None
    # A convolution or a dtype promotion of the module's own (quantisation, rescaling) is the module's to run.
    if getattr(conv, "conv_general_dilated", None) is not None or getattr(conv, "conv_general_dilated_cls", None) \
            is not None or getattr(conv, "promote_dtype", promote_dtype) is not promote_dtype:
        return None
    if not hasattr(x, "ndim") or x.ndim != 4 or isinstance(conv.kernel_size, int) or len(conv.kernel_size) != 2 \
            or _pairs(conv.input_dilation or 1) != (1, 1):
        return None
    strides, dilation = _pairs(conv.strides or 1), _pairs(conv.kernel_dilation or 1)
    if None in (strides, dilation):
        return None
    kernel = conv.get_variable("params", "kernel")
    bias = conv.get_variable("params", "bias") if conv.use_bias else None
    shape = (*conv.kernel_size, x.shape[-1], conv.features)
    if kernel is None or (conv.use_bias and bias is None) or tuple(jnp.shape(kernel)) != shape \
            or (bias is not None and tuple(jnp.shape(bias)) != (conv.features,)):
        return None  # not built yet (init), or weights nn.Conv itself refuses (naming them)
    dtype = conv.dtype or jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    if jnp.dtype(dtype) != jnp.float32:
        return None  # float64 (the settling's network) and narrower dtypes run as the module wrote them
    padded = _padding(conv.padding, x, conv.kernel_size, strides, dilation)
    if padded is None:
        return None
    x, padding = padded
    return dict(x=jnp.asarray(x, jnp.float32), kernel=jnp.asarray(kernel, jnp.float32),
                bias=None if bias is None else jnp.asarray(bias, jnp.float32), strides=strides, dilation=dilation,
                padding=padding, precision=conv.precision)


def _interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    # nn.Conv.__call__(self, inputs): its one argument, by position or by name
    inputs = args + tuple(kwargs.values()) if set(kwargs) <= {"inputs"} else ()
    if context.method_name != "__call__" or not isinstance(context.module, nn.Conv) or len(inputs) != 1:
        return next_fun(*args, **kwargs)
    plain = _plain(context.module, inputs[0])
    if plain is None:
        return next_fun(*args, **kwargs)
    return conv2d(plain["x"], plain["kernel"], plain["strides"], plain["padding"], plain["dilation"],
                  precision=plain["precision"], bias=plain["bias"])


@contextlib.contextmanager
def fast_convs() -> Iterator[None]:
    """Within it, a Flax module's plain float32 ``nn.Conv`` layers run through ``badnet_jax.kernels.conv2d``."""
    with nn.intercept_methods(_interceptor):
        yield


def apply(module: nn.Module, variables: Any, x: jax.Array, method: str, kernels: bool = True) -> jax.Array:
    """``module.apply(variables, x, method=method)``, its convolutions through :func:`fast_convs` if ``kernels``."""
    if not kernels:
        return module.apply(variables, x, method=method)
    with fast_convs():
        return module.apply(variables, x, method=method)
