"""badnet_jax.io.json_values: every attribute of every IR operation has a check that takes the value as a
checkpoint writes it back to the value the IR holds, and refuses JSON that no IR value could be; the refusals
say what was found and what was expected."""

from __future__ import annotations

import json
import re

import pytest

from badnet_jax.io import json_values as values
from badnet_jax.models.ir import OPS


def _as_written(value):
    """A default attribute as JSON text holds it (tuples become lists), built here from the IR's own values."""
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_attribute_of_every_op_reads_back_its_default(op):
    for key, default in OPS[op][0].items():
        assert key in values.ATTRS, f"{op}'s attribute {key!r} has no check: a checkpoint holding it would not load"
        assert values.ATTRS[key](_as_written(default), key) == default


def test_the_optional_attributes_are_attributes_of_some_op():
    known = {key for defaults, _, _ in OPS.values() for key in defaults}
    assert set(values.OPTIONAL_ATTRS) <= known


@pytest.mark.parametrize("key, bad, says", [
    ("strides", [1, 2, 3], "expected two integers >= 1"),
    ("strides", [1, 0], "0, expected an integer from 1"),
    ("strides", [1, True], "expected an integer"),
    ("padding", "full", "expected 'valid' or 'same'"),
    ("epsilon", 0, "a finite number > 0"),
    ("epsilon", 1e39, "that float32 holds"),
    ("dropout", 1.0, "from 0 to below 1"),
    ("fn", "exp", "expected one of"),
    ("target", [], "one to three integers"),
    ("keepdims", 1, "true or false"),
    ("pad", [[0, 0]], "[[top, bottom], [left, right]]"),
    ("negative_slope", -0.1, ">= 0"),
    ("scale", 10 ** 400, "a finite number"),
])
def test_a_value_no_ir_attribute_could_be_is_refused_saying_why(key, bad, says):
    with pytest.raises(values.Refused, match=f"node 'c''s {key} is .*{re.escape(says)}"):
        values.ATTRS[key](bad, f"node 'c''s {key}")


def test_json_constants_and_names():
    with pytest.raises(values.Refused, match="NaN, which is no number"):
        json.loads('{"a": NaN}', parse_constant=values.no_constant)
    with pytest.raises(values.Refused, match="scale is Infinity, expected a finite number"):  # 1e999 decodes to inf
        values.number(json.loads("1e999"), "scale")
    for bad in ("", "a\nb", "x" * 10_000, 3):
        with pytest.raises(values.Refused, match="expected a printable name"):
            values.name(bad, "the model's name")
    with pytest.raises(values.Refused, match=r"has no b; unknown entries \['c'\]"):
        values.json_object({"a": 1, "c": 2}, ("a", "b"), "the graph")
