"""The parameter-matched LSTM's width, and parameter counts from shapes only.

`match(cfg, task, model, kind)`: the LSTM width whose whole parameter count (input layer,
LSTM, head: all trained) is nearest the transformer `model`'s count on the same task, as
FPT, counted as the count table counts it: 'trainable' under trainable='fpt' (the whole
position table included, although a task reads only its first rows), or 'total'. Integer
widths step the count by about 2 / width of itself, so small targets (width below ~200) can
miss by more than 1%; `Match.lines()` prints both counts and the difference. The row that
uses it is `lstm_matched` (fpt_jax/rows.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fpt_jax import freeze
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones
from fpt_jax.models.fpt import make_model

MATCH_COUNTS = ("trainable", "total")


@dataclasses.dataclass(frozen=True)
class Match:
    width: int
    count: int  # the LSTM model's parameters at `width` (all trained)
    target: int  # the transformer's count
    model: str
    kind: str  # 'trainable' or 'total'
    other: int = 0  # the transformer's other count (total, or trainable), for the table

    @property
    def difference(self) -> float:
        return self.count / self.target - 1

    def lines(self) -> str:
        counts = {self.kind: self.target,
                  "total" if self.kind == "trainable" else "trainable": self.other}
        text = (f"parameter-matched LSTM: width {self.width}, matching {self.model} as FPT on "
                f"this task, its {self.kind} count\n"
                f"  {self.model}: trainable (trainable='fpt') {counts['trainable']:,}, total "
                f"{counts['total']:,}\n"
                f"  this LSTM (every parameter trained): {self.count:,} "
                f"({100 * self.difference:+.2f}% of the {self.kind} count)")
        if abs(self.difference) > 0.01:
            text += ("\n  (more than 1% off: integer widths step the count by about "
                     f"{200 / self.width:.1f}% here)")
        return text


def match(cfg: TrainConfig, task, model: str, kind: str = "trainable") -> Match:
    """The width of `cfg`'s LSTM (model=lstm) that matches the transformer preset `model`
    on `task`, by its `kind` of count ('trainable' as FPT, or 'total')."""
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
    target = count(cfg, task, transformer, "fpt" if match_count == "trainable" else "full")
    other = count(cfg, task, transformer, "full" if match_count == "trainable" else "fpt")
    lstm_cls = backbones.family_of_preset(cfg.model).config_cls
    layers = {} if n_layer is None else {"n_layer": n_layer}

    def at(width: int) -> int:
        return count(cfg, task, lstm_cls.preset(cfg.model, n_embd=width, **layers), "full")
    # Every parameter's size is at most quadratic in the width: three counts fix it.
    c4, c8, c12 = at(4), at(8), at(12)
    a = (c12 - 2 * c8 + c4) / 32
    b = (c8 - c4) / 4 - 12 * a
    c0 = c4 - 16 * a - 4 * b
    w = (-b + math.sqrt(max(b * b - 4 * a * (c0 - target), 0.0))) / (2 * a)
    candidates = {max(1, math.floor(w)), max(1, math.ceil(w))}
    best = min(candidates, key=lambda x: abs(at(x) - target))
    return Match(best, at(best), target, match_model, match_count, other)


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
    model = make_model(cfg, task, config)
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    x = jnp.zeros((1, *task.example_shape), dtype)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x)["params"])
    _, counts = freeze.count_table(shapes, freeze.parse_selection(selection, config.n_layer))
    return counts["total"]["trainable"]
