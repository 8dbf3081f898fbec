"""A sweep's results (issue 15, part 3): the cells' summaries and metrics -> tables and plots.

A sweep workdir holds one directory per grid cell, `WORKDIR/cells/<name>/`, with
`cell.json` (the cell's grid settings and config, written by experiments/sweep.py),
`summary.json` (`{"runs": [...]}`, one entry per learning rate x seed run, written by
`fpt_jax.loop.train_and_evaluate`) and `metrics.jsonl` (rows with `run`, `step` and
`eval/accuracy` on validation). From these:

- `WORKDIR/results.csv`: one row per run (the cell, its grid settings, learning rate, seed,
  best validation accuracy and its step, test accuracy and loss at that step per test
  split, steps to converge, whether it stopped early, trainable parameters, wall time).
- `WORKDIR/results.md`: per cell, the learning rate selected on the MEAN best validation
  accuracy over seeds (ties: the smaller learning rate; only learning rates whose every
  seed has a validation accuracy compete: a run that diverged before its first evaluation
  has none, one that diverged later competes with its best finite evaluation), and at
  that learning rate the test accuracy as mean +- standard error over seeds, with the
  number of seeds. The standard error is `std(ddof=1) / sqrt(n)`; with one seed it is 0
  (no spread can be measured).
  Then every learning rate's mean validation accuracy per cell. Each cell's learning-rate
  grid is shown, and a selection at its top or bottom edge (or of a single learning rate)
  marked as not bracketed (`fpt_jax.edges`); the points `--sweep.extend_edges` added beyond
  the grid (`cells/<name>/extend_<lr>/`) are read with the cell's runs, everywhere.
- `WORKDIR/curves.png`: validation accuracy against step per cell at its selected
  learning rate: the mean over seeds, and a band from the lowest to the highest seed.
- `WORKDIR/lr.png`: mean best validation accuracy (+- standard error) against learning
  rate per cell, log x axis.

Everything is a function of plain paths and dicts (no flags); `write_results(workdir)` does
it all.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from fpt_jax import edges, trivial

CELLS = "cells"
CELL_FILE = "cell.json"


@dataclasses.dataclass
class Cell:
    """One grid cell as found on disk. `runs` is summary.json's list ([] before it exists)."""
    name: str
    settings: dict[str, Any]
    runs: list[dict[str, Any]]
    path: Path
    index: int = 0
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.runs)


@dataclasses.dataclass
class Selection:
    """A cell's selected learning rate and its numbers over seeds."""
    cell: Cell
    learning_rate: float | None
    n_seeds: int
    val_mean: float | None
    val_se: float | None
    test: dict[str, tuple[float, float]]  # split -> (mean, s.e.) of test accuracy
    per_lr: dict[float, tuple[float | None, float | None, int]]  # lr -> (mean, s.e., n)
    run_ids: list[int]  # the runs of the selected learning rate
    steps_to_converge: list[int | None]
    trainable_params: int | None
    grid: tuple[float, ...] = ()  # every learning rate the cell trained, added ones included
    edge: str | None = None  # edges.edge: "low", "high", "single" (not bracketed) or None
    added: tuple[float, ...] = ()  # the learning rates a sweep added beyond the grid


# --- reading --------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_cells(workdir: str | os.PathLike) -> list[Cell]:
    """Every cell directory of `WORKDIR/cells/` (those with a cell.json), in grid order."""
    root = Path(workdir) / CELLS
    cells = []
    if not root.is_dir():
        return cells
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = _read_json(d / CELL_FILE)
        if not isinstance(meta, dict):
            continue
        summary = _read_json(d / "summary.json")
        runs = summary.get("runs", []) if isinstance(summary, dict) else []
        runs = edges.cell_runs(d, runs) if runs else []  # with the points added beyond
        cells.append(Cell(meta.get("name", d.name), dict(meta.get("settings", {})),
                          list(runs), d, int(meta.get("index", 0)),
                          dict(meta.get("config") or {})))
    cells.sort(key=lambda c: (c.index, c.name))
    return cells


