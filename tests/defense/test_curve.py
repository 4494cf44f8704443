"""badnet_jax.defense.curve: the drop thresholds a curve is cut at, checked before any work."""

from __future__ import annotations

import pytest

from badnet_jax import ConfigError
from badnet_jax.defense.curve import check_drops


@pytest.mark.parametrize("drops,complaint", [
    ((4.0,), "did you mean 0.04 (4 points)?"),
    ((0.0,), "not a fraction between 0 and 1"),
    ((-0.1,), "not a fraction between 0 and 1"),
    ((1.0,), "did you mean 0.01 (1 point)?"),
    ((float("nan"),), "not a finite number"),
    ((float("inf"),), "not a finite number"),
    ((0.04, 0.04), "is given twice"),
    ((0.041, 0.0410000001), "would share drop_4.1/"),
    ((), "no drop threshold given"),
])
def test_drops_are_checked(drops, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        check_drops(drops)


def test_good_drops_pass():
    assert check_drops((0.02, 0.04, 0.1, 0.3)) == (0.02, 0.04, 0.1, 0.3)
