"""The native dense kernels against independent NumPy arithmetic and the JAX reference, and their transformations."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.kernels.dense import (dense, dense_native, dense_reference, dense_top2, dense_top2_native,
                                      dense_top2_reference, native_runs, resolve_impl)
from badnet_jax.kernels.native import native_library

needs_native = pytest.mark.skipif(native_library() is None and not os.environ.get("CI"),
                                  reason="no C++ compiler here: the native kernels cannot be built")
f32 = lambda v: jnp.asarray(v, jnp.float32)


def numpy_dense(x, w, b, add=None, relu_in=False, relu_out=False) -> np.ndarray:
    """The dense layer in int64/float64 NumPy (exact on small integers)."""
    x = np.maximum(x, 0) if relu_in else x
    y = x @ w + b + (0 if add is None else add)
    return np.maximum(y, 0) if relu_out else y


def numpy_top2(logits) -> tuple[np.ndarray, np.ndarray]:
    """argmax (the first index on ties, the first NaN if any) and top-2 gap of each row, in NumPy."""
    logits = np.asarray(logits, np.float64)
    arg = logits.argmax(axis=1)
    rest = logits.copy()
    rest[np.arange(len(logits)), arg] = -np.inf
    with np.errstate(invalid="ignore"):
        gap = logits.max(axis=1) - rest.max(axis=1)
    return arg, gap


def _ints(shape, lo, hi, seed):
    return np.random.default_rng(seed).integers(lo, hi + 1, shape)


# Rows around the 6-row register tile, columns around the 16-lane vectors and the 4-vector tiles.
SHAPES = [(1, 3, 1), (5, 8, 15), (6, 17, 16), (7, 33, 17), (13, 9, 64), (12, 40, 65), (31, 960, 160),
          (256, 160, 1283)]


@needs_native
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("relu_in,relu_out,with_add", [(False, False, False), (True, True, True), (True, False, True),
                                                        (False, True, False)])
def test_dense_is_exact_on_integers(m, k, n, relu_in, relu_out, with_add):
    x, w, b = _ints((m, k), -4, 4, 1), _ints((k, n), -3, 3, 2), _ints((n,), -50, 50, 3)
    add = _ints((m, n), -60, 60, 4) if with_add else None
    got = dense_native(f32(x), f32(w), f32(b), None if add is None else f32(add), relu_in, relu_out)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), numpy_dense(x, w, b, add, relu_in, relu_out))


@needs_native
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_top2_is_exact_on_integers_ties_included(m, k, n):
    # Few distinct values: many rows have the top logit twice (first column, gap 0).
    x, w, b = _ints((m, k), 0, 2, 5), _ints((k, n), -1, 1, 6), _ints((n,), -2, 2, 7)
    arg, gap, scale = dense_top2_native(f32(x), f32(w), f32(b))
    want_arg, want_gap = numpy_top2(x @ w + b)
    np.testing.assert_array_equal(np.asarray(arg), want_arg)
    np.testing.assert_array_equal(np.asarray(gap), want_gap)
    if n > 1 and m > 4:
        assert (want_gap == 0).any()  # the ties are there to be got right
    np.testing.assert_array_equal(np.asarray(scale), np.abs(x) @ np.abs(w).max(axis=1) + np.abs(b).max())


@needs_native
def test_top2_nan_and_infinities_as_the_reference():
    x = f32(_ints((9, 20), 0, 3, 8))
    w = f32(_ints((20, 1283), -2, 2, 9))
    rows = {}
    for name, col_values in {"nan": {900: np.nan, 37: np.nan, 5: np.inf}, "inf": {1282: np.inf, 700: np.inf},
                             "neg_inf": dict.fromkeys(range(1283), -np.inf), "last": {1282: 1e6}}.items():
        b = np.zeros(1283, np.float32)
        for c, v in col_values.items():
            b[c] = v
        rows[name] = ([np.asarray(a) for a in dense_top2_native(x, w, f32(b))],
                      [np.asarray(a) for a in dense_top2_reference(x, w, f32(b))])
    for name, (got, want) in rows.items():
        np.testing.assert_array_equal(got[0], want[0], err_msg=name)
        np.testing.assert_array_equal(got[1], want[1], err_msg=name)  # NaN where the reference has NaN
    assert (rows["nan"][0][0] == 37).all() and np.isnan(rows["nan"][0][1]).all()
    assert (rows["inf"][0][0] == 700).all() and np.isnan(rows["inf"][0][1]).all()  # inf - inf, as the reference
    assert (rows["neg_inf"][0][0] == 0).all() and (rows["last"][0][0] == 1282).all()


@needs_native
def test_random_floats_agree_with_the_reference_to_rounding():
    rng = np.random.default_rng(10)
    x = f32(np.abs(rng.standard_normal((300, 160))) * 3)
    w, b = f32(rng.standard_normal((160, 1283)) * 0.1), f32(rng.standard_normal(1283))
    got = [np.asarray(a) for a in dense_top2_native(x, w, b)]
    want = [np.asarray(a) for a in dense_top2_reference(x, w, b)]
    logits64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    clear = numpy_top2(logits64)[1] > 1e-3  # rows whose float64 gap no float32 rounding can close
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[0][clear], want[0][clear])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    c4, f1 = f32(rng.standard_normal((300, 960)) * 3), f32(rng.standard_normal((300, 160)) * 3)
    w2, b2 = f32(rng.standard_normal((960, 160)) * 0.05), f32(rng.standard_normal(160))
    np.testing.assert_allclose(np.asarray(dense_native(c4, w2, b2, f1, True, True)),
                               np.asarray(dense_reference(c4, w2, b2, f1, True, True)), rtol=1e-5, atol=1e-4)


@needs_native
def test_a_row_gets_the_same_bits_in_any_batch():
    rng = np.random.default_rng(11)
    x = f32(rng.standard_normal((97, 160)))
    w, b = f32(rng.standard_normal((160, 333))), f32(rng.standard_normal(333))
    whole = np.asarray(dense_native(x, w, b, relu_out=True))
    top = [np.asarray(a) for a in dense_top2_native(x, w, b)]
    for start, stop in ((0, 1), (5, 6), (40, 53), (90, 97)):
        np.testing.assert_array_equal(np.asarray(dense_native(x[start:stop], w, b, relu_out=True)), whole[start:stop])
        for part, full in zip(dense_top2_native(x[start:stop], w, b), top):
            np.testing.assert_array_equal(np.asarray(part), full[start:stop])


def _planted_top_columns(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random float rows for a 160 x 1283 output layer where column 1281 (in the last panel) is the top of a
    quarter of the rows, column 7 and its exact twin, column 1271, of about half the others (an exact tie: the
    first wins). The twins share a lane (1271 = 7 mod 16) but not a panel, so the tie is settled by the order in
    which the panels meet a lane's state, not by the final reduction over lanes."""
    x, w = np.abs(rng.standard_normal((256, 160))) * 3, rng.standard_normal((160, 1283)) * 0.1
    b = rng.standard_normal(1283)
    w[:, 1271] = w[:, 7]
    rest = np.delete(x @ w + b, [7, 1271, 1281], axis=1).max(axis=1)
    b[7] = b[1271] = np.median(rest - x @ w[:, 7])
    b[1281] = np.quantile(np.maximum(rest, x @ w[:, 7] + b[7]) - x @ w[:, 1281], 0.25)
    return x, w, b


