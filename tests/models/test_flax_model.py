"""badnet_jax.models.flax_model: a user's own Flax CNN through the protocol, every sweep strategy against the
same module's float64 forward with the features masked (the README's example)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax import BadNetError, ConfigError
from badnet_jax import sweep as sw
from badnet_jax.goodnet import make_goodnet, predict_goodnet
from badnet_jax.kernels.conv2d import conv2d
from badnet_jax.models.flax_model import FlaxCNN
from badnet_jax.numerics import xla64
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings


class Net(nn.Module):
    """A small CNN split at its second convolution: BatchNorm-free, a GAP head with one hidden layer."""

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        return nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))

    @nn.compact
    def hidden(self, feats):
        return nn.relu(nn.Dense(16, name="fc")(jnp.mean(feats, axis=(1, 2))))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="output")(self.hidden(self.features(x)))


def _model():
    params = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2"), params


def _float64_steps(model, params, x, order):
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        out = []
        for k in range(len(order) + 1):
            mask = np.ones(len(order))
            mask[order[:k]] = 0
            logits = Net().apply({"params": p64}, jnp.asarray(x, jnp.float64) / 255, method=lambda m, x: m.features(x))
            logits = Net().apply({"params": p64}, logits * mask[None, None, None, :], method=lambda m, f: m.hidden(f))
            out.append((np.asarray(logits) @ p64["output"]["kernel"] + p64["output"]["bias"]).argmax(-1))
    return np.stack(out)


@pytest.mark.parametrize("options", [sw.PLAIN, sw.SweepOptions(dedupe=False, group=False), sw.SweepOptions(),
                                     sw.SweepOptions(batch_steps=4)], ids=["plain", "prefix", "dedupe", "batched"])
def test_a_flax_module_sweeps_as_its_float64_masked_forward(options, rng):
    model, params = _model()
    assert (model.feature_hwc, model.num_classes, model.layer) == ((8, 8, 12), 5, "conv2")
    x = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    result = sw.rank_and_sweep(model, params, {"clean_valid": x}, options)
    feats = np.asarray(model.features(params, jnp.asarray(x, jnp.float32)))
    np.testing.assert_array_equal(result.order, np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable"))
    np.testing.assert_array_equal(result.preds["clean_valid"], _float64_steps(model, params, x, result.order))


def test_a_goodnet_of_a_flax_module(rng):
    model, params = _model()
    x = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    mask = np.ones(12, np.float32)
    mask[:6] = 0
    goodnet, variables = make_goodnet(model, params, mask=mask)
    got, _ = predict_goodnet(goodnet, variables, x)
    b = _float64_steps(model, params, x, np.arange(12))[0]
    b_prime = _float64_steps(model, params, x, np.arange(12))[6]
    np.testing.assert_array_equal(got, np.where(b == b_prime, b, 5))
    np.testing.assert_array_equal(np.asarray(goodnet.apply(variables, x)), got)


def test_a_module_without_the_split_is_refused():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="output")(x.reshape(len(x), -1))

    params = Plain().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))["params"]
    with pytest.raises(ConfigError, match="module: Plain has no features\\(\\) method"):
        FlaxCNN.build(Plain(), params, input_hwc=(4, 4, 3), input_scale="raw")


def test_the_module_docstring_example_runs(rng):
    """badnet_jax.models.flax_model "shows a whole one" (the README says so): its example, run as written."""
    import textwrap

    from badnet_jax.models import flax_model

    doc = flax_model.__doc__
    example = textwrap.dedent(doc[doc.index("Example::") + len("Example::"):doc.index("**Batch norm.**")])
    x_valid, x_bd = (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    space = {"nn": nn, "jax": jax, "jnp": jnp, "FlaxCNN": FlaxCNN, "rank_and_sweep": sw.rank_and_sweep,
             "x_valid": x_valid, "x_bd": x_bd}
    exec(compile(example, "flax_model example", "exec"), space)  # noqa: S102 - the library's own docstring
    assert space["sweep"].masks.shape == (33, 32) and space["model"].feature_hwc == (16, 16, 32)


class WideNet(Net):
    """Net with a wider first convolution: the same output layer, other params."""

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(10, (3, 3), name="conv1")(x))
        return nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))


def test_what_a_user_gets_wrong_with_a_module_is_named(rng):
    model, params = _model()
    x = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    # The params of another module with the same output layer: named by the first array that differs, by every
    # entry point (Flax's own error came from inside the sweep, and make_goodnet took them).
    wide_params = WideNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    wide = FlaxCNN.build(WideNet(), wide_params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2")
    from badnet_jax.models.predict import predict_settled
    for name, call in (("params", lambda: sw.rank_and_sweep(wide, params, {"clean_valid": x})),
                       ("params", lambda: predict_settled(wide, params, x, np.ones(12))),
                       ("bad_params", lambda: make_goodnet(wide, params, mask=np.ones(12)))):
        with pytest.raises(ConfigError, match=rf"^{name}: conv1/bias of shape \(8,\), but WideNet was built with "
                                              r"shape \(10,\) \(the params of another module\?\)") as err:
            call()
        assert err.value.field == name
    with pytest.raises(ConfigError, match=r"conv1/kernel missing, but Net was built with shape"):
        model.check_params({**params, "conv1": {"bias": params["conv1"]["bias"]}})
    # The class for an instance; images of another size than the module's weights take.
    with pytest.raises(ConfigError, match=r"module: got the class Net, not a module: give an instance, "
                                          r"FlaxCNN.build\(Net\(\), \.\.\.\)"):
        FlaxCNN.build(Net, params, input_hwc=(16, 16, 3), input_scale="255")
    with pytest.raises(ConfigError, match=r"with images of input_hwc=\(3, 16, 16\).*is input_hwc the \(height, "
                                          r"width, channels\) the module was trained on"):
        FlaxCNN.build(Net(), params, input_hwc=(3, 16, 16), input_scale="255")
    # Images too small for a VALID convolution: an empty feature map, named as such (its hidden layer's mean over
    # nothing was NaN, blamed on mixing the batch's images).
    class Valid(Net):
        @nn.compact
        def features(self, x):
            return nn.relu(nn.Conv(12, (5, 5), padding="VALID", name="conv2")(x))

    valid = Valid().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    with pytest.raises(ConfigError, match=r"layer=features: Valid.features gives shape \(1, 0, 0, 12\), not a "
                                          r"feature map .* of at least one value per image \(is input_hwc the size"):
        FlaxCNN.build(Valid(), valid, input_hwc=(4, 4, 3), input_scale="255")
    # The data-free rankings read a convolution's kernel, which a module's code does not show.
    for ranking in ("clp", "l1"):
        with pytest.raises(ConfigError, match=f"the ranking '{ranking}' reads the kernel.*Net is a Flax module, "
                                              "whose layers badnet-jax cannot see"):
            resolve_rankings(RankingOptions(rank_by=(ranking,)), params, model)
    # One ranking named alone is that ranking, not its letters.
    assert resolve_rankings(RankingOptions(rank_by="random", random_orders=2), params, model).labels == (
        "random/0", "random/1")


class FastNet(Net):
    """The same CNN with its first convolution through badnet_jax.kernels.conv2d (the README's advice)."""

    @nn.compact
    def features(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 3, 8))
        bias = self.param("bias", nn.initializers.zeros_init(), (8,))
        x = nn.relu(conv2d(x, kernel, padding="SAME", bias=bias))
        return nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))


