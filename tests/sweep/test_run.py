"""badnet_jax.sweep.run: the one-call sweep against a plain sequential loop (zero the conv_3 channel, full forward,
count), compiled once per shape, ahead of the data if asked, and for both input scales.

Each shortcut strategy against the plain sweep: test_strategies.py; the sweep sharded over devices: test_sharded.py;
lowered for an accelerator: test_export.py.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

from badnet_jax import BadNet, ConfigError, DataFileError, init_params
from badnet_jax import sweep as sw
from badnet_jax.models.deepid import DeepID
from tests import numpy_ref
from tests.sweep.conftest import sequential_predictions, two_sets


def test_sweep_equals_sequential_loop_on_real_b_and_faces(lab_b, lab_faces):
    model, params = lab_b
    (x, _), (xb, _) = lab_faces["valid_subset"], lab_faces["bd_valid_subset"]
    result = two_sets(model, params, x, xb, 16, sw.PLAIN)  # 47 and 53 images: clamped last chunks
    assert result.preds["clean_valid"].shape == (61, len(x)) and result.preds["bd_valid"].shape == (61, len(xb))
    np.testing.assert_array_equal(result.preds["clean_valid"], sequential_predictions(model, params, x, result.masks))
    np.testing.assert_array_equal(result.preds["bd_valid"], sequential_predictions(model, params, xb, result.masks))
    # The ranking: float64 means of the independent NumPy trunk, ascending, ties (exact zeros) by index.
    ref_mean = numpy_ref.pool3(params, x).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(result.mean_activation, ref_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.order, np.argsort(ref_mean, kind="stable"))
    dead = np.flatnonzero(ref_mean == 0)
    assert len(dead) > 20 and list(result.order[:len(dead)]) == sorted(dead)
    # Every k's mask prunes exactly order[:k].
    for k in (0, 1, 30, 60):
        assert set(np.flatnonzero(result.masks[k] == 0)) == set(result.order[:k])


def test_sweep_equals_sequential_loop_on_random_model_with_other_class_count(rng):
    params = init_params(num_classes=37, seed=11)
    model = BadNet(37)
    x = rng.integers(0, 256, size=(21, 55, 47, 3)).astype(np.float32)
    xb = rng.integers(0, 256, size=(9, 55, 47, 3)).astype(np.float32)
    result = two_sets(model, params, x, xb, 8, sw.PLAIN)
    np.testing.assert_array_equal(result.preds["clean_valid"], sequential_predictions(model, params, x, result.masks))
    np.testing.assert_array_equal(result.preds["bd_valid"], sequential_predictions(model, params, xb, result.masks))
    assert result.seconds["tie_bound"] == 0 and result.seconds["device"] > 0  # DeepID's bound is derived
    test_preds = sw.predict_steps(model, params, xb, result.order, dataclasses.replace(sw.PLAIN, chunk=4))
    np.testing.assert_array_equal(test_preds, sequential_predictions(model, params, xb, result.masks))


def test_second_sweep_of_same_shapes_does_not_recompile(rng):
    params = init_params(num_classes=5, seed=2)
    model = BadNet(5)
    make = lambda n: rng.integers(0, 256, size=(n, 55, 47, 3)).astype(np.float32)
    jitted = sw.program.rank_and_sweep_call
    two_sets(model, params, make(10), make(6), 4)
    size = jitted._cache_size()
    other = init_params(num_classes=5, seed=3)  # new values, same shapes
    two_sets(model, other, make(10), make(6), 4)
    assert jitted._cache_size() == size
    two_sets(model, other, make(11), make(6), 4)  # a new shape does compile
    assert jitted._cache_size() == size + 1


def test_compile_ahead_then_the_sweep_runs_without_compiling(rng, backend_compiles):
    params = init_params(num_classes=7, seed=4)
    model = BadNet(7)
    x = rng.integers(0, 256, size=(13, 55, 47, 3)).astype(np.uint8)
    xb = rng.integers(0, 256, size=(5, 55, 47, 3)).astype(np.uint8)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    options = sw.SweepOptions(impl="reference", chunk=3)
    sw.compile_sweep(model, params, {"clean_valid": spec(x), "bd_valid": spec(xb), "again": spec(x)}, options)
    assert [f for f in backend_compiles if "rank_and_sweep_call" in f] == ["jit(rank_and_sweep_call)"]
    got = sw.rank_and_sweep(model, params, {"clean_valid": x, "bd_valid": xb, "again": x}, options)
    # No second compile:
    assert [f for f in backend_compiles if "rank_and_sweep_call" in f] == ["jit(rank_and_sweep_call)"]
    plain = two_sets(model, params, x, xb, 3, sw.PLAIN, again=x)
    np.testing.assert_array_equal(got.preds["clean_valid"], plain.preds["clean_valid"])
    np.testing.assert_array_equal(got.preds["again"], plain.preds["clean_valid"])



def test_one_program_serves_every_near_tie_bound(rng, backend_compiles):
    """The near-tie bound goes in traced, as the input scale does. A CNN other than DeepID, compiled ahead with
    the bound it has before measuring, then swept with the bound measured on its images (as the defense does it,
    while the sweep compiles), compiles nothing more: neither the sweep nor the float64 functions that settle
    it, the ranking's channel means among them. And the bound still decides: at 4 every prediction is flagged
    and settled in float64, with the same program. Predictions and means against the NumPy float64 network."""
    from badnet_jax.io.model_file import load_model
    from badnet_jax.io.keras_graph import read_keras_graph
    from badnet_jax.numerics.tie_bound import with_measured_tie_rtol
    from tests.conftest import asset

    path = asset("models/other/vgg_tiny.h5")
    model, params = load_model(path, input_scale="255")
    graph, graph_params = read_keras_graph(path)
    # on the device already: moving a NumPy array there compiles a small program of its own
    sets = {"clean_valid": jax.device_put(rng.integers(0, 256, size=(24, 28, 28, 3)).astype(np.uint8)),
            "bd_valid": jax.device_put(rng.integers(0, 256, size=(10, 28, 28, 3)).astype(np.uint8))}
    options = sw.SweepOptions(chunk=7)  # a chunk no other test uses: compiled here
    sw.compile_sweep(model, params, {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in sets.items()}, options)
    assert [f for f in backend_compiles if "rank_and_sweep_call" in f] == ["jit(rank_and_sweep_call)"]
    measured = with_measured_tie_rtol(model, params, np.asarray(sets["clean_valid"]))
    assert measured.tie_rtol_measured
    ahead = list(backend_compiles)
    got = sw.rank_and_sweep(measured, params, sets, options)
    means = measured.feature_means64(params, np.asarray(sets["clean_valid"]), measured.divisor)
    assert backend_compiles == ahead
    wide = sw.rank_and_sweep(dataclasses.replace(measured, tie_rtol=4.0), params, sets, options)
    assert backend_compiles == ahead
    for result in (got, wide):
        for name, x in sets.items():
            logits = [numpy_ref.graph_values64(graph, graph_params, np.asarray(x) / 255.0, upto=graph.logits_node(),
                                               masks={model.layer: np.asarray(m, np.float64)})[graph.logits_node()]
                      for m in result.masks]
            np.testing.assert_array_equal(result.preds[name], np.argmax(logits, axis=-1))
    assert sum(wide.settled.values()) == sum(p.size for p in wide.preds.values()) > 10 * sum(got.settled.values())
    feats = numpy_ref.graph_values64(graph, graph_params, np.asarray(sets["clean_valid"]) / 255.0,
                                     upto=model.layer)[model.layer]
    np.testing.assert_allclose(means, feats.mean(axis=(0, 1, 2)), rtol=1e-12)


def test_compile_ahead_covers_the_float64_settling(rng, backend_compiles):
    """compile_sweep also compiles the float64 trunk that settles near-ties (run on zeros at each call size):
    the sweep after it, settling included (the ranking's float64 check always runs the trunk), compiles
    nothing. A class count no other test uses, so nothing was compiled before."""
    params, model = init_params(num_classes=13, seed=5), BadNet(13)
    # on the device already: moving a NumPy array there compiles a small program of its own
    x = jax.device_put(rng.integers(0, 256, size=(20, 55, 47, 3)).astype(np.uint8))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    sw.compile_sweep(model, params, {"clean_valid": spec}, sw.SweepOptions(chunk=8))
    assert any("lambda" in f for f in backend_compiles[backend_compiles.index("jit(rank_and_sweep_call)"):]), backend_compiles
    ahead = list(backend_compiles)
    sw.rank_and_sweep(model, params, {"clean_valid": x}, sw.SweepOptions(chunk=8))
    assert backend_compiles == ahead


def test_compile_ahead_covers_any_cnns_float64_head(rng, backend_compiles):
    """For a graph model (the GAP-head example) the float64 head that settles a flagged prediction is XLA's too:
    compile_sweep compiles it, so the settling of rows after it, at every call size, compiles nothing."""
    from badnet_jax.defense.inputs import EXAMPLES
    from badnet_jax.io.model_file import load_model
    from badnet_jax.numerics import xla64

    model, params = load_model(EXAMPLES["gapnet"][0], "255")
    x = rng.integers(0, 256, size=(70, *model.input_hwc)).astype(np.uint8)
    sw.compile_sweep(model, params, {"clean_valid": jax.ShapeDtypeStruct(x.shape, x.dtype)}, sw.SweepOptions(chunk=8))
    ahead = list(backend_compiles)
    masks = (rng.random((len(x), model.num_channels)) < 0.7).astype(np.float64)
    for n in sorted({1, *xla64.sizes_on("cpu"), len(x)}):
        preds = model.argmax64(params, x[:n], model.divisor, masks[:n])
        assert preds.shape == (n,)
    assert backend_compiles == ahead


def test_compile_ahead_with_weights_as_shapes_only(rng):
    """Weights given as shapes compile the sweep (nothing to run the float64 trunk with)."""
    params = init_params(num_classes=7, seed=4)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    spec = jax.ShapeDtypeStruct((9, 55, 47, 3), np.uint8)
    sw.compile_sweep(BadNet(7), shapes, {"clean_valid": spec}, sw.SweepOptions(chunk=3))


def test_a_users_own_order_is_swept_and_must_be_a_permutation(lab_b, lab_faces):
    model, params = lab_b
    x, _ = lab_faces["valid_subset"]
    order = np.random.default_rng(3).permutation(60)
    result = sw.rank_and_sweep(model, params, {"clean_valid": x}, sw.SweepOptions(chunk=16), order=order)
    np.testing.assert_array_equal(result.order, order)
    np.testing.assert_array_equal(result.preds["clean_valid"], sequential_predictions(model, params, x, result.masks))
    assert result.mean_activation is not None  # still measured on the ranking set
    with pytest.raises(ConfigError, match="permutation"):
        sw.rank_and_sweep(model, params, {"clean_valid": x}, order=np.zeros(60, int))


def test_one_compiled_sweep_serves_both_input_scales(lab_b, lab_faces):
    """The input scale is a traced divisor: the /255 model reuses the raw model's program, bit for bit right."""
    from badnet_jax.model import predict

    model, params = lab_b
    raw, scaled = model.clone(input_scale="raw"), model.clone(input_scale="255")
    x, _ = lab_faces["valid_subset"]
    xb, _ = lab_faces["bd_test_subset"]
    jitted = sw.program.rank_and_sweep_call
    a = two_sets(raw, params, x, xb, 19, sw.PLAIN)  # a chunk no other test uses: compiled here
    size = jitted._cache_size()
    b = two_sets(scaled, params, x, xb, 19, sw.PLAIN)
    assert jitted._cache_size() == size  # no second compile for the other scale
    for result, m in ((a, raw), (b, scaled)):
        for k in (0, 30, 50):
            np.testing.assert_array_equal(result.preds["clean_valid"][k], predict(m, params, x, result.masks[k]))
    assert not np.array_equal(a.preds["clean_valid"][0], b.preds["clean_valid"][0])  # the scale does matter


# Library misuse: refused on the host before anything is traced, with the argument named and what was expected.

def _faces(rng, n, dtype=np.uint8):
    return rng.integers(0, 256, size=(n, 55, 47, 3)).astype(dtype)


@pytest.fixture(scope="module")
def small_b():
    return BadNet(7), init_params(num_classes=7, seed=5)


def test_an_empty_ranking_set_is_refused_by_name(small_b, rng):
    model, params = small_b
    with pytest.raises(DataFileError, match=r"sets\['clean_valid'\]: no images \(shape \(0, 55, 47, 3\)\); at least "
                                            r"one is needed") as err:
        sw.rank_and_sweep(model, params, {"clean_valid": _faces(rng, 0), "bd_valid": _faces(rng, 3)})
    assert err.value.field == "clean_valid"
    with pytest.raises(ConfigError, match=r"sets: expected image sets by name"):
        sw.rank_and_sweep(model, params, {})
    # An empty set that is only evaluated is a valid (empty) curve.
    got = sw.rank_and_sweep(model, params, {"clean_valid": _faces(rng, 4), "bd_valid": _faces(rng, 0)},
                            sw.SweepOptions(chunk=4))
    assert got.preds["bd_valid"].shape == (61, 0)


def test_any_name_can_be_the_ranking_set_the_empty_one_too(small_b, rng):
    """rank_on is a set's name, whatever it is: one named "" ranks as under any other name (it was taken for
    "no ranking set" and crashed), and its predictions are the lab's loop's."""
    model, params = small_b
    a, b = _faces(rng, 20), _faces(rng, 9)
    named = sw.rank_and_sweep(model, params, {"v": a, "b": b}, sw.SweepOptions(chunk=8), rank_on="v")
    empty = sw.rank_and_sweep(model, params, {"": a, "b": b}, sw.SweepOptions(chunk=8), rank_on="")
    np.testing.assert_array_equal(np.asarray(empty.order), np.asarray(named.order))
    np.testing.assert_array_equal(empty.preds[""], sequential_predictions(model, params, a, empty.masks))
    np.testing.assert_array_equal(empty.preds["b"], sequential_predictions(model, params, b, empty.masks))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_pixels_are_refused_naming_the_set_and_image(small_b, rng, bad):
    model, params = small_b
    xb = _faces(rng, 6, np.float32)
    xb[4, 10, 3, 2] = bad
    with pytest.raises(DataFileError, match=r"sets\['bd_valid'\]: image 4 holds NaN or infinite pixels \(1 of 6 images "
                                            r"do\); pixels must be finite numbers 0..255"):
        sw.rank_and_sweep(model, params, {"clean_valid": _faces(rng, 5), "bd_valid": xb})


@pytest.mark.parametrize("shape", [(5, 47, 55, 3), (5, 55, 47), (5, 55, 47, 1), (55, 47, 3)])
def test_images_of_another_shape_are_refused_with_the_expected_shape(small_b, rng, shape):
    model, params = small_b
    shown = re.escape(str(shape))
    with pytest.raises(DataFileError, match=rf"sets\['clean_valid'\]: images of shape {shown}, expected \(N, 55, 47, 3\)"):
        sw.rank_and_sweep(model, params, {"clean_valid": np.zeros(shape, np.uint8)})
    with pytest.raises(DataFileError, match=r"sets\['clean_valid'\]: images of dtype complex64"):
        sw.rank_and_sweep(model, params, {"clean_valid": np.zeros((2, 55, 47, 3), np.complex64)})


def test_params_of_another_model_and_bad_labels_are_refused(small_b, rng):
    model, params = small_b
    x = {"clean_valid": _faces(rng, 4)}
    with pytest.raises(ConfigError, match=r"params: 7 classes, expected the model's 9"):
        sw.rank_and_sweep(BadNet(9), params, x)
    with pytest.raises(ConfigError, match=r"params: no fc_2 or output \(kernel and bias\) among its layers"):
        sw.rank_and_sweep(model, {k: v for k, v in params.items() if k not in ("fc_2", "output")}, x)
    with pytest.raises(ConfigError, match=r"options: expected SweepOptions or a SweepPlan, got dict"):
        sw.rank_and_sweep(model, params, x, {"chunk": 4})
    anp = sw.rankings.resolve_rankings(sw.rankings.RankingOptions(rank_by=("anp",)), params, DeepID())
    with pytest.raises(ConfigError, match=r"rank_labels: label 7 is outside \[0, 7\) for a 7-class model"):
        sw.rank_and_sweep(model, params, x, rankings=anp, rank_labels=np.array([0, 1, 7, 2]))
    with pytest.raises(ConfigError, match=r"rank_labels: shape \(3,\) for 4 ranking images, expected \(4,\)"):
        sw.rank_and_sweep(model, params, x, rankings=anp, rank_labels=np.array([0, 1, 2]))


def test_shapes_only_are_checked_for_compile_and_export(small_b):
    model, params = small_b
    specs = {"clean_valid": jax.ShapeDtypeStruct((0, 55, 47, 3), np.uint8)}
    with pytest.raises(DataFileError, match=r"sets\['clean_valid'\]: no images"):
        sw.compile_sweep(model, params, specs)
    specs = {"clean_valid": jax.ShapeDtypeStruct((4, 55, 46, 3), np.uint8)}
    with pytest.raises(DataFileError, match=r"expected \(N, 55, 47, 3\)"):
        sw.run.export_sweep(model, params, specs, sw.SweepOptions())
