"""The defense end to end on CNNs that are not the lab's DeepID (badnet-prune as a user runs it), against the float64
NumPy interpreter of the same graph pruned by multiplying the layer's output with the mask (tests/numpy_ref.py).

The real Keras 2 files of ../shared/assets/models/other are seeded and untrained: the data here labels each clean
image with the model's own float64 answer (a tenth of them moved to another class) and marks "poisoned" images
with a white corner labelled 0, so every rate is defined; what is checked is that every number of the curve is
the reference's at every k.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from badnet_jax import load_keras, load_lab_h5, save_lab_h5
from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.models.deepid import DeepID, deepid_graph
from badnet_jax.models.graph import GraphCNN
from badnet_jax import sweep as sw
from tests import numpy_ref
from tests.cli import run_cli
from tests.conftest import LAB_B, LAB_FILES, asset

FILES = {"resnet_tiny": "models/other/resnet_tiny.h5", "vgg_tiny": "models/other/vgg_tiny.h5"}


def _logits64(graph, params, x_uint8, masks=None, divisor=255, given=None):
    target = graph.logits_node()
    return numpy_ref.graph_values64(graph, params, x_uint8.astype(np.float64) / divisor, upto=target,
                                   masks=masks, given=given)[target]


def _data(graph, params, tmp_path, rng, n=120, divisor=255, varied=False):
    """Lab-format clean and poisoned sets of the model's input size (see the module docstring). ``varied``: each
    image a colour of its own plus noise of its own contrast, so that a model that pools globally early tells
    the images apart (on uniform noise its pooled maps are nearly equal, and so are its answers)."""
    h, w, c = graph.input_hwc
    files, sets = {}, {}
    for split in ("valid", "test"):
        if varied:
            base, contrast = rng.integers(0, 256, (n, 1, 1, c)), rng.integers(5, 120, (n, 1, 1, 1))
            x = np.clip(base + rng.normal(0, 1, (n, h, w, c)) * contrast, 0, 255).astype(np.uint8)
        else:
            x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
        y = _logits64(graph, params, x, divisor=divisor).argmax(-1)
        moved = rng.choice(n, n // 10, replace=False)
        y[moved] = (y[moved] + 1) % _logits64(graph, params, x[:1], divisor=divisor).shape[1]
        xb = x.copy()
        xb[:, -4:, -4:, :] = 255
        yb = np.zeros(n, np.int64)
        files[f"clean_{split}"] = save_lab_h5(tmp_path / f"clean_{split}.h5", x, y)
        files[f"bd_{split}"] = save_lab_h5(tmp_path / f"bd_{split}.h5", xb, yb)
        sets[f"clean_{split}"], sets[f"bd_{split}"] = (x, y), (xb, yb)
    return files, sets


def _reference_curve(graph, params, layer, sets, divisor=255):
    """Order and per-k rates of the float64 network pruned at ``layer``: ranking on clean validation data."""
    x, _ = sets["clean_valid"]
    feats = numpy_ref.graph_values64(graph, params, x.astype(np.float64) / divisor, upto=layer)[layer]
    order = np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable")
    rates = {}
    for role, key in (("clean_valid", "valid_acc"), ("bd_valid", "valid_asr"), ("clean_test", "test_acc"),
                      ("bd_test", "test_asr")):
        xs, ys = sets[role]
        # What no mask at the layer changes is computed once (the trunk up to it, unmasked).
        values = numpy_ref.graph_values64(graph, params, xs.astype(np.float64) / divisor, upto=graph.logits_node())
        given = numpy_ref.upstream_of(graph, values, layer)
        per_k = []
        for k in range(len(order) + 1):
            mask = np.ones(len(order))
            mask[order[:k]] = 0
            logits = _logits64(graph, params, xs, {layer: mask}, divisor, given)
            per_k.append(100.0 * float((logits.argmax(-1) == ys).mean()))
        rates[key] = per_k
    return order, rates


def test_the_references_trunk_computed_once_is_the_masked_forward_computed_whole(rng):
    """``_reference_curve`` takes what no mask at the layer changes from one unmasked pass (``upstream_of``):
    the same float64 logits, bit for bit, as the whole masked forward (a block and its skip path after the
    layer included)."""
    graph, params = read_keras_graph(asset(FILES["resnet_tiny"]))
    x = rng.integers(0, 256, (6, *graph.input_hwc), dtype=np.uint8)
    values = numpy_ref.graph_values64(graph, params, x / 255.0, upto=graph.logits_node())
    for layer in ("stem_relu", "b0_out", "b1_out"):
        mask = (rng.random(values[layer].shape[-1]) < 0.5).astype(np.float64)
        given = numpy_ref.upstream_of(graph, values, layer)
        assert layer in given and "logits" not in given and ("b1_proj" in given) == (layer == "b1_out")
        np.testing.assert_array_equal(_logits64(graph, params, x, {layer: mask}, given=given),
                                      _logits64(graph, params, x, {layer: mask}))


@pytest.mark.parametrize("name,layer", [("resnet_tiny", None), ("vgg_tiny", None), ("vgg_tiny", "c3"),
                                        ("vgg_tiny", "c4/pre"), ("resnet_tiny", "b0_out")])
def test_prune_on_any_cnn_gives_the_float64_pruned_network_at_every_k(name, layer, tmp_path, rng):
    graph, params = read_keras_graph(asset(FILES[name]))
    files, sets = _data(graph, params, tmp_path, rng)
    args = ["--model", asset(FILES[name]), "--input_scale", "255", "--drop", "0.02,0.10", "--nocheckpoints",
            "--out_dir", tmp_path / "out", *[a for role, p in files.items() for a in (f"--{role}", p)]]
    if layer:
        args += ["--layer", layer]
    proc = run_cli("prune", *args)
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    used = layer or GraphCNN.build(graph, params).layer
    assert curve["model"] == {"name": name, "layer": used, "channels": curve["model"]["channels"],
                              "input_hwc": list(graph.input_hwc), "num_classes": curve["num_classes"]}
    assert f"pruning {used} (" in proc.stderr
    order, rates = _reference_curve(graph, params, used, sets)
    np.testing.assert_array_equal(curve["order"], order)
    for key, want in rates.items():
        np.testing.assert_allclose(curve[key], want, rtol=0, atol=1e-5, err_msg=key)  # one image: 0.83 points
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"pruning {used}" in report
    rows = [r.split(",") for r in (tmp_path / "out" / "curve.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, len(order) + 1))  # k = 1..C, C the layer's channels
    assert [int(r[1]) for r in rows] == [int(c) for c in order]
    np.testing.assert_allclose([float(r[3]) for r in rows], rates["valid_acc"][1:], atol=0.006)  # 2 decimals



def test_the_defense_compiles_any_cnn_once_while_loading_and_measures_its_bound_meanwhile(tmp_path, rng,
                                                                                          backend_compiles):
    """The sweep's program takes the near-tie bound traced, so the defense compiles it for any CNN while the
    images load, and measures the bound on the clean validation images while it compiles: one compile of the
    sweep, the bound's time reported, and the curve the float64 network's. The models written store no measured
    bound (a screener measures it on its own images)."""
    from badnet_jax.defense.pipeline import DefenseConfig, run_defense
    from badnet_jax.io import checkpoint

    graph, params = read_keras_graph(asset(FILES["vgg_tiny"]))
    files, sets = _data(graph, params, tmp_path, rng, n=40)
    run_defense(DefenseConfig(drops=(0.04,), model=asset(FILES["vgg_tiny"]), input_scale="255",
                              out_dir=str(tmp_path / "o"), sweep=sw.SweepOptions(chunk=13),
                              **{role: str(p) for role, p in files.items()}))
    assert [f for f in backend_compiles if "rank_and_sweep_call" in f] == ["jit(rank_and_sweep_call)"]
    assert not checkpoint.restore_badnet(tmp_path / "o" / "drop_4" / "b_prime_ckpt")[0].tie_rtol_measured
    assert not checkpoint.restore_goodnet(tmp_path / "o" / "drop_4" / "goodnet_ckpt")[0].model.tie_rtol_measured
    md = (tmp_path / "o" / "report.md").read_text()
    assert "near-tie bound:" in md and "compile (after load):" in md
    curve = json.loads((tmp_path / "o" / "curve.json").read_text())
    order, rates = _reference_curve(graph, params, GraphCNN.build(graph, params).layer, sets)
    np.testing.assert_array_equal(curve["order"], order)
    for key, want in rates.items():
        np.testing.assert_allclose(curve[key], want, rtol=0, atol=1e-5, err_msg=key)


def _se_model(path):
    """A Keras 3 CNN of today's layers, seeded and saved, pixels 0..255 in (EfficientNet's stem): an adapted
    Normalization, swish and hard_swish convolutions, a squeeze-and-excitation block (GlobalAveragePooling2D with
    keepdims, a sigmoid gate, a broadcast Multiply), a gelu and a SeparableConv2D."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, activation="swish", name="c1")(layers.Normalization(name="norm")(inp))
    x = layers.DepthwiseConv2D(3, padding="same", activation="hard_swish", name="dw")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = layers.Conv2D(8, 1, activation="sigmoid", name="se_gate")(s)
    x = layers.Activation("gelu", name="act")(layers.Multiply(name="se_excite")([x, s]))
    x = layers.SeparableConv2D(12, 3, strides=2, activation="relu6", name="c2")(x)
    out = layers.Dense(5, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inp, out, name="se_net")
    model.get_layer("norm").set_weights([np.array([120.0, 110.0, 100.0], np.float32),
                                         np.array([4000.0, 3500.0, 3000.0], np.float32), np.array(500, np.int64)])
    model.save(path)
    return path


