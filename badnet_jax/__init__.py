"""badnet-jax: the channel-pruning (Fine-Pruning) defense against backdoored DeepID face classifiers.

Public API::

    from badnet_jax import BadNet, GoodNet, load_keras, save_keras, load_lab_h5
    model, params = load_keras("bd_weights.h5")
    logits = model.apply({"params": params}, x_NHWC, mask=mask_60)
"""

from badnet_jax.io.keras import load_keras, mask_from_zeroed, read_keras_params, save_keras
from badnet_jax.io.lab_data import load_image, load_images, load_lab_h5, load_trigger, poison, save_lab_h5
from badnet_jax.errors import BadNetError, CheckpointError, ConfigError, DataFileError, ModelFileError
from badnet_jax.goodnet import GoodNet, make_goodnet
from badnet_jax.model import BadNet, init_params, predict, prune_params

__version__ = "0.1.0"

__all__ = [
    "BadNet", "GoodNet", "make_goodnet", "load_keras", "save_keras", "read_keras_params", "mask_from_zeroed",
    "load_lab_h5", "save_lab_h5", "load_image", "load_images", "load_trigger", "poison", "init_params",
    "prune_params", "predict", "BadNetError", "ModelFileError", "DataFileError", "ConfigError", "CheckpointError",
]
