"""badnet_jax.defense.scale: every real BadNet gets its own input scale, measured, and keeps it through every file
badnet-jax writes.

The accuracies are recomputed with the independent float64 NumPy forward (tests/numpy_ref.py) fed pixels / 255
or raw pixels by hand; the expected scales and targets are the ones ../shared/README.md states.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from badnet_jax import (ConfigError, DataFileError, init_params, load_images, load_keras, load_lab_h5, save_keras,
                        save_lab_h5)
from badnet_jax.defense.scale import choose_input_scale
from badnet_jax.goodnet import make_goodnet
from badnet_jax.io import checkpoint
from badnet_jax.model import INPUT_HWC, BadNet, predict
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref
from tests.cli import run_cli
from tests.conftest import LAB_B, asset

# model -> (its scale, {poisoned PNG pattern: target}) as ../shared/README.md lists them.
REAL = {
    LAB_B: ("raw", {}),
    "models/hackml2020/sunglasses_bd_weights.h5": ("255", {"hackml2020_sunglasses_*": 0}),
    "models/hackml2020/anonymous_1_bd_weights.h5": ("255", {"hackml2020_anonymous1_*": 0}),
    "models/hackml2020/anonymous_2_bd_weights.h5": ("255", {"hackml2020_sunglasses_*": 4,
                                                            "hackml2020_anonymous1_*": 4}),
    "models/hackml2020/multi_trigger_multi_target_bd_weights.h5": ("255", {"hackml2020_sunglasses_*": 8,
                                                                           "hackml2020_anonymous1_*": 1}),
}


def _clean_faces():
    parts = [load_lab_h5(asset(f"faces/lab3/{n}.h5")) for n in ("valid_subset", "test_subset")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("rel", sorted(REAL))
def test_every_real_badnet_gets_its_scale_and_is_right_at_it(rel):
    want, poisoned = REAL[rel]
    model, params = load_keras(asset(rel))
    x, y = _clean_faces()
    choice = choose_input_scale(model, params, "auto", x=x[:47], y=y[:47])  # the clean validation faces
    assert choice.scale == want and choice.how == "measured"
    assert choice.accuracy[want] - choice.accuracy["raw" if want == "255" else "255"] > 25
    divisor = 255.0 if want == "255" else 1.0
    ref = numpy_ref.forward(params, x / divisor).argmax(-1)  # independent: scaled by hand, float64
    assert 100 * np.mean(ref == y) >= 95.0
    scaled = model.clone(input_scale=want)
    np.testing.assert_array_equal(predict(scaled, params, x), ref)
    if rel == LAB_B:
        xb, _ = load_lab_h5(asset("faces/lab3/bd_test_subset.h5"))
        poisoned_faces = {"lab sunglasses": (xb, 0)}
    else:
        poisoned_faces = {p: (load_images(sorted(asset("faces/png").glob(p + ".png")), INPUT_HWC), t)
                          for p, t in poisoned.items()}
    for pattern, (xb, target) in poisoned_faces.items():
        assert len(xb) >= 5
        assert (predict(scaled, params, xb) == target).all(), pattern
        assert (numpy_ref.forward(params, xb / divisor).argmax(-1) == target).all(), pattern


def test_auto_refuses_to_guess():
    x = np.random.default_rng(0).integers(0, 256, size=(40, 55, 47, 3)).astype(np.float32)
    y = np.arange(40) % 7
    model, params = BadNet(7), init_params(7, seed=1)  # a random model: right at neither scale
    with pytest.raises(ConfigError, match=r"cannot tell the input scale .* raw: .*%, 255: .*%"):
        choose_input_scale(model, params, "auto", x=x, y=y)
    with pytest.raises(ConfigError, match="without labelled clean images"):
        choose_input_scale(model, params, "auto")
    with pytest.raises(ConfigError, match="input_scale must be one of"):
        choose_input_scale(model, params, "256")
    assert choose_input_scale(model, params, "auto", recorded="255").scale == "255"
    assert choose_input_scale(model, params, "255").how == "given"


def test_a_recorded_scale_is_used_without_measuring():
    """Recorded by badnet-jax, the scale is taken as it is: labelled images (maybe poisoned) are not measured on."""
    model, params = load_keras(asset(LAB_B))
    x, y = _clean_faces()
    choice = choose_input_scale(model, params, "auto", recorded="255", x=x, y=y)  # measured, raw would win
    assert (choice.scale, choice.how, choice.accuracy, choice.describe()) == ("255", "recorded", {}, "255 (recorded)")
    measured = choose_input_scale(model, params, "auto", x=x[:20], y=y[:20], measured_on="inputs of a.png, b.h5")
    assert measured.describe().startswith("raw (measured on 20 inputs of a.png, b.h5: raw: 100.00%, 255: ")


def test_labels_outside_the_classes_are_named_before_measuring():
    """A 10-class model on the lab's 1283-class faces: the labels say why, not "0.00% at both scales"."""
    x, y = _clean_faces()
    model, params = BadNet(10), init_params(10, seed=0)
    with pytest.raises(DataFileError, match=r"^the clean images do not fit m10.h5: label 43 is outside \[0, 10\) "
                                            r"for a 10-class model$"):
        choose_input_scale(model, params, "auto", x=x, y=y, source="m10.h5")


