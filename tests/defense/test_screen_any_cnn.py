"""badnet_jax.defense.screen for a model other than the lab's DeepID (the real tf_keras resnet_tiny): B' as a
Keras h5 written by save_keras_graph (both ways it prunes: zeroed readers and an inserted mask layer) or as a
checkpoint, answers checked against float64 NumPy on B's graph with the pruned layer masked; and the B' files that
are not B with channels pruned, refused naming both files.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from badnet_jax.errors import ConfigError, ModelFileError
from badnet_jax.defense.screen import screen
from badnet_jax.goodnet import make_goodnet
from badnet_jax.io import checkpoint
from badnet_jax.io.keras_graph_writer import MASK_LAYER, PRUNED_CHANNELS_ATTR, ZEROED_READERS, save_keras_graph
from badnet_jax.io.model_file import load_model
from tests import numpy_ref
from tests.conftest import LAB_B, asset

RESNET = "models/other/resnet_tiny.h5"
VGG = "models/other/vgg_tiny.h5"


@pytest.fixture(scope="module")
def faces32(tmp_path_factory):
    """resnet_tiny's 16 reference images as PNG files, labelled with Keras' own class for them."""
    ref = np.load(asset(RESNET.replace(".h5", "_reference.npz")))
    folder = tmp_path_factory.mktemp("png")
    paths = []
    for i, (img, logits) in enumerate(zip(ref["images"], ref["logits"])):
        paths.append(folder / f"img{i:02d}_label{int(np.argmax(logits))}.png")
        Image.fromarray(img).save(paths[-1])
    return paths, ref["images"].astype(np.float64)


def _mask(model, every: int = 3) -> np.ndarray:
    mask = np.ones(model.num_channels, np.float32)
    mask[::every] = 0
    return mask


def _expected(model, params, x, mask) -> list[int]:
    logits = lambda masks: numpy_ref.graph_values64(model.graph, params, x / 255.0, masks=masks)[
        model.graph.logits_node()]
    pb, pp = logits(None).argmax(-1), logits({model.layer: mask}).argmax(-1)
    return np.where(pb == pp, pb, model.num_classes).tolist()


@pytest.mark.parametrize("layer,method", [(None, ZEROED_READERS), ("stem_relu", MASK_LAYER)])
def test_a_keras_b_prime_of_any_cnn_screens_as_b_with_its_layer_masked(tmp_path, faces32, layer, method):
    paths, x = faces32
    model, params = load_model(asset(RESNET), "255", layer)
    mask = _mask(model)
    b_prime = save_keras_graph(model, params, tmp_path / "b_prime.h5", mask)
    with h5py.File(b_prime) as f:
        assert f.attrs["badnet_jax_prune_method"].decode() == method
    got = screen(asset(RESNET), b_prime, paths)  # B records no scale; B' records 255
    assert [n for n, _ in got] == [str(p) for p in paths]
    assert [p for _, p in got] == _expected(model, params, x, mask)
    ckpt = checkpoint.save_badnet(tmp_path / "b_prime_ckpt", model, params, mask)
    assert screen(asset(RESNET), ckpt, paths) == got
    goodnet = checkpoint.save_goodnet(tmp_path / "goodnet_ckpt", *make_goodnet(model, params, mask=mask))
    assert screen(None, None, paths, goodnet_path=goodnet) == got


def test_a_keras_b_prime_that_is_not_b_with_channels_pruned_is_refused(tmp_path, faces32):
    paths, _ = faces32
    model, params = load_model(asset(RESNET), "255")
    mask = _mask(model)
    b_prime = save_keras_graph(model, params, tmp_path / "b_prime.h5", mask)
    # A weight of a reader changed.
    moved = tmp_path / "moved.h5"
    moved.write_bytes(b_prime.read_bytes())
    with h5py.File(moved, "a") as f:
        ds = f["model_weights/logits/logits/kernel:0"]
        k = ds[()]
        k[1, 1] += 0.5  # row 1: channel 1 of the pruned layer, a kept one
        ds[...] = k
    with pytest.raises(ModelFileError, match=rf"pruned_path={moved} is not B \(model_path=.*resnet_tiny.h5\) with "
                                             r"channels pruned: layer 'logits' kernel differs in \d+ of"):
        screen(asset(RESNET), moved, paths)
    # Another set of pruned channels recorded than the weights zeroed.
    lied = tmp_path / "lied.h5"
    lied.write_bytes(b_prime.read_bytes())
    with h5py.File(lied, "a") as f:
        f.attrs[PRUNED_CHANNELS_ATTR] = np.array([1, 2], np.int64)
    with pytest.raises(ModelFileError, match="with channels pruned: layer 'logits' kernel differs"):
        screen(asset(RESNET), lied, paths)
    with h5py.File(lied, "a") as f:
        f.attrs[PRUNED_CHANNELS_ATTR] = np.array([0, 999], np.int64)
    with pytest.raises(ModelFileError, match=r"records pruned channels \[0, 999\] of layer 'b1_out', which has 32 "
                                             r"channels"):
        screen(asset(RESNET), lied, paths)


def test_a_keras_file_that_does_not_record_its_pruning_asks_for_the_checkpoint(faces32):
    paths, _ = faces32
    with pytest.raises(ConfigError, match=r"pruned_path=.*resnet_tiny.h5: a Keras file of a model other than the lab's "
                                          r"DeepID that does not record which channels were pruned .* pass the "
                                          r"drop_X/b_prime_ckpt .* as pruned_path, or drop_X/goodnet_ckpt as "
                                          r"goodnet_path"):
        screen(asset(RESNET), asset(RESNET), paths)


def test_a_b_prime_of_another_network_is_refused_naming_both_files(tmp_path, faces32):
    paths, _ = faces32
    vgg, vgg_params = load_model(asset(VGG), "255")
    other = checkpoint.save_badnet(tmp_path / "vgg_ckpt", vgg, vgg_params, _mask(vgg))
    with pytest.raises(ModelFileError, match=rf"pruned_path={other} is not B \(model_path=.*resnet_tiny.h5\) with "
                                             r"channels pruned: B' prunes layer 'p2', which B cannot be pruned at"):
        screen(asset(RESNET), other, paths)
    model, params = load_model(asset(RESNET), "255")
    # The same architecture, other weights (a fine-tuned B'): its GoodNet checkpoint is the way.
    tuned = {k: {kk: np.asarray(v) * np.float32(1.01) for kk, v in p.items()} for k, p in params.items()}
    ckpt = checkpoint.save_badnet(tmp_path / "tuned_ckpt", model, tuned, _mask(model))
    with pytest.raises(ModelFileError, match=r"layer '.*' .* differs in \d+ of \d+ weights; a fine-tuned B' goes "
                                             r"through its GoodNet checkpoint"):
        screen(asset(RESNET), ckpt, paths)
    # The lab's DeepID B' against this B, and this B' against the lab's B.
    with pytest.raises(ModelFileError, match="B' is the lab's DeepID, B is resnet_tiny"):
        screen(asset(RESNET), asset("models/lab3_repaired/full_model_drop30.h5"), paths)
    mine = checkpoint.save_badnet(tmp_path / "mine", model, params, _mask(model))
    with pytest.raises(ModelFileError, match="B' prunes layer 'b1_out', which B cannot be pruned at"):
        screen(asset(LAB_B), mine, paths)


def test_the_screener_settles_near_ties_with_the_bound_measured_on_its_images(tmp_path, faces32, monkeypatch):
    # A checkpoint stores no measured bound; the screener measures it on the images at hand (as the sweep does on
    # its ranking set) before settling: B and B' are flagged within the measured bound, never the stored default.
    paths, x = faces32
    model, params = load_model(asset(RESNET), "255")
    goodnet_path = checkpoint.save_goodnet(tmp_path / "goodnet_ckpt", *make_goodnet(model, params, mask=_mask(model)))
    assert not checkpoint.restore_goodnet(goodnet_path)[0].model.tie_rtol_measured
    from badnet_jax.models import predict as predict_module
    from badnet_jax.numerics.tie_bound import with_measured_tie_rtol
    seen = []
    real = predict_module._top2_fn  # the float32 forward that flags near-ties, built for the model it flags with
    monkeypatch.setattr(predict_module, "_top2_fn", lambda m: seen.append(m) or real(m))
    got = screen(None, None, paths, goodnet_path=goodnet_path)
    want = with_measured_tie_rtol(model, params, x.astype(np.float32))
    assert [m.tie_rtol_measured for m in seen] == [True, True] and {m.tie_rtol for m in seen} == {want.tie_rtol}
    assert [p for _, p in got] == _expected(model, params, x, _mask(model))
