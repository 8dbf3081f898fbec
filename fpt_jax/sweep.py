"""A sweep: a grid of cells over config settings, each cell a run group of learning rates x
seeds trained together (`fpt_jax.loop`), with selection on validation.

`SweepConfig` says what to sweep: `learning_rates` and `seeds` (every cell's runs) and a
`grid` of axes, `"<setting>=<v1>|<v2>|...; <setting>=..."` over the fields of `TrainConfig`
and the task's options (`task_options.<option>`); values are separated by `|` (commas belong
to values such as `trainable=output,ln`), parsed to the setting's type (`none` for None where
it allows it). The cells are the product of the axes, in the order given; a cell is the base
config with its values, trained in `WORKDIR/cells/<name>/` (name: `setting=value` joined by
`__`, characters other than letters, digits and `._,=+-` replaced by `_`, plus a short hash
when replaced). The budgets of reproduce reuse `SweepConfig` per task.

On disk a cell holds cell.json (its settings and config), the group's checkpoints,
metrics.jsonl and summary.json (`fpt_jax.results`). Running a sweep again skips finished
cells and resumes an interrupted one.

A cell whose selected learning rate is the smallest or largest of its grid is logged with a
warning (not bracketed). With `extend_edges=N` the sweep then trains the next point beyond
that edge (`fpt_jax.edges`), as a group of every seed in `cells/<name>/extend_<lr>/`, selects
again over all of the cell's runs, and repeats until the selection is interior or N points
were added to the cell. A finished point is never trained again: each is re-derived from
the runs on disk, so the same command resumes an interrupted one and gives the same
selection.
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from fpt_jax import edges, loop, results, runs
from fpt_jax.config import TrainConfig, setting
from fpt_jax.weights import WeightsError

# Rothermel et al. (2021): learning rates swept log-spaced over 1e-6..1e-2, 3 seeds.
DEFAULT_LEARNING_RATES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_SEEDS = (0, 1, 2)
VALUE_SEPARATOR = "|"
AXIS_SEPARATOR = ";"
# Fields a finished cell may be re-run with changed (it continues or trains nothing);
# any other difference from the cell's recorded config is an error (use another --workdir).
CONTINUABLE = frozenset({"steps", "log_every", "checkpoint_every", "keep_checkpoints",
                         "num_devices", "mesh"})
NOT_A_GRID_AXIS = {"learning_rate": "learning_rates", "seed": "seeds"}


@dataclasses.dataclass
class SweepConfig:
    """What a sweep trains around its base config (`--sweep.<field>=<value>`)."""
    learning_rates: tuple[float, ...] = setting(
        DEFAULT_LEARNING_RATES, "Peak learning rates of every cell's runs (each with every "
        "seed), trained together; default Rothermel et al.'s log-spaced 1e-6..1e-2.")
    seeds: tuple[int, ...] = setting(
        DEFAULT_SEEDS, "Seeds of every cell's runs (initialisation of the new layers, data "
        "order, dropout; a random backbone is drawn from --config.backbone_seed).")
    grid: str = setting(
        "", "Axes '<setting>=<v1>|<v2>; <setting>=...' over the fields of --config and "
        "task_options.<option>; values separated by '|', parsed to the setting's type "
        "('none' for None); cells are the product of the axes. '': one cell, the base config.")
    extend_edges: int = setting(
        0, "Up to this many learning rates added per cell while its selection is at the top "
        "or bottom edge of its grid: the next point beyond, the outermost spacing continued "
        "in log space, trained with every seed (cells/<name>/extend_<lr>/). 0: none; > 0 "
        "needs >= 2 learning_rates.")

    def validate(self) -> "SweepConfig":
        """Raises ValueError naming the field and what is accepted."""
        self.learning_rates = _tuple(self.learning_rates)
        self.seeds = _tuple(self.seeds)
        for name, values, ok, accepted in (
                ("learning_rates", self.learning_rates,
                 lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v) and v > 0, "finite numbers > 0"),
                ("seeds", self.seeds, lambda v: isinstance(v, int) and not isinstance(v, bool)
                 and v >= 0, "integers >= 0")):
            bad = [v for v in values if not ok(v)]
            if bad or not values:
                raise ValueError(f"{name}={values!r}: accepted: one or more {accepted}, "
                                 f"comma-separated" + (f" (not {bad[0]!r})" if bad else ""))
            if len(set(values)) != len(values):
                raise ValueError(f"{name}={values!r}: a value repeated")
        if not isinstance(self.grid, str):
            raise ValueError(f"grid={self.grid!r}; accepted: a string "
                             "'<setting>=<v1>|<v2>; <setting>=...'")
        n = self.extend_edges
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"extend_edges={n!r}: accepted: an integer >= 0 (learning rates "
                             "added per cell beyond an edge selection; 0: none)")
        if n and len(self.learning_rates) < 2:  # one point has no spacing to continue
            raise ValueError(f"extend_edges={n}: needs >= 2 learning_rates, whose outermost "
                             f"spacing it continues (learning_rates={self.learning_rates!r})")
        self.learning_rates = tuple(float(v) for v in self.learning_rates)
        return self

    def runs(self) -> tuple[list[float], list[int]]:
        """The learning rate x seed product as K runs (`flatten`)."""
        return flatten(self.learning_rates, self.seeds)


def _tuple(values: Any) -> tuple:
    return tuple(values) if isinstance(values, (tuple, list)) else (values,)


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
                "config": self.cfg.to_dict()}


# --- the grid -------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_OPTIONS = "task_options."


def _setting_kind(name: str, base: TrainConfig) -> tuple[Any, bool]:
    """(base type, optional) of a TrainConfig field (`int | None` -> (int, True)) or of a
    task option (`task_options.<option>`: the type its task declares; None always allowed)."""
    if name.startswith(_OPTIONS):
        return base.task_options.get_type(name[len(_OPTIONS):]), True
    tp = _FIELDS[name].type
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # noqa: S307 - our own annotations only
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        return next(a for a in args if a is not type(None)), True
    return tp, False


def parse_value(name: str, text: str, base: TrainConfig) -> Any:
    """`text` as a value of the setting `name` (errors name the setting and the value)."""
    kind, optional = _setting_kind(name, base)
    raw = text.strip()
    if raw.lower() == "none":
        if optional:
            return None
        raise ValueError(f"{name}=none: {name} has no 'not set' value")
    try:
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            items = raw.strip("()").split(",") if raw.strip("()").strip() else []
            return tuple(inner(s.strip()) for s in items)
        if kind is bool:
            low = raw.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(raw)
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        accepted = {bool: "true or false", int: "an integer", float: "a finite number"}.get(
            kind, f"comma-separated {typing.get_args(kind)[0].__name__}s" if
            typing.get_origin(kind) is tuple else str(kind))
        raise ValueError(f"{name}={text!r}: not {accepted}"
                         + (" or none" if optional else "")) from None
    if not raw:
        raise ValueError(f"{name}: an empty value")
    return raw


def parse_grid(grid: str, base: TrainConfig) -> list[tuple[str, list[Any]]]:
    """`'trainable=output|fpt; task_options.patch_size=2|4'` -> `[('trainable', ['output',
    'fpt']), ('task_options.patch_size', [2, 4])]`. Unknown, repeated or non-axis
    settings, bad or repeated values are errors naming the grid."""
    axes: list[tuple[str, list[Any]]] = []
    specs = [s.strip() for s in grid.split(AXIS_SEPARATOR)] if grid.strip() else []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        where = f"grid axis {spec!r}"
        if not sep or not name:
            raise ValueError(f"{where}: expected <setting>=<v1>|<v2>..., axes separated by "
                             f"'{AXIS_SEPARATOR}', e.g. grid='trainable=output|output,ln|fpt'")
        if name in NOT_A_GRID_AXIS:
            raise ValueError(f"{where}: {name} is swept within every cell; use the sweep's "
                             f"{NOT_A_GRID_AXIS[name]}")
        option = name[len(_OPTIONS):] if name.startswith(_OPTIONS) else None
        if (option is None and (name not in _FIELDS or name == "task_options")) or (
                option is not None and option not in base.task_options):
            fields = ", ".join(n for n in _FIELDS if n not in NOT_A_GRID_AXIS
                               and n != "task_options")
            raise ValueError(f"{where}: unknown setting {name!r}; accepted: the fields of "
                             f"the config ({fields}) and task_options.<option> for the options "
                             f"of task {base.task} ({', '.join(base.task_options.keys())})")
        if any(name == n for n, _ in axes):
            raise ValueError(f"{where}: {name} is already an axis; give its values once, "
                             f"separated by '{VALUE_SEPARATOR}'")
        try:
            parsed = [parse_value(name, v, base) for v in values.split(VALUE_SEPARATOR)]
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        dupes = sorted({_show(v) for v in parsed if parsed.count(v) > 1})
        if dupes:
            raise ValueError(f"{where}: repeated value(s) {', '.join(dupes)}")
        axes.append((name, parsed))
    return axes


def with_settings(base: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """`base` with a cell's settings (fields, and task options as `task_options.<option>`)."""
    options = {k[len(_OPTIONS):]: v for k, v in settings.items() if k.startswith(_OPTIONS)}
    fields = {k: v for k, v in settings.items() if not k.startswith(_OPTIONS)}
    return dataclasses.replace(base, **fields, task_options={
        **base.task_options.to_dict(), **options})


