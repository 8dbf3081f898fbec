"""The reproduction report: our numbers beside the paper's and Rothermel et al.'s.

`write(report_dir, budget, cells, skipped, ...)` reads the finished sweep cells that
experiments/reproduce.py planned (REPORT_DIR/cells/, `fpt_jax.results`) and writes
REPORT_DIR/report.md with:
  * the main table per task: each row's test accuracy (mean +- s.e. over seeds at the
    learning rate selected on validation), the paper's and Rothermel et al.'s number for the
    same comparison (`fpt_jax.paper`, cited), and how our setting differs from the paper's;
  * the paper's ablation (parameter groups added one at a time), steps to converge, and
    trainable / total parameter counts;
  * what was skipped and why; the budget, machine, commit and command;
  * plots: validation curves and accuracy against learning rate per task, a bar chart of
    the main table, and the Bit XOR attention map of the best frozen attention run.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

from fpt_jax import (align_report, attention_maps, baselines, build, convergence, paper,
                     results, trivial)
from fpt_jax.rows import ROWS, get as get_row
from fpt_jax.models import backbones

PROXY_TASK = {"fashion_mnist": "mnist"}  # our task -> the paper's column it stands in for
# Settings whose difference from the paper's a cell names.
_COMPARED_OPTIONS = ("n", "num_patterns", "patch_size", "image_size", "max_length")
_COMPARED = ("steps",
             "batch_size", "grad_accum")


@dataclasses.dataclass
class Row:
    """One planned cell as found on disk, with its selection (None before it finished)."""
    task: str
    row: str
    selection: str | None
    cfg: Any  # TrainConfig
    reference: Any  # the same row at the paper's settings (TrainConfig)
    cell: results.Cell | None
    picked: results.Selection | None

    @property
    def test(self) -> tuple[float, float] | None:
        return self.picked.test.get("test") if self.picked else None


def _architecture(cfg, row: str) -> str:
    preset = backbones.family_of_preset(cfg.model).presets[cfg.model]
    layers = cfg.n_layer or preset.n_layer
    if get_row(row).match is not None:
        return f"{cfg.model} {layers} x width matched to {get_row(row).match.model}"
    return f"{cfg.model} {layers} x {cfg.n_embd or preset.n_embd}"


def differences(r: Row) -> list[str]:
    """How the cell's setting differs from the paper's (its task config at the paper's
    settings, as the row is defined there)."""
    out = []
    if r.task in PROXY_TASK:
        out.append(f"{r.task} as a proxy for {PROXY_TASK[r.task]}")
    if r.task == "listops" and "listops~" in str(r.cfg.task_options.data_dir or ""):
        out.append("generated ListOps")
    ours, theirs = _architecture(r.cfg, r.row), _architecture(r.reference, r.row)
    if ours != theirs:
        out.append(f"model {ours} (paper's setting: {theirs})")
    if r.cfg.init == "random" and r.cfg.backbone_draw == "shared":
        out.append("one random backbone shared by its seeds (backbone_draw=shared; the "
                   "paper drew a fresh one per run: per_seed)")
    settings = [(n, r.cfg.task_options.get(n), r.reference.task_options.get(n))
                for n in _COMPARED_OPTIONS]
    settings += [(n, getattr(r.cfg, n), getattr(r.reference, n)) for n in _COMPARED]
    for name, a, b in settings:
        if a != b:
            out.append(f"{name} {a} (paper's setting: {b})")
    return out


def _pct(value: tuple[float, float] | None, n: int | None = None) -> str:
    if value is None:
        return "-"
    mean, se = value
    return f"{100 * mean:.1f} +- {100 * se:.1f}" + (f" (n={n})" if n else "")


def _paper(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return f"{value[0]:g} +- {value[1]:g}"
    return f"{value:g}"


def load_rows(report_dir: Path, planned: Sequence[Any]) -> list[Row]:
    """The planned cells (experiments.reproduce.PlannedCell) with what is on disk."""
    found = {c.name: c for c in results.load_cells(report_dir)}
    rows = []
    for p in planned:
        cell = found.get(p.name)
        picked = results.select(cell) if cell is not None and cell.finished else None
        rows.append(Row(p.task, p.row, p.selection, p.cfg, p.reference, cell, picked))
    order = list(ROWS)  # the report's row order, whatever the budget's
    return sorted(rows, key=lambda r: order.index(r.row))


def trivial_baselines(rows: Sequence[Row]) -> dict[str, list[trivial.Baseline]]:
    """Per task of `rows`, its trivial baselines, computed from its data (`fpt_jax.trivial`)."""
    out = {}
    for r in rows:
        if r.task not in out:
            try:
                out[r.task] = trivial.baselines(r.cfg.make_task())
            except (ValueError, OSError):  # its data is not here (a task not trained yet)
                out[r.task] = []
    return out


def _interval(r: Row) -> str:
    if not r.test:
        return "-"
    ci = trivial.interval(*r.test, r.picked.n_seeds)
    if ci is None:
        return "- (1 seed)"
    return f"[{max(100 * ci[0], 0):.1f}, {min(100 * ci[1], 100):.1f}]"  # clipped to [0, 100]


def _versus(r: Row, found: Sequence[trivial.Baseline]) -> str:
    """Where the row stands against the task's trivial baselines."""
    if not r.test:
        return "-"
    if not found:
        return "- (not computed: no data)"
    mean, se = r.test
    same = trivial.closest(mean, se, r.picked.n_seeds, found)
    if same is not None:
        return f"**not above {same.name}**"
    top = max(found, key=lambda b: b.accuracy)
    return f"above {top.name}" if mean > top.accuracy else f"below {top.name}"


