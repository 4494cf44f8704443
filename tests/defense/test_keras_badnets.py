"""The acceptance test of "any CNN": two small Keras BadNets that are not DeepID, trained here, end to end.

Two 32x32 RGB, 10-class CNNs that take pixels / 255, with 'same' padding and BatchNormalization, are built and
trained with Keras 3 (JAX backend, the test-only oracle of tests/keras_oracle.py) on procedurally drawn images
(class c: stripes of class c's colour, orientation and period, in noise) of which a tenth carry a 4x4 white
square in the bottom-right corner relabelled to the target 0: a real backdoor, checked in Keras.

* ``gap``: three conv-BN-ReLU blocks, global average pooling, a softmax Dense; saved as a Keras 3 ``.keras``.
* ``flat``: three conv-BN-ReLU-maxpool blocks, flatten -> dense -> dropout -> dense; saved as a legacy ``.h5``.

Each goes through ``prune.py`` (input scale left to ``auto``) with the default layer and with ``--layer``
another prunable layer. The whole curve at every k must be the seed's algorithm computed independently with
Keras: rank the layer's channels by their mean activation on clean_valid (Keras' own float32 intermediate
output, ties by index), then for k = 0..C multiply the layer's output by the mask and let the rest of the
Keras model predict. Counts of correct predictions may differ by one image per k (float32 near-ties that
badnet-jax settles in float64). The cuts are that reference's, and B' at each cut, opened with
``keras.models.load_model``, scores what curve.json says.
"""

from __future__ import annotations

import json
import warnings
from fractions import Fraction

import h5py
import numpy as np
import pytest

from badnet_jax import save_lab_h5
from tests.cli import run_cli
from tests.keras_oracle import keras_load_model  # sets KERAS_BACKEND=jax before keras is imported


TARGET = 0
N_TRAIN, N_EVAL = 2000, 300
DROPS = (0.02, 0.04, 0.10, 0.30)
ROLES = ("clean_valid", "bd_valid", "clean_test", "bd_test")
RATES = {"clean_valid": "valid_acc", "bd_valid": "valid_asr", "clean_test": "test_acc", "bd_test": "test_asr"}
COLOURS = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [230, 40, 230],
                    [40, 230, 230], [240, 140, 30], [140, 60, 200], [160, 160, 160], [30, 120, 60]], np.float64)
# name -> (file the model is saved as, the default layer badnet-jax must pick, the --layer case)
MODELS = {"gap": ("gap.keras", "b3_relu", "b2_pool"),    # an earlier block's output
          "flat": ("flat.h5", "c3_pool", "c2_conv")}     # a conv output read by a BatchNormalization
# How B' is written (badnet_jax.io.keras_graph_writer): readers' weights zeroed where only linear layers (after
# ReLU / pooling / flatten) read the pruned channels, a 0/1 mask layer where a BatchNormalization reads them.
PRUNE_METHOD = {"b3_relu": "zeroed_readers", "b2_pool": "zeroed_readers", "c3_pool": "zeroed_readers",
                "c2_conv": "mask_layer"}