def _show(value: Any) -> str:
    """A grid value as it appears in a cell name and the tables."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def cell_name(settings: dict[str, Any]) -> str:
    """A readable, stable directory name: `field=value` joined by `__`; characters other than
    letters, digits and `._,=+-` become `_`, and then a hash of the exact settings is added
    (so that two cells never share a name)."""
    if not settings:
        return "base"
    raw = "__".join(f"{k}={_show(v)}" for k, v in settings.items())
    safe = re.sub(r"[^A-Za-z0-9._,=+-]", "_", raw)
    if safe != raw:
        safe += "~" + hashlib.sha1(raw.encode()).hexdigest()[:6]
    return safe


def make_cells(base: TrainConfig, axes: Sequence[tuple[str, Sequence[Any]]] | str
               ) -> list[GridCell]:
    """The product of the axes (or of a grid's, `parse_grid`), each cell the base config with
    its values, every one checked (`TrainConfig.check`) before any trains."""
    if isinstance(axes, str):
        axes = parse_grid(axes, base)
    cells = []
    names = [n for n, _ in axes]
    for i, values in enumerate(itertools.product(*(v for _, v in axes))):
        settings = dict(zip(names, values))
        name = cell_name(settings)
        try:
            cfg = with_settings(base, settings).check()
        except (ValueError, TypeError) as e:
            raise ValueError(f"grid cell {name}: {e}") from None
        cells.append(GridCell(i, name, settings, cfg))
    return cells


def parse_process_cells(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--process_cells={spec}: accepted: i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))



# --- running --------------------------------------------------------------------------------

def flatten(learning_rates: Sequence[float], seeds: Sequence[int]
            ) -> tuple[list[float], list[int]]:
    """The learning rate x seed product as K runs: run k = (lrs[k // S], seeds[k % S])."""
    pairs = list(itertools.product(learning_rates, seeds))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _differing(recorded: dict, current: dict) -> list[str]:
    # fields added since the cell was recorded: what it had (their defaults)
    recorded = runs.active({**runs.ADDED_FIELDS, **runs.nested_task_options(recorded)})
    current = runs.active(current)
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
                "--workdir, or the same learning rates and seeds")
        if not diff:
            return "finished"
    return "resume"


def _write_meta(cell: GridCell, workdir: Path) -> None:
    d = workdir / results.CELLS / cell.name
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{results.CELL_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(cell.meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, d / results.CELL_FILE)


def _train(train_fn: Callable, cfg: TrainConfig, workdir: Path, lrs: Sequence[float],
           seeds: Sequence[int], where: str) -> list[dict] | None:
    """One group trained (or resumed); its runs as the loop returns them."""
    try:
        out = train_fn(cfg, str(workdir), list(lrs), list(seeds))
    except (ValueError, WeightsError, OSError) as e:
        raise ValueError(f"{where}: {e}") from e
    return out if isinstance(out, list) else None


def bracket(cell: GridCell, workdir: Path, seeds: Sequence[int], limit: int,
            train_fn: Callable, own: list[dict] | None = None,
            log: Callable[[str], None] = print, where: str = "") -> bool:
    """A finished cell's selection at the edge of its grid: up to `limit` learning rates
    added beyond it (`fpt_jax.edges`, every seed, `extend_<lr>/` in the cell), a warning if
    it stays at an edge. `own`: the cell's runs if its group trained in this call (its added
    points then go on too, e.g. to more steps). Returns whether anything trained."""
    d = workdir / results.CELLS / cell.name
    where = where or f"cell {cell.name}"
    known: dict[str, list[dict] | None] = {}  # groups trained here: the loop's return
    if own is not None:
        for sub in edges.extension_dirs(d):
            lr = edges.extension_lr(sub)
            known[sub.name] = _train(train_fn, cell.cfg, sub, [lr] * len(seeds), seeds, where)
    own = own or runs.summary_runs(str(d))  # a train_fn that returned nothing: its summary
    tried: set[float] = set()
    while True:
        merged = edges.cell_runs(d, own, known)
        sel = results.select(results.Cell(cell.name, cell.settings, merged, d))
        have = edges.added(merged)
        if sel.edge not in edges.SIDES or len(have) >= limit:
            break
        lr = edges.beyond(sel.grid, sel.edge)
        if lr in tried:  # a train_fn that left no runs: never loop on it
            raise ValueError(f"{where}: the added learning rate {lr:g} left no runs")
        tried.add(lr)
        log(f"{where}: selected lr {sel.learning_rate:g} at the {_side(sel)}: adding lr "
            f"{lr:g} ({len(have) + 1}/{limit}), {len(seeds)} runs")
        start = time.time()
        sub = edges.extension_dir(d, lr)
        known[sub.name] = _train(train_fn, cell.cfg, sub, [lr] * len(seeds), seeds, where)
        log(f"{where}: lr {lr:g} done in {time.time() - start:.1f} s")
    if sel.edge in edges.SIDES:
        log(f"warning: {where}: selected lr {sel.learning_rate:g} is at the {_side(sel)}: "
            "not bracketed, the best may lie beyond" + (
                f" ({len(have)} lr(s) added, extend_edges={limit} reached)" if limit else
                " (the sweep's extend_edges=N adds learning rates beyond it)"))
    return bool(known)


def _side(sel: results.Selection) -> str:
    return (f"{'top' if sel.edge == 'high' else 'bottom'} edge of its grid "
            f"{sel.grid[0]:g}..{sel.grid[-1]:g}")


def run_sweep(cells: Sequence[GridCell], workdir: str | os.PathLike,
              learning_rates: Sequence[float], seeds: Sequence[int],
              process_cells: tuple[int, int] = (0, 1), train_fn: Callable | None = None,
              log: Callable[[str], None] = print, write_results: bool = True,
              extend_edges: int = 0) -> dict[str, str]:
    """Trains this process's share of `cells` one after another (finished ones skipped), then
    writes the results. Every cell is checked against the workdir before the first trains.
    `train_fn` defaults to `fpt_jax.loop.train_and_evaluate`. After each cell, `bracket`
    (up to `extend_edges` learning rates added beyond an edge selection). Returns {cell:
    status}: "trained" when anything of it trained."""
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
        own = None  # the cell's runs, when its group trains now
        if statuses[cell.name] == "finished":
            log(f"{where}: finished, skipped")
        else:
            log(f"{where}: {statuses[cell.name]}, {len(lrs)} runs "
                f"({len(learning_rates)} learning rates x {len(seeds)} seeds)")
            if main:
                _write_meta(cell, workdir)
            start = time.time()
            own = _train(train_fn, cell.cfg, workdir / results.CELLS / cell.name, lrs,
                         run_seeds, where) or []
            statuses[cell.name] = "trained"
            log(f"{where}: done in {time.time() - start:.1f} s")
        if bracket(cell, workdir, seeds, extend_edges, train_fn, own, log, where):
            statuses[cell.name] = "trained"
        if write_results and main and statuses[cell.name] == "trained":  # every cell so far
            results.write_results(workdir)
    return statuses
