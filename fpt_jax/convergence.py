"""Steps to converge, like for like: the rows of a task compared at one learning rate, by two
criteria, from each run's validation curve.

The paper reports approximate steps to converge at a fixed learning rate (1e-3). Our
selected learning rates differ between rows (a frozen random GPT-2 may pick 3e-3, FPT 1e-3),
and a higher rate converges sooner, so steps at each row's own selection compare rates as
much as models. Here every row of a task is read at the learning rate that all of their
grids share (the one nearest the paper's 1e-3), and by two criteria:
  * threshold: the first evaluation at >= `converge_at` validation accuracy (0.99): only
    meaningful on tasks whose ceiling is above it;
  * plateau: the first evaluation within `PLATEAU` (1 point) of the run's own best
    validation accuracy: defined on every task, whatever its ceiling.
The paper's number is shown only where it measures the same quantity: at 1e-3, by the
threshold, reached by every seed; elsewhere its column is left empty.
"""
from __future__ import annotations

import math
from typing import Sequence

from fpt_jax import edges, results

PLATEAU = 0.01  # within 1 point of the run's own best
PAPER_LEARNING_RATE = 1e-3  # the paper's steps to converge are at this rate


def curves(cell: results.Cell) -> dict[int, list[tuple[int, float]]]:
    """Each run's validation curve: run -> [(step, accuracy)] in step order (a learning
    rate a sweep added beyond the grid reads its own group's metrics, fpt_jax.edges)."""
    out: dict[int, list[tuple[int, float]]] = {}
    sources: dict = {}
    for run in cell.runs:
        path, index = edges.metrics_source(cell.path, run)
        sources.setdefault(path, {})[index] = int(run["run"])
    for path, ids in sources.items():
        for row in results.read_eval_rows(path):
            run = ids.get(int(row.get("run", 0)))
            if run is not None:
                out.setdefault(run, []).append((int(row["step"]), float(row["eval/accuracy"])))
    return out


def first_at(curve: Sequence[tuple[int, float]], level: float) -> int | None:
    """The first step whose accuracy is >= `level` (None: never)."""
    return next((step for step, acc in curve if acc >= level), None)


def plateau_step(curve: Sequence[tuple[int, float]], within: float = PLATEAU) -> int | None:
    """The first step within `within` of the curve's own best accuracy."""
    if not curve:
        return None
    return first_at(curve, max(acc for _, acc in curve) - within)


def common_learning_rate(cells: Sequence[results.Cell],
                         prefer: float = PAPER_LEARNING_RATE) -> float | None:
    """The learning rate every cell trained (all of its seeds), nearest `prefer` in log
    distance; None when their grids share none."""
    shared = None
    for cell in cells:
        lrs = {float(r["learning_rate"]) for r in cell.runs}
        shared = lrs if shared is None else shared & lrs
    if not shared:
        return None
    return min(sorted(shared), key=lambda lr: abs(math.log(lr / prefer)))


def steps_at(cell: results.Cell, lr: float, converge_at: float | None
             ) -> tuple[list[int | None], list[int | None]]:
    """(threshold steps, plateau steps) of the cell's runs at learning rate `lr`, one per
    seed (None: not reached / no curve)."""
    runs = sorted((r for r in cell.runs if float(r["learning_rate"]) == lr),
                  key=lambda r: int(r.get("seed", 0)))
    found = curves(cell)
    threshold, plateau = [], []
    for r in runs:
        curve = found.get(int(r["run"]), [])
        threshold.append(first_at(curve, converge_at) if converge_at else None)
        plateau.append(plateau_step(curve))
    return threshold, plateau


def describe(steps: Sequence[int | None]) -> str:
    """'mean (reached/seeds)', or 'not reached (0/n)'."""
    got = [s for s in steps if s is not None]
    if not steps:
        return "-"
    if not got:
        return f"not reached (0/{len(steps)})"
    return f"{sum(got) / len(got):,.0f} ({len(got)}/{len(steps)})"
