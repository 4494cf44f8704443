"""badnet_jax.defense.outputs for a model other than the lab's DeepID: every cut gets B' as a Keras h5 and as a
checkpoint and the GoodNet checkpoint (fine-tuned ones too), each restoring the cut's model and mask; the disk-room
estimate stays above what the results take; a model no checkpoint can hold (a FlaxCNN) is refused before writing.
"""

from __future__ import annotations

import re

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.attack.demo import DEMO_MODEL
from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL
from badnet_jax.defense import report
from badnet_jax.defense.outputs import CutModels, check_space, write_results
from badnet_jax.errors import ConfigError
from badnet_jax.io import checkpoint, fileio
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.io.keras_graph_writer import PRUNED_CHANNELS_ATTR
from badnet_jax.io.model_file import load_model
from badnet_jax.models.flax_model import FlaxCNN
from tests.conftest import GOLDEN, asset


def _cut_models(curve, finetuned=None):
    order = np.asarray(curve.order)
    out = []
    for cut in curve.selected:
        mask = np.ones(len(order), np.float32)
        mask[order[:cut.channels_pruned]] = 0
        out.append(CutModels(cut, mask, finetuned))
    return out


def _bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_every_cut_of_a_graph_model_gets_its_b_prime_and_goodnet_checkpoints(tmp_path):
    curve = report.read_curve_json(GOLDEN / "gapnet_curve.json")
    model, params = load_model(GAP_DEMO_MODEL)
    tuned = jax.tree.map(lambda a: np.asarray(a) * np.float32(0.9), params)
    models = _cut_models(curve, tuned)
    out = write_results(tmp_path / "out", curve, model.with_input_scale("raw"), params, models, {"sweep": 1.0})
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    for m in models:
        d = out / m.cut.folder
        pruned = np.flatnonzero(m.mask == 0)
        with h5py.File(d / "b_prime.h5") as f:
            np.testing.assert_array_equal(f.attrs[PRUNED_CHANNELS_ATTR], pruned)
        read_keras_graph(d / "b_prime_finetuned.h5")
        # The checkpoints carry the model at the curve's input scale (255), not the one passed in.
        got, got_params, got_mask = checkpoint.restore_badnet(d / "b_prime_ckpt")
        assert got == model and got.input_scale == curve.input_scale == "255"
        np.testing.assert_array_equal(np.asarray(got_mask), m.mask)
        np.testing.assert_array_equal(np.asarray(got.logits(got_params, x, got_mask)),
                                      np.asarray(model.logits(params, x, m.mask)))
        got, got_params, _ = checkpoint.restore_badnet(d / "b_prime_finetuned_ckpt")
        np.testing.assert_array_equal(np.asarray(got_params["output"]["kernel"]), tuned["output"]["kernel"])
        for name, bp in (("goodnet_ckpt", params), ("goodnet_finetuned_ckpt", tuned)):
            goodnet, variables = checkpoint.restore_goodnet(d / name)
            assert goodnet.model == model
            np.testing.assert_array_equal(np.asarray(variables["pruning"]["mask"]), m.mask)
            np.testing.assert_array_equal(np.asarray(variables["params"]["pruned"]["conv_3"]["kernel"]),
                                          bp["conv_3"]["kernel"])
    # The room the run asked for up front covers what it wrote (fine-tuned models included).
    need = check_space(tmp_path, params, [m.cut.drop for m in models], True, model)
    assert _bytes(out) <= need, (_bytes(out), need)


@pytest.mark.parametrize("which", ["resnet_tiny", "deepid_demo"])
def test_the_room_estimate_covers_the_results(tmp_path, which, monkeypatch):
    curve = report.read_curve_json(GOLDEN / ("demo_curve.json" if which == "deepid_demo" else "gapnet_curve.json"))
    if which == "deepid_demo":
        model, params = load_model(DEMO_MODEL)
        models = _cut_models(curve)
    else:
        model, params = load_model(asset("models/other/resnet_tiny.h5"), "255")
        models = [CutModels(c, np.asarray(m.mask)) for c, m in zip(curve.selected, _cut_models(curve))]
    out = write_results(tmp_path / "out", curve, model, params, models, {"sweep": 1.0})
    need = check_space(tmp_path, params, [m.cut.drop for m in models], False, model)
    assert _bytes(out) <= need, (_bytes(out), need)
    # Refused for want of room, the message offers the results without models at a size these keep to.
    monkeypatch.setattr(fileio, "free_bytes", lambda path: need - 1)
    with pytest.raises(ConfigError, match=r"results need about .* MiB but only .* MiB are free") as err:
        check_space(tmp_path, params, [m.cut.drop for m in models], False, model)
    bare_kib = int(re.search(r"checkpoints=False: no models, about (\d+) KiB", str(err.value)).group(1))
    bare = write_results(tmp_path / "bare", curve, model, params, (), {"sweep": 1.0})
    assert _bytes(bare) <= bare_kib << 10, (_bytes(bare), bare_kib)


class _Net(nn.Module):
    @nn.compact
    def features(self, x):
        return nn.relu(nn.Conv(32, (3, 3), name="conv")(x))

    @nn.compact
    def hidden(self, feats):
        return jnp.mean(feats, axis=(1, 2))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, name="output")(self.hidden(self.features(x)))


def test_a_flax_model_s_cut_models_are_refused_before_writing(tmp_path):
    curve = report.read_curve_json(GOLDEN / "gapnet_curve.json")
    params = _Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    model = FlaxCNN.build(_Net(), params, input_hwc=(32, 32, 3), input_scale="255", layer="conv")
    with pytest.raises(ConfigError, match=r"model: a FlaxCNN's cut models cannot be written .* checkpoints=False"):
        write_results(tmp_path / "out", curve, model, params, _cut_models(curve), {"sweep": 1.0})
    assert not list(tmp_path.iterdir())
    write_results(tmp_path / "out", curve, model, params, (), {"sweep": 1.0})  # the report alone: written
    assert not list((tmp_path / "out").glob("drop_*"))
