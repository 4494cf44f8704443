"""A Flax CNN's variables: which collections it takes, their shapes, and Flax's refusals in a user's terms.

A :class:`~badnet_jax.models.flax_model.FlaxCNN` is built from a module's params alone or from its full variables
(``{"params": ..., "batch_stats": ...}``); what it was built from is what it takes everywhere afterwards. Here:
reading the collections of what was given (:func:`collections_of`), the variables ``module.apply`` gets
(:func:`for_apply`: every collection but the params frozen), the check that params given later are the model's
(:func:`check_variables`), and a method's shape by abstract evaluation with Flax's errors as
:class:`~badnet_jax.errors.ConfigError` s naming the argument to change (:func:`shape_of`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable

import flax.errors
import jax
import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.models.protocol import Params, path_name

PARAMS = "params"  # Flax's collection of the learned weights; every other collection is frozen here


def collections_of(variables: Any, output: str) -> tuple[str, ...]:
    """The sorted collections of a Flax variables dict (a ``params`` collection, no output layer at the top), or
    () for params alone (the output layer at the top).

    Raises:
        ConfigError: a collection that is not a dict of variables.
    """
    if not isinstance(variables, Mapping) or output in variables or not isinstance(variables.get(PARAMS), Mapping):
        return ()
    for col, value in variables.items():
        if not isinstance(col, str) or not isinstance(value, Mapping):
            raise ConfigError(f"{arg('variables')}: the collection {col!r} is a {type(value).__name__}, expected a "
                              "dict of variables (Flax variables: {'params': ..., 'batch_stats': ...})",
                              field="variables")
    return tuple(sorted(variables))


def shapes(tree: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(path, shape) of every array of a params or variables tree, paths as ``conv1/kernel``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tuple(sorted((path_name(path), tuple(np.shape(leaf))) for path, leaf in leaves))


def for_apply(params: Params, collections: tuple[str, ...], model_name: str) -> dict[str, Any]:
    """The Flax variables of ``params`` for ``module.apply``: the non-param collections behind a stop-gradient
    (constants of the inference network: fine-tuning never moves them).

    Raises:
        ConfigError: ``params`` lack a collection of ``collections``.
    """
    if not collections:
        return {PARAMS: params}
    missing = [c for c in collections if not isinstance(params, Mapping) or c not in params]
    if missing:
        raise ConfigError(f"{arg('params')}: the variables of {model_name} lack the collection "
                          f"{', '.join(map(repr, missing))} (the model was built with "
                          f"{', '.join(map(repr, collections))})", field="params")
    return {c: params[c] if c == PARAMS else jax.lax.stop_gradient(params[c]) for c in collections}


def check_variables(params: Any, name: str, model_name: str, collections: tuple[str, ...], output: str,
                    kernel_shape: tuple[int, int], variable_shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
    """Refuse params that are not a model's: the collections it was built with (the variables dict of a model
    built from variables, the params alone otherwise), the output layer's kernel shape and every array's shape
    (``variable_shapes``, as :func:`shapes` gives them; empty: not checked).

    Raises:
        ConfigError: naming ``name``, the missing or unexpected collection, or the array and its shape.
    """
    net, where = params, name
    if collections:
        held = tuple(params) if isinstance(params, Mapping) else ()
        missing = [c for c in collections if c not in held]
        extra = [c for c in held if c not in collections]
        if missing or extra:
            problem = (f"lack the collection {', '.join(map(repr, missing))}" if missing else
                       f"hold the collection {', '.join(map(repr, extra))} it was not built with")
            got = f"they hold {', '.join(map(repr, held))}" if held else f"got {type(params).__name__}"
            if output in held:
                got += f"; these look like the params alone: pass the variables {model_name} was built from"
            raise ConfigError(f"{arg(name)}: expected the variables of {model_name} with the collections "
                              f"{', '.join(map(repr, collections))} (the model was built from them), but "
                              f"they {problem} ({got})", field=name)
        net, where = params[PARAMS], f"{name}['{PARAMS}']"
    elif isinstance(params, Mapping) and output not in params and isinstance(params.get(PARAMS), Mapping):
        raise ConfigError(f"{arg(name)}: a variables dict ({', '.join(map(repr, params))}), but {model_name} was "
                          "built from params alone: build it with FlaxCNN.build(module, variables, ...) to run it "
                          "on its variables, or pass variables['params']", field=name)
    if not isinstance(net, Mapping) or output not in net:
        raise ConfigError(f"{arg(name)}: expected the params of {model_name} (with its {output!r} layer"
                          f"{' in ' + where if where != name else ''})", field=name)
    shape = tuple(np.shape(net[output].get("kernel")))
    if shape != tuple(kernel_shape):
        raise ConfigError(f"{arg(name)}: layer {output!r} kernel of shape {shape}, expected {tuple(kernel_shape)}",
                          field=name)
    if variable_shapes:
        got, want = dict(shapes(params)), dict(variable_shapes)
        for path in sorted(want.keys() | got.keys()):
            if got.get(path) != want.get(path):
                found = "missing" if path not in got else f"of shape {got[path]}"
                expected = "nothing there" if path not in want else f"shape {want[path]}"
                raise ConfigError(f"{arg(name)}: {path} {found}, but {model_name} was built with {expected} "
                                  "(the params of another module?)", field=name)


def shape_of(apply: Callable[[Params, Any], Any], variables: Params, x: Any, name: str,
             collections: tuple[str, ...], input_hwc: tuple[int, int, int]) -> jax.ShapeDtypeStruct:
    """The shape of ``apply(variables, x)`` (abstract evaluation of the method ``name``, e.g. ``Net.features``),
    Flax's refusals turned into ConfigErrors that say what to change.

    Raises:
        ConfigError: naming ``variables`` (a collection the method reads is missing, weights that do not fit
            images of ``input_hwc``, anything else Flax refuses) or ``module`` (it writes a collection).
    """
    try:
        return jax.eval_shape(apply, variables, x)
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFoundError) as err:
        col = _collection_named(err)
        hint = (f"pass the module's full variables ({{'params': ..., {col!r}: ...}}, what module.init returns), "
                "not its params alone" if col not in collections else
                f"their {col!r} collection lacks a variable the module reads")
        raise ConfigError(f"{arg('variables')}: {name} reads the collection {col!r}, which these variables do not "
                          f"hold: {hint} ({err})", field="variables") from err
    except flax.errors.ModifyScopeVariableError as err:
        col = _collection_named(err)
        raise ConfigError(f"{arg('module')}: {name} writes the collection {col!r} (a batch norm in training "
                          "mode?); a FlaxCNN runs the module in inference mode with every collection frozen, calling "
                          "the method on its input alone (a train flag keeps its default): use "
                          f"nn.BatchNorm(use_running_average=True) ({err})", field="module") from err
    except flax.errors.InvalidRngError as err:
        raise ConfigError(f"{arg('module')}: {name} asks for random numbers (a dropout in training mode?); a "
                          "FlaxCNN runs the module in inference mode without random keys, calling the method on its "
                          "input alone (a train flag keeps its default): use nn.Dropout(..., deterministic=True) "
                          f"({err})", field="module") from err
    except flax.errors.ScopeParamShapeError as err:
        # A layer whose weights do not fit its input: images of another size (input_hwc) or another module's
        # weights (variables); the input size comes first, as the message of a dense layer after a flatten.
        raise ConfigError(f"{arg('variables')}: {name} does not run on these variables with images of "
                          f"{arg('input_hwc', tuple(input_hwc))}: {err}; is input_hwc the (height, width, "
                          "channels) the module was trained on, and are these its variables?",
                          field="variables") from err
    except flax.errors.FlaxError as err:
        raise ConfigError(f"{arg('variables')}: {name} does not run on these variables: {err}",
                          field="variables") from err


def _collection_named(err: Exception) -> str:
    """The collection a Flax scope error names (its text says ``collection "batch_stats"``), or "?"."""
    found = re.search(r'collection "([^"]+)"', str(err))
    return found.group(1) if found else "?"
