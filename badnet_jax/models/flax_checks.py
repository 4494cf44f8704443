"""What a researcher's Flax module must do for the sweep to be exact, checked when a ``FlaxCNN`` is built.

Two properties that no shape shows:

* **Float64 when given float64.** Near-ties are settled by the module's own float64 network: the module run
  under ``jax.enable_x64`` on float64 images and variables. A layer pinned to a narrower dtype
  (``nn.Conv(..., dtype=jnp.float32)``) would settle them in that dtype, and the curve would not be the float64
  network's. :func:`check_float64` reads the method's traced program: every value that depends on its input must
  be float64 (a weight cast alone is a weight like any other, computed the same by both networks).
* **Each image its own.** The sweep cuts the sets into chunks and blocks whose sizes depend on the plan, the
  devices and the memory budget; a method that mixes the images of a batch (statistics over the batch, outside
  a batch norm's running averages) gives a curve that depends on them. :func:`check_per_image` runs the method in
  float64 on a batch of three inputs and on one whose other two are copies of the first.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.errors
import jax
from jax.extend.core import Literal, jaxprs_in_params
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg

# The first input's outputs in two batches may differ by float64 roundings of another batch layout; statistics
# over the batch move them by the order of the values themselves.
PER_IMAGE_RTOL = 1e-9

Apply = Callable[[Any, jax.Array, str], jax.Array]


def float64_variables(variables: Any, abstract: bool = False) -> Any:
    """The variables with every floating array in float64 (as shapes, for a trace, or as values)."""
    def one(t: Any) -> Any:
        dtype = jnp.float64 if jnp.issubdtype(jnp.result_type(t), jnp.floating) else jnp.result_type(t)
        return jax.ShapeDtypeStruct(np.shape(t), dtype) if abstract else jnp.asarray(np.asarray(t), dtype)
    return jax.tree.map(one, variables)


WIDE = (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
FLOAT64_MANTISSA_BITS = 52


def _exact_cast(eqn: Any) -> bool:
    """A conversion of booleans or of integers that the target dtype holds exactly (a 0/1 mask, int8 values
    into float32): no rounding, whatever the dtype."""
    if eqn.primitive.name != "convert_element_type" or not hasattr(eqn.invars[0].aval, "dtype"):
        return False
    src, dst = jnp.dtype(eqn.invars[0].aval.dtype), jnp.dtype(eqn.outvars[0].aval.dtype)
    if src == jnp.bool_:
        return True
    return jnp.issubdtype(src, jnp.integer) and jnp.issubdtype(dst, jnp.floating) \
        and jnp.iinfo(src).bits - jnp.issubdtype(src, jnp.signedinteger) <= jnp.finfo(dst).nmant + 1


def _live(jaxpr: Any) -> set:
    """The equations of ``jaxpr`` (by position) whose outputs reach its outputs: a value sown into a collection
    that is not kept, or computed and dropped, is not the network's."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    live = set()
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if any(v in needed for v in eqn.outvars) or eqn.effects:
            live.add(i)
            needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    return live


def _narrow(jaxpr: Any, reads: set) -> Optional[tuple[str, str]]:
    """The first equation of ``jaxpr`` that computes an inexact value narrower than float64 (or complex128) from
    the variables in ``reads`` (what depends on the input) and reaches the outputs, as (primitive, what it
    computes in); sub-programs are followed with their inputs matched to the equation's, or taken as reading
    the input where they cannot be matched."""
    live = _live(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [v for v in eqn.invars if not isinstance(v, Literal)]
        if i not in live or not any(v in reads for v in ins):
            continue
        for sub in jaxprs_in_params(eqn.params):
            inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
            n = len(inner.invars)
            # A call or a loop passes its operands in order; a cond's branches take all but the index.
            outer = list(eqn.invars) if n == len(eqn.invars) else list(eqn.invars)[1:] if n == len(eqn.invars) - 1 \
                else None
            sub_reads = set(inner.invars) if outer is None else {
                i for i, o in zip(inner.invars, outer) if not isinstance(o, Literal) and o in reads}
            found = _narrow(inner, sub_reads)
            if found:
                return found
        if eqn.primitive.name == "reduce_precision" and eqn.params["mantissa_bits"] < FLOAT64_MANTISSA_BITS:
            return eqn.primitive.name, f"{eqn.params['mantissa_bits']} mantissa bits"
        for v in eqn.outvars:
            dtype = jnp.dtype(v.aval.dtype) if hasattr(v.aval, "dtype") else None
            if dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and dtype not in WIDE \
                    and not _exact_cast(eqn):
                return eqn.primitive.name, str(dtype)
            reads.add(v)
    return None


def check_float64(apply: Apply, variables: Any, module_name: str, method: str, input_shape: tuple[int, ...]) -> None:
    """Refuse a method that computes in a narrower dtype than float64 when its input and variables are float64.

    Args:
        apply: ``apply(variables, x, method)``: the module's method on an input.
        variables: the variables the model is built from.
        module_name: the module's class name, for errors.
        method: the method's name.
        input_shape: its input's shape per image.

    Raises:
        ConfigError: naming ``module``, the method, the operation and its dtype.
    """
    with jax.enable_x64(True):
        x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float64)
        closed = jax.make_jaxpr(lambda v, x: apply(v, x, method))(float64_variables(variables, True), x)
    found = _narrow(closed.jaxpr, {closed.jaxpr.invars[-1]})
    if found:
        primitive, dtype = found
        raise ConfigError(f"{arg('module')}: {module_name}.{method} computes in {dtype} ({primitive}) when given "
                          "float64 inputs and weights; badnet-jax settles near-ties by running the module in float64, "
                          "so nothing that depends on the input may be pinned to a narrower precision: leave the "
                          "layers' dtype unset (None: they compute in their inputs' dtype; a dtype field of the "
                          "module None here), cast to the input's dtype (x.astype(y.dtype)), not to a fixed one, "
                          "and avoid operations fixed to a narrower dtype", field="module")


