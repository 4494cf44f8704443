"""badnet_jax.sweep.progress: the one-call sweep reports its chunks from inside the compiled call, on stderr, without
changing a result; off when stderr is not a terminal unless asked."""

from __future__ import annotations

import dataclasses

import io
import re

import jax
import numpy as np
import pytest

from badnet_jax import BadNet, init_params
from badnet_jax import sweep as sw
from badnet_jax.sweep import progress
from badnet_jax.sweep.anp import ANPConfig
from badnet_jax.sweep.rankings import RankingOptions, resolve_rankings
from badnet_jax.models.deepid import DeepID


def _label(line: str) -> str:
    return re.match(r"sweep +\d+%  (.*?)  \d+ s$", line).group(1)


def _sets(rng):
    make = lambda n: rng.integers(0, 256, size=(n, 55, 47, 3)).astype(np.uint8)
    return {"clean_valid": make(40), "bd_valid": make(24)}


def test_progress_shows_every_stage_and_changes_no_result(rng, capsys, backend_compiles):
    params, model = init_params(num_classes=9, seed=4), BadNet(9)
    sets = _sets(rng)
    off = sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=8, progress=False))
    assert capsys.readouterr().err == ""
    # Compiled ahead with progress, then run: the compiled program reports to the line active when it runs.
    options = sw.SweepOptions(chunk=8, progress=True)
    sw.compile_sweep(model, params, {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in sets.items()}, options)
    ahead = list(backend_compiles)
    on = sw.rank_and_sweep(model, params, sets, options)
    assert backend_compiles == ahead  # no second compile
    assert on.plan.progress and not off.plan.progress
    np.testing.assert_array_equal(on.orders, off.orders)
    np.testing.assert_array_equal(on.mean_activation, off.mean_activation)
    for name in sets:
        np.testing.assert_array_equal(on.all_preds[name], off.all_preds[name])
    *lines, last = capsys.readouterr().err.splitlines()
    # Not a terminal: one line per tenth of the work, every set's trunk and heads among them, then 100%.
    assert 5 <= len(lines) <= progress.LOG_STEPS + 1, lines
    pattern = r"sweep +\d+%  (clean_valid|bd_valid) (trunk|heads): chunk \d+/\d+  \d+ s"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    shown = {_label(l).split(":")[0] for l in lines}
    assert shown == {"clean_valid trunk", "clean_valid heads", "bd_valid trunk", "bd_valid heads"}, shown
    assert int(lines[-1].split()[1].rstrip("%")) >= 80
    assert re.fullmatch(r"sweep 100%  done  \d+ s", last), last


def test_sets_swept_as_one_block_report_as_one_stage_each_for_trunk_and_heads(rng, capsys):
    params, model = init_params(num_classes=9, seed=4), BadNet(9)
    sets = {**_sets(rng), "clean_test": rng.integers(0, 256, size=(16, 55, 47, 3)).astype(np.uint8)}
    sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=8, progress=True))
    *lines, last = capsys.readouterr().err.splitlines()
    shown = {_label(l).split(":")[0] for l in lines}
    assert shown == {"clean_valid trunk", "clean_valid heads", "bd_valid + clean_test trunk",
                     "bd_valid + clean_test heads"}, shown
    # One loop over the block's 24 + 16 images: 5 chunks of 8 (apart, 3 and 2).
    joined = [l for l in lines if "bd_valid + clean_test heads" in l]
    assert joined and all(re.search(r": chunk \d/5 ", l) for l in joined), lines
    assert last.startswith("sweep 100%  done  ")