def test_a_flax_module_may_run_its_first_convolution_through_conv2d(rng):
    # Integer weights and pixels: every summation order is exact, so the two modules agree bit for bit
    # (FastNet's conv1 is width-blocked on a CPU, Net's is XLA's).
    _, params = _model()
    params = jax.tree.map(lambda a: jnp.asarray(rng.integers(-3, 4, a.shape), jnp.float32), params)
    fast = {**{k: v for k, v in params.items() if k != "conv1"}, **params["conv1"]}
    x = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.float32)
    slow_model = FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale="raw", layer="conv2")
    fast_model = FlaxCNN.build(FastNet(), fast, input_hwc=(16, 16, 3), input_scale="raw", layer="conv2")
    np.testing.assert_array_equal(np.asarray(fast_model.features(fast, jnp.asarray(x))),
                                  np.asarray(slow_model.features(params, jnp.asarray(x))))


# ----- batch norm in inference mode: the model takes the module's full variables

EPS = 1e-5  # nn.BatchNorm's default epsilon


class BNNet(nn.Module):
    """A CNN with three inference-mode batch norms: two in the trunk (the pruned features come out of the
    second), one in the head."""

    train: bool = False

    @nn.compact
    def features(self, x):
        x = nn.Conv(6, (3, 3), name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not self.train, name="bn1")(x))
        x = nn.Conv(10, (3, 3), strides=2, name="conv2")(x)
        return nn.relu(nn.BatchNorm(use_running_average=not self.train, name="bn2")(x))

    @nn.compact
    def hidden(self, feats):
        h = nn.Dense(16, name="fc")(jnp.mean(feats, axis=(1, 2)))
        return nn.relu(nn.BatchNorm(use_running_average=not self.train, name="bn3")(h))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="output")(self.hidden(self.features(x)))


