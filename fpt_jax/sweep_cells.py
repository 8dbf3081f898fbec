"""Sweep cells on disk: a cell's directory, its recorded settings, whether it is new,
finished or to be resumed, and the loop that trains cells one after another.

What experiments/sweep.py (a grid of cells) and experiments/reproduce.py (the paper's
comparisons) share. A cell is `WORKDIR/cells/<name>/` with cell.json (its settings and
config), the sweep's checkpoints, metrics.jsonl and summary.json (`fpt_jax.results`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from fpt_jax import freeze, loop, results
from fpt_jax.models import backbones
from fpt_jax.tasks import get_task
from fpt_jax.config import TrainConfig
from fpt_jax.weights import WeightsError

# Fields a finished cell may be re-run with changed (it continues or trains nothing);
# any other difference from the cell's recorded config is an error (use another --workdir).
CONTINUABLE = frozenset({"steps", "log_every", "checkpoint_every", "keep_checkpoints",
                         "num_devices"})
NOT_A_GRID_AXIS = {"learning_rate": "--learning_rates", "seed": "--seeds"}


@dataclasses.dataclass
class GridCell:
    index: int
    name: str
    settings: dict[str, Any]
    cfg: TrainConfig

    @property
    def meta(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name,
                "settings": {k: list(v) if isinstance(v, tuple) else v
                             for k, v in self.settings.items()},
                "config": _config_json(self.cfg)}


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# --- running --------------------------------------------------------------------------------

def flatten(learning_rates: Sequence[float], seeds: Sequence[int]
            ) -> tuple[list[float], list[int]]:
    """The learning rate x seed product as K runs: run k = (lrs[k // S], seeds[k % S])."""
    pairs = list(itertools.product(learning_rates, seeds))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _differing(recorded: dict, current: dict) -> list[str]:
    keys = (set(recorded) | set(current)) - set(NOT_A_GRID_AXIS)
    return sorted(k for k in keys if recorded.get(k) != current.get(k))


def cell_status(cell: GridCell, workdir: Path, lrs: Sequence[float], seeds: Sequence[int]
                ) -> str:
    """'new', 'finished' (skip it) or 'resume' (loop.train_and_evaluate continues it).
    A cell recorded with other runs or another config (beyond CONTINUABLE) is an error."""
    d = workdir / results.CELLS / cell.name
    meta = results._read_json(d / results.CELL_FILE)
    if not isinstance(meta, dict):
        return "resume" if d.exists() and any(d.iterdir()) else "new"
    diff = _differing(meta.get("config", {}), cell.meta["config"])
    blocking = [k for k in diff if k not in CONTINUABLE]
    if blocking:
        shown = ", ".join(f"{k}: {meta.get('config', {}).get(k)!r} -> "
                          f"{cell.meta['config'].get(k)!r}" for k in blocking)
        raise ValueError(f"cell {cell.name} in --workdir={workdir} was run with another config "
                         f"({shown}); use another --workdir, or the same settings")
    summary = results._read_json(d / "summary.json")
    runs = summary.get("runs", []) if isinstance(summary, dict) else []
    want = sorted(zip(*flatten(lrs, seeds)))
    if runs:
        have = sorted((float(r["learning_rate"]), int(r["seed"])) for r in runs)
        if have != want:
            raise ValueError(
                f"cell {cell.name} in --workdir={workdir} holds runs of learning rates "
                f"{sorted({lr for lr, _ in have})} and seeds {sorted({s for _, s in have})}; "
                f"this sweep asks for {sorted(set(lrs))} and {sorted(set(seeds))}: use another "
                "--workdir, or the same --learning_rates and --seeds")
        if not diff:
            return "finished"
    return "resume"


def _write_meta(cell: GridCell, workdir: Path) -> None:
    d = workdir / results.CELLS / cell.name
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{results.CELL_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(cell.meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, d / results.CELL_FILE)


def run_sweep(cells: Sequence[GridCell], workdir: str | os.PathLike,
              learning_rates: Sequence[float], seeds: Sequence[int],
              process_cells: tuple[int, int] = (0, 1), train_fn: Callable | None = None,
              log: Callable[[str], None] = print, write_results: bool = True
              ) -> dict[str, str]:
    """Trains this process's share of `cells` one after another (finished ones skipped), then
    writes the results. Every cell is checked against the workdir before the first trains.
    `train_fn` defaults to `fpt_jax.loop.train_and_evaluate`. Returns {cell: status}."""
    workdir = Path(workdir)
    share, count = process_cells
    mine = [c for c in cells if c.index % count == share]
    statuses = {c.name: cell_status(c, workdir, learning_rates, seeds) for c in cells}
    train_fn = train_fn or loop.train_and_evaluate
    lrs, run_seeds = flatten(learning_rates, seeds)
    main = jax.process_index() == 0  # several processes train each cell together
    log = log if main else (lambda line: None)
    for cell in cells:  # every cell listed (pending) in results.md from the start
        if main and not (workdir / results.CELLS / cell.name / results.CELL_FILE).exists():
            _write_meta(cell, workdir)
    for n, cell in enumerate(mine, 1):
        where = f"cell {n}/{len(mine)} {cell.name}"
        if statuses[cell.name] == "finished":
            log(f"{where}: finished, skipped")
            continue
        log(f"{where}: {statuses[cell.name]}, {len(lrs)} runs "
            f"({len(learning_rates)} learning rates x {len(seeds)} seeds)")
        if main:
            _write_meta(cell, workdir)
        start = time.time()
        try:
            train_fn(cell.cfg, str(workdir / results.CELLS / cell.name), lrs, run_seeds)
        except (ValueError, WeightsError, OSError) as e:
            raise ValueError(f"{where}: {e}") from e
        statuses[cell.name] = "trained"
        log(f"{where}: done in {time.time() - start:.1f} s")
        if write_results and main:  # tables and plots of every cell so far
            results.write_results(workdir)
    return statuses


def precheck(cfg: TrainConfig) -> None:
    """What can be checked of a cell without reading weights or data: the task and its
    settings, the backbone's architecture settings, the trainable selection."""
    get_task(cfg.task, **cfg.task_options())
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd")
                 if getattr(cfg, k) is not None}
    if cfg.model == "auto" or cfg.init not in ("random", "pretrained"):
        return  # the architecture is the weights' or the source run's
    preset = backbones.family_of_preset(cfg.model).config_cls.preset
    if cfg.init == "random":
        config = preset(cfg.model, **overrides)
    else:
        if overrides:
            raise ValueError(f"architecture overrides {overrides} apply to init='random' "
                             "only; pretrained weights fix the architecture")
        config = preset(cfg.model)
    freeze.check_named_groups(freeze.parse_selection(cfg.trainable, config.n_layer),
                              freeze.fpt_paths(config))

