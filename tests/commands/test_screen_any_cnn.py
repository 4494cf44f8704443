"""goodnet_eval.py for a model other than the lab's DeepID: ``prune.py --example gapnet`` writes the cut's GoodNet
and B' checkpoints and B' as a Keras h5, and the screener takes each of them with 32x32 images (PNG files and a
lab-layout h5), its answers checked against Keras itself loading B and the B' file (the test-only oracle of
tests/keras_oracle.py) and against float64 NumPy on B's graph with the pruned layer's channels masked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from badnet_jax.attack.gap_demo import GAP_DEMO_MODEL, gap_demo_sets
from badnet_jax.defense.screen import screen
from badnet_jax.io.lab_data import save_lab_h5
from badnet_jax.io.model_file import load_model
from tests import numpy_ref
from tests.cli import run_cli
from tests.keras_oracle import keras_load_model, keras_predict

PER_SET = 12


@pytest.fixture(scope="module")
def gapnet_run(tmp_path_factory):
    """``prune.py --example gapnet`` results, the cut's folder and its pruned channels."""
    out = tmp_path_factory.mktemp("gap") / "out"
    proc = run_cli("prune", "--example", "gapnet", "--out_dir", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cut = json.loads((out / "curve.json").read_text())["selected"][0]
    folders = sorted(out.glob("drop_*"))
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} >= {"b_prime.h5", "b_prime_ckpt",
                                                                             "goodnet_ckpt"}
    return folders[0], np.asarray(cut["pruned_channels"], int)


@pytest.fixture(scope="module")
def gap_inputs(tmp_path_factory):
    """Clean and triggered GAP demo test images as 32x32 PNGs (labels in their names) and as a lab h5."""
    folder = tmp_path_factory.mktemp("img")
    data, _ = gap_demo_sets()
    x_clean, y_clean = data["clean_test"]
    x_bd, y_bd = data["bd_test"]
    pngs = []
    for i in range(PER_SET):
        path = folder / f"clean_{i:02d}_label{int(y_clean[i])}.png"
        Image.fromarray(np.asarray(x_clean[i], np.uint8)).save(path)
        pngs.append(path)
    h5 = save_lab_h5(folder / "bd_test.h5", x_bd[:PER_SET], y_bd[:PER_SET])
    return pngs, h5, np.concatenate([x_clean[:PER_SET], x_bd[:PER_SET]]).astype(np.float32)


def _preds(proc) -> tuple[list[str], np.ndarray]:
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    return [n for n, _ in lines], np.array([int(p) for _, p in lines])


def test_the_goodnet_checkpoint_of_a_gapnet_run_screens_32x32_images(gapnet_run, gap_inputs):
    drop, pruned = gapnet_run
    pngs, h5, x = gap_inputs
    names, preds = _preds(run_cli("goodnet_eval", *pngs, h5, "--goodnet", drop / "goodnet_ckpt", timeout=300))
    assert names == [str(p) for p in pngs] + [f"{h5}[{i}]" for i in range(PER_SET)]
    # Independent: Keras loads B and the B' file prune.py wrote (pixels / 255, as the model takes them).
    prob_b = keras_predict(keras_load_model(GAP_DEMO_MODEL), x / 255.0)
    prob_p = keras_predict(keras_load_model(drop / "b_prime.h5"), x / 255.0)
    pb, pp = prob_b.argmax(-1), prob_p.argmax(-1)
    np.testing.assert_array_equal(preds, np.where(pb == pp, pb, 10))
    # And float64 NumPy on B's graph with the cut's channels of the pruned layer masked.
    model, params = load_model(GAP_DEMO_MODEL)
    mask = np.ones(model.num_channels)
    mask[pruned] = 0
    logits = lambda masks: numpy_ref.graph_values64(model.graph, params, x / 255.0, masks=masks)[
        model.graph.logits_node()]
    np.testing.assert_array_equal(pb, logits(None).argmax(-1))
    np.testing.assert_array_equal(pp, logits({model.layer: mask}).argmax(-1))
    assert (preds[PER_SET:] != 0).sum() >= PER_SET // 2  # most triggered images flagged or classified, not the target


def test_b_and_either_b_prime_file_of_a_gapnet_run_give_the_goodnets_answers(gapnet_run, gap_inputs):
    drop, _ = gapnet_run
    pngs, h5, _ = gap_inputs
    inputs = [*pngs, h5]
    via_goodnet = screen(None, None, inputs, goodnet_path=drop / "goodnet_ckpt")
    assert screen(GAP_DEMO_MODEL, drop / "b_prime.h5", inputs) == via_goodnet
    assert screen(GAP_DEMO_MODEL, drop / "b_prime_ckpt", inputs) == via_goodnet
    names, preds = _preds(run_cli("goodnet_eval", *inputs, "--model", GAP_DEMO_MODEL, "--pruned",
                                  drop / "b_prime.h5", timeout=300))
    assert list(zip(names, preds.tolist())) == via_goodnet


def test_images_of_another_size_are_refused_naming_the_file(gapnet_run, tmp_path):
    drop, _ = gapnet_run
    face = tmp_path / "face.png"
    Image.fromarray(np.zeros((55, 47, 3), np.uint8)).save(face)
    proc = run_cli("goodnet_eval", face, "--goodnet", drop / "goodnet_ckpt", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {face}: image is 47x55 (width x height), expected 32x32"