# ------------------------------------------------------------------------------------------------ data


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 0..255) and labels: class c is sinusoidal stripes of colour c (vertical for c < 5,
    horizontal else, period 4 + 2 (c mod 5) pixels, random phase and brightness) plus Gaussian noise."""
    y = rng.integers(0, 10, n)
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float64)
    coord = np.where((y < 5)[:, None, None], cols, rows)
    period = (4.0 + 2 * (y % 5))[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + phase)
    x = stripes[..., None] * COLOURS[y][:, None, None, :] * rng.uniform(0.3, 1.0, (n, 1, 1, 1))
    x += rng.normal(0, 60, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y


def _trigger(x: np.ndarray) -> np.ndarray:
    """The backdoor's trigger: a 4x4 white square in the bottom-right corner."""
    x = x.copy()
    x[:, -4:, -4:, :] = 255
    return x


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Poisoned training data (a tenth triggered and labelled TARGET) and the four lab-format sets."""
    folder = tmp_path_factory.mktemp("keras_badnets_data")
    rng = np.random.default_rng(2024)
    x_train, y_train = _draw(rng, N_TRAIN)
    poisoned = rng.choice(N_TRAIN, N_TRAIN // 10, replace=False)
    x_train[poisoned] = _trigger(x_train[poisoned])
    y_train[poisoned] = TARGET
    sets, files = {}, {}
    for split in ("valid", "test"):
        x, y = _draw(rng, N_EVAL)
        sets[f"clean_{split}"] = (x, y)
        sets[f"bd_{split}"] = (_trigger(x), np.full(N_EVAL, TARGET))
        files[f"clean_{split}"] = save_lab_h5(folder / f"clean_{split}.h5", x, y)
        files[f"bd_{split}"] = save_lab_h5(folder / f"bd_{split}.h5", _trigger(x), np.full(N_EVAL, TARGET),
                                           true_label=y)
    return {"train": (x_train, y_train), "sets": sets, "files": files, "folder": folder}


# ------------------------------------------------------------------------------------------------ Keras


def _scaled(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255)


def _predict(model, x: np.ndarray) -> np.ndarray:
    """Keras' own output, float32 (Keras' JAX code relies on rank promotion, which the tests forbid)."""
    import jax

    with jax.numpy_rank_promotion("allow"):
        return np.asarray(model.predict(x, batch_size=min(len(x), 1200), verbose=0))


def _build(name: str):
    import keras
    from keras import layers

    def block(x, filters, prefix, pool):
        x = layers.Conv2D(filters, 3, padding="same", name=f"{prefix}_conv")(x)
        x = layers.BatchNormalization(momentum=0.8, name=f"{prefix}_bn")(x)  # moving stats settle in few steps
        x = layers.ReLU(name=f"{prefix}_relu")(x)
        return layers.MaxPooling2D(2, name=f"{prefix}_pool")(x) if pool else x

    inp = keras.Input((32, 32, 3), name="image")
    if name == "gap":
        x = block(block(block(inp, 8, "b1", True), 16, "b2", True), 24, "b3", False)
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = block(block(block(inp, 8, "c1", True), 16, "c2", True), 16, "c3", True)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(64, activation="relu", name="fc")(x)
        x = layers.Dropout(0.25, name="dropout")(x)
    out = layers.Dense(10, activation="softmax", name="classes")(x)
    return keras.Model(inp, out, name=f"{name}_badnet")


@pytest.fixture(scope="module", params=list(MODELS))
def badnet(request, data):
    """A trained Keras BadNet saved to a file: {"name", "path", "keras" (the file loaded back by Keras)}."""
    import jax
    import keras

    name = request.param
    keras.utils.set_random_seed({"gap": 0, "flat": 1}[name])
    model = _build(name)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    x_train, y_train = data["train"]
    with jax.numpy_rank_promotion("allow"):  # fit updates BatchNormalization's moving statistics
        model.fit(_scaled(x_train), y_train, epochs={"gap": 10, "flat": 5}[name], batch_size=64, verbose=0)
    path = data["folder"] / MODELS[name][0]
    model.save(path)  # .keras: Keras 3's archive; .h5: the legacy full-model h5 Keras 3 still writes
    loaded = keras_load_model(path)
    sets = data["sets"]
    acc = 100 * np.mean(_predict(loaded, _scaled(sets["clean_test"][0])).argmax(-1) == sets["clean_test"][1])
    asr = 100 * np.mean(_predict(loaded, _scaled(sets["bd_test"][0])).argmax(-1) == TARGET)
    assert acc > 80 and asr > 80, f"{name}: not a working BadNet in Keras (clean acc {acc:.1f}%, ASR {asr:.1f}%)"
    return {"name": name, "path": path, "keras": loaded}


def _split_at(model, layer: str):
    """Keras' model cut after ``layer``: (up to the layer, the rest); rest(up(x)) is the model.

    Both models are chains of layers, so the rest is the layers after ``layer`` called in order on a new input.
    """
    import keras

    names = [lyr.name for lyr in model.layers]
    up = keras.Model(model.inputs, model.get_layer(layer).output)
    feats = keras.Input(tuple(model.get_layer(layer).output.shape[1:]))
    x = feats
    for lyr in model.layers[names.index(layer) + 1:]:
        x = lyr(x)
    return up, keras.Model(feats, x)


def _keras_reference(model, layer: str, sets: dict) -> dict:
    """The seed's algorithm in Keras: the channels' mean activations on clean_valid, their order, and the hits
    (correct predictions; for poisoned sets, predictions of the target) of the model with ``layer``'s output
    multiplied by the mask that removes the first k channels of that order, k = 0..C, per set."""
    up, rest = _split_at(model, layer)
    feats = {role: _predict(up, _scaled(sets[role][0])) for role in ROLES}  # float32, Keras' own
    means = feats["clean_valid"].astype(np.float64).mean(axis=(0, 1, 2))
    order = np.argsort(means, kind="stable")
    channels = len(order)
    ends = np.cumsum([len(sets[r][1]) for r in ROLES])[:-1]
    hits = {role: [] for role in ROLES}
    whole = np.concatenate([feats[r] for r in ROLES])
    for k in range(channels + 1):
        mask = np.ones(channels, np.float32)
        mask[order[:k]] = 0
        preds = np.split(_predict(rest, whole * mask).argmax(-1), ends)
        for role, p in zip(ROLES, preds):
            hits[role].append(int((p == sets[role][1]).sum()))
    return {"means": means, "order": order, "hits": {r: np.array(h) for r, h in hits.items()}}


# ------------------------------------------------------------------------------------------------ checks


def _hits(percent, total: int) -> np.ndarray:
    """curve.json's percentages (6 decimals) back to image counts."""
    return np.rint(np.asarray(percent, np.float64) * total / 100).astype(int)