def _bn_variables(seed=0):
    """BNNet's variables as a trained network's might be: each batch norm's running statistics near its input's
    mean and variance on some images (so that the predictions vary), shifted by random amounts, its scales and
    offsets random."""
    variables = BNNet().init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))
    r = np.random.default_rng(seed + 7)
    params = {k: dict(v) for k, v in variables["params"].items()}
    for bn in ("bn1", "bn2", "bn3"):
        params[bn] = {"scale": r.uniform(0.5, 1.5, params[bn]["scale"].shape),
                      "bias": r.normal(0, 0.1, params[bn]["bias"].shape)}
    params["output"] = {"kernel": r.normal(0, 1, params["output"]["kernel"].shape),
                        "bias": r.normal(0, 0.1, params["output"]["bias"].shape)}
    p = _np64(params)
    stats = {}

    def calibrated(bn, z):  # z: (..., C) the batch norm's input on the calibration images
        z = z.reshape(-1, z.shape[-1])
        stats[bn] = {"mean": z.mean(0) + 0.2 * z.std(0) * r.normal(size=z.shape[1]),
                     "var": z.var(0) * r.uniform(0.5, 2.0, z.shape[1])}
        return np.maximum(_np_bn(z, p[bn], stats[bn]), 0).reshape(z.shape)

    h = _bn_images(np.random.default_rng(seed), 64).astype(np.float64) / 255
    z = _np_conv_same(h, p["conv1"]["kernel"], p["conv1"]["bias"], 1)
    h = calibrated("bn1", z).reshape(z.shape)
    z = _np_conv_same(h, p["conv2"]["kernel"], p["conv2"]["bias"], 2)
    h = calibrated("bn2", z).reshape(z.shape)
    calibrated("bn3", h.mean(axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"])
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {"params": params, "batch_stats": stats})


def _bn_images(rng, n):
    """Images of a random colour, gradient and noise each (plain noise images all look alike after pooling)."""
    colour = rng.uniform(0, 255, (n, 1, 1, 3))
    gradient = np.linspace(-1, 1, 16)[None, :, None, None] * rng.uniform(-80, 80, (n, 1, 1, 3))
    return np.clip(colour + gradient + rng.normal(0, 20, (n, 16, 16, 3)), 0, 255).astype(np.uint8)


def _bn_model(variables):
    return FlaxCNN.build(BNNet(), variables, input_hwc=(16, 16, 3), input_scale="255", layer="bn2")


def _np_conv_same(x, kernel, bias, stride):
    """NumPy float64 cross-correlation with XLA's SAME padding (the low side gets the smaller half)."""
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] @ kernel[i, j]
    return out + bias


def _np_bn(x, p, s):
    return (x - s["mean"]) / np.sqrt(s["var"] + EPS) * p["scale"] + p["bias"]


def _np64(variables):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), variables)


def _np_features(variables, x):
    v = _np64(variables)
    p, s = v["params"], v["batch_stats"]
    h = np.asarray(x, np.float64) / 255
    h = np.maximum(_np_bn(_np_conv_same(h, p["conv1"]["kernel"], p["conv1"]["bias"], 1), p["bn1"], s["bn1"]), 0)
    return np.maximum(_np_bn(_np_conv_same(h, p["conv2"]["kernel"], p["conv2"]["bias"], 2), p["bn2"], s["bn2"]), 0)


def _np_logits(variables, feats, mask):
    v = _np64(variables)
    p, s = v["params"], v["batch_stats"]
    h = (feats * mask).mean(axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]
    h = np.maximum(_np_bn(h, p["bn3"], s["bn3"]), 0)
    return h @ p["output"]["kernel"] + p["output"]["bias"]


def _np_steps(variables, x, order):
    """(C + 1, N) float64 NumPy predictions with the first k channels of ``order`` pruned, k = 0..C."""
    feats = _np_features(variables, x)
    out = []
    for k in range(len(order) + 1):
        mask = np.ones(len(order))
        mask[order[:k]] = 0
        out.append(_np_logits(variables, feats, mask).argmax(-1))
    return np.stack(out)