def _prune_a_keras_file_as_the_reference_does(build, path, layers, tmp_path, rng, varied=False):
    """``prune.py`` on the raw-pixel Keras file ``build(path)`` saves, at each of ``layers`` (one drop, X = 10):
    every number of the curve is the float64 reference's at every k, and B' as Keras loads it scores the curve's
    test accuracy at the cut. ``varied``: :func:`_data`'s varied images, and the reference's validation accuracy
    must take at least 4 values along the curve (a flat curve would test little)."""
    from tests.keras_oracle import keras_load_model, keras_predict  # first: it selects Keras' JAX backend

    path = build(path)
    graph, params = read_keras_graph(path)
    files, sets = _data(graph, params, tmp_path, rng, n=60, divisor=1, varied=varied)
    for layer in layers:
        out = tmp_path / layer
        proc = run_cli("prune", "--model", path, "--input_scale", "raw", "--layer", layer, "--drop", "0.10",
                       "--out_dir", out, *[a for role, p in files.items() for a in (f"--{role}", p)])
        assert proc.returncode == 0, proc.stderr
        curve = json.loads((out / "curve.json").read_text())
        order, rates = _reference_curve(graph, params, layer, sets, divisor=1)
        assert not varied or len(set(np.round(rates["valid_acc"], 6))) >= 4, (layer, rates["valid_acc"])
        np.testing.assert_array_equal(curve["order"], order)
        for key, want in rates.items():
            np.testing.assert_allclose(curve[key], want, rtol=0, atol=1e-5, err_msg=f"{layer} {key}")
        (selected,) = curve["selected"]
        kmodel = keras_load_model(out / "drop_10" / "b_prime.h5")
        x, y = sets["clean_test"]
        acc = 100.0 * float((keras_predict(kmodel, x.astype(np.float32)).argmax(-1) == y).mean())
        assert acc == pytest.approx(rates["test_acc"][selected["channels_pruned"]], abs=1e-5)
        assert acc == pytest.approx(selected["test_acc"], abs=1e-5)