def test_progress_is_on_by_default_only_on_a_terminal(monkeypatch):
    assert not sw.plan_sweep(sw.SweepOptions(), [], DeepID()).progress  # pytest's captured stderr is no terminal
    monkeypatch.setattr(sw.plan, "stderr_is_terminal", lambda: True)
    assert sw.plan_sweep(sw.SweepOptions(), [], DeepID()).progress
    assert not sw.plan_sweep(sw.SweepOptions(progress=False), [], DeepID()).progress
    with pytest.raises(sw.plan.ConfigError, match=r"progress=yes: expected True, False or None"):
        sw.plan_sweep(sw.SweepOptions(progress="yes"), [], DeepID())


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_rewritten_in_place_and_cleared(monkeypatch):
    monkeypatch.setattr(progress, "LIVE_INTERVAL_S", 0.0)
    out = _Terminal()
    with progress.showing([("a trunk", 10.0), ("a heads", 30.0)], True, out):
        for stage, blocks in ((0, 2), (1, 3)):
            for i in range(blocks):
                progress._chunk_started(stage, blocks, np.int32(i))
                progress._chunk_started(stage, blocks, np.int32(i))  # the same chunk on another device: once
    text = out.getvalue()
    assert "\n" not in text and text.endswith("\r\x1b[K")
    shown = [t.removesuffix("\x1b[K") for t in text.split("\r") if t and t != "\x1b[K"]
    assert [_label(s) for s in shown] == ["a trunk: chunk 1/2", "a trunk: chunk 2/2", "a heads: chunk 1/3",
                                                  "a heads: chunk 2/3", "a heads: chunk 3/3"]
    assert shown[-1].startswith("sweep  75%")  # trunk (10) done and 2 of the heads' 3 chunks (20 of 30) started
    progress._chunk_started(0, 2, 0)  # after the sweep: nothing active, nothing written, no error
    assert out.getvalue() == text


def test_a_sweep_that_fails_is_not_shown_done():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress.showing([("a trunk", 1.0)], True, out):
            progress._chunk_started(0, 2, 0)
            raise RuntimeError("the sweep failed")
    lines = out.getvalue().splitlines()
    assert lines and not [line for line in lines if "done" in line], lines


def test_a_broken_stderr_never_fails_the_sweep():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    with progress.showing([("a trunk", 1.0)], True, Broken()):
        progress._chunk_started(0, 1, 0)  # swallowed: an error here would abort the compiled call


def test_progress_of_a_set_whose_trunk_runs_beside_its_heads_is_one_stage(rng, capsys):
    params, model = init_params(num_classes=9, seed=4), BadNet(9)
    sets = _sets(rng)
    plain = sw.rank_and_sweep(model, params, sets, dataclasses.replace(sw.PLAIN, chunk=8))
    on = sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=8, progress=True, cumulative=True))
    assert on.plan.fuses_trunk
    for name in sets:
        np.testing.assert_array_equal(on.all_preds[name], plain.all_preds[name])
    *lines, last = capsys.readouterr().err.splitlines()
    shown = {_label(l).split(":")[0] for l in lines}
    assert shown == {"clean_valid trunk", "clean_valid heads", "bd_valid trunk and heads"}, shown
    assert int(lines[-1].split()[1].rstrip("%")) >= 80 and last.startswith("sweep 100%  done  ")


def test_without_a_ranking_set_every_block_runs_its_trunk_beside_its_heads(rng, capsys):
    params, model = init_params(num_classes=9, seed=4), BadNet(9)
    sets, order = _sets(rng), np.arange(60)[::-1]
    plain = sw.rank_and_sweep(model, params, sets, dataclasses.replace(sw.PLAIN, chunk=8), order=order, rank_on=None)
    on = sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=8, progress=True, cumulative=True),
                           order=order, rank_on=None)
    for name in sets:
        np.testing.assert_array_equal(on.all_preds[name], plain.all_preds[name])
    *lines, last = capsys.readouterr().err.splitlines()
    assert {_label(l).split(":")[0] for l in lines} == {"clean_valid + bd_valid trunk and heads"}, lines


def test_anps_optimisation_reports_its_steps_and_changes_no_result(rng, capsys):
    params, model = init_params(num_classes=9, seed=4), BadNet(9)
    sets = _sets(rng)
    labels = rng.integers(0, 9, size=len(sets["clean_valid"]))
    plan = resolve_rankings(RankingOptions(rank_by=("activation", "anp"), anp=ANPConfig(steps=30, batch=8)),
                            params, DeepID())
    run = lambda shown: sw.rank_and_sweep(model, params, sets, sw.SweepOptions(chunk=8, progress=shown),
                                          rankings=plan, rank_labels=labels)
    off = run(False)
    assert capsys.readouterr().err == ""
    on = run(True)
    np.testing.assert_array_equal(on.orders, off.orders)
    for name in sets:
        np.testing.assert_array_equal(on.all_preds[name], off.all_preds[name])
    *lines, last = capsys.readouterr().err.splitlines()
    steps = [re.fullmatch(r"anp ranking: step (\d+)/30", _label(line)) for line in lines]
    assert [int(m.group(1)) for m in steps if m], lines  # shown between the trunks' and heads' chunks
    assert all(1 <= int(m.group(1)) <= 30 for m in steps if m)
    assert re.fullmatch(r"sweep 100%  done  \d+ s", last), last
