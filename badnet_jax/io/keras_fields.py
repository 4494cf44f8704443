"""A Keras layer's config fields, read and checked: what every layer of :mod:`badnet_jax.io.keras_layers` reads.

Each reader takes the layer and the key, returns the value in the form the IR takes (an int, a float, a pair, a
padding) and refuses anything else with a ModelFileError naming the file, the layer, its class, the field and
what was expected: integers within the limits of ``badnet_jax.io.keras_config``, finite numbers, channels-last
data, the last axis, a window that fits its input, a float32 or float64 dtype policy, plain (not LoRA) kernels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from badnet_jax.errors import ModelFileError
from badnet_jax.io.keras_config import MAX_ELEMENTS, ConfigLayer, short

_CHANNELS_LAST = "channels_last"
_FLOAT_DTYPES = ("float32", "float64")  # a layer's dtype (policy name) whose arithmetic badnet-jax reproduces


class ConfigFields:
    """The checked reads of one file's layer configs (``path`` names the file in every message)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path

    def fail(self, layer: ConfigLayer, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: layer {layer.name!r} ({layer.cls}) {what}")

    def integer(self, layer: ConfigLayer, key: str, default: Any = None, low: int = 1) -> int:
        value = layer.cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_ELEMENTS:
            raise self.fail(layer, f"has {key} {short(value)}, expected an integer >= {low}")
        return value

    def number(self, layer: ConfigLayer, key: str, default: Any, low: float = -math.inf) -> float:
        value = layer.cfg.get(key, default)
        try:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and value >= low)
        except OverflowError:  # an integer beyond float's range (JSON allows any number of digits)
            ok = False
        if not ok:
            raise self.fail(layer, f"has {key} {short(value)}, expected a finite number"
                            + (f" >= {low:g}" if low > -math.inf else ""))
        return float(value)

    def pair(self, layer: ConfigLayer, key: str, default: Any = None) -> tuple[int, int]:
        value = layer.cfg.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ELEMENTS for v in value)):
            raise self.fail(layer, f"has {key} {short(value)}, expected two integers >= 1")
        return value[0], value[1]

    def edges(self, layer: ConfigLayer, key: str, default: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        """Rows and columns at each edge, as ZeroPadding2D and Cropping2D take them: n, [rows, columns] or
        [[top, bottom], [left, right]]."""
        value = layer.cfg.get(key, default)
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ELEMENTS  # noqa: E731
        if ok(value):
            return (value, value), (value, value)
        if isinstance(value, list) and len(value) == 2 and all(ok(v) for v in value):
            return (value[0], value[0]), (value[1], value[1])
        if isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, list) and len(v) == 2 and all(ok(x) for x in v) for v in value):
            return (value[0][0], value[0][1]), (value[1][0], value[1][1])
        raise self.fail(layer, f"has {key} {short(value)}; expected n, [rows, columns] or [[top, bottom], "
                        "[left, right]]")

    def padding(self, layer: ConfigLayer) -> str:
        value = layer.cfg.get("padding", "valid")
        if not isinstance(value, str) or value.lower() not in ("valid", "same"):
            raise self.fail(layer, f"has padding {short(value)}; badnet-jax reads 'valid' and 'same'")
        return value.lower()

    def channels_last(self, layer: ConfigLayer) -> None:
        value = layer.cfg.get("data_format", _CHANNELS_LAST)
        if value != _CHANNELS_LAST:
            raise self.fail(layer, f"has data_format {short(value)}; badnet-jax reads only channels_last models")

    def axis_is_last(self, layer: ConfigLayer, key: str, rank: int, default: Any = -1) -> None:
        value = layer.cfg.get(key, default)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, bool) or value not in (-1, rank):  # rank leaves the batch axis out: last is rank
            raise self.fail(layer, f"has {key} {short(value)}; badnet-jax reads only the last (channel) axis "
                            f"(-1 or {rank})")

    def float_dtype(self, layer: ConfigLayer) -> None:
        """Refuse a layer computing in another precision than float32 or float64 (a mixed-precision or quantized
        dtype policy): badnet-jax evaluates the network in float32, settled in float64, which is not that
        model's arithmetic, so its curve would not be the model's."""
        value = layer.cfg.get("dtype")
        if isinstance(value, dict):  # Keras 3 DTypePolicy / QuantizedDTypePolicy, Keras 2 mixed-precision Policy
            inner = value.get("config")
            value = inner.get("name") if isinstance(inner, dict) else inner
        if value is None or value in _FLOAT_DTYPES:
            return
        raise self.fail(layer, f"computes with dtype policy {short(value)}; badnet-jax reads float32 and float64 "
                        "models only (a mixed-precision or quantized model's arithmetic is not float32's): save a "
                        "float32 copy of the model and give that")

    def window(self, layer: ConfigLayer) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], str]:
        return (self.pair(layer, "kernel_size"), self.pair(layer, "strides", 1), self.pair(layer, "dilation_rate", 1),
                self.padding(layer))

    def conv_out(self, layer: ConfigLayer, hw: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
                 dilation: tuple[int, int], padding: str) -> tuple[int, int]:
        out = []
        for size, k, s, d in zip(hw, kernel, strides, dilation):
            span = (k - 1) * d + 1
            if padding == "same":
                out.append(-(-size // s))
            elif span > size:
                raise self.fail(layer, f"has a {kernel} window (dilation {dilation}) larger than its {hw} input")
            else:
                out.append((size - span) // s + 1)
        return out[0], out[1]

    def bias(self, layer: ConfigLayer, size: int) -> list[tuple[str, tuple[int, ...]]]:
        use_bias = layer.cfg.get("use_bias", True)
        if not isinstance(use_bias, bool):
            raise self.fail(layer, f"has use_bias {short(use_bias)}, expected true or false")
        return [("bias", (size,))] if use_bias else []

    def one_group(self, layer: ConfigLayer) -> None:
        # Keras 2 writes groups 1 on its depthwise and separable convolutions too.
        if self.integer(layer, "groups", 1) != 1:
            raise self.fail(layer, f"has groups {layer.cfg.get('groups')}; badnet-jax reads only groups=1")

    def no_lora(self, layer: ConfigLayer) -> None:
        # A LoRA-enabled Keras 3 layer stores extra factors its kernel is the sum with; not read here.
        if layer.cfg.get("lora_rank") not in (None, 0):
            raise self.fail(layer, f"has lora_rank {short(layer.cfg.get('lora_rank'))}; badnet-jax reads only plain "
                            "kernels (merge the LoRA weights first)")