def _lr(r: Row) -> str:
    if not (r.picked and r.picked.learning_rate):
        return "-"
    text, grid, edge = f"{r.picked.learning_rate:g}", r.picked.grid, r.picked.edge
    if len(grid) > 1:
        text += f" of {min(grid):g}..{max(grid):g} ({len(grid)}"
        text += f", {len(r.picked.added)} added at an edge)" if r.picked.added else ")"
    if edge == "single":
        return text + ", **one learning rate: not bracketed**"
    return text + (f", **at the {edge} edge**" if edge in ("low", "high") else "")


def main_table(rows: Sequence[Row], found: dict[str, list[trivial.Baseline]] | None = None
               ) -> list[str]:
    found = found if found is not None else trivial_baselines(rows)
    lines = []
    tasks = list(dict.fromkeys(r.task for r in rows))
    for task in tasks:
        proxy = PROXY_TASK.get(task)
        lines += [f"### {task}" + (f" (a proxy: the paper has no {task}; nothing here is "
                                   f"comparable with its {proxy})" if proxy else ""), "",
                  "| row | ours: test acc. % | 95% interval | selected lr (grid) | vs trivial "
                  "| paper (Lu et al.) | Rothermel et al. | how our setting differs |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in found[task]:
            lines.append(f"| trivial: {b.name} | {100 * b.accuracy:.1f} | - | - | - | - | - | "
                         f"{b.how}; computed on {b.examples:,} test examples |")
        for r in (r for r in rows if r.task == task and r.selection is None):
            ours = (_pct(r.test, r.picked.n_seeds) if r.test else
                    "not finished" if r.picked is None else "no test result")
            lu = None if proxy else paper.published(get_row(r.row).paper_row, task)
            ro = None if proxy else paper.ROTHERMEL.get(get_row(r.row).rothermel_row,
                                                        {}).get(task)
            lines.append(f"| {get_row(r.row).label} | {ours} | {_interval(r)} | {_lr(r)} | "
                         f"{_versus(r, found[task])} | {_paper(lu)} | {_paper(ro)} | "
                         f"{'; '.join(differences(r)) or 'as the paper'} |")
        if proxy:
            published = [f"{get_row(r.row).label} {_paper(v)}" for r in rows
                         if r.task == task and r.selection is None and (v := paper.published(
                             get_row(r.row).paper_row, proxy)) is not None]
            lines += ["", f"The paper's {proxy} numbers, another dataset (a linear model "
                      f"scores about 92% on MNIST and 84% on Fashion-MNIST), for orientation "
                      f"only: {'; '.join(published) or 'none for these rows'}."]
        lines.append("")
    return lines


def ablation_table(rows: Sequence[Row], budget) -> list[str]:
    selections = list(budget.ablation.selections)
    head = " | ".join(f"{paper.ABLATION_LABELS.get(s, s)}" for s in selections)
    lines = [f"| task | backbone | {head} |", "|---|---|" + "---|" * len(selections)]
    for task in dict.fromkeys(r.task for r in rows):
        col = PROXY_TASK.get(task, task)
        for row in budget.ablation.rows:
            cells = {(r.selection or r.cfg.trainable): r for r in rows
                     if r.task == task and r.row == row}
            if not any(r.selection for r in cells.values()):
                continue  # no ablation on this task (the budget's ablation.tasks)
            published = {} if task in PROXY_TASK else (
                paper.ABLATION if row == "fpt" else
                paper.ABLATION_RANDOM if row == "random" else {}).get(col, {})
            values = []
            for s in selections:
                r = cells.get(s)
                ours = _pct(r.test) if r is not None and r.test else "-"
                values.append(f"{ours} (paper {_paper(published.get(s))})")
            lines.append(f"| {task} | {get_row(row).label} | " + " | ".join(values) + " |")
    return lines


def convergence_table(rows: Sequence[Row], converge_at: float | None) -> list[str]:
    """Steps to converge per task at the learning rate its rows share (fpt_jax.convergence),
    by the threshold and by the plateau criterion; the paper's number where it is the same
    quantity."""
    level = f"{100 * converge_at:g}%" if converge_at else "a threshold (none set)"
    lines = [f"| task | row | learning rate (shared) | first step at >= {level} validation "
             f"(seeds reached) | first step within {100 * convergence.PLATEAU:g} point of "
             "its own best | paper (1e-3, its criterion) |", "|---|---|---|---|---|---|"]
    main = [r for r in rows if r.selection is None and r.cell is not None and r.cell.finished]
    for task in dict.fromkeys(r.task for r in main):
        compared = [r for r in main if r.task == task]
        lr = convergence.common_learning_rate([r.cell for r in compared])
        for r in compared:
            if lr is None:
                lines.append(f"| {task} | {get_row(r.row).label} | none shared by the rows' "
                             "grids | - | - | - |")
                continue
            threshold, plateau = convergence.steps_at(r.cell, lr, converge_at)
            pub = (paper.CONVERGENCE[r.task][paper.CONVERGENCE_ROWS.index(r.row)]
                   if r.row in paper.CONVERGENCE_ROWS and r.task in paper.CONVERGENCE
                   else None)
            same = (lr == convergence.PAPER_LEARNING_RATE and threshold
                    and all(s is not None for s in threshold))
            lines.append(f"| {task} | {get_row(r.row).label} | {lr:g} | "
                         f"{convergence.describe(threshold)} | "
                         f"{convergence.describe(plateau)} | "
                         f"{f'{pub:.0e}' if pub is not None and same else '-'} |")
    return lines


def count_table(rows: Sequence[Row]) -> list[str]:
    lines = ["| task | row | trainable | total |", "|---|---|---:|---:|"]
    for r in (r for r in rows if r.selection is None):
        task = r.cfg.make_task()
        config = build.backbone(r.cfg, task)[0]
        total = baselines.count(r.cfg, task, config, "full")
        trainable = (r.picked.trainable_params if r.picked and r.picked.trainable_params
                     else baselines.count(r.cfg, task, config, r.cfg.trainable))
        lines.append(f"| {r.task} | {get_row(r.row).label} | {trainable:,} | {total:,} |")
    return lines


# --- plots ----------------------------------------------------------------------------------

def _labelled(r: Row) -> results.Selection:
    return dataclasses.replace(r.picked, cell=dataclasses.replace(r.cell,
                                                                   name=get_row(r.row).label))


def plot_main(rows: Sequence[Row], path: Path,
              found: dict[str, list[trivial.Baseline]]) -> None:
    """A bar per (task, row): ours (mean +- s.e.), the paper's number as a black mark (none
    on a proxy task), each task's trivial baselines as dashed lines across its bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    main = [r for r in rows if r.selection is None and r.test]
    tasks = list(dict.fromkeys(r.task for r in main))
    names = list(dict.fromkeys(r.row for r in main))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * len(names) / 2), 4.5))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        labelled = False  # a row's first bar names it (a task may run a subset of rows)
        for i, task in enumerate(tasks):
            r = next((r for r in main if r.task == task and r.row == name), None)
            if r is None:
                continue
            x = i + (j - (len(names) - 1) / 2) * width
            ax.bar(x, 100 * r.test[0], width, yerr=100 * r.test[1], capsize=2,
                   color=f"C{j}", label=None if labelled else get_row(name).label)
            labelled = True
            lu = (None if task in PROXY_TASK else
                  paper.published(get_row(name).paper_row, task))
            if lu is not None:
                ax.plot(x, lu, "k_", markersize=12, markeredgewidth=2)
    for i, task in enumerate(tasks):
        for k, b in enumerate(sorted(found[task], key=lambda b: b.accuracy)):
            ax.hlines(100 * b.accuracy, i - 0.45, i + 0.45, colors="0.3",
                      linestyles="--" if k == 0 else ":", linewidth=1,
                      label=f"trivial: {b.name}" if i == 0 or not any(
                          c.name == b.name for t in tasks[:i] for c in found[t]) else None)
    ax.set_xticks(range(len(tasks)), [t + (" (proxy)" if t in PROXY_TASK else "")
                                      for t in tasks])
    ax.set_ylabel("test accuracy % (black mark: the paper's)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside, not on, the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write(report_dir: str | os.PathLike, budget, planned: Sequence[Any],
          skipped: Sequence[tuple[str, str, str]], command: str = "", wall_s: float = 0.0
          ) -> Path:
    """REPORT_DIR/report.md and its PNGs; returns the report's path."""
    report_dir = Path(report_dir)
    rows = load_rows(report_dir, planned)
    finished = [r for r in rows if r.picked is not None and r.selection is None]
    found = trivial_baselines(rows)
    plots = []
    for task in dict.fromkeys(r.task for r in finished):
        picked = [_labelled(r) for r in finished if r.task == task]
        for kind, fn in (("curves", results.plot_curves), ("lr", results.plot_learning_rates)):
            fn(picked, report_dir / f"{kind}_{task}.png", found[task])
            plots.append((f"{task}: validation accuracy" if kind == "curves" else
                          f"{task}: best validation accuracy against learning rate",
                          f"{kind}_{task}.png"))
    if any(r.test for r in finished):
        plot_main(rows, report_dir / "main.png", found)
        plots.insert(0, ("the main table: ours (bars, +- s.e.), the paper's (marks), the "
                         "trivial baselines (dashed and dotted)", "main.png"))
    attention = attention_map(rows, report_dir) if budget.get("attention_map") else None
    alignment = []
    if align_report.aligned(rows):
        alignment = ["## Input alignment (ORCA)", "",
                     "The held-out distance between the task's validation examples as the "
                     "input layer embeds them and held-out documents of the source text as "
                     "the backbone's word embeddings do (mean +- s.e. over seeds, at the "
                     "selected learning rate; the stage itself does not depend on it), "
                     "before and after the alignment stage (`fpt_jax/align.py`).", "",
                     *align_report.table(rows), ""]
        if align_report.plot(rows, report_dir / "align.png"):
            plots.append(("held-out distance during the alignment stage", "align.png"))
    ablation = ablation_table(rows, budget)
    if len(ablation) > 2:  # a budget without an ablation gets no empty section
        ablation = ["## Adding parameter groups one at a time", "",
                    "Test accuracy % of frozen backbones training the named groups (ours, "
                    "then the paper's in parentheses).", "", *ablation, ""]
    else:
        ablation = []
    trained_s = sum(max((float(x.get("wall_s") or 0) for x in r.cell.runs), default=0.0)
                    for r in rows if r.cell is not None and r.cell.finished)
    lines = [f"# Reproduction report: budget `{budget.name}`", "",
             f"{budget.description}.", "", *_header(command, wall_s), "",
             f"Training time of the {sum(1 for r in rows if r.picked)} finished cells, summed "
             f"(each cell's `wall_s` in its summary.json, recorded when it trained, possibly "
             f"by an earlier invocation): {trained_s / 60:.1f} min.", "",
             "## Main table", "",
             "Test accuracy at each run's best validation step, mean +- standard error over "
             "seeds (n), and the mean's 95% t interval, at the learning rate selected on mean "
             "validation accuracy (the grid searched; a selection at its edge is not "
             "bracketed). The trivial baselines are computed from each task's data "
             "(`fpt_jax/trivial.py`); 'not above' marks a row whose interval holds one. Rows "
             "whose intervals overlap are not ordered by these numbers. The paper's numbers "
             "are Lu et al.'s and Rothermel et al.'s (sources below).", "",
             *main_table(rows, found), *ablation,
             "## Steps to converge", "",
             "Every row of a task at the one learning rate their grids share (nearest the "
             "paper's 1e-3), so that rows are compared at the same rate: the mean first "
             "evaluation step at the threshold (over the seeds that reached it), and the "
             "first within 1 point of each run's own best (defined whatever the task's "
             "ceiling). The paper's number only where it is the same quantity (1e-3, the "
             "threshold reached by every seed).", "",
             *convergence_table(rows, budget.get("converge_at")),
             "", "## Parameter counts", "", *count_table(rows), "", *alignment,
             "## Skipped", ""]
    lines += [f"- {task} / {row}: {why}" for task, row, why in skipped] or ["- nothing"]
    lines += ["", "## Plots", ""]
    for title, name in plots:
        lines += [f"{title}:", "", f"![{title}]({name})", ""]
    if attention:
        lines += [f"Bit XOR attention, {attention[0]}:", "",
                  f"![Bit XOR attention]({attention[1]})", ""]
    lines += ["## Sources", ""]
    lines += [f"- {text}" for text in paper.CITATIONS.values()]
    lines += [f"- {text}" for text in paper.NOTES.values()]
    lines += ["", "## Budget", "", "```json", json.dumps(budget.to_dict(), indent=1,
                                                        default=str), "```", ""]
    path = report_dir / "report.md"
    tmp = report_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def attention_map(rows: Sequence[Row], report_dir: Path) -> tuple[str, str] | None:
    """The Bit XOR attention of the best frozen attention run (best mean validation
    accuracy; its best seed), as attention_bit_xor.png."""
    frozen = [r for r in rows if r.task == "bit_xor" and r.selection is None
              and get_row(r.row).draws_attention and r.picked and r.picked.val_mean is not None]
    if not frozen:
        return None
    best = max(frozen, key=lambda r: r.picked.val_mean)
    runs = {int(x["run"]): x for x in best.cell.runs}
    run = max(best.picked.run_ids, key=lambda k: runs[k].get("best_val_accuracy") or 0.0)
    group = best.cell.path / runs[run].get("group", "")  # a learning rate added at an edge
    attention_maps.render(str(group), str(report_dir / "attention_bit_xor.png"),
                          run=int(runs[run].get("group_run", run)))
    return (f"{get_row(best.row).label}, seed {runs[run].get('seed')}, learning rate "
            f"{runs[run].get('learning_rate'):g}", "attention_bit_xor.png")


def _header(command: str, wall_s: float) -> list[str]:
    import jax
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
            f"{jax.default_backend()} ({cpu}, {os.cpu_count()} cores, "
            f"{jax.device_count()} device(s)); fpt-jax commit {commit}, jax {jax.__version__}; "
            f"this invocation's wall time {wall_s / 60:.1f} min.", "", f"Command: `{command}`"]