@needs_native
@pytest.mark.parametrize("rows", [256, 20])
@pytest.mark.parametrize("values", ["floats", "small integers"])
def test_the_top2_is_the_same_bits_whatever_its_column_panels(values, rows):
    # The top-2 kernel takes a range of rows through as many weight columns as fit its panel (96 KB: 144 or 128
    # of 1283 columns with 160 inputs) before the next panel, the weights packed or (few rows) read in place.
    # Zero inputs appended to every row add exact zeros to every logit and to the output scale, but shrink the
    # panel to one register tile's columns: a row's top-2 state must carry across the panels' boundaries in
    # column order to give the same bits, and the argmax NumPy's (the first column of an exact tie).
    rng = np.random.default_rng(18)
    if values == "floats":
        x, w, b = _planted_top_columns(rng)
    else:
        x, w, b = _ints((256, 160), 0, 2, 19), _ints((160, 1283), -1, 1, 20), _ints((1283,), -2, 2, 21)
    x = x[:rows]
    narrow_x = np.concatenate([x, np.zeros((rows, 6000 - 160))], axis=1)
    narrow_w = np.concatenate([w, rng.standard_normal((6000 - 160, 1283))], axis=0)
    wide = [np.asarray(a) for a in dense_top2_native(f32(x), f32(w), f32(b))]
    narrow = [np.asarray(a) for a in dense_top2_native(f32(narrow_x), f32(narrow_w), f32(b))]
    for got, want in zip(narrow, wide):  # argmax, gap and scale
        np.testing.assert_array_equal(got, want)
    logits = np.asarray(f32(x), np.float64) @ np.asarray(f32(w), np.float64) + np.asarray(f32(b), np.float64)
    want_arg, want_gap = numpy_top2(logits)
    if values == "floats":
        # Rows whose top (with its twin, if it is column 7) clears every other column by far more than rounding.
        others = logits.copy()
        others[np.arange(rows), want_arg] = -np.inf
        others[want_arg == 7, 1271] = -np.inf
        clear = logits.max(axis=1) - others.max(axis=1) > 1e-3
        top = want_arg[clear]
        assert (top == 7).sum() > rows // 4 and (top == 1281).sum() > 0 and (~np.isin(top, (7, 1281))).sum() > 0
        np.testing.assert_array_equal(wide[0][clear], top)
        assert (wide[1][clear & (want_arg == 7)] == 0).all()  # the twin's exact tie
    else:
        np.testing.assert_array_equal(wide[0], want_arg)
        assert (wide[1] == 0).any()  # ties, settled by the first column as in NumPy