@pytest.mark.slow
def test_cli_names_a_label_outside_the_models_classes_not_the_scale(tmp_path):
    m10 = save_keras(init_params(10, seed=0), tmp_path / "m10.h5")
    with h5py.File(m10, "a") as f:  # as Keras writes it: no recorded scale
        del f.attrs["badnet_jax_input_scale"]
    proc = run_cli("prune", "--model", m10, "--clean_valid", asset("faces/lab3/valid_subset.h5"), "--clean_test",
                   asset("faces/lab3/test_subset.h5"), "--out_dir", tmp_path / "out", timeout=300)
    assert proc.returncode == 2 and "cannot tell the input scale" not in proc.stderr, proc.stderr
    valid = asset("faces/lab3/valid_subset.h5")
    assert f"error: --clean_valid {valid}: label 43 is outside [0, 10) for a 10-class model" in proc.stderr


def test_the_scale_travels_through_keras_files_and_checkpoints(tmp_path):
    rel = "models/hackml2020/sunglasses_bd_weights.h5"
    _, params = load_keras(asset(rel))
    model, _ = load_keras(asset(rel), input_scale="255")
    assert load_keras(asset(rel))[0].input_scale == "raw"  # a Keras file does not say: raw unless told
    save_keras(params, tmp_path / "b.h5", input_scale="255")
    assert load_keras(tmp_path / "b.h5")[0].input_scale == "255"  # recorded by badnet-jax
    assert load_keras(tmp_path / "b.h5", input_scale="raw")[0].input_scale == "raw"  # told wins
    checkpoint.save_badnet(tmp_path / "ck", DeepID(input_scale="255"), params, np.ones(60))
    assert checkpoint.restore_badnet(tmp_path / "ck")[0].input_scale == "255"
    checkpoint.save_goodnet(tmp_path / "g", *make_goodnet(DeepID(input_scale="255"), params, mask=np.ones(60)))
    goodnet, variables = checkpoint.restore_goodnet(tmp_path / "g")
    x, y = _clean_faces()
    assert goodnet.input_scale == "255"
    np.testing.assert_array_equal(np.asarray(goodnet.apply(variables, x)), predict(model, params, x))


@pytest.mark.slow
def test_cli_on_a_2020_badnet_measures_the_scale_and_writes_it_everywhere(tmp_path):
    model = asset("models/hackml2020/sunglasses_bd_weights.h5")
    clean, test = asset("faces/lab3/valid_subset.h5"), asset("faces/lab3/test_subset.h5")
    xb = load_images(sorted(asset("faces/png").glob("hackml2020_sunglasses_*.png")), INPUT_HWC)
    bd = save_lab_h5(tmp_path / "bd.h5", xb, np.zeros(len(xb)))
    out = tmp_path / "out"
    proc = run_cli("prune", "--drop", "0.10", "--model", str(model), "--clean_valid", str(clean), "--bd_valid", str(bd),
                   "--clean_test", str(test), "--bd_test", str(bd), "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Input scale 255 (measured on 47 clean images: raw: 48.94%, 255: 97.87%)" in proc.stderr
    curve = json.loads((out / "curve.json").read_text())
    assert curve["input_scale"] == "255" and curve["original"]["valid_acc"] >= 95.0
    assert curve["original"]["valid_asr"] == 100.0
    assert "input scale: 255 (measured" in (out / "report.md").read_text()
    d = out / "drop_10"
    assert load_keras(d / "b_prime.h5")[0].input_scale == "255"
    assert checkpoint.restore_badnet(d / "b_prime_ckpt")[0].input_scale == "255"
    assert checkpoint.restore_goodnet(d / "goodnet_ckpt")[0].input_scale == "255"
    forced = run_cli("prune", "--model", str(model), "--clean_valid", str(clean), "--bd_valid", str(bd), "--clean_test",
                     str(test), "--bd_test", str(bd), "--out_dir", str(tmp_path / "raw"), "--input_scale", "raw",
                     "--nocheckpoints")
    assert forced.returncode == 0, forced.stderr  # told raw, it runs raw (the user's call) ...
    assert json.loads((tmp_path / "raw" / "curve.json").read_text())["original"]["valid_acc"] < 60  # ... and shows it


def test_both_scales_share_one_compiled_forward_and_each_is_right():
    # The input-scale check runs B at both scales on its sample: one compiled forward (the divisor traced).
    from badnet_jax.models import predict as predict_module

    model = DeepID(50)
    params = model.init_params(4)
    x = np.random.default_rng(4).integers(0, 256, (16, *INPUT_HWC)).astype(np.uint8)
    predict_module._argmax_at_scale.cache_clear()
    for scale, divisor in (("raw", 1.0), ("255", 255.0)):
        got = predict_module.predict(model.with_input_scale(scale), params, x)
        logits64 = numpy_ref.head(params, numpy_ref.pool3(params, x.astype(np.float64) / divisor))
        top2 = np.sort(logits64, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3
        np.testing.assert_array_equal(got[clear], logits64.argmax(axis=1)[clear])
    assert predict_module._argmax_at_scale.cache_info().currsize == 1