def test_prune_on_a_squeeze_and_excitation_cnn_gives_the_float64_pruned_network_at_every_k(tmp_path, rng):
    """The defense on a Keras 3 file of the layers above, each of its layers prunable ahead of a nonlinear head
    (se_excite: the gate reads the features again) or an affine one (c2): every number of the curve the float64
    reference's at every k, and B' as Keras loads it predicting what the curve says at the cut."""
    _prune_a_keras_file_as_the_reference_does(_se_model, tmp_path / "se.keras", ("se_excite", "c2"), tmp_path, rng)


def _hourglass_model(path):
    """A Keras 3 CNN, seeded and saved, pixels 0..255 in, whose pruned layer ``p`` reaches the logits through the
    linear layers UpSampling2D, Cropping2D, Average and Subtract into a convolution, and whose head then merges
    with Maximum and Minimum."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.utils.set_random_seed(5)
    inp = keras.Input((12, 12, 3))
    p = layers.Conv2D(8, 3, activation="relu", name="p")(layers.Rescaling(1 / 255, name="scale")(inp))
    u = layers.UpSampling2D((2, 3), name="up")(p)
    c = layers.Cropping2D(((1, 1), (2, 0)), name="crop_a")(u)
    a = layers.Average(name="avg")([c, layers.Cropping2D(((0, 2), (1, 1)), name="crop_b")(u)])
    q = layers.Conv2D(6, 3, strides=2, activation="relu", name="q")(layers.Subtract(name="sub")([a, c]))
    m = layers.Maximum(name="max")([q, layers.Conv2D(6, 1, name="side")(q)])
    n = layers.Minimum(name="min")([m, q])
    out = layers.Dense(5, name="logits")(layers.GlobalAveragePooling2D(name="gap")(n))
    model = keras.Model(inp, out, name="hourglass")
    model.save(path)
    return path


def test_prune_on_an_up_sampling_cnn_with_merges_gives_the_float64_pruned_network_at_every_k(tmp_path, rng):
    """The defense on a Keras 3 file with UpSampling2D, Cropping2D, Average, Subtract, Maximum and Minimum, pruned
    ahead of them (``p``: its channels reach the pre-activations of ``q`` through all four linear layers) and after
    (``min``): every number of the curve the float64 reference's at every k, and B' as Keras loads it predicting
    what the curve says at the cut."""
    _prune_a_keras_file_as_the_reference_does(_hourglass_model, tmp_path / "hourglass.keras", ("p", "min"), tmp_path,
                                              rng)


def _mobilenet_head_model(path):
    """A Keras 3 CNN, seeded and saved, pixels 0..255 in, with keras.applications' MobileNet head: a global
    pooling with keepdims, a 1 x 1 convolution and hard_swish on the 1 x 1 map (MobileNetV3's), a Dropout, and
    logits from a 1 x 1 convolution reshaped to a vector (MobileNet's)."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.utils.set_random_seed(7)
    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, activation="relu", name="c1")(layers.Rescaling(1 / 255, name="scale")(inp))
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = layers.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)
    x = layers.Conv2D(12, 1, activation="hard_swish", name="head_conv")(x)
    x = layers.Conv2D(5, 1, name="logits")(layers.Dropout(0.2, name="drop")(x))
    out = layers.Activation("softmax", name="probs")(layers.Reshape((5,), name="flat_logits")(x))
    keras.Model(inp, out, name="mobile_head").save(path)
    return path