@needs_native
def test_leading_axes_vmap_scan_and_empty_batches():
    rng = np.random.default_rng(12)
    x = f32(rng.integers(-3, 4, (4, 5, 24)))
    w, b = f32(rng.integers(-2, 3, (24, 70))), f32(rng.integers(-5, 6, (70,)))
    add = f32(rng.integers(-9, 10, (4, 5, 70)))
    want = numpy_dense(np.asarray(x), np.asarray(w), np.asarray(b), np.asarray(add), True, True)
    np.testing.assert_array_equal(np.asarray(dense_native(x, w, b, add, True, True)), want)  # (4, 5, K) rows
    fn = lambda xi, ai: dense_native(xi, w, b, ai, True, True)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(fn))(x, add)), want)
    want0 = numpy_dense(np.asarray(x), np.asarray(w), np.asarray(b), np.asarray(add[0]), True, True)
    np.testing.assert_array_equal(np.asarray(jax.vmap(fn, in_axes=(0, None))(x, add[0])), want0)
    ws = jnp.stack([w, -w])  # batched weights: one call each
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda wi: dense_native(x[0], wi, b))(ws))[1],
                                  numpy_dense(np.asarray(x[0]), -np.asarray(w), np.asarray(b)))
    arg, gap, _ = jax.vmap(lambda xi: dense_top2_native(xi, w, b))(x)
    want_arg, want_gap = numpy_top2(np.asarray(x).reshape(20, 24) @ np.asarray(w) + np.asarray(b))
    np.testing.assert_array_equal(np.asarray(arg).reshape(-1), want_arg)
    np.testing.assert_array_equal(np.asarray(gap).reshape(-1), want_gap)
    bs = jnp.stack([b, -b])  # the top-2 with batched weights and biases: one call each, x broadcast
    arg2, gap2, _ = jax.vmap(lambda wi, bi: dense_top2_native(x[0], wi, bi))(ws, bs)
    for i, sign in enumerate((1, -1)):
        want_i = numpy_top2(sign * (np.asarray(x[0]) @ np.asarray(w) + np.asarray(b)))
        np.testing.assert_array_equal(np.asarray(arg2[i]), want_i[0])
        np.testing.assert_array_equal(np.asarray(gap2[i]), want_i[1])
    _, scanned = jax.lax.scan(lambda c, xi: (c, dense_top2_native(xi, w, b)[0]), 0, x)
    np.testing.assert_array_equal(np.asarray(scanned).reshape(-1), want_arg)
    assert dense_native(x[:, :0], w, b).shape == (4, 0, 70)
    assert [a.shape for a in dense_top2_native(x[:0], w, b)] == [(0, 5)] * 3
    assert jax.vmap(lambda xi: dense_native(xi, w, b))(x[:0]).shape == (0, 5, 70)


@needs_native
def test_gradients_of_dense_are_the_references():
    rng = np.random.default_rng(13)
    x, w, b = f32(rng.standard_normal((7, 30))), f32(rng.standard_normal((30, 20))), f32(rng.standard_normal(20))
    add = f32(rng.standard_normal((7, 20)))
    loss = lambda fn: (lambda *a: jnp.sum(fn(*a, relu_in=True, relu_out=True) ** 2))
    got = jax.grad(loss(dense_native), argnums=(0, 1, 2, 3))(x, w, b, add)
    want = jax.grad(loss(dense_reference), argnums=(0, 1, 2, 3))(x, w, b, add)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