def test_a_batch_norm_module_is_built_from_its_variables_and_runs_on_its_running_statistics(rng):
    variables = _bn_variables()
    model = _bn_model(variables)
    assert model.collections == ("batch_stats", "params")
    assert (model.feature_hwc, model.num_classes, model.hidden_size) == ((8, 8, 10), 5, 16)
    assert model.check_params(variables) == 5
    x = _bn_images(rng, 8).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.features(variables, jnp.asarray(x))), _np_features(variables, x),
                               rtol=1e-4, atol=1e-5)
    mask = np.ones(10, np.float32)
    mask[[1, 4, 7]] = 0
    want = _np_logits(variables, _np_features(variables, x), mask)
    np.testing.assert_allclose(np.asarray(model.logits(variables, jnp.asarray(x), mask)), want, rtol=1e-4, atol=1e-5)
    # init_params: the same collections, which the model accepts
    fresh = model.init_params(3)
    assert set(fresh) == {"batch_stats", "params"} and model.check_params(fresh) == 5


@pytest.mark.parametrize("options", [sw.PLAIN, sw.SweepOptions()], ids=["plain", "dedupe"])
def test_a_batch_norm_module_sweeps_as_a_numpy_masked_forward(options, rng):
    variables = _bn_variables()
    model = _bn_model(variables)
    x = _bn_images(rng, 40)
    x_bd = x[:20].copy()
    x_bd[:, -4:, -4:, :] = 255
    result = sw.rank_and_sweep(model, variables, {"clean_valid": x, "bd_valid": x_bd}, options)
    means = _np_features(variables, x).mean(axis=(0, 1, 2))
    np.testing.assert_array_equal(result.order, np.argsort(means, kind="stable"))
    for name, images in (("clean_valid", x), ("bd_valid", x_bd)):
        np.testing.assert_array_equal(result.preds[name], _np_steps(variables, images, result.order))


def test_every_ranking_of_a_batch_norm_module_sweeps_as_a_numpy_masked_forward(rng):
    from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings

    variables = _bn_variables()
    model = _bn_model(variables)
    x = _bn_images(rng, 32)
    labels = _np_steps(variables, x, np.arange(10))[0]
    plan = resolve_rankings(RankingOptions(rank_by=("activation", "anp", "random"), random_orders=1), variables,
                            model)
    result = sw.rank_and_sweep(model, variables, {"clean_valid": x}, rankings=plan, rank_labels=labels)
    assert result.labels == ("activation", "anp", "random/0")
    for label, order in zip(result.labels, result.orders):
        assert sorted(order) == list(range(10))
        np.testing.assert_array_equal(result.preds_of(label)["clean_valid"], _np_steps(variables, x, order))
    # the data-free rankings read a producing convolution, which nothing inside a Flax module exposes
    with pytest.raises(ConfigError, match="clp"):
        resolve_rankings(RankingOptions(rank_by=("clp",)), variables, model)


def _near_tie(variables, x_a, x_b):
    """A float32 image on the segment from x_a to x_b within a few float32 roundings of the float64 NumPy
    network's decision boundary (x_a and x_b predicted differently): bisection."""
    pred = lambda img: _np_logits(variables, _np_features(variables, img[None]), np.ones(10))[0].argmax()
    lo, hi = 0.0, 1.0
    at = lambda t: (x_a + t * (x_b - x_a)).astype(np.float32)
    p_lo = pred(at(lo))
    for _ in range(60):
        mid = (lo + hi) / 2
        if pred(at(mid)) == p_lo:
            lo = mid
        else:
            hi = mid
    return at(lo)


def test_a_batch_norm_module_settles_its_near_ties_in_float64(rng):
    variables = _bn_variables()
    model = _bn_model(variables)
    x = _bn_images(rng, 24).astype(np.float32)
    # the float64 network carries the batch statistics in float64 (float32 ones would be ~1e-7 off)
    np.testing.assert_allclose(model.features64(variables, x, 255.0), _np_features(variables, x), rtol=1e-10,
                               atol=1e-12)
    preds = _np_steps(variables, x, np.arange(10))
    a, b = np.flatnonzero(preds[0] != preds[0][0])[0], 0
    x_tie = np.stack([_near_tie(variables, x[b], x[a])])
    masks = np.ones((3, 10))
    masks[1, :4] = 0
    masks[2, ::2] = 0
    want = np.stack([_np_logits(variables, _np_features(variables, x[:3]), m).argmax(-1) for m in masks])
    np.testing.assert_array_equal(model.argmax64(variables, x[:3], 255.0, np.repeat(masks, 3, axis=0),
                                                 np.tile(np.arange(3), 3)), want.reshape(-1))
    result = sw.rank_and_sweep(model, variables, {"clean_valid": x, "tie": x_tie})
    assert result.settled["tie"] >= 1
    np.testing.assert_array_equal(result.preds["tie"], _np_steps(variables, x_tie, result.order))
    np.testing.assert_array_equal(result.preds["clean_valid"], _np_steps(variables, x, result.order))


