"""The parameter-matched LSTM's width, and parameter counts from shapes only.

`match(cfg, task, model, kind)`: the LSTM width whose whole parameter count (input layer,
LSTM, head: all trained) is nearest the transformer `model`'s count on the same task, as
FPT, by one of MATCH_COUNTS (below): its trainable count (whole position table, or
`effective`: the rows the task reads), its total, or its frozen part (matched by the
frozen recurrence of an LSTM that trains FROZEN_LSTM_TRAINABLE). Integer
widths step the count by about 2 / width of itself, so small targets (width below ~200) can
miss by more than 1%; `Match.lines()` prints both counts and the difference. The row that
use it are `lstm_matched` and `lstm_frozen_matched` (fpt_jax/rows.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fpt_jax import build, freeze
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones
from fpt_jax.models.fpt import make_model

# What of the transformer (as FPT on the task) a matched LSTM's width matches:
#   trainable: its trainable count under trainable='fpt' (the whole position table);
#   effective: the same with only the position rows the task reads (the paper's "positions
#              used": 64 x 768 on CIFAR-10, not 1,024 x 768);
#   total:     every parameter;
#   frozen:    its frozen part (attention and MLPs), matched by the LSTM's frozen
#              recurrence under FROZEN_LSTM_TRAINABLE (a reservoir of the same size).
MATCH_COUNTS = ("trainable", "effective", "total", "frozen")
FROZEN_LSTM_TRAINABLE = "input,ln,output"


@dataclasses.dataclass(frozen=True)
class Match:
    width: int
    count: int  # the LSTM model's parameters at `width` (all trained)
    target: int  # the transformer's count
    model: str
    kind: str  # 'trainable' or 'total'
    other: int = 0  # the transformer's total count, for the table

    @property
    def difference(self) -> float:
        return self.count / self.target - 1

    def lines(self) -> str:
        mine = ("frozen recurrence" if self.kind == "frozen" else "every parameter trained")
        text = (f"parameter-matched LSTM: width {self.width}, matching {self.model} as FPT on "
                f"this task, its {self.kind} count\n"
                f"  {self.model}: {self.kind} {self.target:,}, total {self.other:,}\n"
                f"  this LSTM ({mine}): {self.count:,} "
                f"({100 * self.difference:+.2f}% of the {self.kind} count)")
        if abs(self.difference) > 0.01:
            text += ("\n  (more than 1% off: integer widths step the count by about "
                     f"{200 / self.width:.1f}% here)")
        return text


def match(cfg: TrainConfig, task, model: str, kind: str = "trainable") -> Match:
    """The width of `cfg`'s LSTM (model=lstm) that matches the transformer preset `model`
    on `task`, by its `kind` of count (one of MATCH_COUNTS)."""
    if kind not in MATCH_COUNTS:
        raise ValueError(f"match count {kind!r}; accepted: {list(MATCH_COUNTS)}")
    families = {p: backbones.family_of_preset(p).name for p in backbones.preset_names()}
    if families.get(model, "lstm") == "lstm":
        raise ValueError(f"match model {model!r}; accepted: a transformer preset "
                         f"{[p for p, f in families.items() if f != 'lstm']}")
    if cfg.model == "auto" or families.get(cfg.model) != "lstm":
        raise ValueError(f"a parameter-matched width is an LSTM's; model={cfg.model!r}")
    return _match(cfg.model, cfg.n_layer, model, kind, tuple(cfg.in_layer_sizes),
                  tuple(cfg.out_layer_sizes), _TaskShape(
                      task.name, task.input_dim, task.output_dim, task.input_kind,
                      tuple(task.example_shape)))


@functools.lru_cache(maxsize=32)
def _match(model: str, n_layer: int | None, match_model: str, match_count: str,
           in_layer_sizes: tuple, out_layer_sizes: tuple, task: "_TaskShape") -> Match:
    # Only what decides parameter shapes (layers, input and output layers) matters here.
    cfg = TrainConfig(model=model, in_layer_sizes=in_layer_sizes,
                      out_layer_sizes=out_layer_sizes)
    transformer = backbones.family_of_preset(match_model).config_cls.preset(match_model)
    shapes = _shapes(cfg, task, transformer)  # once: every count below reads them
    total, fpt = (_selected(shapes, s, transformer.n_layer) for s in ("full", "fpt"))
    target = {"total": total, "trainable": fpt, "frozen": total - fpt,
              "effective": fpt - unread_positions(task, transformer) * transformer.n_embd
              }[match_count]
    lstm_cls = backbones.family_of_preset(cfg.model).config_cls
    layers = {} if n_layer is None else {"n_layer": n_layer}

    @functools.lru_cache(maxsize=None)
    def at(width: int) -> int:
        lstm = lstm_cls.preset(cfg.model, n_embd=width, **layers)
        shapes = _shapes(cfg, task, lstm)
        full = _selected(shapes, "full", lstm.n_layer)
        return (full - _selected(shapes, FROZEN_LSTM_TRAINABLE, lstm.n_layer)
                if match_count == "frozen" else full)
    # Every parameter's size is at most quadratic in the width: three counts fix it.
    c4, c8, c12 = at(4), at(8), at(12)
    a = (c12 - 2 * c8 + c4) / 32
    b = (c8 - c4) / 4 - 12 * a
    c0 = c4 - 16 * a - 4 * b
    w = (-b + math.sqrt(max(b * b - 4 * a * (c0 - target), 0.0))) / (2 * a)
    candidates = {max(1, math.floor(w)), max(1, math.ceil(w))}
    best = min(candidates, key=lambda x: abs(at(x) - target))
    return Match(best, at(best), target, match_model, match_count, total)


def tokens(task) -> int:
    """The sequence length FPT feeds its backbone for one of `task`'s examples: token ids
    as they are; real features cut into `input_dim`-feature tokens row by row."""
    if task.input_kind == "tokens":
        return int(task.example_shape[0])
    return math.prod(task.example_shape) // task.input_dim


def unread_positions(task, config: Any) -> int:
    """Rows of `config`'s position table that `task`'s sequences never read."""
    return max(config.n_positions - tokens(task), 0)


@dataclasses.dataclass(frozen=True)
class _TaskShape:  # what `make_model` and `build.init_params` read of a task
    name: str
    input_dim: int
    output_dim: int
    input_kind: str
    example_shape: tuple


def count(cfg: TrainConfig, task, config: Any, selection: str = "full") -> int:
    """Parameters of `cfg`'s FPT over the backbone `config` on `task` that `selection`
    trains ('full': all of them), from shapes only."""
    return _selected(_shapes(cfg, task, config), selection, config.n_layer, len(cfg.blocks))


def _shapes(cfg: TrainConfig, task, config: Any) -> Any:
    """The parameter shapes of `cfg`'s FPT over the backbone `config` on `task`."""
    model = make_model(cfg, task, config, build.blocks_config(cfg))
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    x = jnp.zeros((1, *task.example_shape), dtype)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x)["params"])


def _selected(shapes: Any, selection: str, n_layer: int, n_blocks: int = 0) -> int:
    _, counts = freeze.count_table(shapes, freeze.parse_selection(selection, n_layer, n_blocks))
    return counts["total"]["trainable"]