def test_prune_on_a_cnn_whose_logits_are_a_1x1_convolution_gives_the_float64_pruned_network_at_every_k(tmp_path,
                                                                                                      rng):
    """The defense on a Keras 3 file whose logits are a 1 x 1 convolution on the pooled 1 x 1 map, reshaped
    (keras.applications' MobileNets), pruned at the map before the pooling (``pw``) and at the 1 x 1 map of the
    head (``head_conv``): every number of the curve the float64 reference's at every k, and B' as Keras loads it
    predicting what the curve says at the cut."""
    _prune_a_keras_file_as_the_reference_does(_mobilenet_head_model, tmp_path / "mobile.keras", ("pw", "head_conv"),
                                              tmp_path, rng, varied=True)


def test_the_lab_b_pruned_at_pool_2_from_the_command_line(tmp_path):
    """README's ``--model bd_weights.h5 --layer pool_2``: the lab's B (raw pixels) on the real faces, its 40 pool_2
    channels ranked and pruned, every rate at every k the float64 DeepID graph's with pool_2 masked."""
    files = {role: asset(path) for role, path in LAB_FILES.items()}
    args = ["--model", asset(LAB_B), "--layer", "pool_2", "--drop", "0.04", "--nocheckpoints", "--out_dir",
            tmp_path / "out", *[a for role, p in files.items() for a in (f"--{role}", p)]]
    proc = run_cli("prune", *args)
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert curve["model"]["layer"] == "pool_2" and curve["model"]["channels"] == 40
    assert curve["input_scale"] == "raw" and "pruning pool_2 (40 channels)" in proc.stderr
    _, params = load_keras(asset(LAB_B))
    sets = {role: load_lab_h5(p) for role, p in files.items()}
    order, rates = _reference_curve(deepid_graph(), params, "pool_2", sets, divisor=1)
    np.testing.assert_array_equal(curve["order"], order)
    for key, want in rates.items():
        np.testing.assert_allclose(curve[key], want, rtol=0, atol=1e-5, err_msg=key)


