"""fpt_jax/convergence.py and the report's steps-to-converge table: rows compared at the
learning rate their grids share, by the threshold and by each run's own plateau, the paper's
number only where it is the same quantity."""
import json
import runpy

import pytest

from fpt_jax import convergence, reproduce_report, results


def _cell(tmp_path, name, curves_by_lr, task="bit_xor", row="fpt"):
    """A finished cell on disk: for each (lr, seed) a run with its validation curve."""
    path = tmp_path / name
    path.mkdir()
    runs, lines = [], []
    for k, ((lr, seed), curve) in enumerate(sorted(curves_by_lr.items())):
        runs.append({"run": k, "seed": seed, "learning_rate": lr,
                     "best_val_accuracy": max(curve.values()),
                     "test": {"test": {"test/accuracy": max(curve.values())}}})
        lines += [json.dumps({"run": k, "step": s, "eval/accuracy": a})
                  for s, a in sorted(curve.items())]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    cell = results.Cell(name, {}, runs, path)
    cfg = runpy.run_path(f"experiments/configs/{task}.py")["get_config"](row)
    return reproduce_report.Row(task, row, None, cfg, cfg, cell, results.select(cell))


def test_threshold_and_plateau_steps_of_a_curve():
    curve = [(100, 0.5), (200, 0.9), (300, 0.975), (400, 0.98), (500, 0.97)]
    assert convergence.first_at(curve, 0.99) is None
    assert convergence.first_at(curve, 0.9) == 200
    assert convergence.plateau_step(curve) == 300  # within 1 point of its best, 0.98
    assert convergence.plateau_step([]) is None
    assert convergence.describe([300, None, 500]) == "400 (2/3)"
    assert convergence.describe([None, None]) == "not reached (0/2)"


def test_the_shared_learning_rate_is_the_one_nearest_the_papers(tmp_path):
    a = _cell(tmp_path, "a", {(lr, 0): {100: 0.5} for lr in (1e-4, 3e-4, 3e-3)}).cell
    b = _cell(tmp_path, "b", {(lr, 0): {100: 0.5} for lr in (3e-4, 3e-3, 1e-2)}).cell
    assert convergence.common_learning_rate([a, b]) == 3e-3  # |log(3)| < |log(1/3.3)|
    c = _cell(tmp_path, "c", {(1e-5, 0): {100: 0.5}}).cell
    assert convergence.common_learning_rate([a, c]) is None


def test_rows_are_compared_at_the_shared_rate_and_the_paper_only_for_the_same_quantity(
        tmp_path):
    fast, slow = {100: 0.6, 200: 0.995, 300: 1.0}, {100: 0.5, 200: 0.8, 300: 0.85}
    fpt = _cell(tmp_path, "fpt", {(1e-3, 0): fast, (1e-3, 1): fast, (3e-3, 0): slow,
                                  (3e-3, 1): slow}, row="fpt")
    random_row = _cell(tmp_path, "random", {(1e-3, 0): fast, (1e-3, 1): slow,
                                            (3e-3, 0): fast, (3e-3, 1): fast}, row="random")
    assert random_row.picked.learning_rate == 3e-3  # its own selection: not what is compared
    lines = reproduce_report.convergence_table([fpt, random_row], 0.99)
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[2] for row in table] == ["0.001", "0.001"]
    assert table[0][3] == "200 (2/2)" and table[0][4] == "200 (2/2)"
    assert table[0][5] == "5e+02"  # the paper's Bit XOR FPT count: 1e-3, every seed reached
    assert table[1][3] == "200 (1/2)"
    assert table[1][4] == "250 (2/2)"  # plateaus: 200 (best 1.0) and 300 (best 0.85)
    assert table[1][5] == "-"  # a seed never reached the threshold: not the same quantity


@pytest.mark.parametrize("lrs", [(3e-3,), (3e-4, 3e-3)])
def test_no_paper_number_away_from_its_learning_rate(tmp_path, lrs):
    fast = {100: 0.995, 200: 1.0}
    fpt = _cell(tmp_path, "fpt", {(lr, 0): fast for lr in lrs}, row="fpt")
    (row,) = [[c.strip() for c in line.strip("|").split("|")]
              for line in reproduce_report.convergence_table([fpt], 0.99)[2:]]
    assert row[3] == "100 (1/1)" and row[5] == "-"
