"""badnet_jax.sweep.layout: the sets that rank nothing are swept as one block per dtype, each set's predictions
those of the lab's loop on that set alone, and the program compiles one trunk and one head loop for them all."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from badnet_jax import BadNet, init_params
from badnet_jax import sweep as sw
from badnet_jax.sweep import layout
from badnet_jax.sweep.run import export_sweep
from tests.sweep.conftest import sequential_predictions

spec = lambda n, dtype=np.uint8: jax.ShapeDtypeStruct((n, 55, 47, 3), dtype)


def test_the_ranking_set_is_alone_and_the_others_join_by_dtype_in_the_order_given():
    sets = {"a": spec(5), "clean_valid": spec(7), "b": spec(3, np.float32), "c": spec(0), "d": spec(2, np.float32)}
    assert layout.blocks(sets, "clean_valid") == (
        layout.Block(("clean_valid",), (7,)), layout.Block(("a", "c"), (5, 0)), layout.Block(("b", "d"), (3, 2)))
    assert layout.blocks(sets, None) == (layout.Block(("a", "clean_valid", "c"), (5, 7, 0)),
                                         layout.Block(("b", "d"), (3, 2)))
    assert layout.blocks({"clean_valid": spec(4)}, "clean_valid") == (layout.Block(("clean_valid",), (4,)),)
    # float64 images are float32 on the device (without JAX's 64-bit mode): one block, joined as float32.
    both = {"a": spec(2, np.float32), "b": spec(3, np.float64)}
    assert layout.blocks(both, None) == (layout.Block(("a", "b"), (2, 3)),)
    assert layout.shape(layout.blocks(both, None)[0], both).dtype == np.float32


def test_join_puts_the_sets_one_after_the_other_and_split_takes_them_back(rng):
    sets = {n: rng.integers(0, 256, size=(k, 55, 47, 3)).astype(np.uint8) for n, k in (("a", 5), ("b", 0), ("c", 4))}
    block = layout.blocks(sets, None)[0]
    reference = np.concatenate([sets["a"], sets["b"], sets["c"], np.zeros((3, 55, 47, 3), np.uint8)])
    assert layout.shape(block, sets, multiple=4) == jax.ShapeDtypeStruct((12, 55, 47, 3), np.uint8)
    np.testing.assert_array_equal(layout.join(block, sets), reference[:9])
    # A device's rows, as make_array_from_callback asks for them: any range, padding rows zeros.
    for start, stop in ((0, 12), (0, 3), (3, 6), (4, 9), (6, 12), (9, 12)):
        rows = layout.join(block, sets, start, stop)
        np.testing.assert_array_equal(rows, reference[start:stop])
        assert rows.dtype == np.uint8 and rows.ctypes.data % 64 == 0
    # What a block's outputs look like: (R, 61, rows) per output, the image axis last.
    preds = np.arange(2 * 61 * 12).reshape(2, 61, 12)
    parts = layout.split(block, (preds, preds > 100))
    assert list(parts) == ["a", "b", "c"]
    for name, start in (("a", 0), ("b", 5), ("c", 5)):
        p, flags = parts[name]
        np.testing.assert_array_equal(p, preds[:, :, start:start + len(sets[name])])
        np.testing.assert_array_equal(flags, preds[:, :, start:start + len(sets[name])] > 100)
        assert p.flags.c_contiguous


def test_a_cpu_device_takes_the_joined_images_without_a_copy(rng):
    """Why join aligns its arrays: the device's buffer is the host array itself, so joining the sets costs
    no memory beyond the device copy the sweep made before it joined them."""
    if jax.default_backend() != "cpu":
        pytest.skip("host memory is a CPU device's own")
    sets = {n: rng.integers(0, 256, size=(k, 55, 47, 3)).astype(np.uint8) for n, k in (("a", 33), ("b", 31))}
    joined = layout.join(layout.blocks(sets, None)[0], sets)
    assert jax.device_put(joined).unsafe_buffer_pointer() == joined.ctypes.data


def test_each_joined_set_gets_the_lab_loops_predictions_on_it_alone(lab_b, lab_faces):
    """Three sets that rank nothing (two uint8, one float32) beside the ranking set, with chunks of 16 that
    straddle the sets' boundaries in the joined block and grouping that sorts across them: every set's 61 steps
    are what the lab's loop gives for that set alone."""
    model, params = lab_b
    faces = lambda split, dtype: lab_faces[split][0].astype(dtype)  # whole pixels: exact in either dtype
    sets = {"clean_valid": faces("valid_subset", np.uint8), "bd_valid": faces("bd_valid_subset", np.uint8),
            "clean_test": faces("test_subset", np.float32), "bd_test": faces("bd_test_subset", np.uint8)}
    assert layout.blocks(sets, "clean_valid")[1].names == ("bd_valid", "bd_test")
    result = sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=16))
    assert list(result.all_preds) == list(sets)
    for name, images in sets.items():
        assert result.preds[name].shape == (61, len(images))
        np.testing.assert_array_equal(result.preds[name], sequential_predictions(model, params, images, result.masks))


def _whiles(sets) -> int:
    params = init_params(num_classes=11, seed=1)
    exported = export_sweep(BadNet(11), params, sets, sw.SweepOptions(platform="cpu", chunk=8))
    return len(re.findall(r"stablehlo\.while", exported.mlir_module()))


def test_four_sets_compile_the_loops_of_two():
    """The program's loops (trunk, chunks, the scan over steps) for the ranking set and one block: sets that
    rank nothing add rows to the block, not loops."""
    two = _whiles({"clean_valid": spec(20), "bd_valid": spec(12)})
    four = _whiles({"clean_valid": spec(20), "bd_valid": spec(12), "clean_test": spec(9), "bd_test": spec(10)})
    alone = _whiles({"clean_valid": spec(20)})
    assert two == four > alone > 0, (alone, two, four)


def test_sets_already_on_the_device_are_joined_there_not_round_tripped(rng):
    from badnet_jax.sweep.run import _images

    on_device = {n: jax.device_put(rng.integers(0, 256, size=(k, 55, 47, 3)).astype(np.uint8))
                 for n, k in (("a", 5), ("b", 4))}
    alone = layout.Block(("a",), (5,))
    assert _images(alone, on_device, None).unsafe_buffer_pointer() == on_device["a"].unsafe_buffer_pointer()
    joined = _images(layout.blocks(on_device, None)[0], on_device, None)
    np.testing.assert_array_equal(np.asarray(joined), np.concatenate([np.asarray(on_device["a"]),
                                                                      np.asarray(on_device["b"])]))