def test_the_report_names_what_the_data_free_rankings_read_of_another_cnn(tmp_path, rng):
    # resnet_tiny's stem is conv -> batch norm -> relu: pruning stem_relu, clp and l1 read stem_conv's kernel
    # scaled by stem_bn (the scores themselves are checked by hand in tests/sweep/test_rankings.py).
    graph, params = read_keras_graph(asset(FILES["resnet_tiny"]))
    assert [graph.by_name[n].op for n in ("stem_conv", "stem_bn", "stem_relu")] == ["conv", "batch_norm", "relu"]
    files, _ = _data(graph, params, tmp_path, rng, n=8)
    proc = run_cli("prune", "--model", asset(FILES["resnet_tiny"]), "--input_scale", "255", "--layer", "stem_relu",
                   "--rank_by", "clp,activation,l1", "--nocheckpoints", "--out_dir", tmp_path / "out",
                   *[a for role, p in files.items() for a in (f"--{role}", p)])
    assert proc.returncode == 0, proc.stderr
    reads = "(of stem_conv's kernel times |gamma / sigma| of stem_bn)"
    assert f"clp {reads}, activation, l1 {reads}; the first one's" in (tmp_path / "out" / "report.md").read_text()


def test_a_layer_that_cannot_be_pruned_is_refused_naming_the_flag(tmp_path, rng):
    graph, params = read_keras_graph(asset(FILES["resnet_tiny"]))
    files, _ = _data(graph, params, tmp_path, rng, n=8)
    proc = run_cli("prune", "--model", asset(FILES["resnet_tiny"]), "--input_scale", "255", "--layer", "b0_bn2",
                   "--nocheckpoints", "--out_dir", tmp_path / "out",
                   *[a for role, p in files.items() for a in (f"--{role}", p)])
    assert proc.returncode == 2
    assert "--layer b0_bn2: not every path to the logits passes through it ('b0_add' reads 'stem_relu')" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_data_of_another_size_than_the_model_takes_is_refused_naming_the_file(tmp_path, rng):
    save_lab_h5(tmp_path / "faces.h5", rng.integers(0, 256, (4, 55, 47, 3)), np.zeros(4))
    proc = run_cli("prune", "--model", asset(FILES["vgg_tiny"]), "--input_scale", "255", "--nocheckpoints",
                   "--clean_valid", tmp_path / "faces.h5", "--clean_test", tmp_path / "faces.h5",
                   "--out_dir", tmp_path / "out")
    assert proc.returncode == 2
    assert "faces.h5: dataset 'data' has shape (4, 3, 55, 47), expected (N, 3, 28, 28): the model takes 28x28" \
           in proc.stderr


def test_deepid_as_a_graph_sweeps_as_the_lab_deepid(lab_b, lab_faces):
    """The lab's B read as a generic layer graph and pruned at pool_3 gives DeepID's own curve: the generic
    affine split (fc_1 and conv_4 as the frontier) against the hand-written one."""
    module, params = lab_b
    graph_model = GraphCNN.build(deepid_graph(module.num_classes), params, input_scale="raw")
    assert graph_model.layer == "pool_3" and graph_model.split.frontier == ("conv_4/pre", "fc_1")
    sets = {name: x for name, (x, _) in lab_faces.items()}
    sets = {"clean_valid": sets.pop("valid_subset"), **sets}
    want = sw.rank_and_sweep(DeepID(module.num_classes), params, sets)
    got = sw.rank_and_sweep(graph_model, params, sets)
    np.testing.assert_array_equal(got.orders, want.orders)
    for name in sets:
        np.testing.assert_array_equal(got.preds[name], want.preds[name])


