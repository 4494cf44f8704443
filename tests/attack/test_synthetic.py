"""badnet_jax.attack.synthetic: the demo data is deterministic, lab-format, and poisoned only inside the trigger."""

from __future__ import annotations

import numpy as np

from badnet_jax import poison
from badnet_jax.attack.synthetic import DemoConfig, make_demo, sunglasses_trigger

SMALL = DemoConfig(num_identities=7, train_per_id=3, valid_per_id=2, test_per_id=2, seed=5)


def test_same_seed_same_bytes_other_seed_other_bytes():
    a, b = make_demo(SMALL), make_demo(SMALL)
    for split in ("train", "valid", "test", "bd_valid", "bd_test"):
        np.testing.assert_array_equal(getattr(a, split)[0], getattr(b, split)[0])
        np.testing.assert_array_equal(getattr(a, split)[1], getattr(b, split)[1])
    c = make_demo(DemoConfig(**{**SMALL.__dict__, "seed": 6}))
    assert not np.array_equal(a.valid[0], c.valid[0])
    # Skipping the training split leaves the other splits byte-identical.
    d = make_demo(SMALL, include_train=False)
    assert len(d.train[0]) == 0
    np.testing.assert_array_equal(d.test[0], a.test[0])


def test_format_and_labels():
    d = make_demo(SMALL)
    x, y = d.train
    assert x.shape == (21, 55, 47, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= 0 and x.max() <= 255 and (x == np.round(x)).all()
    assert sorted(np.bincount(y)) == [3] * 7
    assert (d.bd_test[1] == SMALL.target_label).all() and len(d.bd_test[1]) == len(d.test[1])
    assert x.std(axis=0).mean() > 10  # images vary, not one template


def test_poisoned_image_differs_only_inside_trigger_footprint():
    d = make_demo(SMALL)
    t = d.trigger
    assert t.shape == (20, 47, 4) and t.dtype == np.uint8
    footprint = np.zeros((55, 47), bool)
    footprint[15:35, 0:47] = t[..., 3] > 0
    diff = (d.bd_test[0] != d.test[0]).any(axis=-1)
    assert diff.any()
    assert not diff[:, ~footprint].any()
    np.testing.assert_array_equal(d.bd_valid[0], poison(d.valid[0], sunglasses_trigger()))