def read_eval_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The validation rows of a metrics.jsonl (those with `eval/accuracy`), one per (run,
    step): the last written wins (a resumed run may repeat a step); torn lines skipped."""
    rows: dict[tuple[int, int], dict] = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "eval/accuracy" in row and "step" in row:
                    rows[(int(row.get("run", 0)), int(row["step"]))] = row
    except OSError:
        return []
    return [rows[k] for k in sorted(rows)]


# --- statistics -----------------------------------------------------------------------------

def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error `std(ddof=1) / sqrt(n)` (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def _test_metric(run: dict, split: str, metric: str = "accuracy") -> float | None:
    """A run's test metric on `split` (keys `test/<metric>` or `test_<split>/<metric>`)."""
    entry = (run.get("test") or {}).get(split) or {}
    value = next((v for k, v in entry.items() if k.rsplit("/", 1)[-1] == metric), None)
    return None if value is None else float(value)


def split_names(cells: Sequence[Cell]) -> list[str]:
    """The test splits found in any run, in first-seen order."""
    splits: dict[str, None] = {}
    for cell in cells:
        for run in cell.runs:
            for split in (run.get("test") or {}):
                splits.setdefault(split, None)
    return list(splits)


def select(cell: Cell) -> Selection:
    """The learning rate with the best mean best-validation-accuracy over seeds (ties: the
    smaller one). A learning rate competes only if all of its runs have a validation
    accuracy; the number of seeds is that of the selected learning rate. `grid` holds every
    learning rate trained (competing or not: one that diverged above the selection brackets
    it as well), `edge` where the selection sits in it (`fpt_jax.edges.edge`)."""
    by_lr: dict[float, list[dict]] = {}
    for run in cell.runs:
        by_lr.setdefault(float(run["learning_rate"]), []).append(run)
    per_lr: dict[float, tuple[float | None, float | None, int]] = {}
    best = None
    for lr in sorted(by_lr):
        vals = [r.get("best_val_accuracy") for r in by_lr[lr]]
        if any(v is None for v in vals):
            per_lr[lr] = (None, None, len(vals))
            continue
        mean, se = mean_se([float(v) for v in vals])
        per_lr[lr] = (mean, se, len(vals))
        if best is None or mean > per_lr[best][0]:
            best = lr
    grid, added = tuple(sorted(by_lr)), edges.added(cell.runs)
    if best is None:
        return Selection(cell, None, 0, None, None, {}, per_lr, [], [], None, grid, None, added)
    runs = sorted(by_lr[best], key=lambda r: int(r.get("seed", 0)))
    test = {}
    for split in split_names([cell]):
        accs = [_test_metric(r, split) for r in runs]
        if all(a is not None for a in accs):
            test[split] = mean_se(accs)
    params = {r.get("trainable_params") for r in runs}
    return Selection(cell, best, len(runs), per_lr[best][0], per_lr[best][1], test, per_lr,
                     [int(r["run"]) for r in runs], [r.get("steps_to_converge") for r in runs],
                     params.pop() if len(params) == 1 else None, grid, edges.edge(grid, best),
                     added)


# --- tables ---------------------------------------------------------------------------------

def _split_column(split: str, what: str) -> str:
    return f"test_{what}" if split == "test" else f"test_{what}/{split}"


def run_rows(cells: Sequence[Cell]) -> tuple[list[str], list[dict[str, Any]]]:
    """results.csv's header and rows: one row per run of every finished cell."""
    fields: dict[str, None] = {}
    for cell in cells:
        for k in cell.settings:
            fields.setdefault(k, None)
    splits = split_names(cells)
    header = ["cell", *fields, "learning_rate", "seed", "best_val_accuracy", "best_step",
              "best_val_loss"]
    for split in splits:
        header += [_split_column(split, "accuracy"), _split_column(split, "loss")]
    header += ["steps_to_converge", "stopped_early", "diverged_step", "last_step",
               "trainable_params", "wall_s", "lr_added"]
    rows = []
    for cell in cells:
        for run in sorted(cell.runs, key=lambda r: int(r.get("run", 0))):
            row = {"cell": cell.name, **{k: _plain(cell.settings.get(k, "")) for k in fields}}
            for k in ("learning_rate", "seed", "best_val_accuracy", "best_step", "best_val_loss",
                      "steps_to_converge", "stopped_early", "diverged_step", "last_step",
                      "trainable_params", "wall_s"):
                row[k] = run.get(k)
            row["lr_added"] = bool(run.get("group"))  # trained beyond the grid (edges)
            for split in splits:
                row[_split_column(split, "accuracy")] = _test_metric(run, split, "accuracy")
                row[_split_column(split, "loss")] = _test_metric(run, split, "loss")
            rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return header, rows


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else value


