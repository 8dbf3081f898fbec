"""The alignment stage in the reproduction report (fpt_jax/align.py): for every finished cell
that aligned its input layer, the held-out distance to the source text before and after
the stage, and its curve.

The stage does not depend on the training learning rate (runs of one seed align alike), so
the numbers are over the runs at the cell's selected learning rate: one per seed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fpt_jax import align


def aligned(rows: Sequence[Any]) -> list[Any]:
    """The finished main cells (reproduce_report.Row) whose runs aligned first."""
    return [r for r in rows if r.picked is not None and r.selection is None
            and r.cfg.align_steps]


def _mean_se(values: list[float]) -> str:
    v = np.asarray(values, np.float64)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():.4f} +- {se:.4f}"


def table(rows: Sequence[Any]) -> list[str]:
    """Markdown: per aligned cell, the held-out distance before and after (mean +- s.e. over
    seeds), their ratio, and the stage's settings."""
    lines = ["| task | row | distance, steps, lr, corpus | seeds | held-out before | "
             "held-out after | after / before |", "|---|---|---|---|---|---|---|"]
    for r in aligned(rows):
        finals = [r.cell.runs[i].get("final", {}) for i in r.picked.run_ids]
        pairs = [(f["align/held_out_before"], f["align/held_out_after"]) for f in finals
                 if "align/held_out_before" in f and "align/held_out_after" in f]
        if not pairs:
            continue
        before, after = ([p[i] for p in pairs] for i in (0, 1))
        ratio = [a / b for b, a in pairs]
        corpus = r.cfg.align_corpus or "Debian fortunes"
        lines.append(f"| {r.task} | {r.row} | {r.cfg.align_distance}, {r.cfg.align_steps}, "
                     f"{r.cfg.align_learning_rate:g}, {corpus} | {len(pairs)} | "
                     f"{_mean_se(before)} | {_mean_se(after)} | {_mean_se(ratio)} |")
    return lines


def curves(cell_path: Path, run_ids: Sequence[int]) -> dict[int, tuple[list[int], list[float]]]:
    """run -> (steps, held-out distances) from the cell's align_metrics.jsonl."""
    out: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in run_ids}
    path = Path(cell_path) / align.METRICS
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("run") in out and "align/held_out_distance" in rec:
            out[rec["run"]][0].append(rec["step"])
            out[rec["run"]][1].append(rec["align/held_out_distance"])
    return out


def plot(rows: Sequence[Any], path: Path) -> bool:
    """Held-out distance against alignment step, one line per seed of each aligned cell (log
    scale); False when there is nothing to draw."""
    cells = [(r, curves(r.cell.path, r.picked.run_ids)) for r in aligned(rows)]
    cells = [(r, c) for r, c in cells if c]
    if not cells:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.2), squeeze=False)
    for ax, (r, c) in zip(axes[0], cells):
        for run, (steps, values) in c.items():
            seed = r.cell.runs[run].get("seed", run)
            ax.plot(steps, values, marker=".", label=f"seed {seed}")
        positive = all(v > 0 for _, values in c.values() for v in values)
        ax.set_yscale("log" if positive else "linear")  # unbiased MMD can dip below 0
        ax.set_title(f"{r.task}: {r.row}", fontsize=9)
        ax.set_xlabel("alignment step")
        ax.set_ylabel(f"held-out {r.cfg.align_distance}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
