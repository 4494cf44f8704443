"""badnet-jax: the channel-pruning (Fine-Pruning) defense against backdoored CNNs (the lab's DeepID face
classifier as the exemplar, any Keras or Flax CNN of standard layers as well).

Public API::

    from badnet_jax import load_model, make_goodnet, rank_and_sweep
    model, params = load_model("bd_weights.h5")               # or any Keras CNN: load_model(path, input_scale, layer)
    logits = model.logits(params, x_NHWC, mask)                 # B' = B with the pruned layer's channels masked
    goodnet, variables = make_goodnet(model, params, mask=mask)

    from badnet_jax import SweepOptions, rank_and_sweep             # the whole curve in one call
    from badnet_jax import DefenseConfig, run_defense               # the defense end to end, as badnet-prune

The errors load with the package, every other name on first use (``import badnet_jax`` imports no JAX: a
command-line tool starts in milliseconds and holds its signals until its handler is in place). The
sub-packages (``io``, ``sweep``, ``numerics``, ``defense``, ``attack``) hold the rest.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from badnet_jax.errors import (BadNetError, CheckpointError, ConfigError, DataFileError, ModelFileError,
                               OutputError)

__version__ = "0.1.0"

# Name -> the module that defines it, imported on first access (PEP 562): JAX and Flax alone take ~2 s to import,
# orbax, the sweep's kernels and the whole defense more; a command-line tool defers its signals until its
# handler is in place (commands.cli.launch), so the package itself must import in milliseconds.
_LAZY = {
    "GoodNet": "badnet_jax.goodnet", "make_goodnet": "badnet_jax.goodnet", "predict_goodnet": "badnet_jax.goodnet",
    "load_keras": "badnet_jax.io.keras", "mask_from_zeroed": "badnet_jax.io.keras",
    "read_keras_params": "badnet_jax.io.keras", "save_keras": "badnet_jax.io.keras",
    "load_lab_h5": "badnet_jax.io.lab_data", "save_lab_h5": "badnet_jax.io.lab_data",
    "load_image": "badnet_jax.io.images", "load_images": "badnet_jax.io.images",
    "load_trigger": "badnet_jax.io.poisoning", "make_poisoned_h5": "badnet_jax.io.poisoning",
    "poison": "badnet_jax.io.poisoning",
    "BadNet": "badnet_jax.model", "init_params": "badnet_jax.model", "predict": "badnet_jax.model",
    "prune_params": "badnet_jax.model", "predict_settled": "badnet_jax.models.predict",
    "save_badnet": "badnet_jax.io.checkpoint", "restore_badnet": "badnet_jax.io.checkpoint",
    "save_goodnet": "badnet_jax.io.checkpoint", "restore_goodnet": "badnet_jax.io.checkpoint",
    "SweepOptions": "badnet_jax.sweep.plan", "Sweep": "badnet_jax.sweep.run",
    "rank_and_sweep": "badnet_jax.sweep.run",
    "RankingOptions": "badnet_jax.sweep.rankings", "resolve_rankings": "badnet_jax.sweep.rankings",
    "ANPConfig": "badnet_jax.sweep.anp",
    "DefenseConfig": "badnet_jax.defense.pipeline", "run_defense": "badnet_jax.defense.pipeline",
    "FinetuneConfig": "badnet_jax.defense.finetune", "Curve": "badnet_jax.defense.curve",
    "read_curve_json": "badnet_jax.defense.report", "screen": "badnet_jax.defense.screen",
    "load_model": "badnet_jax.io.model_file", "read_keras_graph": "badnet_jax.io.keras_graph",
    "save_keras_graph": "badnet_jax.io.keras_graph_writer",
    "PrunableModel": "badnet_jax.models.protocol", "DeepID": "badnet_jax.models.deepid",
    "GraphCNN": "badnet_jax.models.graph", "FlaxCNN": "badnet_jax.models.flax_model",
}

__all__ = [
    # models: the protocol, the lab's DeepID, any Keras/IR CNN, a user's Flax CNN; any model file
    "PrunableModel", "DeepID", "GraphCNN", "FlaxCNN", "load_model", "read_keras_graph", "save_keras_graph",
    # the lab's network as a Flax module, the GoodNet and single forwards
    "BadNet", "init_params", "predict", "prune_params", "predict_settled",
    "GoodNet", "make_goodnet", "predict_goodnet",
    # files: Keras models, lab data and images, checkpoints
    "load_keras", "save_keras", "read_keras_params", "mask_from_zeroed",
    "load_lab_h5", "save_lab_h5", "load_image", "load_images", "load_trigger", "poison", "make_poisoned_h5",
    "save_badnet", "restore_badnet", "save_goodnet", "restore_goodnet",
    # the sweep and the rankings
    "SweepOptions", "Sweep", "rank_and_sweep", "RankingOptions", "resolve_rankings", "ANPConfig",
    # the defense and its results
    "DefenseConfig", "run_defense", "FinetuneConfig", "Curve", "read_curve_json", "screen",
    # errors
    "BadNetError", "ModelFileError", "DataFileError", "ConfigError", "CheckpointError", "OutputError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")  # a sub-module: badnet_jax.io after import badnet_jax
        raise AttributeError(f"module 'badnet_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
