r"""A sweep: a grid over config fields x learning rates x seeds, with selection on validation.

  # Bit XOR on a small frozen random GPT-2: 3 trainable selections x 4 lrs x 3 seeds
  python -m experiments.sweep --config=experiments/configs/bit_xor.py \
      --config.init=random --config.n_layer=2 --config.n_head=4 --config.n_embd=128 \
      --grid='trainable=output|output,ln|fpt' \
      --learning_rates=1e-4,1e-3,1e-2,1e-1 --seeds=0,1,2 --workdir=/tmp/fpt_sweep

`--config` (with `--config.<field>` overrides) is the base config of every cell, as for
experiments/train.py; its `learning_rate` and `seed` are not used (`--learning_rates` and
`--seeds` are). Each `--grid=<field>=<v1>|<v2>|...` (repeatable) is an axis over a
`TrainConfig` field: values are separated by `|` (commas belong to values such as
`trainable=output,ln` or `in_layer_sizes=64,64`), parsed to the field's type (`none` for
None where the field allows it, true/false for booleans). The cells are the product of the
axes, in the order given; cell `c` is the base config with `c`'s values, trained in
`WORKDIR/cells/<name>` (name: `field=value` joined by `__`, characters other than
letters, digits and `._,=+-` replaced by `_`, plus a short hash when replaced) by
`fpt_jax.loop.train_and_evaluate`: its len(learning_rates) x len(seeds) runs, one group in one
compiled program. Cells run one after another; `--process_cells=i/n` runs only every n-th
cell from cell i (one process per share on a cluster; then `--results_only` once all are done).
With the multi-process flags (as experiments/train.py's, docs/multihost.md) every process
trains every cell together, data-parallel over all their devices.

Running the same command again skips finished cells (summary.json with every run, same
config) and resumes an interrupted one from its checkpoint. After each cell, and at the end,
`fpt_jax.results.write_results` writes WORKDIR/results.csv, results.md, curves.png and lr.png.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads (fpt_jax/hugepages.py)
    from fpt_jax import hugepages
    hugepages.reexec_with_huge_pages()

import dataclasses
import hashlib
import itertools
import math
import re
import typing
from typing import Any, Sequence

import jax
from absl import app, flags

from experiments import cli
from fpt_jax import loop, results
from fpt_jax.sweep_cells import NOT_A_GRID_AXIS, GridCell, precheck, run_sweep
from fpt_jax.config import TrainConfig
from fpt_jax.weights import WeightsError

F = flags.FLAGS

# Rothermel et al. (2021): learning rates swept log-spaced over 1e-6..1e-2, 3 seeds.
DEFAULT_LEARNING_RATES = ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2")
DEFAULT_SEEDS = ("0", "1", "2")
VALUE_SEPARATOR = "|"

flags.DEFINE_string("workdir", None, "Where the sweep goes: cells/<name>/ per grid cell, "
                    "results.csv, results.md, curves.png, lr.png.", required=True)
flags.DEFINE_multi_string("grid", [], "An axis of the grid: <field>=<v1>|<v2>|... over a "
                          "--config field (values separated by '|', parsed to the field's "
                          "type; 'none' for None). Repeat for more axes; cells are their "
                          "product. None: one cell, the base config.")
flags.DEFINE_list("learning_rates", list(DEFAULT_LEARNING_RATES), "Peak learning rates of "
                  "every cell's runs (each with every seed), trained together. Default: "
                  "Rothermel et al.'s log-spaced 1e-6..1e-2.")
flags.DEFINE_list("seeds", list(DEFAULT_SEEDS), "Seeds of every cell's runs (initialisation "
                  "of the new layers, data order, dropout; a random backbone is drawn from "
                  "--config.backbone_seed).")
flags.DEFINE_string("process_cells", None, "i/n: run only the cells whose index is i modulo "
                    "n (0 <= i < n), to share a grid among n processes. Default: all cells.")
cli.define_distributed_flags()
flags.DEFINE_bool("results_only", False, "Train nothing: write results.csv, results.md and "
                  "the plots from the finished cells in --workdir.")


# --- the grid -------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_kind(name: str) -> tuple[Any, bool]:
    """(base type, optional) of a TrainConfig field: `int | None` -> (int, True)."""
    tp = _FIELDS[name].type
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # noqa: S307 - our own annotations only
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        return next(a for a in args if a is not type(None)), True
    return tp, False


def parse_value(name: str, text: str) -> Any:
    """`text` as a value of TrainConfig field `name` (errors name the field and the value)."""
    kind, optional = _field_kind(name)
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


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """`['trainable=output|fpt', 'n_embd=16|32']` -> `[('trainable', ['output', 'fpt']),
    ('n_embd', [16, 32])]`. Unknown, repeated or non-axis fields, bad or repeated values
    are errors naming --grid."""
    axes: list[tuple[str, list[Any]]] = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--grid={spec}: expected <field>=<v1>|<v2>..., e.g. "
                             "--grid='trainable=output|output,ln|fpt'")
        if name in NOT_A_GRID_AXIS:
            raise ValueError(f"--grid={spec}: {name} is swept within every cell; use "
                             f"{NOT_A_GRID_AXIS[name]}")
        if name not in _FIELDS:
            fields = ", ".join(n for n in _FIELDS if n not in NOT_A_GRID_AXIS)
            raise ValueError(f"--grid={spec}: unknown field {name!r}; accepted: the fields of "
                             f"--config ({fields})")
        if any(name == n for n, _ in axes):
            raise ValueError(f"--grid={spec}: {name} is already an axis; give its values once, "
                             f"separated by '{VALUE_SEPARATOR}'")
        try:
            parsed = [parse_value(name, v) for v in values.split(VALUE_SEPARATOR)]
        except ValueError as e:
            raise ValueError(f"--grid={spec}: {e}") from None
        dupes = sorted({_show(v) for v in parsed if parsed.count(v) > 1})
        if dupes:
            raise ValueError(f"--grid={spec}: repeated value(s) {', '.join(dupes)}")
        axes.append((name, parsed))
    return axes


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


def make_cells(base: TrainConfig, axes: Sequence[tuple[str, Sequence[Any]]]) -> list[GridCell]:
    """The product of the axes, each cell the base config with its values (validated and
    checked as far as is cheap: the task's settings, the trainable selection)."""
    cells = []
    names = [n for n, _ in axes]
    for i, values in enumerate(itertools.product(*(v for _, v in axes))):
        settings = dict(zip(names, values))
        name = cell_name(settings)
        try:
            cfg = dataclasses.replace(base, **settings)
            precheck(cfg)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--grid cell {name}: {e}") from None
        cells.append(GridCell(i, name, settings, cfg))
    return cells


# --- flags other than the grid --------------------------------------------------------------

def parse_learning_rates(values: Sequence[str]) -> list[float]:
    out = []
    for v in values:
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"--learning_rates: {v!r} is not a finite number > 0")
        out.append(x)
    if not out:
        raise ValueError("--learning_rates: empty; accepted: comma-separated numbers > 0")
    if len(set(out)) != len(out):
        raise ValueError(f"--learning_rates={','.join(values)}: a learning rate repeated")
    return out