def test_a_goodnet_of_a_batch_norm_module(rng):
    variables = _bn_variables()
    model = _bn_model(variables)
    x = _bn_images(rng, 20)
    mask = np.ones(10, np.float32)
    mask[:5] = 0
    goodnet, g_variables = make_goodnet(model, variables, mask=mask)
    got, _ = predict_goodnet(goodnet, g_variables, x)
    steps = _np_steps(variables, x, np.arange(10))
    np.testing.assert_array_equal(got, np.where(steps[0] == steps[5], steps[0], 5))
    np.testing.assert_array_equal(np.asarray(goodnet.apply(g_variables, x)), got)


def test_fine_tuning_a_batch_norm_module_keeps_its_running_statistics(rng):
    from badnet_jax.defense.finetune import FinetuneConfig, finetune
    from badnet_jax.train import TrainConfig, train_model

    variables = _bn_variables()
    model = _bn_model(variables)
    x = _bn_images(rng, 32).astype(np.float32)
    y = rng.integers(0, 5, 32)
    mask = np.ones(10, np.float32)
    mask[:3] = 0
    # no gradient reaches the statistics; the params get one
    grads = jax.grad(lambda v: model.logits(v, jnp.asarray(x), mask).sum())(variables)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["batch_stats"]))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["params"]))
    tuned, history = finetune(model, variables, mask, x, y, FinetuneConfig(epochs=2, batch_size=8, patience=2))
    assert len(history) >= 1 and model.check_params(tuned) == 5
    jax.tree.map(np.testing.assert_array_equal, tuned["batch_stats"], variables["batch_stats"])
    trained, _ = train_model(model, variables, x, y, TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2))
    jax.tree.map(np.testing.assert_array_equal, trained["batch_stats"], variables["batch_stats"])
    assert not np.array_equal(trained["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])


def test_a_batch_norm_module_without_its_batch_stats_is_refused():
    variables = _bn_variables()
    with pytest.raises(BadNetError, match="reads the collection 'batch_stats'.*full variables") as err:
        FlaxCNN.build(BNNet(), variables["params"], input_hwc=(16, 16, 3), input_scale="255", layer="bn2")
    assert isinstance(err.value, ConfigError) and err.value.field == "variables"
    with pytest.raises(ConfigError, match="reads the collection 'batch_stats'"):
        FlaxCNN.build(BNNet(), {"params": variables["params"]}, input_hwc=(16, 16, 3), input_scale="255")
    with pytest.raises(ConfigError, match="writes the collection 'batch_stats'.*a train flag keeps its default.*"
                                          "use_running_average=True"):
        FlaxCNN.build(BNNet(train=True), variables, input_hwc=(16, 16, 3), input_scale="255")
    # a model built from the variables refuses the params alone, and the reverse
    model = _bn_model(variables)
    with pytest.raises(ConfigError, match="lack the collection 'batch_stats'"):
        sw.rank_and_sweep(model, {"params": variables["params"]}, {"clean_valid": np.zeros((2, 16, 16, 3))})
    with pytest.raises(ConfigError, match=r"they hold 'bn1', .*; these look like the params alone: pass the "
                                          "variables BNNet was built from"):
        sw.rank_and_sweep(model, variables["params"], {"clean_valid": np.zeros((2, 16, 16, 3))})
    _, params = _model()
    plain = FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale="255", layer="conv2")
    with pytest.raises(ConfigError, match="built from params alone"):
        plain.check_params({"params": params, "batch_stats": {}})


def test_what_a_module_cannot_do_when_run_as_a_flax_cnn_is_named():
    _, params = _model()

    class TrainingDropout(Net):
        @nn.compact
        def hidden(self, feats):
            return nn.Dropout(0.5, deterministic=False)(super().hidden(feats))

    class RaisingCallback(Net):
        def features(self, x):
            jax.debug.callback(lambda v: 1 / 0, x.sum())  # fails when run, inside XLA
            return super().features(x)

    with pytest.raises(ConfigError, match=r"module: TrainingDropout.hidden asks for random numbers \(a dropout in "
                                          r"training mode\?\).*deterministic=True") as err:
        FlaxCNN.build(TrainingDropout(), params, input_hwc=(16, 16, 3), input_scale="255")
    assert err.value.field == "module"
    with pytest.raises(ConfigError, match=r"module: RaisingCallback failed inside XLA when run in float64 on three "
                                          r"inputs: .*a jax.debug.print or a callback inside features or hidden"):
        FlaxCNN.build(RaisingCallback(), params, input_hwc=(16, 16, 3), input_scale="255")
    with pytest.raises(ConfigError, match=r"input_scale=255: expected one of raw, 255 \(given the int 255: the "
                                          r"strings 'raw' or '255'\)"):
        FlaxCNN.build(Net(), params, input_hwc=(16, 16, 3), input_scale=255)


class BigFirstNet(nn.Module):
    """A 96x96 CNN whose first convolution's output (96x96x64 per image) dwarfs its input and features, with a
    weights-only product as large as sixteen images' worth of that output: not working memory per image."""

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(64, (3, 3), name="conv1")(x))
        x = nn.max_pool(x, (4, 4), (4, 4))
        mixing = self.param("mixing", nn.initializers.normal(0.1), (64, 256, 96 * 6))
        x = x @ jnp.eye(64) + (mixing * 2.0).sum() * 0  # (64 x 147456) computed from the weights alone
        return nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))

    @nn.compact
    def hidden(self, feats):
        return jnp.mean(feats, axis=(1, 2))

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="output")(self.hidden(self.features(x)))


