"""badnet_jax.bench.grid: the fast sweep timed for every combination of a few options (``badnet-bench --grid``).

The spec's parsing and its refusals, the combinations, what each row times (the plan the planner resolved, the
one-order sweep once per distinct plan, the rankings per row), the fastest row, the table, and the command
end to end in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from badnet_jax import ConfigError
from badnet_jax.attack.gap_demo import gap_model
from badnet_jax.bench import grid
from badnet_jax.sweep import SweepOptions, plan_sweep
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.commands.processes import cpu_cores
from tests.cli import run_cli


def test_a_spec_parses_to_typed_values_in_its_order():
    assert grid.parse_grid(" impl = reference,pallas ; batch_steps=8, 16 ;; chunk=4096;") == (
        ("impl", ("reference", "pallas")), ("batch_steps", (8, 16)), ("chunk", (4096,)))
    assert grid.parse_grid("orders_per_call=1,5") == (("orders_per_call", (1, 5)),)
    assert grid.parse_grid("batch_steps=+8,0") == (("batch_steps", (8, 0)),)


@pytest.mark.parametrize("spec, problem", [
    ("bogus=1", "'bogus=1' is not OPTION=V1,V2 with OPTION one of impl, batch_steps, chunk, orders_per_call"),
    ("batch_steps", "'batch_steps' is not OPTION=V1,V2"),
    ("batch_steps=8,x", "batch_steps takes whole numbers, got '8,x'"),
    ("chunk=\u0664\u0660\u0669\u0666", "chunk takes whole numbers"),  # Arabic-Indic digits: int() reads 4096
    ("chunk=4096.0", "chunk takes whole numbers"),
    ("chunk=1;chunk=2", "chunk is named twice"),
    ("impl=,", "impl has no values"),
    ("batch_steps=8,4,8", "batch_steps names 8 twice"),
    (" ; ", "no option to vary"),
])
def test_a_bad_spec_is_refused_naming_the_flag_and_the_problem(spec, problem):
    with pytest.raises(ConfigError) as err:
        grid.parse_grid(spec)
    assert "grid" in str(err.value) and problem in str(err.value)
    assert err.value.field == "grid"


def test_the_combinations_are_the_product_first_option_slowest_the_rest_from_the_base():
    base = SweepOptions(impl="reference", chunk=100, group=False)
    options = grid.grid_options(base, (("batch_steps", (0, 4, 8)), ("orders_per_call", (1, 2))))
    assert [(o.batch_steps, o.orders_per_call) for o in options] == [(0, 1), (0, 2), (4, 1), (4, 2), (8, 1), (8, 2)]
    assert all(dataclasses.replace(o, batch_steps=None, orders_per_call=1) ==
               dataclasses.replace(base, batch_steps=None) for o in options)


@pytest.fixture(scope="module")
def gap():
    model = gap_model()
    params = model.init_params(0)
    rng = np.random.default_rng(0)
    sets = {name: rng.integers(0, 256, size=(n, *model.input_hwc), dtype=np.uint8)
            for name, n in (("clean_valid", 40), ("bd_valid", 24))}
    return model, params, sets


class _Recorder:
    """Stands in for ``rank_and_sweep``: records each call's plan and rankings, returns a sweep-like result with
    the times given."""

    def __init__(self, device_s: float = 0.002, settle_s: float = 0.001):
        self.calls, self.times = [], (device_s, settle_s)

    def __call__(self, model, params, sets, plan, rank_on="clean_valid", rankings=None, rank_labels=None):
        self.calls.append((plan, rankings, rank_on))
        device, settle = self.times
        return type("S", (), {"seconds": {"device": device, "settle": settle},
                              "orders": np.zeros((1, 1))})()


def test_each_row_times_its_own_plan_and_the_one_order_sweep_once_per_distinct_plan(gap, monkeypatch):
    model, params, sets = gap
    recorder = _Recorder()
    monkeypatch.setattr(grid, "rank_and_sweep", recorder)
    monkeypatch.setattr(grid, "compile_sweep", lambda *a, **k: None)
    rankings = resolve_rankings(RankingOptions(rank_by=("activation", "l1")), params, model)
    candidates = grid.grid_options(SweepOptions(impl="reference"), (("batch_steps", (4, 8)),
                                                                    ("orders_per_call", (1, 2))))
    out = grid.time_grid(model, params, sets, candidates, repeats=3, rankings=rankings)
    rows = out["rows"]
    assert [(r["plan"]["batch_steps"], r["plan"]["orders_per_call"]) for r in rows] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    one = [p for p, r, _ in recorder.calls if r is None]
    ranked = [p for p, r, _ in recorder.calls if r is rankings]
    assert {on for _, _, on in recorder.calls} == {"clean_valid"}  # the first set ranks
    # One untimed call and 3 timed per distinct one-order plan (orders_per_call does not change it), the same per
    # row with the rankings.
    assert [p.batch_steps for p in one] == [4] * 4 + [8] * 4
    assert [(p.batch_steps, p.orders_per_call) for p in ranked] == [
        (4, 1)] * 4 + [(4, 2)] * 4 + [(8, 1)] * 4 + [(8, 2)] * 4
    assert rows[0]["s"] == rows[1]["s"] and rows[0]["compile_s"] == rows[1]["compile_s"]
    for row in rows:
        assert (row["device_s"], row["settle_s"]) == (0.002, 0.001)
        assert row["vs_one"] == row["rankings_s"] / row["s"]


def test_real_sweeps_are_timed_and_the_fastest_rows_named(gap):
    """Three real candidates on the small GAP model: the cumulative sweep (batch_steps=0), and batched steps with one
    and with two orders per call, which share one one-order plan (orders_per_call serves the rankings only)."""
    model, params, sets = gap
    rankings = resolve_rankings(RankingOptions(rank_by=("activation", "l1")), params, model)
    candidates = [SweepOptions(batch_steps=0), SweepOptions(batch_steps=4),
                  SweepOptions(batch_steps=4, orders_per_call=2)]
    out = grid.time_grid(model, params, sets, candidates, repeats=1, rankings=rankings,
                         rank_labels=np.zeros(len(sets["clean_valid"]), np.int32))
    rows = out["rows"]
    assert len(rows) == 3
    for options, row in zip(candidates, rows):
        assert row["options"] == {"impl": options.impl, "batch_steps": options.batch_steps, "chunk": options.chunk,
                                  "orders_per_call": options.orders_per_call}
        planned = plan_sweep(options, list(sets.values()), model)  # what the planner resolves, asked directly
        assert row["plan"] == {"strategy": planned.strategy, "impl": planned.impl, "batch_steps": planned.batch_steps,
                               "chunk": planned.chunk, "orders_per_call": planned.orders_per_call,
                               "devices": planned.devices}
        assert row["s"] > 0 and row["device_s"] > 0 and row["settle_s"] >= 0 and row["compile_s"] > 0
        assert row["s"] >= row["device_s"] + row["settle_s"]  # one timed run: the whole call holds both parts
        assert row["rankings_s"] > 0 and row["rankings_device_s"] > 0
        assert row["vs_one"] == row["rankings_s"] / row["s"]
    assert [r["plan"]["batch_steps"] for r in rows] == [0, 4, 4]
    # the GAP model's logits are affine in the mask: without batched steps it is swept cumulatively
    assert [r["plan"]["strategy"] for r in rows] == ["cumulative", "prefix_batched", "prefix_batched"]
    assert [r["plan"]["orders_per_call"] for r in rows] == [1, 1, 2]
    # The two batched rows differ only in orders_per_call: one one-order timing for both, each its own rankings.
    assert all(rows[1][k] == rows[2][k] for k in ("s", "device_s", "settle_s", "compile_s"))
    assert rows[0]["s"] != rows[1]["s"]
    assert out["best"]["one_order"]["row"] == min(range(3), key=lambda i: rows[i]["s"])
    assert rows[out["best"]["one_order"]["row"]]["s"] == min(r["s"] for r in rows)
    assert rows[out["best"]["rankings"]["row"]]["rankings_s"] == min(r["rankings_s"] for r in rows)
    for what in ("one_order", "rankings"):
        assert out["best"][what]["plan"] == rows[out["best"][what]["row"]]["plan"]


def test_without_rankings_only_the_one_order_sweep_is_timed(gap):
    model, params, sets = gap
    out = grid.time_grid(model, params, sets, [SweepOptions(batch_steps=0, impl="reference")], repeats=1)
    (row,) = out["rows"]
    assert row["s"] >= row["device_s"] > 0 and "rankings_s" not in row and "vs_one" not in row
    assert out["best"] == {"one_order": {"row": 0, "plan": row["plan"]}}


def test_a_combination_the_planner_refuses_is_named_before_anything_is_timed(gap, monkeypatch):
    model, params, sets = gap

    def never(*args, **kwargs):
        raise AssertionError("timed before every combination was planned")

    monkeypatch.setattr(grid, "rank_and_sweep", never)
    monkeypatch.setattr(grid, "compile_sweep", never)
    candidates = grid.grid_options(SweepOptions(), (("batch_steps", (4, 0)), ("orders_per_call", (2,))))
    with pytest.raises(ConfigError, match=r"grid: the combination impl=auto batch_steps=0 chunk=default "
                                          r"orders_per_call=2 cannot run: orders_per_call > 1 needs batch_steps > 0"):
        grid.time_grid(model, params, sets, candidates, repeats=1,
                       rankings=resolve_rankings(RankingOptions(rank_by=("activation", "l1")), params, model))


def test_any_set_names_the_first_one_ranking(gap):
    model, params, sets = gap
    renamed = {"mine": sets["clean_valid"], "theirs": sets["bd_valid"]}
    out = grid.time_grid(model, params, renamed, [SweepOptions(impl="reference")], repeats=1)
    assert out["rows"][0]["s"] > 0


def test_orders_per_call_without_rankings_is_refused_as_changing_nothing(gap):
    model, params, sets = gap
    candidates = grid.grid_options(SweepOptions(batch_steps=4), (("orders_per_call", (2,)),))
    with pytest.raises(ConfigError, match="orders_per_call only changes how several rankings are swept; give "
                                          "rankings too"):
        grid.time_grid(model, params, sets, candidates, repeats=1)


def test_the_table_has_a_line_per_row_and_marks_the_fastest():
    def row(batch, s, ranked):
        return {"plan": {"strategy": "prefix_dedupe", "impl": "reference", "batch_steps": batch, "chunk": 256,
                         "orders_per_call": 1, "devices": 2},
                "s": s, "device_s": s / 2, "settle_s": s / 4, "rankings_s": ranked, "vs_one": ranked / s}

    result = {"rows": [row(0, 0.010, 0.050), row(8, 0.020, 0.030)],
              "best": {"one_order": {"row": 0}, "rankings": {"row": 1}}}
    lines = grid.format_grid(result).splitlines()
    assert len(lines) == 3 and lines[0].split()[:6] == ["strategy", "impl", "batch", "chunk", "opc", "devs"]
    assert lines[1].split()[:10] == ["prefix_dedupe", "reference", "0", "256", "1", "2", "10.00", "5.00", "2.50",
                                     "50.00"]
    assert lines[1].endswith("<- fastest: one order") and lines[2].endswith("<- fastest: rankings")
    result["best"]["rankings"]["row"] = 0
    assert grid.format_grid(result).splitlines()[1].endswith("<- fastest: one order, rankings")
    alone = {"rows": result["rows"][:1], "best": {"one_order": {"row": 0}}}  # one row: nothing to be faster than
    assert "fastest" not in grid.format_grid(alone)


def test_badnet_bench_grid_times_each_combination_and_prints_the_table(tmp_path):
    out = tmp_path / "g.json"
    proc = run_cli("benchmark", "--example", "gapnet", "--grid", "batch_steps=4,8", "--repeats", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["plan"]["batch_steps"] for r in result["grid"]["rows"]] == [4, 8]
    assert "layers" not in result and "sweep_fast_s" not in result  # the grid alone
    fastest = result["grid"]["rows"][result["grid"]["best"]["one_order"]["row"]]
    summary = (f"grid of 2: the fastest whole curve {1e3 * fastest['s']:.2f} ms (strategy=prefix_batched "
               f"impl={fastest['plan']['impl']} batch_steps={fastest['plan']['batch_steps']} "
               f"chunk={fastest['plan']['chunk']} orders_per_call=1 devices={cpu_cores()})")
    # a busy machine's run says so after the summary (its matmul peak measured twice, far apart)
    noisy = "" if result["noisy"] is None else f" [NOISY: {result['noisy']}]"
    assert proc.stdout.strip().splitlines()[-1] == summary + noisy == result["summary"]
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:5] == ["strategy", "impl", "batch", "chunk", "opc"])
    table = lines[head + 1:head + 3]  # one line per row, in the grid's order, the fastest marked
    assert [line.split()[2] for line in table] == ["4", "8"]
    best = result["grid"]["best"]["one_order"]["row"]
    assert [line.endswith("<- fastest: one order") for line in table] == [i == best for i in range(2)]


def test_badnet_bench_grid_with_one_ranking_reports_it_in_the_singular(tmp_path):
    out = tmp_path / "g.json"
    proc = run_cli("benchmark", "--example", "gapnet", "--grid", "batch_steps=4", "--rank_by", "l1",
                   "--repeats", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert "; 1 order fastest " in summary and "x one (" in summary, summary
    assert "fastest" not in proc.stdout.split("grid of 1")[0]  # one row: the table marks nothing


@pytest.mark.parametrize("args, message", [
    (["--grid", "bogus=1"], "error: --grid bogus=1: 'bogus=1' is not OPTION=V1,V2"),
    (["--grid", "batch_steps=4", "--layers_only"], "error: --layers_only is not timed with --grid"),
    (["--grid", "batch_steps=4", "--per_step_steps", "2"], "error: --per_step_steps is not timed with --grid"),
    (["--grid", "batch_steps=4", "--kernel_block_n", "16"], "error: --kernel_block_n is not timed with --grid"),
    (["--kernel_block_n", "16,0", "--layers_only"], "error: --kernel_block_n 16,0: block sizes must be at least 1"),
    # an option given outside the grid is named as given
    (["--grid", "chunk=8", "--batch_steps", "-1"], "error: --batch_steps"),
    (["--grid", "batch_steps=8;orders_per_call=2"], "error: --grid: orders_per_call only changes how several "
                                                    "rankings are swept; give --rank_by too"),
    # the memory budget the planner checks each combination against is the bench's own flag
    (["--grid", "batch_steps=4", "--memory_budget", "0.00001"], "GiB resident but the memory budget is 1e-05 GiB; "
                                                                "raise --memory_budget or use fewer images"),
    (["--grid", "batch_steps=4", "--memory_budget", "-1"], "error: --memory_budget -1.0 must be a positive number"),
])
def test_badnet_bench_refuses_a_bad_grid_naming_the_flags(args, message, tmp_path):
    proc = run_cli("benchmark", "--example", "gapnet", *args, "--repeats", "1", "--out", tmp_path / "g.json")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "g.json").exists()
