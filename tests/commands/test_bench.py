"""badnet-bench (scripts/benchmark.py, badnet_jax.commands.bench): a benchmark run on real weights and faces."""

from __future__ import annotations

import json

from tests import numpy_ref
from tests.cli import run_cli
from tests.conftest import asset


def test_benchmark_cli_measures_the_input_scale_and_prints_a_summary(tmp_path):
    out = tmp_path / "b.json"
    proc = run_cli("benchmark", "--model", asset("models/hackml2020/sunglasses_bd_weights.h5"),
                   "--clean_valid", asset("faces/lab3/valid_subset.h5"), "--n_bd", "8", "--per_step_steps", "1",
                   "--repeats", "1", "--rank_by", "activation,l1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Input scale 255 (measured on 47 clean images" in proc.stderr
    result = json.loads(out.read_text())
    assert result["num_classes"] == 1283 and result["n_clean"] == 47 and result["n_bd"] == 8
    ranked = result["rankings"]
    assert ranked["orders"] == 2 and ranked["vs_one"] > 0
    # Two orders' FLOPs against one: the trunk once (55 images), the tail once per order (CPU: no batch rounding,
    # so each order's evaluations are the sweep's count), less the steps the two orders share. FLOPs per image
    # counted by hand (tests/numpy_ref.py).
    e, trunk = ranked["tail_evaluations_per_order"], 55 * numpy_ref.TRUNK_FLOPS
    assert e == round(result["head_evaluations_per_image"] * 55) and e < ranked["tail_evaluations_shared"] < 2 * e
    one = trunk + e * numpy_ref.TAIL_FLOPS[1283]
    assert abs(ranked["flop_ratio"] - (trunk + 2 * e * numpy_ref.TAIL_FLOPS[1283]) / one) < 1e-12
    assert 1 < ranked["flop_ratio_shared"] < ranked["flop_ratio"] < 2
    assert ranked["tail_rate_vs_trunk_for_2x"] == 0  # two orders are within 2x of one at any rates
    assert proc.stdout.strip().splitlines()[-1].startswith("fast sweep ")
    assert "% of the measured matmul peak" in proc.stdout
    flops = result["flops_per_image"]
    assert flops["tail_after_prefix_sums"] == numpy_ref.TAIL_FLOPS[1283]
