"""badnet_jax.numerics.tie_bound: the near-tie bound of a model other than DeepID, measured on it; and the
certified curve on those models: images bisected onto a decision boundary are predicted as float64 predicts."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from badnet_jax import sweep as sw
from badnet_jax.io.model_file import load_model
from badnet_jax.models.deepid import DeepID
from badnet_jax.numerics import tie_bound
from badnet_jax.numerics.ties import TIE_RTOL, U
from tests import numpy_ref
from tests.conftest import asset

FILES = {"resnet_tiny": "models/other/resnet_tiny.h5", "vgg_tiny": "models/other/vgg_tiny.h5"}


def _images(name):
    return np.load(asset(FILES[name].replace(".h5", "_reference.npz")))["images"]


@pytest.mark.parametrize("name", FILES)
def test_the_measured_gap_error_is_a_few_roundings_and_sets_the_bound(name, monkeypatch):
    model, params = load_model(asset(FILES[name]), input_scale="255")
    measured = tie_bound.measured_gap_error(model, params, _images(name))
    assert 0 < measured < TIE_RTOL / U / 10  # within the floor's margin on these models
    got = tie_bound.with_measured_tie_rtol(model, params, _images(name))
    assert got.tie_rtol_measured and got.tie_rtol == TIE_RTOL
    # A model whose float32 errs more (another architecture, another CPU) gets a wider bound: 10x its error.
    monkeypatch.setattr(tie_bound, "measured_gap_error", lambda *args: 1000.0)
    assert tie_bound.with_measured_tie_rtol(model, params, _images(name)).tie_rtol == pytest.approx(10 * 1000 * U)


def test_the_bound_compiled_ahead_serves_either_input_scale_without_compiling(backend_compiles):
    """compile_tie_bound compiles, from the ranking set's shape and dtype alone, every program the measurement
    runs: measured afterwards at the other input scale, nothing compiles, and the gap error is the one measured
    without compiling ahead."""
    model, params = load_model(asset(FILES["resnet_tiny"]), input_scale="raw")
    x = _images("resnet_tiny")
    tie_bound._logits32.cache_clear()
    tie_bound._heads64.cache_clear()
    tie_bound.compile_tie_bound(model, params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    ahead = list(backend_compiles)
    assert ahead
    scaled = model.with_input_scale("255")
    measured = tie_bound.measured_gap_error(scaled, params, x)
    assert tie_bound.with_measured_tie_rtol(scaled, params, x).tie_rtol_measured
    assert backend_compiles == ahead, backend_compiles[len(ahead):]
    tie_bound._logits32.cache_clear()
    tie_bound._heads64.cache_clear()
    assert tie_bound.measured_gap_error(scaled, params, x) == measured
    assert len(backend_compiles) > len(ahead)  # the premise: a fresh measurement compiles
    # A model that keeps its bound (the lab's DeepID) compiles nothing ahead, nor do weights given as shapes only.
    before = list(backend_compiles)
    tie_bound.compile_tie_bound(DeepID(), None, jax.ShapeDtypeStruct((4, 55, 47, 3), np.uint8))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.float32), params)
    tie_bound.compile_tie_bound(model, shapes, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert backend_compiles == before


@pytest.mark.parametrize("name,layer", [("vgg_tiny", "c3"), ("resnet_tiny", None)])
def test_the_bound_measures_the_prefix_sweeps_own_sums(name, layer, monkeypatch):
    """The prefix sweep sums the channels' contributions by the reverse scan of ``models.affine.reverse_steps``
    (``sweep.strategies``): the measurement runs those very sums, so an error in them shows in the bound (an
    error injected into each step's suffix sums: 1e-3 of their size, ~10^4 u S, where rounding gives a few)."""
    from badnet_jax.models import affine

    model, params = load_model(asset(FILES[name]), input_scale="255", **({"layer": layer} if layer else {}))
    x = _images(name)
    clean = tie_bound.measured_gap_error(model, params, x)

    def skewed(model, params, feats, order, step_fn, **kwargs):
        skew = lambda k, pre: step_fn(k, jax.tree.map(lambda a: a * np.float32(1 + 1e-3), pre))  # noqa: E731
        return affine.reverse_steps(model, params, feats, order, skew, **kwargs)

    monkeypatch.setattr(tie_bound, "reverse_steps", skewed)
    tie_bound._logits32.cache_clear()
    try:
        assert clean < TIE_RTOL / U / 10 < 1000 < tie_bound.measured_gap_error(model, params, x)
    finally:
        tie_bound._logits32.cache_clear()


def test_deepid_keeps_its_derived_bound(lab_b, lab_faces):
    _, params = lab_b
    x = lab_faces["valid_subset"][0]
    assert tie_bound.with_measured_tie_rtol(DeepID(), params, x) == DeepID()
    # The measurement agrees with the constant's documented margin (gap errors 1.3-1.8 u S, 10x under TIE_RTOL).
    assert tie_bound.measured_gap_error(DeepID(), params, x) < TIE_RTOL / U / 10


def _boundary_images(graph, params, layer, order, k, a, b, steps=60):
    """Images on the float64 decision boundary of the network pruned at step k: bisect between a and b."""
    mask = np.ones(len(order))
    mask[order[:k]] = 0
    target = graph.logits_node()

    def pred(x):
        return numpy_ref.graph_values64(graph, params, x[None] / 255, upto=target, masks={layer: mask})[target][0].argmax()

    lo, hi = 0.0, 1.0
    p_lo = pred(a)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if pred((1 - mid) * a + mid * b) == p_lo:
            lo = mid
        else:
            hi = mid
    return np.stack([(1 - lo) * a + lo * b, (1 - hi) * a + hi * b]).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_images_on_a_decision_boundary_get_the_float64_prediction_at_every_step(name, rng):
    model, params = load_model(asset(FILES[name]), input_scale="255")
    graph = model.graph
    refs = _images(name).astype(np.float64)
    pool = np.concatenate([refs, 255 - refs, rng.integers(0, 256, (32, *model.input_hwc)).astype(np.float64)])
    # The files' networks are untrained and answer almost every image alike: a random output layer centred on
    # the pool's mean hidden layer makes images disagree, so that boundaries between them exist (the
    # architecture is what is under test).
    logits_node = graph.by_name[graph.logits_node()]
    out, hidden = logits_node.weights, logits_node.inputs[0]
    w = rng.normal(0, 1, params[out]["kernel"].shape)
    h = numpy_ref.graph_values64(graph, params, pool / 255, upto=hidden)[hidden]
    params = {**params, out: {"kernel": w.astype(np.float32), "bias": (-h.mean(0) @ w).astype(np.float32)}}
    order = np.arange(model.num_channels)[::-1].copy()
    target = graph.logits_node()
    boundary = []
    for k in (0, model.num_channels // 2, model.num_channels - 1):  # steps where two images of the pool disagree
        mask = np.ones(model.num_channels)
        mask[order[:k]] = 0
        pred = numpy_ref.graph_values64(graph, params, pool / 255, upto=target, masks={model.layer: mask})[target]
        pred = pred.argmax(-1)
        pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool)) if pred[i] != pred[j]]
        if pairs:
            i, j = pairs[0]
            boundary.append(_boundary_images(graph, params, model.layer, order, k, pool[i], pool[j]))
    assert boundary, "no two images of the pool are told apart at any step checked"
    boundary = np.concatenate(boundary)
    result = sw.rank_and_sweep(model, params, {"x": boundary}, order=order, rank_on=None)
    want = []
    for k in range(model.num_channels + 1):
        mask = np.ones(model.num_channels)
        mask[order[:k]] = 0
        want.append(numpy_ref.graph_values64(graph, params, boundary.astype(np.float64) / 255, upto=target,
                                             masks={model.layer: mask})[target].argmax(-1))
    np.testing.assert_array_equal(result.preds["x"], np.stack(want))
    assert result.settled["x"] > 0  # float32 could not decide them: they went to float64


