"""Keras h5 <-> Flax conversion: every real layout, the export round trip, and every bad file.

Keras 3 (JAX backend, test-only) is the independent oracle: it reads the lab's files itself, reads what
``save_keras`` writes, and writes the Keras 3 ``.weights.h5`` layout that ``load_keras`` must read.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from badnet_jax import (BadNet, ModelFileError, init_params, load_keras, mask_from_zeroed, read_keras_params,
                        save_keras)
from tests import numpy_ref
from tests.conftest import LAB_B, REPAIRED, asset
from tests.keras_oracle import build_keras_deepid, keras_load_model, keras_predict, keras_weights

keras = pytest.importorskip("keras")


def _assert_params_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for layer in a:
        for what in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(a[layer][what]), np.asarray(b[layer][what]))


def test_lab_b_matches_what_keras_itself_loads(lab_faces):
    kmodel = build_keras_deepid()
    kmodel.load_weights(str(asset(LAB_B)))
    model, params = load_keras(asset(LAB_B))
    _assert_params_equal(params, keras_weights(kmodel))
    x = np.concatenate([lab_faces["valid_subset"][0], lab_faces["bd_valid_subset"][0]])
    kprobs = keras_predict(kmodel, x)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x)).argmax(-1), kprobs.argmax(-1))


@pytest.mark.parametrize("rel,pruned", sorted(REPAIRED.items()))
def test_repaired_b_prime_layouts_and_mask(rel, pruned, lab_b, lab_faces):
    _, b_params = lab_b
    _, bp_params = load_keras(asset(rel))
    mask = np.asarray(mask_from_zeroed(bp_params))
    assert int((mask == 0).sum()) == pruned
    # Every other layer is B's: the public solution only zeroed conv_3 channels.
    for layer in ("conv_1", "conv_2", "conv_4", "fc_1", "fc_2", "output"):
        np.testing.assert_array_equal(bp_params[layer]["kernel"], b_params[layer]["kernel"])
    x = np.concatenate([lab_faces["test_subset"][0], lab_faces["bd_test_subset"][0]])
    model = BadNet(1283)
    masked_b = np.asarray(model.apply({"params": b_params}, x, mask=mask))
    b_prime = np.asarray(model.apply({"params": bp_params}, x))
    np.testing.assert_allclose(masked_b, b_prime, rtol=1e-5, atol=1e-4 * np.abs(b_prime).max())
    np.testing.assert_array_equal(masked_b.argmax(-1), b_prime.argmax(-1))


def test_keras3_weights_file_reads(tmp_path):
    kmodel = build_keras_deepid(num_classes=11)
    path = tmp_path / "model.weights.h5"
    kmodel.save_weights(str(path))
    _, params = load_keras(path)
    _assert_params_equal(params, keras_weights(kmodel))


def test_export_is_a_full_keras_model_that_load_model_reads(tmp_path, rng):
    """The lab's eval.py calls keras.models.load_model: B' must load that way and predict what badnet-jax does."""
    params = init_params(num_classes=23, seed=7)
    path = save_keras(params, tmp_path / "full.h5")
    _assert_params_equal(read_keras_params(path), params)
    with h5py.File(path) as f:  # the layout of the public full_model_drop*.h5 files
        assert "model_config" in f.attrs and "model_weights" in f
        assert [n.decode() for n in f["model_weights"].attrs["layer_names"]][:2] == ["input", "conv_1"]
    kmodel = keras_load_model(path)
    _assert_params_equal(keras_weights(kmodel), params)
    x = rng.integers(0, 256, size=(6, 55, 47, 3)).astype(np.float32)
    ref = numpy_ref.forward(params, x)
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    np.testing.assert_allclose(keras_predict(kmodel, x), probs / probs.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    other = build_keras_deepid(num_classes=23)
    other.load_weights(str(path))  # and load_weights reads it too
    _assert_params_equal(keras_weights(other), params)


def test_keras_load_model_predicts_what_the_pruned_b_predicts_on_real_faces(tmp_path, lab_b, lab_faces):
    from badnet_jax import prune_params
    from badnet_jax.model import predict

    model, params = lab_b
    mask = np.ones(60, np.float32)
    mask[np.random.default_rng(0).permutation(60)[:50]] = 0  # a deep cut: predictions do change
    path = save_keras(prune_params(params, mask), tmp_path / "b_prime.h5")
    kmodel = keras_load_model(path)
    for name in ("valid_subset", "bd_valid_subset", "test_subset", "bd_test_subset"):
        x, _ = lab_faces[name]
        ours = predict(model, params, x, mask)
        np.testing.assert_array_equal(keras_predict(kmodel, x).argmax(-1), ours)
    assert (predict(model, params, lab_faces["bd_valid_subset"][0], mask) != 0).any()  # the cut matters here


def test_weights_only_export_round_trip_and_keras_reads_it(tmp_path, rng):
    params = init_params(num_classes=23, seed=7)
    path = save_keras(params, tmp_path / "out.h5", full_model=False)
    _assert_params_equal(read_keras_params(path), params)
    with h5py.File(path) as f:  # the Keras 2.3 weights-only layout
        assert [n.decode() for n in f.attrs["layer_names"]][:2] == ["input", "conv_1"]
        assert [n.decode() for n in f["conv_3"].attrs["weight_names"]] == ["conv_3/kernel:0", "conv_3/bias:0"]
        assert f["conv_3/conv_3/kernel:0"].shape == (3, 3, 40, 60)
    kmodel = build_keras_deepid(num_classes=23)
    kmodel.load_weights(str(path))
    _assert_params_equal(keras_weights(kmodel), params)
    x = rng.integers(0, 256, size=(4, 55, 47, 3)).astype(np.float32)
    ref = numpy_ref.forward(params, x)
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    np.testing.assert_allclose(keras_predict(kmodel, x), probs / probs.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # nothing left behind


# ---------------------------------------------------------------- bad files -------------------------------

@pytest.fixture
def small_file(tmp_path):
    return save_keras(init_params(num_classes=7, seed=0), tmp_path / "small.h5", full_model=False)


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _raises(path, *fragments):
    with pytest.raises(ModelFileError) as info:
        load_keras(path)
    msg = str(info.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, msg


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.h5", "not found")


def test_not_hdf5(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    _raises(p, "not an HDF5 file")


def test_truncated(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: len(data) // 2])
    _raises(small_file, "truncated")


def test_missing_layer(small_file):
    _raises(_edit(small_file, lambda f: f.__delitem__("fc_2")), "missing layer 'fc_2'")


def test_unknown_layer_name(small_file):
    _raises(_edit(small_file, lambda f: f.attrs.__setitem__("layer_names", np.array([b"input", b"evil"]))),
            "unknown layers", "evil")


def test_wrong_kernel_shape(small_file):
    def edit(f):
        del f["conv_2/conv_2/kernel:0"]
        f["conv_2/conv_2"].create_dataset("kernel:0", data=np.zeros((3, 3, 20, 41), np.float32))
    _raises(_edit(small_file, edit), "'conv_2' kernel has shape (3, 3, 20, 41)", "expected (3, 3, 20, 40)")


def test_nan_weight(small_file):
    def edit(f):
        f["fc_1/fc_1/bias:0"][3] = np.nan
    _raises(_edit(small_file, edit), "'fc_1' bias contains NaN")


def test_integer_weights(small_file):
    def edit(f):
        del f["fc_1/fc_1/bias:0"]
        f["fc_1/fc_1"].create_dataset("bias:0", data=np.zeros((160,), np.int32))
    _raises(_edit(small_file, edit), "dtype int32")


def test_full_model_with_lambda_layer_is_refused_without_running_it(tmp_path):
    src = asset("models/lab3_repaired/full_model_drop4.h5")
    p = shutil.copy(src, tmp_path / "lambda.h5")

    def edit(f):
        cfg = json.loads(f.attrs["model_config"])
        cfg["config"]["layers"][7] = {"class_name": "Lambda", "name": "conv_4",
                                      "config": {"name": "conv_4", "function": "os.system('touch pwned')"}}
        f.attrs["model_config"] = json.dumps(cfg)
    _raises(_edit(p, edit), "'Lambda'", "not allowed")


def test_full_model_with_optimizer_weights_group_is_read(tmp_path, lab_b):
    src = asset("models/lab3_repaired/full_model_drop4.h5")
    p = shutil.copy(src, tmp_path / "bd_net_like.h5")
    _edit(p, lambda f: f.create_group("optimizer_weights").create_dataset("Adam/iter:0", data=np.int64(5)))
    _, params = load_keras(p)
    assert int((np.asarray(mask_from_zeroed(params)) == 0).sum()) == 48


def test_keras3_archive_is_read_through_the_allow_list(tmp_path, rng):
    """A .keras file that Keras 3 itself saved: the same weights, the same forward; hostile archives refused."""
    import zipfile

    kmodel = build_keras_deepid(num_classes=13)
    path = tmp_path / "model.keras"
    kmodel.save(str(path))
    model, params = load_keras(path)
    _assert_params_equal(params, keras_weights(kmodel))
    x = rng.integers(0, 256, size=(3, 55, 47, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x)).argmax(-1),
                                  keras_predict(kmodel, x).argmax(-1))
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["layers"][3]["class_name"] = "Lambda"  # a layer that would run code
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(evil, "w") as z:
        for n, data in members.items():
            z.writestr(n, json.dumps(config) if n == "config.json" else data)
    _raises(evil, "'Lambda', which is not allowed")
    missing = tmp_path / "missing.keras"
    with zipfile.ZipFile(missing, "w") as z:
        z.writestr("config.json", members["config.json"])
    _raises(missing, "without 'model.weights.h5'")
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError):
        load_keras(truncated)