def check_per_image(apply: Apply, variables: Any, module_name: str, method: str, x_NxHxWxC: np.ndarray) -> np.ndarray:
    """Refuse a method whose outputs for an input depend on the other inputs of its batch; returns its float64
    outputs for ``x`` (three inputs).

    The method runs in float64 on ``x`` and on each of its inputs repeated to a batch of the same size (one
    compiled program): each input's outputs must agree within :data:`PER_IMAGE_RTOL` of their size.

    Raises:
        ConfigError: naming ``module`` and the method.
    """
    with jax.enable_x64(True):
        run = jax.jit(lambda v, x: apply(v, x, method))
        v64 = float64_variables(variables)
        both = [np.asarray(run(v64, jnp.asarray(x, jnp.float64)), np.float64)
                for x in (x_NxHxWxC, x_NxHxWxC[[0] * len(x_NxHxWxC)])]
        for i in range(1, len(x_NxHxWxC)):
            both.append(np.asarray(run(v64, jnp.asarray(x_NxHxWxC[[i] * len(x_NxHxWxC)], jnp.float64)), np.float64))
    mixed, alone = both[0], np.stack([b[0] for b in both[1:]])
    size = max(float(np.abs(mixed).max(initial=0.0)), float(np.abs(alone).max(initial=0.0)), 1e-300)
    err = float(np.abs(mixed - alone).max(initial=0.0)) / size
    if not err <= PER_IMAGE_RTOL:  # NaN fails too
        raise ConfigError(f"{arg('module')}: {module_name}.{method} gives an image other values in a batch of other "
                          f"images than in a batch of copies of itself (off by {err:.3g} of their size): it mixes the "
                          "images of a batch (statistics over the batch?). The sweep cuts the images into chunks of "
                          "any size, so each image's values must be its own", field="module")
    return both[0]


def check_module(apply: Apply, variables: Any, module_name: str, input_hwc: tuple[int, int, int],
                 feature_hwc: tuple[int, int, int], divisor: float) -> None:
    """Both checks on ``features`` (random images, pixels divided by ``divisor``) and ``hidden`` (random
    non-negative feature maps, as features after a ReLU are); a head split's methods are checked with the split
    (``badnet_jax.models.flax_split.check_split``).

    Raises:
        ConfigError: naming ``module`` (see :func:`check_float64`, :func:`check_per_image`), or ``variables`` the
            module does not run on in float64.
    """
    rng = np.random.default_rng(0)
    # Three inputs of other ranges (pixels 0..127, 32..255, 0..255; feature maps of other sizes), so that the
    # batch's statistics (its mean, its smallest and largest values) differ from those of each input's copies.
    lows, highs = np.array([0, 32, 0])[:, None, None, None], np.array([128, 256, 256])[:, None, None, None]
    try:
        check_float64(apply, variables, module_name, "features", input_hwc)
        check_float64(apply, variables, module_name, "hidden", feature_hwc)
        images = rng.integers(lows, highs, (3, *input_hwc)) / divisor
        check_per_image(apply, variables, module_name, "features", images)
        maps = np.array([0.5, 1.0, 2.0])[:, None, None, None] * np.abs(rng.standard_normal((3, *feature_hwc)))
        check_per_image(apply, variables, module_name, "hidden", maps)
    except flax.errors.FlaxError as err:
        raise ConfigError(f"{arg('variables')}: {module_name} does not run on these variables in float64: {err}",
                          field="variables") from err
