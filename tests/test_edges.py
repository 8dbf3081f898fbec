"""Learning rates bracketed (issue 26, item 5): the edge flag of a selection, the next point
beyond an edge, `--sweep.extend_edges` adding points to a cell until its selection is interior
(with a fake training loop, and once through the real loop), and how results show them."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fpt_jax import edges, loop, results, sweep
from tests.settings import train_config

TINY = dict(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16, batch_size=8,
            dropout=0.0, log_every=2, eval_every=2, eval_batches=1, checkpoint_every=2,
            num_devices=1, steps=4)


def _run(k: int, lr: float, seed: int, val: float | None) -> dict:
    return {"run": k, "learning_rate": lr, "seed": seed, "best_step": 4,
            "best_val_accuracy": val, "best_val_loss": None if val is None else 1 - val,
            "test": {"test": {"test/accuracy": val or 0.0, "test/loss": 0.5}},
            "steps_to_converge": None, "stopped_early": False, "last_step": 4,
            "wall_s": 1.0, "trainable_params": 10}


def _cell(accuracy: dict[float, float | None], seeds=(0, 1)) -> results.Cell:
    runs = [_run(k, lr, s, accuracy[lr] if accuracy[lr] is None else accuracy[lr] + s / 100)
            for k, (lr, s) in enumerate((lr, s) for lr in accuracy for s in seeds)]
    return results.Cell("c", {}, runs, Path("/nonexistent"))


# --- the edge flag -------------------------------------------------------------------------

def test_a_selection_inside_the_grid_is_bracketed():
    sel = results.select(_cell({1e-4: 0.6, 1e-3: 0.8, 1e-2: 0.7}))
    assert sel.learning_rate == 1e-3 and sel.grid == (1e-4, 1e-3, 1e-2) and sel.edge is None


def test_a_selection_at_the_smallest_learning_rate_is_the_low_edge():
    sel = results.select(_cell({1e-4: 0.9, 1e-3: 0.8, 1e-2: 0.7}))
    assert (sel.learning_rate, sel.edge) == (1e-4, "low")


def test_a_selection_at_the_largest_learning_rate_is_the_high_edge():
    sel = results.select(_cell({3e-3: 0.9, 1e-4: 0.5, 1e-3: 0.8}))  # grid sorted
    assert sel.grid == (1e-4, 1e-3, 3e-3) and (sel.learning_rate, sel.edge) == (3e-3, "high")


def test_a_one_point_grid_is_single_never_bracketed():
    sel = results.select(_cell({1e-3: 0.8}))
    assert (sel.learning_rate, sel.grid, sel.edge) == (1e-3, (1e-3,), "single")
    assert sel.edge is not None  # `if sel.edge:` reads "not bracketed"


def test_a_diverged_learning_rate_beyond_the_selection_brackets_it():
    sel = results.select(_cell({1e-4: 0.6, 1e-3: 0.8, 1e-2: None}))
    assert sel.grid == (1e-4, 1e-3, 1e-2) and (sel.learning_rate, sel.edge) == (1e-3, None)
    none = results.select(_cell({1e-3: None, 1e-2: None}))
    assert (none.learning_rate, none.edge, none.grid) == (None, None, (1e-3, 1e-2))


# --- the next point beyond an edge ---------------------------------------------------------

@pytest.mark.parametrize("grid,side,want", [
    ((1e-4, 1e-3, 1e-2), "high", 1e-1),
    ((1e-4, 1e-3, 1e-2), "low", 1e-5),
    ((1e-5, 3e-5), "high", 9e-5),
    ((1e-5, 3e-5, 9e-5), "high", 2.7e-4),  # an added point's spacing goes on
    ((3e-4, 1e-3, 3e-3), "high", 9e-3),  # uneven: the outermost pair's ratio (3)
    ((3e-4, 1e-3, 3e-3), "low", 9e-5),  # ... and on the other side (10/3)
    ((1e-3, 2e-3, 1e-2), "high", 5e-2),
    ((1e-2, 1e-3, 2e-3), "low", 5e-4),  # order of the grid does not matter
])
def test_the_point_beyond_an_edge_continues_the_outermost_log_spacing(grid, side, want):
    got = edges.beyond(grid, side)
    assert got == pytest.approx(want, rel=1e-3)
    points = sorted(grid)
    outer, inner = (points[-1], points[-2]) if side == "high" else (points[0], points[1])
    assert math.log(got / outer) == pytest.approx(math.log(outer / inner), rel=1e-3)
    assert got == float(f"{got:.4g}")  # rounded: a readable name and table entry


def test_the_point_beyond_needs_two_points_and_a_side():
    with pytest.raises(ValueError, match="needs a grid of >= 2"):
        edges.beyond((1e-3,), "high")
    with pytest.raises(ValueError, match="needs a grid of >= 2"):
        edges.beyond((1e-3, 1e-2), "single")


def test_an_added_point_names_its_own_directory_and_back():
    d = edges.extension_dir("/w/cells/c", 3.333e-3)
    assert d == Path("/w/cells/c/extend_0.003333") and edges.extension_lr(d) == 3.333e-3
    assert edges.extension_lr("checkpoints") is None and edges.extension_lr("extend_x") is None


def test_extend_edges_is_validated_naming_the_field():
    assert sweep.SweepConfig(learning_rates=(1e-3, 1e-2), extend_edges=3).validate() \
        .extend_edges == 3
    for bad, words in ((dict(extend_edges=-1), "an integer >= 0"),
                       (dict(extend_edges=1.5), "an integer >= 0"),
                       (dict(extend_edges=True), "an integer >= 0"),
                       (dict(extend_edges=1, learning_rates=(1e-3,)),
                        "needs >= 2 learning_rates")):
        with pytest.raises(ValueError, match=f"^extend_edges=.*{words}"):
            sweep.SweepConfig(**bad).validate()
    sweep.SweepConfig(learning_rates=(1e-3,), extend_edges=0).validate()  # a single lr: ok


# --- extending a cell, with a fake training loop -------------------------------------------

def peaked(lr: float, peak: float = 1e-4) -> float:
    """A validation accuracy that peaks at `peak`, falling by 0.1 per decade either side."""
    return round(0.9 - 0.1 * abs(math.log10(lr / peak)), 6)


class FakeTrain:
    """loop.train_and_evaluate's contract: summary.json and metrics.jsonl of the K runs in
    `workdir`, the validation accuracy `peaked(lr) + seed / 100`. `stop_at`: the workdirs it
    leaves unfinished (an interrupted group: a checkpoint, no summary), once each."""

    def __init__(self, peak: float = 1e-4, stop_at: tuple[str, ...] = ()):
        self.peak, self.stop_at, self.calls = peak, set(stop_at), []

    def __call__(self, cfg, workdir, learning_rates, seeds):
        self.calls.append((Path(workdir).name, list(learning_rates), list(seeds), cfg.steps))
        Path(workdir, "checkpoints").mkdir(parents=True, exist_ok=True)
        if Path(workdir).name in self.stop_at:
            self.stop_at.discard(Path(workdir).name)
            raise KeyboardInterrupt  # killed mid-group
        runs = [_run(k, lr, s, peaked(lr, self.peak) + s / 100)
                for k, (lr, s) in enumerate(zip(learning_rates, seeds))]
        Path(workdir, "metrics.jsonl").write_text("".join(json.dumps(
            {"step": 4, "run": r["run"], "learning_rate": r["learning_rate"],
             "seed": r["seed"], "eval/accuracy": r["best_val_accuracy"]}) + "\n" for r in runs))
        Path(workdir, "summary.json").write_text(json.dumps({"runs": runs}))
        return runs


def _sweep(tmp_path, fake, lrs=(1e-5, 3e-5), extend=2, steps=4, log=None, tables=False):
    cells = sweep.make_cells(train_config(**{**TINY, "steps": steps}), "")
    return sweep.run_sweep(cells, tmp_path, lrs, [0, 1], train_fn=fake,
                           log=(log if log is not None else []).append, extend_edges=extend,
                           write_results=tables)


def test_a_top_edge_selection_gains_points_above_until_it_is_interior(tmp_path):
    fake, log = FakeTrain(peak=1e-4), []
    assert _sweep(tmp_path, fake, log=log, tables=True) == {"base": "trained"}
    # 1e-5, 3e-5: the top is best -> 9e-5 (best again) -> 2.7e-4 (worse): 9e-5 is interior
    assert [c[:3] for c in fake.calls] == [("base", [1e-5, 1e-5, 3e-5, 3e-5], [0, 1, 0, 1]),
                                          ("extend_9e-05", [9e-5, 9e-5], [0, 1]),
                                          ("extend_0.00027", [2.7e-4, 2.7e-4], [0, 1])]
    (cell,) = results.load_cells(tmp_path)
    sel = results.select(cell)
    assert sel.learning_rate == 9e-5 and sel.edge is None and sel.added == (9e-5, 2.7e-4)
    assert sel.grid == (1e-5, 3e-5, 9e-5, 2.7e-4) and sel.n_seeds == 2
    assert [r["run"] for r in cell.runs] == list(range(8))  # numbered on, one cell
    assert [(r.get("group"), r.get("group_run")) for r in cell.runs[4:]] == [
        ("extend_9e-05", 0), ("extend_9e-05", 1), ("extend_0.00027", 0), ("extend_0.00027", 1)]
    assert not any("warning" in line for line in log)
    assert any("adding lr 9e-05 (1/2)" in line for line in log)
    # results: every added run in the csv, the grid with its added points in results.md
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["learning_rate"]), r["lr_added"]) for r in rows] == [
        (1e-5, "False"), (1e-5, "False"), (3e-5, "False"), (3e-5, "False"),
        (9e-5, "True"), (9e-5, "True"), (2.7e-4, "True"), (2.7e-4, "True")]
    md = (tmp_path / "results.md").read_text()
    assert "| base | 9e-05 | 1e-05, 3e-05, +9e-05, +0.00027 | 2 | 90.04 +- 0.50 |" in md
    assert "| base | 80.50 +- 0.50 | 85.27 +- 0.50 | 90.04 +- 0.50* (added) | 86.19 +- 0.50 " \
        "(added) |" in md
    # the same command again: nothing trains, the same selection
    assert _sweep(tmp_path, fake) == {"base": "finished"} and len(fake.calls) == 3
    assert results.select(results.load_cells(tmp_path)[0]).learning_rate == 9e-5


def test_a_bottom_edge_selection_gains_points_below(tmp_path):
    fake = FakeTrain(peak=1e-4)
    _sweep(tmp_path, fake, lrs=(1e-3, 1e-2), extend=3)
    assert [c[1][0] for c in fake.calls[1:]] == [1e-4, 1e-5]
    sel = results.select(results.load_cells(tmp_path)[0])
    assert (sel.learning_rate, sel.edge, sel.added) == (1e-4, None, (1e-5, 1e-4))


def test_a_cell_left_at_an_edge_after_n_points_is_a_warning(tmp_path):
    fake, log = FakeTrain(peak=1.0), []  # the best lies far above any grid
    _sweep(tmp_path, fake, lrs=(1e-5, 3e-5), extend=2, log=log, tables=True)
    assert len(fake.calls) == 3
    sel = results.select(results.load_cells(tmp_path)[0])
    assert (sel.learning_rate, sel.edge) == (2.7e-4, "high")
    (warning,) = [line for line in log if line.startswith("warning:")]
    assert "base" in warning and "top edge of its grid 1e-05..0.00027" in warning
    assert "extend_edges=2 reached" in warning
    md = (tmp_path / "results.md").read_text()
    assert "| 0.00027 (top edge of 1e-05..0.00027) |" in md
    # a larger N later: the finished points reused, the next one added
    _sweep(tmp_path, fake, lrs=(1e-5, 3e-5), extend=3)
    assert [c[0] for c in fake.calls[3:]] == ["extend_0.00081"]


def test_without_extend_edges_an_edge_cell_is_warned_about_and_nothing_added(tmp_path):
    fake, log = FakeTrain(peak=1.0), []
    _sweep(tmp_path, fake, extend=0, log=log)
    assert [c[0] for c in fake.calls] == ["base"]
    assert any(line.startswith("warning: cell 1/1 base: selected lr 3e-05 is at the top edge")
               and "extend_edges=N adds" in line for line in log)


def test_an_interrupted_added_point_resumes_and_finished_ones_never_retrain(tmp_path):
    fake = FakeTrain(peak=1e-4, stop_at=("extend_0.00027",))
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, fake)
    assert [c[0] for c in fake.calls] == ["base", "extend_9e-05", "extend_0.00027"]
    _sweep(tmp_path, fake)  # the same command: the interrupted point only
    assert [c[0] for c in fake.calls[3:]] == ["extend_0.00027"]
    assert results.select(results.load_cells(tmp_path)[0]).learning_rate == 9e-5


def test_a_cell_that_goes_on_takes_its_added_points_with_it(tmp_path):
    fake = FakeTrain(peak=1e-4)
    _sweep(tmp_path, fake)
    _sweep(tmp_path, fake, steps=8)  # more steps: the cell continues, and so do its points
    assert [(c[0], c[3]) for c in fake.calls[3:]] == [
        ("base", 8), ("extend_9e-05", 8), ("extend_0.00027", 8)]


def test_curves_of_a_selection_at_an_added_point_read_its_groups_metrics(tmp_path):
    _sweep(tmp_path, FakeTrain(peak=1e-4))
    sel = results.select(results.load_cells(tmp_path)[0])
    sources = {edges.metrics_source(sel.cell.path, r) for r in sel.cell.runs
               if r["run"] in sel.run_ids}
    assert sources == {(tmp_path / "cells/base/extend_9e-05/metrics.jsonl", 0),
                       (tmp_path / "cells/base/extend_9e-05/metrics.jsonl", 1)}


# --- through the real loop -----------------------------------------------------------------

@pytest.mark.slow
def test_extend_edges_through_the_real_loop_adds_trained_groups_and_resumes_them(tmp_path):
    """Real training of tiny Bit XOR groups (4 steps); the validation accuracies that the
    selection reads are replaced by `peaked` (the optimum beyond the grid, which 4 real steps
    cannot place reliably), so the mechanics are what is checked: added points trained as
    groups of every seed, their records, and a second call that trains nothing."""
    calls = []

    def train(cfg, workdir, learning_rates, seeds):
        calls.append(Path(workdir).name)
        out = loop.train_and_evaluate(cfg, workdir, learning_rates, seeds)
        for r in out:
            assert r["best_val_accuracy"] is not None  # really trained and evaluated
            r["best_val_accuracy"] = peaked(r["learning_rate"]) + r["seed"] / 100
        Path(workdir, "summary.json").write_text(json.dumps({"runs": out}))
        return out

    _sweep(tmp_path, train, tables=True)
    assert calls == ["base", "extend_9e-05", "extend_0.00027"]
    cell = tmp_path / "cells" / "base"
    for name, lr in (("extend_9e-05", 9e-5), ("extend_0.00027", 2.7e-4)):
        summary = json.loads((cell / name / "summary.json").read_text())
        assert [(r["run"], r["learning_rate"], r["seed"]) for r in summary["runs"]] == [
            (0, lr, 0), (1, lr, 1)]  # one group of every seed
        assert (cell / name / "checkpoints" / "4").is_dir()
        rows = [json.loads(line) for line in (cell / name / "metrics.jsonl").read_text()
                .splitlines()]
        assert {(r["run"], r["step"]) for r in rows if "eval/accuracy" in r} == {
            (0, 2), (0, 4), (1, 2), (1, 4)}
    sel = results.select(results.load_cells(tmp_path)[0])
    assert (sel.learning_rate, sel.edge, sel.added) == (9e-5, None, (9e-5, 2.7e-4))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    mtimes = {p: p.stat().st_mtime_ns for p in cell.rglob("summary.json")}
    assert _sweep(tmp_path, train) == {"base": "finished"} and len(calls) == 3
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert results.select(results.load_cells(tmp_path)[0]).learning_rate == 9e-5
