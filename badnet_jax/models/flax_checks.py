"""What a researcher's Flax module must do for the sweep to be exact, checked when a ``FlaxCNN`` is built.

Two properties that no shape shows:

* **Float64 when given float64.** Near-ties are settled by the module's own float64 network: the module run
  under ``jax.enable_x64`` on float64 images and variables. A layer pinned to a narrower dtype
  (``nn.Conv(..., dtype=jnp.float32)``) would settle them in that dtype, and the curve would not be the float64
  network's. :func:`check_float64` reads the method's traced program (``badnet_jax.models.dataflow``): every
  value that depends on its input and reaches its outputs must be float64 (a weight cast alone is a weight like
  any other, computed the same by both networks), and nothing that depends on it may pass through an operation
  whose precision the program does not show (host callbacks, foreign function calls, bit casts).
* **Each image its own.** The sweep cuts the sets into chunks and blocks whose sizes depend on the plan, the
  devices and the memory budget; a method that mixes the images of a batch (statistics over the batch, outside
  a batch norm's running averages) gives a curve that depends on them. :func:`check_per_image` runs the method in
  float64 on a batch of three inputs, on each input repeated to a batch of three, and on the first alone.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.dataflow import first_narrow

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
    found = first_narrow(closed.jaxpr, {closed.jaxpr.invars[-1]})
    if found:
        raise ConfigError(f"{arg('module')}: {module_name}.{method} {found} when given "
                          "float64 inputs and weights; badnet-jax settles near-ties by running the module in float64, "
                          "so nothing that depends on the input may be pinned to a narrower precision: leave the "
                          "layers' dtype unset (None: they compute in their inputs' dtype; a dtype field of the "
                          "module None here), cast to the input's dtype (x.astype(y.dtype)), not to a fixed one, "
                          "and avoid operations fixed to a narrower dtype or hiding their precision (host callbacks, "
                          "foreign function calls, bit casts)", field="module")


def check_per_image(apply: Apply, variables: Any, module_name: str, method: str, x_NxHxWxC: np.ndarray) -> np.ndarray:
    """Refuse a method whose outputs for an input depend on the other inputs of its batch; returns its float64
    outputs for ``x`` (three inputs).

    The method runs in float64 on ``x``, on each of its inputs repeated to a batch of the same size (one
    compiled program) and on its first input alone (a batch of another size): each input's outputs must agree
    within :data:`PER_IMAGE_RTOL` of their size.

    Raises:
        ConfigError: naming ``module`` and the method (non-finite outputs are refused too).
    """
    with jax.enable_x64(True):
        run = jax.jit(lambda v, x: apply(v, x, method))
        v64 = float64_variables(variables)
        both = [np.asarray(run(v64, jnp.asarray(x, jnp.float64)), np.float64)
                for x in (x_NxHxWxC, x_NxHxWxC[[0] * len(x_NxHxWxC)])]
        for i in range(1, len(x_NxHxWxC)):
            both.append(np.asarray(run(v64, jnp.asarray(x_NxHxWxC[[i] * len(x_NxHxWxC)], jnp.float64)), np.float64))
        single = np.asarray(run(v64, jnp.asarray(x_NxHxWxC[:1], jnp.float64)), np.float64)
    mixed, alone = np.concatenate([both[0], both[0][:1]]), np.stack([b[0] for b in both[1:]] + [single[0]])
    if not (np.isfinite(mixed).all() and np.isfinite(alone).all()):
        raise ConfigError(f"{arg('module')}: {module_name}.{method} gives NaN or infinite values in float64 on random "
                          "inputs (pixels 0..255 scaled as the model's, or non-negative feature maps): its outputs "
                          "would be NaN in the sweep too", field="module")
    size = max(float(np.abs(mixed).max(initial=0.0)), float(np.abs(alone).max(initial=0.0)), 1e-300)
    err = float(np.abs(mixed - alone).max(initial=0.0)) / size
    if not err <= PER_IMAGE_RTOL:  # NaN fails too
        raise ConfigError(f"{arg('module')}: {module_name}.{method} gives an image other values in a batch of other "
                          f"images than alone or in a batch of copies of itself (off by {err:.3g} of their size): it "
                          "mixes the images of a batch (statistics over the batch, or its size?). The sweep cuts the "
                          "images into chunks of any size, so each image's values must be its own", field="module")
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
    except jax.errors.JaxRuntimeError as err:
        # XLA's own failures when compiling or running the module (a jax.debug.print of an intermediate value
        # trips a CPU compiler check in jaxlib 0.10): the module's, not its data's.
        raise ConfigError(f"{arg('module')}: {module_name} failed inside XLA when run in float64 on three "
                          f"inputs: {str(err).splitlines()[0]}; a jax.debug.print or a callback inside features "
                          "or hidden can cause this: remove it and build again", field="module") from err