@needs_native
def test_inside_shard_map_the_outputs_vary_like_the_rows():
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
    rng = np.random.default_rng(14)
    x, w, b = f32(rng.integers(-3, 4, (8, 12))), f32(rng.integers(-2, 3, (12, 40))), f32(rng.integers(-5, 6, (40,)))
    run = lambda a: (dense_native(a, w, b, relu_out=True), *dense_top2_native(a, w, b))
    out = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("rows"), out_specs=P("rows")))(x)
    want_arg, want_gap = numpy_top2(np.asarray(x) @ np.asarray(w) + np.asarray(b))
    np.testing.assert_array_equal(np.asarray(out[0]), numpy_dense(np.asarray(x), np.asarray(w), np.asarray(b),
                                                                   relu_out=True))
    np.testing.assert_array_equal(np.asarray(out[1]), want_arg)
    np.testing.assert_array_equal(np.asarray(out[2]), want_gap)


@needs_native
def test_bad_arguments_are_refused_naming_them():
    x, w, b = jnp.zeros((3, 4)), jnp.zeros((4, 5)), jnp.zeros((5,))
    with pytest.raises(ValueError, match="float32"):
        dense_native(x.astype(jnp.bfloat16), w, b)
    with pytest.raises(ValueError, match="agree on K"):
        dense_native(x, jnp.zeros((3, 5)), b)
    with pytest.raises(ValueError, match="b_N must be"):
        dense_top2_native(x, w, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="add must be"):
        dense_native(x, w, b, add=jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least one class"):
        dense_top2_native(x, jnp.zeros((4, 0)), jnp.zeros((0,)))


def test_the_rule_runs_native_only_on_a_cpu_with_the_kernels():
    built = native_library() is not None and jax.default_backend() == "cpu"
    assert native_runs() == built and native_runs("cpu") == built
    assert resolve_impl() == resolve_impl("native") == ("native" if built else "reference")
    assert resolve_impl("reference") == "reference"
    assert resolve_impl("auto", "cuda") == resolve_impl("native", "tpu") == "reference"
    with pytest.raises(ValueError, match="impl must be"):
        resolve_impl("pallas")
    x, w, b = f32(_ints((4, 6), -3, 3, 15)), f32(_ints((6, 9), -2, 2, 16)), f32(_ints((9,), -4, 4, 17))
    for impl in ("reference", resolve_impl()):  # the dispatch gives the same values either way (integers)
        np.testing.assert_array_equal(np.asarray(dense(x, w, b, relu_out=True, impl=impl)),
                                      numpy_dense(np.asarray(x), np.asarray(w), np.asarray(b), relu_out=True))
        np.testing.assert_array_equal(np.asarray(dense_top2(x, w, b, impl=impl)[0]),
                                      numpy_top2(np.asarray(x) @ np.asarray(w) + np.asarray(b))[0])


@needs_native
def test_inside_shard_map_outputs_vary_with_per_device_weights_too():
    # Weights that differ per device (a model variant per device) make the results differ per device: asking
    # shard_map for one replicated output must fail as it does for the reference, not return one device's.
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    x, b = f32(np.ones((1, 2))), f32(np.zeros(3))
    w = f32(np.eye(2, 3))
    for fn in (lambda xx, ww: dense_reference(xx, ww, b), lambda xx, ww: dense_native(xx, ww, b),
               lambda xx, ww: dense_top2_native(xx, ww, b)[0], lambda xx, ww: dense_top2_native(xx, ww, b)[2]):
        with pytest.raises(ValueError, match="out_specs"):
            jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))(x, w)


@needs_native
def test_no_inner_dimension_gives_the_bias_as_the_reference():
    x, w = jnp.zeros((2, 0), jnp.float32), jnp.zeros((0, 17), jnp.float32)
    b = f32(np.arange(17) - 8.0)
    np.testing.assert_array_equal(np.asarray(dense_native(x, w, b, relu_out=True)), np.maximum(np.tile(b, (2, 1)), 0))
    arg, gap, scale = dense_top2_native(x, w, b)
    np.testing.assert_array_equal(np.asarray(arg), [16, 16])
    np.testing.assert_array_equal(np.asarray(gap), [1, 1])
    np.testing.assert_array_equal(np.asarray(scale), [8, 8])
