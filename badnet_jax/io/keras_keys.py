"""The keys of each Keras layer's config that badnet-jax knows, and the refusal of any other.

A key badnet-jax does not read could change what the layer computes (Keras 3 added ``lora_rank`` and
``quantization_config`` to Dense this way), and reading the layer without it would give another network's
curve with no error to say so. So every key of a layer's config is either read by
``badnet_jax.io.keras_layers`` (and checked there), or known to change nothing at inference (its name, whether it
trains, how its weights were initialised, regularised and constrained, dropout's noise), or allowed only with the
value that changes nothing (``quantization_config`` null, a non-sparse input); any other key is refused, naming the
file, the layer, its class and the key. The keys are those Keras 2 (``tf.keras`` up to 2.21) and Keras 3 (up to
3.15) write for the layers of ``badnet_jax.io.keras_config.ALLOWED_LAYERS``; Keras itself refuses a key its layer
does not take.
"""

from __future__ import annotations

from badnet_jax.io.keras_config import ConfigLayer, short
from badnet_jax.io.keras_fields import ConfigFields

# Every layer's: its name, whether it trains, its dtype (read by ConfigFields.float_dtype), a loss term on its
# output (training only), Keras 2's eager-only flag and the first layer's input shape (read by keras_config).
_EVERY_LAYER = frozenset({"name", "trainable", "dtype", "activity_regularizer", "dynamic", "batch_input_shape"})
# How a weight is initialised, regularised or constrained shapes training alone (kernel_initializer,
# depthwise_regularizer, gamma_constraint, ...).
_TRAINING_SUFFIXES = ("_initializer", "_regularizer", "_constraint")

_WINDOW = frozenset({"kernel_size", "strides", "padding", "data_format", "dilation_rate", "activation", "use_bias",
                     "groups", "quantization_config"})
_POOL = frozenset({"pool_size", "strides", "padding", "data_format"})
_GLOBAL_POOL = frozenset({"data_format", "keepdims"})
_MERGE = frozenset()

KEYS: dict[str, frozenset[str]] = {
    "InputLayer": frozenset({"batch_shape", "sparse", "ragged", "optional"}),
    "Conv2D": _WINDOW | {"filters", "lora_rank", "lora_alpha"},
    "DepthwiseConv2D": _WINDOW | {"depth_multiplier"},
    "SeparableConv2D": _WINDOW | {"filters", "depth_multiplier"},
    "Dense": frozenset({"units", "activation", "use_bias", "lora_rank", "lora_alpha", "quantization_config"}),
    "MaxPooling2D": _POOL,
    "AveragePooling2D": _POOL,
    "GlobalAveragePooling2D": _GLOBAL_POOL,
    "GlobalMaxPooling2D": _GLOBAL_POOL,
    # momentum and synchronized update the statistics in training; renorm's clipping and momentum only with renorm
    # (refused); virtual_batch_size only with its value null.
    "BatchNormalization": frozenset({"axis", "epsilon", "center", "scale", "momentum", "synchronized", "renorm",
                                     "renorm_clipping", "renorm_momentum", "virtual_batch_size"}),
    "Normalization": frozenset({"axis", "mean", "variance", "invert"}),
    "Activation": frozenset({"activation"}),
    "ReLU": frozenset({"max_value", "negative_slope", "threshold"}),
    "LeakyReLU": frozenset({"negative_slope", "alpha"}),
    "Softmax": frozenset({"axis"}),
    "Add": _MERGE,
    "Subtract": _MERGE,
    "Average": _MERGE,
    "Maximum": _MERGE,
    "Minimum": _MERGE,
    "Multiply": _MERGE,
    "Concatenate": frozenset({"axis"}),
    "Reshape": frozenset({"target_shape"}),
    "Flatten": frozenset({"data_format"}),
    "Dropout": frozenset({"rate", "noise_shape", "seed"}),
    "ZeroPadding2D": frozenset({"padding", "data_format"}),
    "Cropping2D": frozenset({"cropping", "data_format"}),
    "UpSampling2D": frozenset({"size", "data_format", "interpolation"}),
    "Rescaling": frozenset({"scale", "offset"}),
}
"""Each allowed class's own keys (besides every layer's and the training-only suffixes)."""

# Keys known, and inert only at these values (compared by identity: 0 is not False here); why any other is refused.
_ONLY = {
    "quantization_config": ((None,), "is quantized ({value}); badnet-jax reads float32 and float64 models only (a "
                                     "quantized layer's arithmetic is not float32's): save a float32 copy of the "
                                     "model and give that"),
    "virtual_batch_size": ((None,), "normalizes virtual batches (virtual_batch_size {value}), whose statistics "
                                    "badnet-jax does not read: rebuild the layer without virtual_batch_size, set "
                                    "its weights from this one's (squeezed to one value per channel) and save "
                                    "that model"),
    "sparse": ((None, False), "takes sparse tensors (sparse {value}); badnet-jax reads dense image inputs: "
                              "rebuild the model on a dense Input"),
    "ragged": ((None, False), "takes ragged tensors (ragged {value}); badnet-jax reads dense image inputs: "
                              "rebuild the model on a dense Input"),
    "optional": ((None, False), "is an optional input (optional {value}); badnet-jax reads models of one image "
                                "input: rebuild the model on a required Input"),
}


def check_keys(fields: ConfigFields, layer: ConfigLayer) -> None:
    """Refuse a key of ``layer``'s config that badnet-jax neither reads nor knows to be inert at inference, or
    an inert one at a value that is not (a ModelFileError naming the file, the layer, its class and the key)."""
    own = KEYS[layer.cls]
    unknown = sorted(key for key in layer.cfg if key not in own and key not in _EVERY_LAYER
                     and not key.endswith(_TRAINING_SUFFIXES))
    if unknown:
        listed = ", ".join(f"{key} {short(layer.cfg[key])}" for key in unknown)
        raise fields.fail(layer, f"has config key(s) badnet-jax does not know ({listed}): a setting it does not read "
                          "could change what the layer computes, so the model is refused rather than read as another "
                          "network. It knows the keys Keras 2 and Keras 3 (up to 3.15) write for this layer; save "
                          "the model without the option, or with a Keras of those versions")
    for key, value in layer.cfg.items():
        if key in _ONLY and key in own and not any(value is ok for ok in _ONLY[key][0]):
            raise fields.fail(layer, _ONLY[key][1].format(value=short(value)))