def test_a_bound_far_beyond_rounding_is_measured_and_warned_about(rng, caplog):
    """A Flax module that computes another thing in float32 than in float64 (here: scaled by 1.001 in float32
    alone) passes the build's checks, but its measured bound is far beyond rounding: a warning names the model,
    and the sweep stays exact (every prediction within the bound is settled by the float64 network)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from badnet_jax.models.flax_model import FlaxCNN

    class Net(nn.Module):
        drift: float = 1.001

        @nn.compact
        def features(self, x):
            x = x * (self.drift if x.dtype == jnp.float32 else 1.0)
            return nn.relu(nn.Conv(6, (3, 3), strides=2, name="conv")(x))

        @nn.compact
        def hidden(self, feats):
            return nn.relu(nn.Dense(12, name="fc")(feats.reshape(feats.shape[0], -1)))

        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="output")(self.hidden(self.features(x)))

    x = rng.integers(0, 256, (24, 10, 10, 3)).astype(np.uint8)
    for drift, warned in ((1.0, False), (1.001, True)):
        params = Net(drift).init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 10, 3)))["params"]
        model = FlaxCNN.build(Net(drift), params, input_hwc=(10, 10, 3), input_scale="255", layer="conv")
        caplog.clear()
        measured = tie_bound.with_measured_tie_rtol(model, params, x)
        messages = [r.getMessage() for r in caplog.records if r.name == tie_bound.__name__]
        assert (measured.tie_rtol > tie_bound.IMPLAUSIBLE_RTOL) == warned
        assert bool(messages) == warned
        if warned:
            assert "The near-tie bound measured on Net is" in messages[0] and "far beyond rounding" in messages[0]
            sweep = sw.rank_and_sweep(model, params, {"clean_valid": x})
            with jax.enable_x64(True):
                p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
                for k in (0, 3):
                    mask = np.asarray(sweep.masks[k], np.float64)
                    feats = Net(drift).apply({"params": p64}, jnp.asarray(x, jnp.float64) / 255, method="features")
                    hidden = np.asarray(Net(drift).apply({"params": p64}, feats * mask[None, None, None, :],
                                                         method="hidden"))
                    logits = hidden @ p64["output"]["kernel"] + p64["output"]["bias"]
                    np.testing.assert_array_equal(sweep.preds["clean_valid"][k], np.asarray(logits).argmax(-1))
