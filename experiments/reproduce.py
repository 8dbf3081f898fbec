r"""Reproduce: the paper's comparisons that this machine can reach, in one command, and a
report beside the paper's tables.

  # CI-sized check of the whole pipeline (about a minute)
  python -m experiments.reproduce --budget=experiments/budgets/smoke.py --report_dir=/tmp/r

  # a 2-core CPU in at most 90 minutes (smaller models and fewer steps, stated in the report)
  python -m experiments.reproduce --budget=experiments/budgets/cpu.py --report_dir=/tmp/r \
      --data_dir=/data/fpt

  # the paper's sizes and steps (GPU/TPU pods); any budget field can be overridden
  python -m experiments.reproduce --budget=experiments/budgets/paper.py --report_dir=gs://.. \
      --data_dir=/data/fpt --budget.tasks.cifar10.seeds='(0,1)'

A budget (experiments/budgets/*.py, an ml_collections config) fixes per task the settings
that differ from the task's config (experiments/configs/<task>.py: the paper's), the
learning rates and seeds, and the rows: the comparisons of `fpt_jax/baselines.py` (frozen
pretrained GPT-2, frozen random GPT-2, full fine-tuning, the transformer from scratch, the
paper's LSTM and a parameter-matched one, the FNet reservoir) plus frozen MiniLM and its
architecture at random init, each with its own overrides (e.g. a smaller model on a CPU).
Also the paper's ablation: parameter groups added one at a time.

Every (task, row) is a sweep cell (a run group of `fpt_jax.loop`: its learning rates x seeds trained
together, selection on validation, test once at each run's best step) in
REPORT_DIR/cells/<task>__<row>~<hash>/, the hash over its exact settings: an interrupted
reproduction resumes, and a second one with another budget reuses every cell whose settings
are equal. Tasks whose data this machine does not have, and rows whose weights it cannot
reach, are skipped and listed with the reason. The report: REPORT_DIR/report.md with its
plots (fpt_jax/reproduce_report.py).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads
    from experiments import prologue
    prologue.start()

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from experiments import cli
from fpt_jax import sweep_cells
from fpt_jax import baselines, build, loop, reproduce_report, results
from fpt_jax.config import TrainConfig

CONFIGS = Path(__file__).parent / "configs"
# row -> (baseline variant, further changes): the comparisons, defined once
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "fpt": ("fpt", {}),
    "random": ("random", {}),
    "full": ("full", {}),
    "scratch": ("scratch", {}),
    "lstm": ("lstm", {}),
    "lstm_matched": ("lstm_matched", {}),
    "fnet": ("fnet", {}),
    "fnet_orthonormal": ("fnet", {"model": "fnet-orthonormal"}),
    "minilm": ("fpt", {"model": "minilm-l6", "weights": "minilm"}),
    "minilm_random": ("random", {"model": "minilm-l6"}),
}
# our task -> the paper's column it stands in for, when it is a proxy
PROXIES = {"fashion_mnist": "mnist"}

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


class Skip(Exception):
    """A task or row this machine cannot run; the message says why."""


@dataclasses.dataclass
class PlannedCell:
    task: str
    row: str
    selection: str | None  # an ablation cell's trainable selection; None: the main table
    cfg: TrainConfig
    learning_rates: list[float]
    seeds: list[int]
    reference: TrainConfig  # the same row at the paper's settings (the report's comparison)

    @property
    def settings(self) -> dict[str, Any]:
        return {"task": self.task, "row": self.row, "selection": self.selection}

    @property
    def name(self) -> str:
        exact = json.dumps([dataclasses.asdict(self.cfg), self.learning_rates, self.seeds],
                           sort_keys=True, default=str)
        tail = "" if self.selection is None else "__" + self.selection.replace(",", "+")
        return f"{self.task}__{self.row}{tail}~{hashlib.sha1(exact.encode()).hexdigest()[:8]}"


@dataclasses.dataclass
class Plan:
    cells: list[PlannedCell]
    skipped: list[tuple[str, str, str]]  # (task, row or '*', reason)


# --- planning -------------------------------------------------------------------------------

def task_config(task: str, tb: ConfigDict, data_dir: str | None, report_dir: Path,
                dry: bool = False) -> TrainConfig:
    """The task's config (the paper's settings) with the budget's overrides and its data;
    Skip when the data is not here."""
    path = CONFIGS / f"{task}.py"
    if not path.is_file():
        raise ValueError(f"budget task {task!r}: no experiments/configs/{task}.py")
    cfg = cli.load_config_file(str(path))
    changes = dict(tb.get("overrides", {}))
    if task == "listops":
        changes["data_dir"] = _listops_dir(tb, data_dir, report_dir, dry)
    elif data_dir and cfg.task not in ("bit_xor", "bit_memory"):
        changes["data_dir"] = data_dir
    try:
        cfg = dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as e:
        raise ValueError(f"budget task {task}, overrides: {e}") from None
    if dry and not Path(cfg.data_dir or "", "DONE").is_file() and task == "listops" \
            and "listops~" in str(cfg.data_dir):
        return cfg  # to be generated by the run
    try:
        build.prepare_task(cfg)  # every split opened: the data is here and well-formed
    except (ValueError, OSError) as e:
        raise Skip(f"no data: {e}") from None
    return cfg


def _listops_dir(tb: ConfigDict, data_dir: str | None, report_dir: Path,
                 dry: bool = False) -> str:
    """The LRA files when --data_dir holds them, else a generated set (the budget's sizes)."""
    from fpt_jax.tasks import listops
    name = "basic"
    if data_dir and all((Path(data_dir) / f"{name}_{f}.tsv").is_file()
                        for f in listops.SPLIT_FILES.values()):
        return data_dir
    if "generate" not in tb:
        raise Skip("no LRA ListOps files in --data_dir and the budget generates none")
    sizes = dict(tb.generate)
    target = report_dir / "data" / ("listops~" + hashlib.sha1(
        json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:8])
    if not (target / "DONE").is_file() and not dry:
        listops.write_listops(target, task_name=name, **sizes)
        (target / "DONE").write_text(json.dumps(sizes) + "\n")
    return str(target)


def row_config(base: TrainConfig, row: str, overrides: dict[str, Any],
               reachable: Callable[[TrainConfig], str | None]) -> TrainConfig:
    """The row's config on the task (`base`); Skip when its weights are not reachable."""
    if row not in ROWS:
        raise ValueError(f"budget row {row!r}; accepted: {sorted(ROWS)}")
    variant, changes = ROWS[row]
    cfg = baselines.variant(base, variant)
    cfg = dataclasses.replace(cfg, **{**changes, **overrides})
    why = reachable(cfg) if cfg.init == "pretrained" else None
    if why:
        raise Skip(why)
    return cfg


def weights_probe() -> Callable[[TrainConfig], str | None]:
    """Whether a pretrained row's weights load here (None) or why not; once per source."""
    seen: dict[tuple, str | None] = {}

    def reachable(cfg: TrainConfig) -> str | None:
        key = (cfg.model, cfg.weights)
        if key not in seen:
            try:
                build.backbone(cfg)
                seen[key] = None
            except Exception as e:  # offline hub, missing package: all mean "not here"
                seen[key] = ("pretrained weights not reachable: "
                             + str(e).splitlines()[0].split(" (")[0])
        return seen[key]
    return reachable


def plan(budget: ConfigDict, report_dir: Path, data_dir: str | None = None,
         tasks: list[str] | None = None, rows: list[str] | None = None,
         reachable: Callable[[TrainConfig], str | None] | None = None,
         dry: bool = False) -> Plan:
    """Every cell the budget asks for that this machine can run, and what it skips. `dry`:
    generate no data (a plan to look at)."""
    reachable = reachable or weights_probe()
    cells, skipped = [], []
    for name in unknown(tasks, budget.tasks) + unknown(rows, budget.rows):
        raise ValueError(f"--tasks/--rows: {name!r} is not in the budget (tasks: "
                         f"{list(budget.tasks)}; rows: {list(budget.rows)})")
    for task, tb in budget.tasks.items():
        if tasks and task not in tasks:
            continue
        try:
            base = task_config(task, tb, data_dir, report_dir, dry)
        except Skip as e:
            skipped.append((task, "*", str(e)))
            continue
        base = dataclasses.replace(base, converge_at=budget.get("converge_at"))
        lrs, seeds = [float(x) for x in tb.learning_rates], [int(s) for s in tb.seeds]
        if not lrs or not seeds:
            raise ValueError(f"budget task {task}: learning_rates={lrs} and seeds={seeds}; "
                             "accepted: at least one of each")
        paper_cfg = cli.load_config_file(str(CONFIGS / f"{task}.py"))
        wanted = [(row, None) for row in budget.rows if not rows or row in rows]
        if task in budget.ablation.get("tasks", [task]):  # default: every task
            wanted += [(row, sel) for row in budget.ablation.rows
                       for sel in budget.ablation.selections
                       if row in budget.rows and (not rows or row in rows)]
        for row, sel in wanted:
            try:
                cfg = row_config(base, row, dict(budget.rows[row]), reachable)
                sweep_cells.precheck(dataclasses.replace(cfg, trainable=sel or cfg.trainable))
            except Skip as e:
                if sel is None:
                    skipped.append((task, row, str(e)))
                continue
            except (ValueError, TypeError) as e:  # every cell checked before any trains
                raise ValueError(f"budget task {task}, row {row}"
                                 + (f", ablation {sel}" if sel else "") + f": {e}") from None
            reference = row_config(paper_cfg, row, {}, lambda _: None)
            if sel is not None:
                if sel == cfg.trainable:
                    continue  # the main cell is this column of the ablation
                cfg = dataclasses.replace(cfg, trainable=sel)
                reference = dataclasses.replace(reference, trainable=sel)
            cells.append(PlannedCell(task, row, sel, cfg, lrs, seeds, reference))
    return Plan(cells, skipped)


def check_budget(budget) -> None:
    """The budget's shape, before anything is created: its keys, its rows and tasks."""
    if not isinstance(budget, ConfigDict):
        try:
            budget.name  # config_flags defers a file's load error to the first access
        except OSError as e:
            raise ValueError(f"--budget: {str(e).splitlines()[0]}") from None
        except AttributeError:
            pass
        raise ValueError(f"--budget: get_config() returned {type(budget).__name__}; accepted: "
                         "an ml_collections ConfigDict (experiments/budgets/*.py)")
    for key in ("name", "description", "tasks", "rows", "ablation"):
        if key not in budget:
            raise ValueError(f"--budget: no field {key!r}; a budget has name, description, "
                             "tasks, rows, ablation (see experiments/budgets/smoke.py)")
    for task, tb in budget.tasks.items():
        for key in ("learning_rates", "seeds"):
            if key not in tb:
                raise ValueError(f"--budget.tasks.{task}: no field {key!r}")
    bad = [r for r in (*budget.rows, *budget.ablation.rows) if r not in ROWS]
    if bad:
        raise ValueError(f"--budget.rows: unknown rows {bad}; accepted: {list(ROWS)}")


def unknown(names: list[str] | None, known) -> list[str]:
    return [n for n in names or [] if n not in known]


# --- running --------------------------------------------------------------------------------

def run(p: Plan, report_dir: Path, log: Callable[[str], None] = print) -> dict[str, str]:
    """Trains every planned cell (finished ones are reused), one after another."""
    statuses = {}
    done: set[str] = set()
    for i, cell in enumerate(p.cells):
        if cell.name in done:  # an ablation cell equal to a main one
            continue
        done.add(cell.name)
        grid = sweep_cells.GridCell(i, cell.name, cell.settings, cell.cfg)
        log(f"[{len(done)}/{len({c.name for c in p.cells})}] {cell.task} / {cell.row}"
            + (f" / trainable={cell.selection}" if cell.selection else ""))
        statuses.update(sweep_cells.run_sweep([grid], report_dir, cell.learning_rates,
                                            cell.seeds, log=lambda m: log("  " + m),
                                            write_results=False))
    if done:
        results.write_results(report_dir)  # results.csv / .md of every cell, once
    return statuses


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
