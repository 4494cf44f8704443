"""The benchmark's helpers: analytic FLOP counts and the stand-in lab data writer."""

from __future__ import annotations

import numpy as np

from badnet_jax import load_lab_h5, load_trigger, poison
from badnet_jax import bench
from badnet_jax.synthetic import write_standin_lab_data
from tests.conftest import ASSETS, asset


def test_flop_counts_match_the_architecture():
    # conv_1: 52x44 outputs x 20 filters x 4x4x3 taps, 2 FLOPs per multiply-add; and so on.
    assert bench.TRUNK_FLOPS == 2 * (52 * 44 * 20 * 48 + 24 * 20 * 40 * 180 + 10 * 8 * 60 * 360)
    assert bench.tail_flops(1283) == 2 * (960 * 160 + 160 * 1283)  # 0.72 MFLOP, the budget figure
    assert abs(bench.tail_flops(1283) - 0.72e6) < 0.01e6
    assert bench.tail_flops(200) == 2 * (960 * 160 + 160 * 200)  # the demo's class count, not the lab's
    assert bench.head_flops(200) == 2 * (1200 * 160 + 4 * 3 * 80 * 2 * 2 * 60) + bench.tail_flops(200)


def test_standin_data_is_lab_layout_and_poisoned_with_the_real_trigger(tmp_path):
    asset("faces/lab3/valid_subset.h5")
    written = write_standin_lab_data(str(ASSETS), str(tmp_path), scale=2, base_sizes=(20, 10))
    assert written == {"valid": 40, "test": 20}
    trigger = load_trigger(asset("triggers/sun_glass_trigger.png"))
    for name, n in (("valid", 40), ("test", 20)):
        x, y = load_lab_h5(tmp_path / f"data/cl/{name}.h5", num_classes=1283)
        xb, yb = load_lab_h5(tmp_path / f"data/bd/bd_{name}.h5")
        assert x.shape == (n, 55, 47, 3) and (yb == 0).all()
        np.testing.assert_array_equal(xb, poison(x, trigger))


def test_kernel_timings_reports_each_block_size_and_its_agreement():
    out = bench.kernel_timings(masks=2, images=24, num_classes=37, block_ns=(8, 16), repeats=1)
    assert set(out) >= {"reference", "pallas_block_n8", "pallas_block_n16"}
    for name in ("reference", "pallas_block_n8", "pallas_block_n16"):
        assert out[name]["s"] > 0 and out[name]["agree"] == 1.0  # interpret mode on CPU equals the reference


def test_benchmark_cli_measures_the_input_scale_and_prints_a_summary(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--model",
                           str(asset("models/hackml2020/sunglasses_bd_weights.h5")), "--clean_valid",
                           str(asset("faces/lab3/valid_subset.h5")), "--n_bd", "8", "--per_step_steps", "1",
                           "--repeats", "1", "--rank_by", "activation,l1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Input scale 255 (measured on 47 clean images" in proc.stderr
    result = json.loads(out.read_text())
    assert result["num_classes"] == 1283 and result["n_clean"] == 47 and result["n_bd"] == 8
    assert result["rankings"]["orders"] == 2 and result["rankings"]["vs_one"] > 0
    assert proc.stdout.strip().splitlines()[-1].startswith("fast sweep ") and "% of the measured matmul peak" in proc.stdout
    flops = result["flops_per_image"]
    assert flops["tail_after_prefix_sums"] == bench.tail_flops(1283)