def _big_first_model():
    params = BigFirstNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))["params"]
    return FlaxCNN.build(BigFirstNet(), params, input_hwc=(96, 96, 3), input_scale="255", layer="conv2"), params


def test_a_flax_modules_working_memory_counts_its_largest_tensors_per_image():
    model, _ = _big_first_model()
    conv1 = 96 * 96 * 64  # values per image of the first convolution's output (and of its ReLU)
    assert model.trunk_sizes == (conv1, conv1)
    # The sweep's memory model holds both (a layer's input and output) in float32, with slack.
    assert 2 * 4 * conv1 <= model.trunk_bytes_per_image() <= 3 * 2 * 4 * conv1


def test_a_flax_modules_working_memory_sizes_its_chunks_and_float64_blocks():
    # At least a layer's input and output are held at once: the first convolution's output twice per image,
    # in float32 in the sweep's chunks and in float64 in the ranking means' blocks (at most SUM_BLOCK_BYTES).
    model, _ = _big_first_model()
    held = 2 * 96 * 96 * 64
    x = jax.ShapeDtypeStruct((1000, 96, 96, 3), np.uint8)
    budget = 2**30
    plan = sw.plan_sweep(sw.SweepOptions(memory_budget=budget, devices=1, platform="cpu"), [x, x], model)
    assert 1 <= plan.chunk and plan.chunk * 4 * held <= budget
    assert xla64.sum_block(2 * model.trunk_bytes_per_image()) * 8 * held <= xla64.SUM_BLOCK_BYTES


class WhereNet(BigFirstNet):
    """The first convolution's output masked by a (1, H, W, C) weight through ``jnp.where``: JAX broadcasts the
    mask to the batch for two images or more, not for one."""

    @nn.compact
    def features(self, x):
        x = nn.relu(nn.Conv(64, (3, 3), name="conv1")(x))
        keep = self.param("keep", nn.initializers.ones, (1, 96, 96, 64))
        x = nn.max_pool(jnp.where(keep > 0, x, 0.0), (4, 4), (4, 4))
        return nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))


class PadNet(BigFirstNet):
    """The batch padded to a multiple of 8 images before the first convolution: two images cost what three do."""

    @nn.compact
    def features(self, x):
        n = x.shape[0]
        x = jnp.pad(x, ((0, -n % 8), (0, 0), (0, 0), (0, 0)))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3), name="conv1")(x)), (4, 4), (4, 4))[:n]
        return nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))


@pytest.mark.parametrize("net", [WhereNet, PadNet])
def test_a_flax_modules_working_memory_holds_where_the_batch_changes_its_program(net):
    params = net().init(jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))["params"]
    model = FlaxCNN.build(net(), params, input_hwc=(96, 96, 3), input_scale="255", layer="conv2")
    conv1 = 96 * 96 * 64  # values per image of the first convolution's output
    assert model.trunk_sizes[0] >= conv1 and model.trunk_bytes_per_image() >= 2 * 4 * conv1