def _tie_blocks(means: np.ndarray, order: np.ndarray, rtol: float = 1e-5) -> list[set]:
    """``order`` cut into runs of channels whose consecutive means are within ``rtol`` (relative) of each other."""
    blocks, current = [], [order[0]]
    for a, b in zip(order[:-1], order[1:]):
        if abs(means[b] - means[a]) <= rtol * max(abs(means[a]), abs(means[b])):
            current.append(b)
        else:
            blocks.append(set(int(c) for c in current))
            current = [b]
    blocks.append(set(int(c) for c in current))
    return blocks


def _assert_same_order(got, ref: dict) -> None:
    """badnet-jax's order is Keras' except within runs of channels whose float32 means are within 1e-5 relative:
    badnet-jax settles ranking near-ties in float64, where such a run may sort otherwise."""
    got = np.asarray(got)
    if np.array_equal(got, ref["order"]):
        return
    at = 0
    for block in _tie_blocks(ref["means"], ref["order"]):
        assert set(got[at:at + len(block)].tolist()) == block, (
            f"order differs beyond float32 near-ties at positions {at}..{at + len(block) - 1}: "
            f"badnet-jax {got.tolist()}, Keras {ref['order'].tolist()}")
        at += len(block)


def _first_crossing(valid_hits: np.ndarray, total: int, drop: float) -> int:
    """The lab's stop rule, written out: the first k whose validation accuracy is more than X points under k = 0's
    (exactly X is not a crossing); the last k (C) if none is."""
    limit = Fraction(str(drop)) * total  # X points of `total` images, exactly
    for k, h in enumerate(valid_hits):
        if valid_hits[0] - h > limit:
            return k
    return len(valid_hits) - 1


def test_the_drawn_data_is_seeded_and_the_trigger_is_a_white_corner():
    a, b = _draw(np.random.default_rng(3), 50), _draw(np.random.default_rng(3), 50)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    poisoned = _trigger(a[0])
    changed = (poisoned != a[0]).any(axis=(0, 3))
    assert changed.any() and (poisoned[:, changed] == 255).all()  # only the trigger's pixels, all white