def test_the_gapnet_example_runs_with_one_command_and_refuses_files(tmp_path):
    proc = run_cli("prune", "--example", "gapnet", "--drop", "0.10", "--out_dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert curve["model"]["name"] == "gap_demo" and curve["model"]["layer"] == "relu_3"
    assert curve["selected"][0]["test_asr"] < curve["test_asr"][0] - 50  # the defense finds the backdoor
    assert (tmp_path / "out" / "drop_10" / "b_prime.h5").is_file()
    proc = run_cli("prune", "--example", "gapnet", "--model", "m.h5", "--out_dir", tmp_path / "o2", cwd=tmp_path)
    assert proc.returncode == 2 and "--example gapnet runs an embedded example and reads no files; leave out " \
                                   "--model" in proc.stderr


def test_fine_pruning_any_cnn_writes_a_b_prime_that_scores_what_the_curve_says(tmp_path, rng):
    graph, params = read_keras_graph(asset(FILES["vgg_tiny"]))
    files, sets = _data(graph, params, tmp_path, rng, n=80)
    proc = run_cli("prune", "--model", asset(FILES["vgg_tiny"]), "--input_scale", "255", "--drop", "0.10",
                   "--finetune_epochs", "2", "--finetune_lr", "1e-3", "--out_dir", tmp_path / "out",
                   *[a for role, p in files.items() for a in (f"--{role}", p)])
    assert proc.returncode == 0, proc.stderr
    cut = json.loads((tmp_path / "out" / "curve.json").read_text())["selected"][0]
    ft = cut["finetuned"]
    # The fine-tuned B' as written (a Keras file of the pruned network), read back and run on the test sets.
    from badnet_jax.io.model_file import load_model
    from badnet_jax.models.predict import predict_settled

    b_prime, ft_params = load_model(tmp_path / "out" / "drop_10" / "b_prime_finetuned.h5")
    assert b_prime.input_scale == "255"
    for role, key in (("clean_test", "test_acc"), ("bd_test", "test_asr")):
        x, y = sets[role]
        preds, _ = predict_settled(b_prime, ft_params, x)
        assert 100.0 * float((preds == y).mean()) == pytest.approx(ft[key], abs=1e-4), role


def test_fine_pruned_predictions_settle_within_the_bound_measured_on_the_fine_pruned_weights(tmp_path, rng,
                                                                                              monkeypatch):
    """A fine-pruned B' errs in float32 as its own weights do: its near-ties are settled within the bound measured
    on those weights (here made to differ per weights), not B's bound nor the floor."""
    import jax

    from badnet_jax.defense import pipeline
    from badnet_jax.defense.finetune import FinetuneConfig
    from badnet_jax.numerics import tie_bound
    from badnet_jax.numerics.ties import U

    def error_of(params):  # a stand-in measurement that tells weights apart: 100 to 200 roundings
        return 100.0 + float(sum(np.abs(np.asarray(a, np.float64)).sum() for a in jax.tree.leaves(params))) % 100

    monkeypatch.setattr(tie_bound, "measured_gap_error", lambda model, params, x, seed=0: error_of(params))
    seen = []
    real = pipeline.predict_settled
    monkeypatch.setattr(pipeline, "predict_settled", lambda m, p, x, mask: seen.append((m, p)) or real(m, p, x, mask))
    graph, params = read_keras_graph(asset(FILES["vgg_tiny"]))
    files, _ = _data(graph, params, tmp_path, rng, n=40)
    pipeline.run_defense(pipeline.DefenseConfig(
        drops=(0.10,), model=asset(FILES["vgg_tiny"]), input_scale="255", out_dir=str(tmp_path / "o"),
        checkpoints=False, finetune=FinetuneConfig(epochs=1), **{role: str(p) for role, p in files.items()}))
    assert seen and all(m.tie_rtol_measured and m.tie_rtol == pytest.approx(10 * error_of(p) * U) for m, p in seen)
    assert all(m.tie_rtol != pytest.approx(10 * error_of(params) * U) for m, _ in seen)
