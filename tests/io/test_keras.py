"""badnet_jax.io.keras: Keras h5 <-> Flax conversion, on every real layout, and every bad or hostile file.

Keras 3 (JAX backend, test-only) is the independent oracle: it reads the lab's files itself, reads what
``save_keras`` writes, and writes the Keras 3 ``.weights.h5`` layout that ``load_keras`` must read. Hostile
files (property-based where a space of them exists) end in ModelFileError naming the file: never a crash, a
hang, a huge allocation or code execution. Checks every reader shares (any bytes, odd paths, links out of
the file) are in test_fileio.py.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from badnet_jax import (BadNet, BadNetError, ModelFileError, init_params, load_keras, mask_from_zeroed, read_keras_params,
                        save_keras)
from tests import numpy_ref
from tests.conftest import LAB_B, REPAIRED, asset
from tests.io.conftest import FUZZ, HUGE, WEIRD_ARRAYS, refused, refused_naming_the_file, write_bytes
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


def test_mask_from_zeroed_refuses_another_models_params_pointing_at_its_checkpoint():
    # The embedded GAP-head example is a graph CNN (no conv_3): DeepID's reader must say so, not KeyError.
    from badnet_jax import load_model
    from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL

    _, params = load_model(GAP_DEMO_MODEL)
    with pytest.raises(ModelFileError, match=r"reads the lab's DeepID.*restore_badnet"):
        mask_from_zeroed(params)


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


def test_missing_file(tmp_path):
    refused(load_keras, tmp_path / "nope.h5", "not found")


def test_not_hdf5(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    refused(load_keras, p, "not an HDF5 file")


def test_truncated(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: len(data) // 2])
    refused(load_keras, small_file, "truncated")


def test_missing_layer(small_file):
    refused(load_keras, _edit(small_file, lambda f: f.__delitem__("fc_2")), "not the lab's DeepID (no layer 'fc_2'")


def test_unknown_layer_name(small_file):
    refused(load_keras, _edit(small_file, lambda f: f.attrs.__setitem__("layer_names", np.array([b"input", b"evil"]))),
            "unknown layers", "evil")


def test_wrong_kernel_shape(small_file):
    def edit(f):
        del f["conv_2/conv_2/kernel:0"]
        f["conv_2/conv_2"].create_dataset("kernel:0", data=np.zeros((3, 3, 20, 41), np.float32))
    refused(load_keras, _edit(small_file, edit), "'conv_2' kernel has shape (3, 3, 20, 41)", "expected (3, 3, 20, 40)")


def test_nan_weight(small_file):
    def edit(f):
        f["fc_1/fc_1/bias:0"][3] = np.nan
    refused(load_keras, _edit(small_file, edit), "'fc_1' bias contains NaN")


def test_integer_weights(small_file):
    def edit(f):
        del f["fc_1/fc_1/bias:0"]
        f["fc_1/fc_1"].create_dataset("bias:0", data=np.zeros((160,), np.int32))
    refused(load_keras, _edit(small_file, edit), "dtype int32")


def test_full_model_with_lambda_layer_is_refused_without_running_it(tmp_path):
    src = asset("models/lab3_repaired/full_model_drop4.h5")
    p = shutil.copy(src, tmp_path / "lambda.h5")

    def edit(f):
        cfg = json.loads(f.attrs["model_config"])
        cfg["config"]["layers"][7] = {"class_name": "Lambda", "name": "conv_4",
                                      "config": {"name": "conv_4", "function": "os.system('touch pwned')"}}
        f.attrs["model_config"] = json.dumps(cfg)
    refused(load_keras, _edit(p, edit), "'Lambda'", "not allowed")


def test_full_model_with_optimizer_weights_group_is_read(tmp_path, lab_b):
    src = asset("models/lab3_repaired/full_model_drop4.h5")
    p = shutil.copy(src, tmp_path / "bd_net_like.h5")
    _edit(p, lambda f: f.create_group("optimizer_weights").create_dataset("Adam/iter:0", data=np.int64(5)))
    _, params = load_keras(p)
    assert int((np.asarray(mask_from_zeroed(params)) == 0).sum()) == 48


def test_keras3_archive_is_read_through_the_allow_list(tmp_path, rng):
    """A .keras file that Keras 3 itself saved: the same weights, the same forward; hostile archives refused."""
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
    refused(load_keras, evil, "'Lambda', which is not allowed")
    missing = tmp_path / "missing.keras"
    with zipfile.ZipFile(missing, "w") as z:
        z.writestr("config.json", members["config.json"])
    refused(load_keras, missing, "without 'model.weights.h5'")
    # A second config.json after the real one: zip readers differ on which copy is the archive's.
    twice = tmp_path / "twice.keras"
    with zipfile.ZipFile(twice, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("config.json", json.dumps(config))
    refused(load_keras, twice, "['config.json'] more than once")
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError):
        load_keras(truncated)


def test_finite_but_absurd_weights_are_refused(tmp_path):
    params = init_params(num_classes=3, seed=0)
    params["fc_2"]["kernel"] = np.full((960, 160), 3e38, np.float32)
    path = save_keras(params, tmp_path / "big.h5", full_model=False)
    with pytest.raises(ModelFileError, match=r"big\.h5: layer 'fc_2' kernel holds values up to 3e\+38"):
        load_keras(path)


@pytest.mark.parametrize("field,value", [("data_format", "channels_first"), ("dilation_rate", [2, 2]),
                                         ("filters", 21), ("kernel_size", [5, 5]), ("use_bias", False)])
def test_full_model_configs_the_model_would_not_honour_are_refused(tmp_path, field, value):
    path = save_keras(init_params(num_classes=3, seed=0), tmp_path / "full.h5")
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"]["layers"][1]["config"][field] = value  # conv_1
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ModelFileError, match=r"full\.h5: layer 'conv_1'"):
        load_keras(path)


# ---------------------------------------------------------------- hostile files ---------------------------

@FUZZ
@given(frac=st.floats(0.0, 0.999))
def test_truncated_model(tmp_path, model_bytes, frac):
    p = write_bytes(tmp_path, "t.h5", model_bytes[: int(frac * len(model_bytes))])
    with pytest.raises(ModelFileError):
        load_keras(p)


@FUZZ
@given(pos=st.integers(0, 10**9), value=st.integers(0, 255))
def test_flipped_byte_in_model_never_crashes(tmp_path, model_bytes, pos, value):
    data = bytearray(model_bytes)
    data[pos % len(data)] = value
    p = write_bytes(tmp_path, "f.h5", bytes(data))
    try:
        _, params = load_keras(p)
    except ModelFileError:
        return
    for layer in params.values():  # if it loads, what it loaded is valid
        assert all(np.isfinite(np.asarray(v)).all() for v in layer.values())


def test_written_models_keep_no_string_in_the_global_heap(tmp_path):
    """Every attribute save_keras writes is a fixed-length string (as Keras 2 writes them): a variable-length
    string lives in HDF5's global heap, and HDF5 can loop forever, uninterruptible from Python, inside
    ``attrs.get`` on a global heap with a flipped byte (what the byte-flip test above does to every file)."""
    for full_model in (False, True):
        path = save_keras(init_params(num_classes=3, seed=0), tmp_path / f"m{full_model}.h5", full_model=full_model)
        attrs = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: attrs.extend(obj.attrs.values()))
            attrs.extend(f.attrs.values())
        strings = [a for a in attrs if h5py.check_string_dtype(np.asarray(a).dtype) or isinstance(a, (str, bytes))]
        assert len(strings) >= 4 and all(np.asarray(a).dtype.kind == "S" for a in strings)
        assert b"GCOL" not in path.read_bytes()  # no global heap collection in the file at all


def test_an_input_scale_attribute_that_is_not_utf8_is_a_model_error(tmp_path):
    path = save_keras(init_params(num_classes=3, seed=0), tmp_path / "m.h5", full_model=False)
    with h5py.File(path, "r+") as f:
        f.attrs["badnet_jax_input_scale"] = np.bytes_(b"\x80\x81")
    with pytest.raises(ModelFileError, match="m.h5: cannot read its attributes"):
        load_keras(path)


@FUZZ
@given(layer=st.sampled_from(["conv_1", "conv_3", "fc_1", "output"]), what=st.sampled_from(["kernel", "bias"]),
       arr=WEIRD_ARRAYS)
def test_weird_weight_datasets(tmp_path, model_bytes, layer, what, arr):
    p = write_bytes(tmp_path, "w.h5", model_bytes)
    with h5py.File(p, "r+") as f:
        del f[f"{layer}/{layer}/{what}:0"]
        f[f"{layer}/{layer}"].create_dataset(f"{what}:0", data=arr)
    with pytest.raises(ModelFileError, match=layer):
        load_keras(p)


@FUZZ
@given(depth=st.integers(1, 100_000), kind=st.sampled_from(["Lambda", "MyCustomLayer", "TFOpLambda"]))
def test_hostile_model_config(tmp_path, model_bytes, depth, kind):
    p = write_bytes(tmp_path, "c.h5", model_bytes)
    with h5py.File(p, "r+") as f:
        weights = f.create_group("model_weights")
        for key in list(f.keys()):
            if key != "model_weights":
                f.move(key, f"model_weights/{key}")
        for a in ("layer_names", "backend", "keras_version"):
            weights.attrs[a] = f.attrs[a]
        if depth > 50_000:  # deeply nested JSON
            cfg = "[" * (depth - 50_000) + "]" * (depth - 50_000)
        else:
            cfg = json.dumps({"class_name": "Functional", "config": {"layers": [
                {"class_name": kind, "name": "conv_1", "config": {"name": "conv_1", "function": "__import__('os')"}}]}})
        f.attrs["model_config"] = cfg
    with pytest.raises(ModelFileError):
        load_keras(p)


@pytest.mark.parametrize("case", ["output_layer", "keras_config"])
def test_a_huge_declared_size_is_refused_naming_the_file(tmp_path, model_bytes, case):
    """Headers that declare far more than the file holds: refused from the header, the message names the file."""
    if case == "output_layer":
        path = write_bytes(tmp_path, "m.h5", model_bytes)
        with h5py.File(path, "r+") as f:
            for name, shape in (("output/output/kernel:0", (160, HUGE)), ("output/output/bias:0", (HUGE,))):
                del f[name]
                f.create_dataset(name, shape=shape, dtype=np.float32, chunks=tuple(min(s, 64) for s in shape))
    else:
        path = tmp_path / "m.keras"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("config.json", b" " * (64 << 20))  # 64 MiB of spaces: ~64 KB compressed
            z.writestr("model.weights.h5", model_bytes)
    refused_naming_the_file(load_keras, path)


def test_a_file_that_is_both_an_h5_and_a_keras_zip_is_refused(tmp_path):
    """h5py (and Keras' h5 reader) read the lab's B in it, a zip reader another network: neither is taken."""
    from badnet_jax.io.keras_file import recorded_input_scale

    archive = tmp_path / "other.keras"
    build_keras_deepid(num_classes=1283).save(str(archive))
    both = tmp_path / "bd_weights.h5"
    both.write_bytes(asset(LAB_B).read_bytes() + archive.read_bytes())
    with h5py.File(both) as f:  # what h5py and Keras see: the lab's B, intact
        np.testing.assert_array_equal(f["conv_1/conv_1/kernel:0"][()],
                                      np.asarray(load_keras(asset(LAB_B))[1]["conv_1"]["kernel"]))
    with zipfile.ZipFile(both) as z:  # what a zip reader sees: the other network
        assert "model.weights.h5" in z.namelist()
    for read in (load_keras, read_keras_params, recorded_input_scale):
        with pytest.raises(ModelFileError, match="is both an HDF5 file and a zip archive") as info:
            read(both)
        assert str(both) in str(info.value) and "refusing an ambiguous file" in str(info.value)
    load_keras(archive)  # each part alone still reads
    load_keras(asset(LAB_B))


def test_save_keras_names_a_missing_layer_instead_of_a_key_error(tmp_path):
    params = init_params(10)
    del params["fc_2"]
    with pytest.raises(BadNetError, match="params: no fc_2"):
        save_keras(params, tmp_path / "b.h5")
    assert not list(tmp_path.iterdir())
