r"""Reproduce: the paper's comparisons that this machine can reach, in one command, and a
report beside the paper's tables.

  # CI-sized check of the whole pipeline (about a minute)
  python -m experiments.reproduce --budget=experiments/budgets/smoke.py --report_dir=/tmp/r

  # a 2-core CPU aimed at 90 minutes (smaller models and fewer steps, stated in the report)
  python -m experiments.reproduce --budget=experiments/budgets/cpu.py --report_dir=/tmp/r \
      --data_dir=/data/fpt

  # the paper's sizes and steps (for accelerators); any budget field can be overridden
  python -m experiments.reproduce --budget=experiments/budgets/paper.py \
      --report_dir=/shared/fpt_report --data_dir=/data/fpt \
      --budget.tasks.cifar10.sweep.seeds=0,1

A budget (experiments/budgets/*.py: `fpt_jax.reproduce`'s doc says what it holds) names
the tasks, each with its overrides and its `SweepConfig` of learning rates and seeds, and
the rows of `fpt_jax.rows`. Every (task, row) is a sweep cell in REPORT_DIR/cells/; an
interrupted reproduction resumes, another budget reuses every equal cell. Tasks without
their data and rows without reachable weights are skipped and listed. The report:
REPORT_DIR/report.md with its plots (fpt_jax/reproduce_report.py).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads
    from experiments import prologue
    prologue.start()

import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from fpt_jax import loop, reproduce_report
from fpt_jax.reproduce import check_budget, plan, run, weights_probe

F = flags.FLAGS
config_flags.DEFINE_config_file("budget", None, "The budget: experiments/budgets/{smoke,cpu,"
                                "paper}.py or your own; override fields with "
                                "--budget.<field>=<value>.", lock_config=True)
flags.DEFINE_string("report_dir", None, "Where the cells, report.md and its plots go.")
flags.DEFINE_string("data_dir", None, "Prepared datasets (experiments.prepare_data) and LRA "
                    "ListOps files; tasks without their data are skipped and listed.")
flags.DEFINE_list("tasks", [], "Train only these of the budget's tasks (default: all); the "
                  "report still shows every finished cell of the budget.")
flags.DEFINE_list("rows", [], "Train only these of the budget's rows (default: all); the "
                  "report still shows every finished cell of the budget.")
flags.DEFINE_bool("plan_only", False, "Print the cells and what is skipped; train nothing.")


def main(argv):
    cli.begin(argv)
    try:
        budget = F.budget
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        cli.fail(f"--budget: {e}")
    if budget is None:
        cli.fail("--budget is required: experiments/budgets/smoke.py, cpu.py or paper.py")
    if not F.report_dir:
        cli.fail("--report_dir is required: where the cells and report.md go")
    try:
        check_budget(budget)
        report_dir = cli.writable_dir(F.report_dir, "--report_dir")
        if F.data_dir and not os.path.isdir(F.data_dir):
            raise ValueError(f"--data_dir={F.data_dir}: no such directory")
        start = time.time()
        reachable = weights_probe()
        p = plan(budget, report_dir, F.data_dir, F.tasks, F.rows, reachable, dry=F.plan_only)
        # --tasks/--rows select what trains; the report covers the whole budget, whose every
        # cell is checked here, before anything trains.
        whole = plan(budget, report_dir, F.data_dir, reachable=reachable, dry=True) \
            if F.tasks or F.rows else p
    except (ValueError, TypeError, KeyError, OSError) as e:
        cli.fail(str(e))
    for task, row, why in p.skipped:
        print(f"skipped {task} / {row}: {why}", flush=True)
    print(f"{len({c.name for c in p.cells})} cells", flush=True)
    if F.plan_only:
        for c in p.cells:
            print(f"  {c.name}: lrs {c.learning_rates}, seeds {c.seeds}")
        return
    try:
        run(p, report_dir)
    except loop.Preempted as e:  # the cell in training checkpointed; the command resumes
        cli.stopped(e)
    except ValueError as e:
        cli.fail(str(e))
    path = reproduce_report.write(report_dir, budget, whole.cells, whole.skipped,
                                  command=shlex.join(["python", "-m", "experiments.reproduce",
                                                      *sys.argv[1:]]),
                                  wall_s=time.time() - start)
    print(f"report: {path}", flush=True)


def _parse_flags(argv: list[str]) -> list[str]:
    """As `cli.parse_plain_flags`, and an override of a field the budget has not
    (`--budget.rows.lstm.n_head=2` where that row sets no n_head) named as such."""
    try:
        return cli.parse_plain_flags(argv)
    except (AttributeError, KeyError) as e:
        cli.fail(f"--budget override of a field the budget does not have ({e}); add the field "
                  "to the budget file (experiments/budgets/*.py) or a copy of it")
    return []


def run_main() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