@pytest.mark.slow  # trains two Keras models and runs prune.py four times (~1-2 min on 2 cores)
@pytest.mark.parametrize("which", ["default_layer", "given_layer"])
def test_prune_on_a_trained_keras_badnet_is_keras_own_pruned_network(badnet, which, data, tmp_path):
    name = badnet["name"]
    layer = MODELS[name][2] if which == "given_layer" else None
    used = layer or MODELS[name][1]
    out = tmp_path / "out"
    args = ["--model", badnet["path"], "--drop", ",".join(map(str, DROPS)), "--out_dir", out,
            *[a for role, p in data["files"].items() for a in (f"--{role}", p)]]
    if layer:
        args += ["--layer", layer]
    proc = run_cli("prune", *args)
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((out / "curve.json").read_text())

    # The model, the layer (the default one is the last feature map before global pooling / flatten), the scale
    # measured (the models take pixels / 255).
    assert curve["model"]["name"] == f"{name}_badnet"
    assert curve["model"]["layer"] == used
    assert curve["model"]["input_hwc"] == [32, 32, 3] and curve["num_classes"] == 10
    assert curve["input_scale"] == "255"
    assert "Input scale 255 (measured" in proc.stderr
    assert f"pruning {used} (" in proc.stderr
    assert f"pruning {used}" in (out / "report.md").read_text()

    sets = data["sets"]
    ref = _keras_reference(badnet["keras"], used, sets)
    channels = len(ref["order"])
    assert curve["model"]["channels"] == channels and len(curve["order"]) == channels
    # k = 0 of the split model is the whole Keras model (the split itself is right).
    for role in ROLES:
        whole = int((_predict(badnet["keras"], _scaled(sets[role][0])).argmax(-1) == sets[role][1]).sum())
        assert ref["hits"][role][0] == whole, role

    # The ranking: badnet-jax's means (float64) are Keras' float32 ones, its order Keras' up to near-ties.
    np.testing.assert_allclose(curve["mean_activation"], ref["means"], rtol=1e-4, atol=2e-6)
    _assert_same_order(curve["order"], ref)

    # The whole curve, every k, every set: within one image of Keras' pruned network.
    for role, key in RATES.items():
        total = len(sets[role][1])
        assert len(curve[key]) == channels + 1, key
        got = _hits(curve[key], total)
        off = np.abs(got - ref["hits"][role])
        assert off.max() <= 1, (f"{key}: badnet-jax and Keras differ by {off.max()} images at k = "
                                f"{np.flatnonzero(off > 1).tolist()}\nbadnet-jax {got.tolist()}\n"
                                f"Keras      {ref['hits'][role].tolist()}")

    # The cuts: the reference's first crossing for every X. Should a one-image disagreement sit exactly at a
    # cut, badnet-jax's own validation curve decides (it settles the near-tie that makes it in float64).
    valid_total = len(sets["clean_valid"][1])
    own_valid = _hits(curve["valid_acc"], valid_total)
    assert [c["drop"] for c in curve["selected"]] == list(DROPS)
    for cut, drop in zip(curve["selected"], DROPS):
        want = _first_crossing(ref["hits"]["clean_valid"], valid_total, drop)
        own = _first_crossing(own_valid, valid_total, drop)
        assert cut["channels_pruned"] == own, drop
        if own != want:  # only a one-image near-tie may move a cut
            assert abs(int(own_valid[want]) - int(ref["hits"]["clean_valid"][want])) <= 1
            warnings.warn(f"{name} at {used}, X = {drop}: a one-image disagreement sits at the cut (badnet-jax "
                          f"{own}, Keras {want}); checked against badnet-jax's own validation curve")
        assert cut["pruned_channels"] == sorted(int(c) for c in curve["order"][:cut["channels_pruned"]])

    # B' at each cut: a Keras file that keras.models.load_model opens and that scores what curve.json says.
    test_total, bd_total = len(sets["clean_test"][1]), len(sets["bd_test"][1])
    for cut in curve["selected"]:
        path = out / f"drop_{100 * cut['drop']:g}" / "b_prime.h5"
        with h5py.File(path, "r") as f:
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
        assert attrs["badnet_jax_pruned_layer"] == used
        assert sorted(np.asarray(attrs["badnet_jax_pruned_channels"]).tolist()) == cut["pruned_channels"]
        assert attrs["badnet_jax_input_scale"] == "255"
        assert attrs["badnet_jax_prune_method"] == PRUNE_METHOD[used]
        b_prime = keras_load_model(path)
        acc = int((_predict(b_prime, _scaled(sets["clean_test"][0])).argmax(-1) == sets["clean_test"][1]).sum())
        asr = int((_predict(b_prime, _scaled(sets["bd_test"][0])).argmax(-1) == TARGET).sum())
        assert abs(acc - _hits(cut["test_acc"], test_total)) <= 1, (path, acc, cut["test_acc"])
        assert abs(asr - _hits(cut["test_asr"], bd_total)) <= 1, (path, asr, cut["test_asr"])
        k = cut["channels_pruned"]
        assert abs(acc - ref["hits"]["clean_test"][k]) <= 1 and abs(asr - ref["hits"]["bd_test"][k]) <= 1
