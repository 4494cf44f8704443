"""badnet-bench (scripts/benchmark.py, badnet_jax.commands.bench): a benchmark run on real weights and faces."""

from __future__ import annotations

import json
import os

import pytest

from badnet_jax.commands.processes import cpu_cores
from tests import numpy_ref
from tests.cli import run_cli, run_python
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


def test_benchmark_cli_times_each_layer_of_the_gap_example_on_the_named_machine(tmp_path):
    out = tmp_path / "g.json"
    proc = run_cli("benchmark", "--example", "gapnet", "--layers_only", "--layer_images", "64", "--repeats", "1",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["model"].startswith("gap_demo (32x32x3 input, 10 classes), pruning relu_3 (32 channels)")
    assert result["machine"] == result["cpu_model"] and result["jax"] and result["layer_images"] == 64
    assert "n_clean" not in result and "n_bd" not in result  # no sweep ran: no set sizes to report
    assert ("\nnoisy " in proc.stdout) == (result["noisy"] is not None)  # no line for a steady run's None
    names = [r["name"] for r in result["layers"]]
    assert names == ["conv_1", "conv_2", "conv_3", "output", "trunk", "head"]
    # 3x3 'same' convolutions of 16, 32, 32 channels, the second of stride 2, by hand.
    conv = [2 * 32 * 32 * 9 * 3 * 16, 2 * 16 * 16 * 9 * 16 * 32, 2 * 16 * 16 * 9 * 32 * 32]
    assert [r["flops_per_image"] for r in result["layers"][:3]] == conv
    assert result["layers"][4]["flops_per_image"] == sum(conv)
    peak = result["matmul_peak_gflops"]
    for r in result["layers"]:
        assert abs(r["peak_share"] * peak - r["gflops"]) < 1e-9 * peak
    header = proc.stdout.splitlines()[0]
    assert header.startswith(f"badnet-bench on {result['machine']} (jax {result['jax']}, cpu)")
    table = proc.stdout[proc.stdout.index("per layer, 64 images"):]
    assert all(f"\n{name} " in table for name in names)
    assert proc.stdout.strip().splitlines()[-1].startswith("trunk ")
    # The layers run as badnet-prune's sweep runs: the images sharded over one CPU device per core.
    cores = cpu_cores()
    assert result["layer_blocks"]["devices"] == cores and {r["devices"] for r in result["layers"]} == {cores}
    assert (f"64 images sharded over {cores} devices as the sweep ({64 // cores} on each) in blocks of"
            in table.splitlines()[0]) == (cores > 1)


def test_benchmark_cli_shards_over_the_devices_it_is_given(tmp_path):
    out = tmp_path / "g.json"
    proc = run_cli("benchmark", "--example", "gapnet", "--layers_only", "--layer_images", "63", "--repeats", "1",
                   "--devices", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["layer_blocks"]["devices"] == 1 and {r["devices"] for r in result["layers"]} == {1}
    assert result["layer_images"] == 63 and "sharded" not in proc.stdout
    proc = run_cli("benchmark", "--example", "gapnet", "--layers_only", "--devices", cpu_cores() + 1, "--out", out)
    assert proc.returncode == 2
    more = cpu_cores() + 1
    assert f"--devices {more}: asked for {more} devices, only {cpu_cores()} available" in proc.stderr


def test_the_commands_leave_the_cpu_device_count_unset_until_they_run():
    # Importing a command must not start JAX's backend: the command then gives the CPU one device per core.
    for command in ("bench", "prune"):
        proc = run_python(f"import jax._src.xla_bridge as xb, badnet_jax.commands.{command}; "
                          "print(xb.backends_are_initialized())")
        assert proc.returncode == 0 and proc.stdout.strip() == "False", (command, proc.stderr[-2000:])


def test_benchmark_cli_sweeps_any_keras_cnn(tmp_path):
    out = tmp_path / "v.json"
    proc = run_cli("benchmark", "--model", asset("models/other/vgg_tiny.h5"), "--input_scale", "255", "--n_clean",
                   "24", "--n_bd", "8", "--per_step_steps", "1", "--repeats", "1", "--layer_images", "16", "--out",
                   out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["num_classes"] == 7 and result["steps"] == 17 and result["input_scale"] == "255"
    assert result["n_clean"] == 24 and result["sweep_fast_s"] > 0 and result["per_step_loop_s"] > 0
    flops = result["flops_per_image"]
    stages = {r["name"]: r for r in result["layers"]}
    parts = {p: sum(r["flops_per_image"] for r in result["layers"][:-2] if r["part"] == p)
             for p in ("trunk", "affine", "tail")}
    assert flops["trunk"] == parts["trunk"] == stages["trunk"]["flops_per_image"] > 0
    assert flops["masked_head"] == parts["affine"] + parts["tail"] == stages["head"]["flops_per_image"]
    assert proc.stdout.strip().splitlines()[-1].startswith("fast sweep ")


def test_benchmark_cli_refuses_an_example_with_files(tmp_path):
    proc = run_cli("benchmark", "--example", "gapnet", "--model", "B.h5", "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "--example" in proc.stderr and "--model" in proc.stderr


def test_benchmark_cli_names_the_flag_of_a_file_it_cannot_read(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
    weights = tmp_path / "cnn.weights.h5"
    model.save_weights(str(weights))
    proc = run_cli("benchmark", "--model", weights, "--layers_only", "--out", tmp_path / "x.json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--model {weights}: not the lab's DeepID (no layer" in proc.stderr
    missing = tmp_path / "none.h5"
    proc = run_cli("benchmark", "--clean_valid", missing, "--layers_only", "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and f"--clean_valid {missing}: file not found" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv,complaint", [
    (["--n_clean", "0"], "--n_clean 0: expected a whole number of at least 1"),
    (["--repeats", "0"], "--repeats 0: expected a whole number of at least 1"),
    (["--layer", "conv_2"], "--layer conv_2 needs --model or --example"),
    (["--layers_only", "--ablation"], "--ablation is not timed with --layers_only"),
    (["--layers_only", "--rank_by", "activation"], "--rank_by is not timed with --layers_only"),
    (["--layer_images", "0"], "--layer_images 0: expected a whole number of at least 1"),
])
def test_benchmark_cli_refuses_what_it_would_not_time(tmp_path, argv, complaint):
    out = tmp_path / "x.json"
    proc = run_cli("benchmark", "--layer_images", "8", *argv, "--out", out)  # argv's own value last, so it wins
    assert proc.returncode == 2 and complaint in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("argv, complaint", [
    (["--layer_images", "1", "--devices", "2"], "error: --layer_images 1: fewer images than the 2 devices they are "
                                                "sharded over; give at least 2 (or fewer --devices)"),
    (["--scaling", "1,3"], "error: --scaling 1,3: 3 devices, but 2 available"),
    (["--scaling", "0"], "error: --scaling 0: 0 devices, but 2 available"),
])
def test_benchmark_cli_refuses_device_counts_it_cannot_shard_over(tmp_path, argv, complaint):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}  # two CPU devices whatever the cores
    extra = ["--layers_only"] if "--layer_images" in argv else ["--per_step_steps", "1", "--repeats", "1"]
    proc = run_cli("benchmark", "--example", "gapnet", *extra, *argv, "--out", tmp_path / "x.json", env=env)
    assert proc.returncode == 2 and complaint in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()