def parse_seeds(values: Sequence[str]) -> list[int]:
    out = []
    for v in values:
        try:
            s = int(v)
        except ValueError:
            s = -1
        if s < 0:
            raise ValueError(f"--seeds: {v!r} is not an integer >= 0")
        out.append(s)
    if not out:
        raise ValueError("--seeds: empty; accepted: comma-separated integers >= 0")
    if len(set(out)) != len(out):
        raise ValueError(f"--seeds={','.join(values)}: a seed repeated")
    return out


def parse_process_cells(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--process_cells={spec}: accepted: i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def main(argv):
    cli.begin(argv)
    try:
        cli.initialize_distributed()
        learning_rates = parse_learning_rates(F.learning_rates)
        seeds = parse_seeds(F.seeds)
        process_cells = parse_process_cells(F.process_cells)
        cells = make_cells(F.config, parse_grid(F.grid))
        workdir = cli.writable_dir(F.workdir, "--workdir")
        if not F.results_only:
            run_sweep(cells, workdir, learning_rates, seeds, process_cells)
        if jax.process_index() != 0:
            return  # process 0 writes and prints the results
        paths = results.write_results(workdir)
    except loop.Preempted as e:
        cli.stopped(e)
    except (ValueError, WeightsError, OSError) as e:
        # Bad flags, a cell that cannot train, bad files: named, no traceback.
        cli.fail(str(e))
    print(paths["md"].read_text(), end="", flush=True)
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)


def run() -> None:
    """The entry point: flags parsed by `cli.parse_flags` (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
