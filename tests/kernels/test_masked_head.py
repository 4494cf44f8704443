"""Each masked-head implementation against the pure-JAX reference (interpret mode on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet_jax.kernels.masked_head import api
from badnet_jax.kernels.native import native_library
from badnet_jax.kernels.masked_head.pallas_kernel import head_argmax_pallas, head_top2_pallas
from badnet_jax.kernels.masked_head.reference import head_argmax_reference
from tests import numpy_ref


def _inputs(seed, m, n, classes):
    return api.random_head_inputs(m, n, classes, seed=seed)


def _float64_argmax(*args):
    return numpy_ref.tail(*args)[0].argmax(-1)


def _float64_gap_and_scale(*args):
    logits, scale = numpy_ref.tail(*args)
    top2 = np.sort(logits, -1)[..., -2:]
    return top2[..., 1] - top2[..., 0], scale


@pytest.mark.parametrize("m,n,classes,block_n,class_block", [
    (3, 37, 1283, 16, 128),  # lab class count, padded images and classes
    (1, 5, 10, 8, 8),  # tiny: classes in 2 blocks
    (4, 64, 257, 32, 64),
])
def test_pallas_interpret_matches_reference(m, n, classes, block_n, class_block):
    args = _inputs(m * n + classes, m, n, classes)
    ref = np.asarray(head_argmax_reference(*args))
    got = np.asarray(head_argmax_pallas(*args, block_n=block_n, class_block=class_block, interpret=True))
    assert got.shape == (m, n) and got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(ref, _float64_argmax(*args))  # the reference itself, in float64


@pytest.mark.parametrize("m,n,classes,block_n,class_block", [
    (2, 37, 1283, 16, 128),  # runner-up and winner in different class blocks, or the same one
    (1, 9, 10, 8, 8),
])
def test_kernel_keeps_a_running_max_and_second_max(m, n, classes, block_n, class_block):
    args = _inputs(7 * n + classes, m, n, classes)
    want_gap, want_scale = _float64_gap_and_scale(*args)
    for arg, gap, scale in (head_top2_pallas(*args, block_n=block_n, class_block=class_block, interpret=True),
                            api.head_top2(*args, impl="reference"), *_native(api.head_top2, *args)):
        np.testing.assert_array_equal(np.asarray(arg), _float64_argmax(*args))
        np.testing.assert_allclose(np.asarray(gap), want_gap, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-5)


def _native(fn, *args):
    """``fn(*args, impl="native")`` as a one-element list where the native kernels are built, else none."""
    return [] if native_library() is None else [fn(*args, impl="native")]


def test_native_head_agrees_with_the_reference_on_random_inputs():
    # The native dense kernels (fc_2 with both ReLUs and fc_1 added; the output layer's top-2) on the
    # magnitudes of real pre-activations: every class the same where the float64 gap is clear of rounding.
    if native_library() is None:
        pytest.skip("no C++ compiler here: the native kernels cannot be built")
    args = api.random_head_inputs(3, 200, seed=4)
    got = [np.asarray(a) for a in api.head_top2(*args, impl="native")]
    want = [np.asarray(a) for a in api.head_top2(*args, impl="reference")]
    clear = api.clear_rows(args)
    assert got[0].shape == (3, 200) and clear.mean() > 0.9
    np.testing.assert_array_equal(got[0][clear], want[0][clear])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(api.head_argmax(*args, impl="native")), got[0])


def test_ties_resolve_to_the_first_class_like_argmax():
    fc1 = jnp.zeros((1, 3, 160))
    c4 = jnp.zeros((1, 3, 960))
    w2 = jnp.zeros((960, 160))
    b2 = jnp.zeros((160,))
    wout = jnp.zeros((160, 300))
    bout = jnp.zeros((300,)).at[jnp.array([5, 140, 290])].set(1.0)  # equal maxima in 3 class blocks
    for impl in ("reference", "interpret", *(["native"] if native_library() is not None else [])):
        np.testing.assert_array_equal(np.asarray(api.head_argmax(fc1, c4, w2, b2, wout, bout, impl=impl)), [[5, 5, 5]])
        np.testing.assert_array_equal(np.asarray(api.head_top2(fc1, c4, w2, b2, wout, bout, impl=impl)[1]), [[0, 0, 0]])


def test_resolve_impl_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only expectations")
    assert api.resolve_impl("auto") == ("native" if native_library() is not None else "reference")
    assert api.resolve_impl("auto", platform="cpu") == api.resolve_impl("auto")
    assert api.resolve_impl("pallas") == "interpret"
    assert api.resolve_impl("reference") == "reference"
    assert api.resolve_impl("auto", platform="cuda") == "reference"  # the faster head on the one GPU measured
    assert api.resolve_impl("pallas", platform="cuda") == "pallas"  # lowering for another platform: unprobed
    with pytest.raises(ValueError):
        api.resolve_impl("cuda")


def test_clear_rows_leave_out_only_near_ties():
    *args, bout = [np.asarray(a, np.float64) for a in _inputs(3, 1, 4, 5)]
    logits = numpy_ref.tail(*args, bout)[0]
    # Image 0: make classes 1 and 2 tie to 1e-5 at the top; the others keep their clear gaps.
    top = logits[0, 0].max() + 1.0
    bout = bout.copy()
    bout[1] += top - logits[0, 0, 1]
    bout[2] += top - 1e-5 - logits[0, 0, 2]
    clear = api.clear_rows((*args, bout))
    assert not clear[0, 0]
    gaps = _float64_gap_and_scale(*args, bout)[0]
    np.testing.assert_array_equal(clear, gaps > api.CLEAR_GAP)


def test_probe_requires_every_clear_row_and_falls_back_with_a_warning(monkeypatch, caplog):
    """The probe at the call's shapes: a kernel off on one clear row, or one that fails to lower, is not used."""
    reference = api.head_top2_reference
    monkeypatch.setattr(api, "head_top2_pallas", lambda *a, platform: reference(*a))
    assert api.pallas_available.__wrapped__("cuda", 2, 64, 300)

    def one_off(*a, platform, which=0, change=lambda v: (v + 1) % 300):
        out = [np.asarray(t).copy() for t in reference(*a)]
        out[which][0, 0] = change(out[which][0, 0])
        return out

    monkeypatch.setattr(api, "head_top2_pallas", one_off)
    assert not api.pallas_available.__wrapped__("cuda", 2, 64, 300)
    assert "disagrees with the reference on 1 of" in caplog.text
    for which in (1, 2):  # a gap or a scale off decides near-ties wrongly: not used either
        monkeypatch.setattr(api, "head_top2_pallas", lambda *a, platform, w=which: one_off(
            *a, platform=platform, which=w, change=lambda v: v * 1.01 + 0.01))
        assert not api.pallas_available.__wrapped__("cuda", 2, 64, 300)

    def broken(*a, platform):
        raise RuntimeError("kernel does not lower here")

    monkeypatch.setattr(api, "head_top2_pallas", broken)
    assert not api.pallas_available.__wrapped__("cuda", 2, 64, 300)
    assert "unavailable on cuda at 2 x 64 x 300 classes (RuntimeError: kernel does not lower here)" in caplog.text


@pytest.mark.device
def test_pallas_compiles_on_device():
    if jax.default_backend() == "cpu":
        pytest.skip("needs a GPU or TPU")
    args = _inputs(0, 61, 4096, 1283)
    assert api.pallas_available(api.default_platform(), 61, 4096, 1283)
    got = np.asarray(head_argmax_pallas(*args, platform=api.default_platform()))
    ref = np.asarray(head_argmax_reference(*args))
    clear = api.clear_rows(args)  # float32 near-ties may go either way: the sweep settles them in float64
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], ref[clear])
    np.testing.assert_array_equal(ref[clear], _float64_argmax(*args)[clear])
