"""Learning rates bracketed (issue 26, item 5): whether a cell's selected learning rate lies at
the edge of its grid, the next grid point beyond that edge, and the points a sweep added.

A selection at the smallest or largest learning rate of a cell's grid is not an optimum: the
best one may lie beyond. `edge(grid, lr)` says so ("low", "high"; "single" for a grid of one
point, which brackets nothing; None for an interior selection). `--sweep.extend_edges=N`
(`fpt_jax.sweep`) then trains the next point beyond that edge, `beyond(grid, side)`: the
outermost spacing on that side continued in log space, until the selection is interior or N
points were added to the cell.

On disk an added point is a run group of its own (that learning rate x every seed) inside
its cell, `cells/<name>/extend_<lr>/`, trained and resumed by the same loop as the cell's
own group: the cell's group and its records never change, so a finished point is never
trained again and resume stays exact. `cell_runs` merges the cell's runs and those of its
added points for selection and the tables: an added point's runs carry `group` (the
directory's name) and `group_run` (their index in it), and a `run` numbered after the
cell's own.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

SIDES = ("low", "high")  # the edges a selection can sit at (and an added point extends)
SINGLE = "single"  # one learning rate: nothing to bracket, nothing to extend
EXTEND = "extend_"
SIGNIFICANT = 4  # an added learning rate is rounded to this many digits (readable names)


def edge(grid: Sequence[float], lr: float | None) -> str | None:
    """Where `lr` sits in `grid`: "low" / "high" when it is the smallest / largest of >= 2
    points, "single" for a grid of one point, None when interior (bracketed) or no `lr`."""
    if lr is None or not grid:
        return None
    if len(set(grid)) < 2:
        return SINGLE
    if lr == min(grid):
        return "low"
    return "high" if lr == max(grid) else None


def beyond(grid: Sequence[float], side: str) -> float:
    """The next learning rate beyond the `side` edge of `grid`: the ratio of its two
    outermost points on that side applied once more (log spacing continued), rounded to
    SIGNIFICANT digits."""
    points = sorted(set(float(x) for x in grid))
    if len(points) < 2 or side not in SIDES:
        raise ValueError(f"beyond({points}, {side!r}): needs a grid of >= 2 learning rates "
                         f"and a side in {SIDES}")
    outer, inner = (points[-1], points[-2]) if side == "high" else (points[0], points[1])
    exact = outer * (outer / inner)
    if not (math.isfinite(exact) and exact > 0):
        raise ValueError(f"beyond({points}, {side!r}): {exact} is not a learning rate")
    rounded = float(f"{exact:.{SIGNIFICANT}g}")
    # outer points that differ past the 4th digit: rounding could land back on the grid
    further = rounded > outer if side == "high" else rounded < outer
    return rounded if further else exact


# --- added points on disk -------------------------------------------------------------------

def extension_dir(cell_dir: str | Path, lr: float) -> Path:
    """Where the cell's added learning rate `lr` trains (a run group of every seed)."""
    return Path(cell_dir) / f"{EXTEND}{lr:g}"


def extension_lr(path: str | Path) -> float | None:
    """The learning rate an `extend_<lr>` directory trains; None for any other name."""
    name = Path(path).name
    if not name.startswith(EXTEND):
        return None
    try:
        return float(name[len(EXTEND):])
    except ValueError:
        return None


def extension_dirs(cell_dir: str | Path) -> list[Path]:
    """The cell's added points on disk (finished or not), by learning rate."""
    d = Path(cell_dir)
    found = [p for p in d.iterdir() if p.is_dir() and extension_lr(p) is not None] \
        if d.is_dir() else []
    return sorted(found, key=extension_lr)


def _summary_runs(workdir: Path) -> list[dict[str, Any]]:
    try:
        with open(workdir / "summary.json") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return []
    runs = summary.get("runs") if isinstance(summary, dict) else None
    return runs if isinstance(runs, list) else []


def cell_runs(cell_dir: str | Path, own: Sequence[dict[str, Any]],
              known: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The cell's own runs followed by those of every finished added point (by learning
    rate), tagged with `group` and `group_run` and numbered on after the cell's own.
    `known`: {directory name: runs} of groups whose summary this process holds already
    (a loop's return: every process has it; summary.json is written by process 0)."""
    known = known or {}
    out = [dict(r) for r in own]
    next_id = max((int(r.get("run", 0)) for r in out), default=-1) + 1
    names = {p.name for p in extension_dirs(cell_dir)} | set(known)
    for name in sorted((n for n in names if extension_lr(n) is not None), key=extension_lr):
        group = known.get(name) or _summary_runs(Path(cell_dir) / name)
        for r in sorted(group, key=lambda r: int(r.get("run", 0))):
            out.append({**r, "run": next_id, "group": name, "group_run": int(r.get("run", 0))})
            next_id += 1
    return out


def added(runs: Sequence[dict[str, Any]]) -> tuple[float, ...]:
    """The learning rates of `runs` (`cell_runs`) that a sweep added beyond the grid."""
    return tuple(sorted({float(r["learning_rate"]) for r in runs if r.get("group")}))


def metrics_source(cell_dir: str | Path, run: dict[str, Any]) -> tuple[Path, int]:
    """(metrics.jsonl, run index in it) of a run of `cell_runs`."""
    return Path(cell_dir) / run.get("group", "") / "metrics.jsonl", int(
        run.get("group_run", run.get("run", 0)))
