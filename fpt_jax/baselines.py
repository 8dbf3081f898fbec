"""The paper's comparisons as settings: baseline variants of a task's config, and the
parameter-matched LSTM's width.

`variant(cfg, name)` turns a task's config (the paper's FPT) into one of the rows the paper
and its reviewers compare it with. Every task config takes the name after a colon:
`--config=experiments/configs/cifar10.py:lstm`.

  fpt            frozen pretrained GPT-2 (the task config as it is)
  random         the same, frozen at random init (the paper's random-init ablation)
  full           every parameter fine-tuned from the pretrained weights
  scratch        the paper's "Full transformer": GPT-2 at random init, every parameter
                 trained; `scratch_layers` blocks where the paper used fewer (3 for
                 CIFAR-10, ListOps, CIFAR-10 LRA)
  lstm           the paper's "Full LSTM": 3 layer-normalised LSTM layers of width 768,
                 every parameter trained, learning rate 3e-4
  lstm_matched   the same LSTM, its width chosen so that its parameter count matches the
                 task config's transformer as FPT (`match_model`, `match_count`)
  fnet           fixed Fourier mixing in place of attention, frozen at random init: a
                 reservoir beside `random`

`match(cfg, task)`: the LSTM width whose whole parameter count (input layer, LSTM, head: all
trained) is nearest the named transformer's count on the same task, as FPT, counted as the
count table counts it: 'trainable' under trainable='fpt' (the whole position table included,
although a task reads only its first rows), or 'total'. Integer widths step the count by
about 2 / width of itself, so small targets (width below ~200) can miss by more than 1%;
the count table prints both counts and the difference.
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

LSTM_LEARNING_RATE = 3e-4  # the paper's, for its LSTMs
VARIANTS = ("fpt", "random", "full", "scratch", "lstm", "lstm_matched", "fnet")


def variant(cfg: TrainConfig, name: str = "fpt", scratch_layers: int | None = None
            ) -> TrainConfig:
    """`cfg` (a task's FPT config) as the baseline `name` (see the module doc)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown baseline variant {name!r}; accepted: {list(VARIANTS)}")
    changes: dict[str, Any] = {
        "fpt": {},
        "random": {"init": "random"},
        "full": {"trainable": "full"},
        "scratch": {"init": "random", "trainable": "full", "n_layer": scratch_layers},
        "lstm": {"model": "lstm", "init": "random", "trainable": "full",
                 "learning_rate": LSTM_LEARNING_RATE},
        "lstm_matched": {"model": "lstm", "init": "random", "trainable": "full",
                         "learning_rate": LSTM_LEARNING_RATE, "match_model": cfg.model},
        "fnet": {"model": "fnet", "init": "random"},
    }[name]
    return dataclasses.replace(cfg, **changes)


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


def match(cfg: TrainConfig, task) -> Match:
    """The width of `cfg`'s LSTM (model=lstm) that matches `cfg.match_model` on `task`."""
    if cfg.match_model is None:
        raise ValueError("match() needs match_model set")
    return _match(cfg.model, cfg.n_layer, cfg.match_model, cfg.match_count,
                  tuple(cfg.in_layer_sizes), tuple(cfg.out_layer_sizes), _TaskShape(
                      task.name, task.input_dim, task.output_dim, task.input_kind,
                      tuple(task.example_shape)))


@functools.lru_cache(maxsize=32)
def _match(model: str, n_layer: int | None, match_model: str, match_count: str,
           in_layer_sizes: tuple, out_layer_sizes: tuple, task: "_TaskShape") -> Match:
    # Only what decides parameter shapes (layers, input and output layers) matters here.
    cfg = TrainConfig(model=model, match_model=match_model, match_count=match_count,
                      in_layer_sizes=in_layer_sizes, out_layer_sizes=out_layer_sizes)
    transformer = backbones.family_of_preset(cfg.match_model).config_cls.preset(cfg.match_model)
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
    return Match(best, at(best), target, cfg.match_model, cfg.match_count, other)


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
