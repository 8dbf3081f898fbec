"""fpt_jax/rows.py at the paper budget: every row's config on every task is the paper's
setting for that row (the planner's cell and the report's reference alike)."""
import runpy
from pathlib import Path

import pytest

from fpt_jax import reproduce, reproduce_report, rows

PAPER_BUDGET = runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" /
                                  "budgets" / "paper.py"))["get_config"]()
# The paper's "Full transformer" has 3 blocks on these tasks (Lu et al., section 3.1), 12
# (GPT-2 small's) on the others; its LSTM is 3 x 768 trained at 3e-4 everywhere.
THREE_BLOCK_TASKS = {"cifar10", "listops", "cifar10_lra"}
PAPER_SETTING = {  # row -> (model, init, trainable, layers x width) of the paper's
    "fpt": ("gpt2", "pretrained", "fpt", "12 x 768"),
    "random": ("gpt2", "random", "fpt", "12 x 768"),
    "full": ("gpt2", "pretrained", "full", "12 x 768"),
    "scratch": ("gpt2", "random", "full", None),  # per task, below
    "lstm": ("lstm", "random", "full", "3 x 768"),
    # the original code's default: the recurrence frozen (freeze_trans=True)
    "lstm_original": ("lstm-original", "random", "input,ln,output", "3 x 768"),
}
CASES = [(t, r) for t in PAPER_BUDGET.tasks for r in PAPER_BUDGET.rows if r in PAPER_SETTING]


@pytest.mark.parametrize("task,row", CASES, ids=[f"{t}-{r}" for t, r in CASES])
def test_every_row_at_the_paper_budget_is_the_papers_setting(task, row):
    paper_cfg = reproduce.load_task_config(task)
    cell = reproduce.row_config(paper_cfg, row, dict(PAPER_BUDGET.rows[row]), lambda _: None)
    reference = reproduce.row_config(paper_cfg, row, {}, lambda _: None)
    model, init, trainable, size = PAPER_SETTING[row]
    if row == "scratch":
        size = "3 x 768" if task in THREE_BLOCK_TASKS else "12 x 768"
    for cfg in (cell, reference):
        assert (cfg.model, cfg.init, cfg.trainable) == (model, init, trainable)
        assert reproduce_report._architecture(cfg, row) == f"{model} {size}"
    if row.startswith("lstm"):
        assert cell.learning_rate == rows.LSTM_LEARNING_RATE == 3e-4
    # nothing the report would name as a difference from the paper's setting
    found = reproduce_report.Row(task, row, None, cell, reference, None, None)
    assert [d for d in reproduce_report.differences(found) if "proxy" not in d] == []