def csv_text(cells: Sequence[Cell]) -> str:
    header, rows = run_rows(cells)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _pct(mean: float | None, se: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + ("" if se is None else f" +- {100 * se:.2f}")


def markdown(cells: Sequence[Cell], selections: Sequence[Selection] | None = None,
             pending: Sequence[str] = ()) -> str:
    """results.md: the selected learning rate per cell with test accuracy over seeds, then
    every learning rate's mean validation accuracy."""
    selections = selections if selections is not None else [select(c) for c in cells if c.runs]
    splits = split_names(cells)
    fields: dict[str, None] = {}
    for cell in cells:
        for k in cell.settings:
            fields.setdefault(k, None)
    lines = ["# Sweep results", "",
             "Per cell: the learning rate with the best mean validation accuracy over seeds "
             "(each run's best evaluation); test accuracy at each run's best step, "
             "mean +- standard error over seeds (std with ddof=1 / sqrt(n); 0 with one seed). "
             "Accuracies in %. Converged: seeds whose validation accuracy reached "
             "converge_at, and their mean first step ('-': converge_at not set). "
             "A selected lr at the top or bottom edge of its cell's grid is not bracketed "
             "(the best may lie beyond: --sweep.extend_edges adds points there); nor is the "
             "one lr of a single-lr grid. lr grid: the learning rates trained; +: added "
             "beyond the grid by --sweep.extend_edges.", ""]
    head = ["cell", *fields, "selected lr", "lr grid", "seeds", "val acc"]
    head += [f"test acc ({s})" if s != "test" else "test acc" for s in splits]
    head += ["converged (seeds)", "trainable params"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sel in selections:
        row = [sel.cell.name, *(str(_plain(sel.cell.settings.get(k, ""))) for k in fields)]
        if sel.learning_rate is None:
            row += ["-", _grid(sel), "0", "-"] + ["-"] * len(splits) + ["-", "-"]
        else:
            conv = [s for s in sel.steps_to_converge if s is not None]
            converged = (f"{len(conv)}/{sel.n_seeds}"
                         + (f" (mean step {sum(conv) / len(conv):.0f})" if conv else ""))
            recorded = [r.get("converge_at", sel.cell.config.get("converge_at", 0))
                        for r in sel.cell.runs]
            if not conv and all(c is None for c in recorded):
                converged = "-"  # not recorded (converge_at not set)
            row += [_selected(sel), _grid(sel), str(sel.n_seeds), _pct(sel.val_mean, sel.val_se)]
            row += [_pct(*sel.test[s]) if s in sel.test else "-" for s in splits]
            row += [converged, "-" if sel.trainable_params is None
                    else f"{sel.trainable_params:,}"]
        lines.append("| " + " | ".join(row) + " |")
    lrs = sorted({lr for sel in selections for lr in sel.per_lr})
    if lrs:
        lines += ["", "## Mean validation accuracy per learning rate", "",
                  "Best validation accuracy per run, mean +- s.e. over seeds; * marks the "
                  "selected learning rate; - a learning rate with a run that has no "
                  "validation accuracy (it diverged before its first evaluation): not "
                  "selectable. (d: runs that diverged later; their best finite "
                  "evaluation counts.) (added): a learning rate added beyond the cell's grid.",
                  ""]
        head = ["cell", *(f"{lr:g}" for lr in lrs)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for sel in selections:
            row = [sel.cell.name]
            for lr in lrs:
                mean, se, _ = sel.per_lr.get(lr, (None, None, 0))
                mark = "*" if lr == sel.learning_rate else ""
                div = sum(1 for r in sel.cell.runs if float(r["learning_rate"]) == lr
                          and r.get("diverged_step") is not None)
                row.append(_pct(mean, se) + mark + (f" ({div}d)" if div else "")
                           + (" (added)" if lr in sel.added else ""))
            lines.append("| " + " | ".join(row) + " |")
    if pending:
        lines += ["", "Not finished (no summary yet): " + ", ".join(pending) + "."]
    return "\n".join(lines) + "\n"


def _selected(sel: Selection) -> str:
    """The selected learning rate, marked when nothing brackets it."""
    text = f"{sel.learning_rate:g}"
    if sel.edge in edges.SIDES:
        side = "top" if sel.edge == "high" else "bottom"
        return text + f" ({side} edge of {sel.grid[0]:g}..{sel.grid[-1]:g})"
    return text + (" (single lr)" if sel.edge == edges.SINGLE else "")


def _grid(sel: Selection) -> str:
    return ", ".join(("+" if lr in sel.added else "") + f"{lr:g}" for lr in sel.grid) or "-"


# --- plots ----------------------------------------------------------------------------------

def plot_curves(selections: Sequence[Selection], path: str | os.PathLike,
                levels: Sequence = ()) -> None:
    """curves.png: validation accuracy vs step per cell at its selected learning rate, the
    mean over seeds and a min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sel in selections:
        if sel.learning_rate is None:
            continue
        # an added learning rate's runs log to their own group's metrics.jsonl
        sources = [edges.metrics_source(sel.cell.path, r) for r in sel.cell.runs
                   if int(r["run"]) in sel.run_ids]
        by_step: dict[int, list[float]] = {}
        for source in sorted({p for p, _ in sources}):
            ids = {k for p, k in sources if p == source}
            for row in read_eval_rows(source):
                if int(row.get("run", 0)) in ids:
                    by_step.setdefault(int(row["step"]), []).append(
                        float(row["eval/accuracy"]))
        steps = sorted(by_step)
        if not steps:
            continue
        means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        line, = ax.plot(steps, means, marker="o", markersize=3,
                        label=f"{sel.cell.name} (lr {sel.learning_rate:g})")
        ax.fill_between(steps, [min(by_step[s]) for s in steps],
                        [max(by_step[s]) for s in steps], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy at the selected learning rate (mean, min-max over seeds)",
                 fontsize=9)
    _finish(fig, ax, path, levels)


def plot_learning_rates(selections: Sequence[Selection], path: str | os.PathLike,
                        levels: Sequence = ()) -> None:
    """lr.png: mean best validation accuracy (+- s.e.) vs learning rate per cell, log x; the
    points a sweep added beyond the grid hollow, a selection at an edge named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sel in selections:
        points = [(lr, m, se) for lr, (m, se, _) in sorted(sel.per_lr.items()) if m is not None]
        if not points:
            continue
        lrs, means, ses = zip(*points)
        mark = {"low": " (bottom edge)", "high": " (top edge)"}.get(sel.edge, "")
        bars = ax.errorbar(lrs, means, yerr=ses, marker="o", capsize=3,
                           label=sel.cell.name + mark)
        extra = [(lr, m) for lr, m, _ in points if lr in sel.added]
        if extra:  # the added points hollow, so the grid the sweep was given stays visible
            ax.plot(*zip(*extra), "o", mfc="white", color=bars.lines[0].get_color(),
                    zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best validation accuracy (mean over seeds)")
    _finish(fig, ax, path, levels)


# --- all of it ------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_plot(fn, selections, path: Path, levels: Sequence = ()) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fn(selections, tmp, levels)
    os.replace(tmp, path)


def write_results(workdir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """results.csv, results.md, curves.png and lr.png in `workdir` from its finished cells
    (unfinished ones are listed in results.md as pending). Returns the paths written."""
    workdir = Path(workdir)
    cells = load_cells(workdir)
    done = [c for c in cells if c.finished]
    selections = [select(c) for c in done]
    paths = {"csv": workdir / "results.csv", "md": workdir / "results.md"}
    found = trivial.for_configs([c.config for c in done])
    _write_text(paths["csv"], csv_text(done))
    _write_text(paths["md"], markdown(done, selections,
                                      [c.name for c in cells if not c.finished])
                + "\n".join(trivial.markdown(found, trivial.not_above(selections, found)))
                + ("\n" if found else ""))
    # one task: its trivial baselines drawn across the plots too
    levels = found[0][1] if len(found) == 1 and not isinstance(found[0][1], str) else []
    if plots:
        paths["curves"] = workdir / "curves.png"
        paths["lr"] = workdir / "lr.png"
        _write_plot(plot_curves, selections, paths["curves"], levels)
        _write_plot(plot_learning_rates, selections, paths["lr"], levels)
    return paths


def _finish(fig, ax, path: str | os.PathLike, levels: Sequence = ()) -> None:
    """The trivial baselines (`fpt_jax.trivial.Baseline`) as dashed lines, legend (when there
    are lines), grid, saved as PNG, closed."""
    import matplotlib.pyplot as plt
    for k, b in enumerate(levels):
        ax.axhline(b.accuracy, color="0.3", linestyle=("--", ":", "-.")[k % 3], linewidth=1,
                   label=f"trivial: {b.name} ({100 * b.accuracy:.1f}%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
