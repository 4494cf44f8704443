"""The Flax BadNet against an independent float64 NumPy forward, on all five real BadNets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import BadNet, ConfigError, DataFileError, init_params, load_keras, predict, prune_params
from badnet_jax.model import check_params
from tests import numpy_ref
from tests.conftest import ALL_BADNETS, asset


def _check_close(logits: np.ndarray, ref: np.ndarray) -> None:
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, rel
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("rel", ALL_BADNETS)
def test_forward_matches_numpy_float64_on_random_and_real_faces(rel, lab_faces, rng):
    model, params = load_keras(asset(rel))
    x_rand = rng.integers(0, 256, size=(8, 55, 47, 3)).astype(np.float32)
    x_real = np.concatenate([lab_faces["test_subset"][0], lab_faces["bd_test_subset"][0]])
    for x in (x_rand, x_real):
        logits = np.asarray(jax.jit(model.apply)({"params": params}, x))
        _check_close(logits, numpy_ref.forward(params, x))


def test_mask_equals_zeroing_conv3_channels(rng):
    params = init_params(num_classes=17, seed=3)
    model = BadNet(17)
    x = rng.integers(0, 256, size=(6, 55, 47, 3)).astype(np.float32)
    mask = (rng.random(60) > 0.5).astype(np.float32)
    masked = np.asarray(model.apply({"params": params}, x, mask=mask))
    zeroed = np.asarray(model.apply({"params": prune_params(params, mask)}, x))
    np.testing.assert_array_equal(masked, zeroed)  # exactly: relu(0) = 0 and maxpool(0) = 0
    _check_close(masked, numpy_ref.forward(params, x, mask=mask))


def test_trunk_then_head_is_the_whole_network(rng):
    params = init_params(num_classes=5, seed=1)
    model = BadNet(5)
    x = jnp.asarray(rng.integers(0, 256, size=(4, 55, 47, 3)), jnp.float32)
    pool3 = model.apply({"params": params}, x, method=BadNet.trunk)
    assert pool3.shape == (4, 5, 4, 60)
    np.testing.assert_allclose(pool3, numpy_ref.pool3(params, np.asarray(x)), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(model.apply({"params": params}, pool3, method=BadNet.head),
                                  model.apply({"params": params}, x))


def test_lab_b_classifies_real_faces(lab_b, lab_faces):
    model, params = lab_b
    for name, (x, y) in lab_faces.items():
        pred = np.asarray(model.apply({"params": params}, x).argmax(-1))
        expected = np.zeros_like(y) if name.startswith("bd_") else y
        np.testing.assert_array_equal(pred, expected, err_msg=name)
        if name.startswith("bd_"):
            assert (y == 0).all()


def test_check_params_names_a_missing_layer_or_a_wrong_shape():
    """What save_keras, the sweep and the GoodNet check first: params missing a layer are named, not a KeyError."""
    params = init_params(num_classes=4)
    assert check_params(params) == 4
    with pytest.raises(ConfigError, match=r"params: no fc_2 \(kernel and bias\) among its layers \(conv_1, conv_2, "
                                          r"conv_3, conv_4, fc_1, output\); a BadNet's params hold conv_1, conv_2, "
                                          r"conv_3, conv_4, fc_1, fc_2, output") as err:
        check_params({k: v for k, v in params.items() if k != "fc_2"})
    assert err.value.field == "params"
    with pytest.raises(ConfigError, match=r"params: no conv_3 \(kernel and bias\)"):
        check_params({**params, "conv_3": {"kernel": params["conv_3"]["kernel"]}})
    with pytest.raises(ConfigError, match=r"params: fc_1 kernel of shape \(1200, 16\), expected \(1200, 160\)"):
        check_params({**params, "fc_1": {**params["fc_1"], "kernel": np.zeros((1200, 16))}})
    with pytest.raises(ConfigError, match=r"params: expected a BadNet's params \(a dict of the layers"):
        check_params([1, 2])


def test_predict_and_prune_params_refuse_wrong_masks_and_images(rng):
    params = init_params(num_classes=4)
    model = BadNet(4)
    x = rng.integers(0, 256, size=(3, 55, 47, 3)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"mask: shape \(59,\), expected \(60,\)"):
        predict(model, params, x, mask=np.ones(59))
    with pytest.raises(ConfigError, match=r"mask: channel 0 is 0.5"):
        prune_params(params, np.full(60, 0.5))
    with pytest.raises(DataFileError, match=r"x_NxHxWxC: images of shape \(3, 55, 47\), expected \(N, 55, 47, 3\)"):
        predict(model, params, x[..., 0])
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(DataFileError, match=r"x_NxHxWxC: image 1 holds NaN or infinite pixels"):
        predict(model, params, x)
    with pytest.raises(ConfigError, match=r"params: 4 classes, expected the model's 5"):
        predict(BadNet(5), params, x)
    with pytest.raises(ConfigError, match=r"num_classes=0: expected a positive number of classes"):
        init_params(num_classes=0)
    # Inside jit a traced mask is checked for its shape only (no host sync).
    zeroed = jax.jit(prune_params)(params, jnp.zeros(60))
    assert float(jnp.abs(zeroed["conv_3"]["kernel"]).max()) == 0.0
