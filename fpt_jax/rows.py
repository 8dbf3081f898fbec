"""The comparison rows, each defined once: what it changes in a task's FPT config, its label,
the published rows it stands beside, whether its attention is drawn.

A row turns a task's config (the paper's FPT: `experiments/configs/<task>.py`) into one of
the comparisons the paper and its reviewers make. Everything that names a row reads it
here: the task configs' `:row` suffix (`--config=experiments/configs/cifar10.py:lstm`), the
sweep (through `--config`), reproduce and its budgets (`rows:`), the report's tables and
plots, and the benchmark's baselines.

Adding a row is one entry in `ROWS`: its name, its `changes` (TrainConfig fields), and
where the row needs them, `per_task` changes (the paper's "Full transformer" has 3 blocks on
CIFAR-10, ListOps and CIFAR-10 LRA) or `match` (an LSTM whose width is chosen so that its
parameter count matches a transformer's, `fpt_jax.baselines.match`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging

from fpt_jax.config import TrainConfig

LSTM_LEARNING_RATE = 3e-4  # the paper's, for its LSTMs
FROZEN_LSTM_TRAINABLE = "input,ln,output"  # a reservoir LSTM (fpt_jax.baselines: the same)


@dataclasses.dataclass(frozen=True)
class Match:
    """The LSTM's width chosen so that its parameters match `model`'s count on the same task
    as FPT, by one of fpt_jax.baselines.MATCH_COUNTS ('trainable', 'effective': only the
    position rows the task reads, 'total', 'frozen': the LSTM's frozen recurrence against
    the transformer's frozen part)."""
    model: str = "gpt2"
    count: str = "trainable"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str  # in tables and plots
    changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    per_task: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    match: Match | None = None
    paper_row: str | None = None  # fpt_jax.paper.MAIN's row it stands beside
    rothermel_row: str | None = None  # fpt_jax.paper.ROTHERMEL's row
    draws_attention: bool = False  # a frozen attention backbone: its attention map is drawn

    def apply(self, cfg: TrainConfig, overrides: Mapping[str, Any] | None = None
              ) -> TrainConfig:
        """`cfg` (a task's FPT config) as this row, then `overrides` (a budget's, say), then
        the row's matched width unless the overrides set `n_embd`."""
        overrides = dict(overrides or {})
        changes = {**self.changes, **self.per_task.get(cfg.task, {})}
        options = {**cfg.task_options.to_dict(), **dict(overrides.pop("task_options", {}))}
        try:
            out = dataclasses.replace(cfg, **{**changes, **overrides}, task_options=options)
        except TypeError as e:  # a field TrainConfig does not have
            raise ValueError(f"row {self.name}: {e}") from None
        return out if "n_embd" in overrides else self.resolve(out)

    def matched(self, cfg: TrainConfig) -> "baselines.Match | None":
        """The matched LSTM's width and counts on `cfg`'s task (None: the row matches none)."""
        if self.match is None:
            return None
        from fpt_jax import baselines  # builds models: not needed to read a row
        return baselines.match(cfg, cfg.make_task(), self.match.model, self.match.count)

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        """The settings the row computes from the others (the matched LSTM's width)."""
        m = self.matched(cfg)
        if m is None:
            return cfg
        logging.info("row %s: %s", self.name, m.lines())
        return dataclasses.replace(cfg, n_embd=m.width)


_SCRATCH_LAYERS = {"n_layer": 3}  # the paper's "Full transformer" where it used 3 blocks
# The alignment stage's length: Fashion-MNIST's held-out MMD to MiniLM's text had fallen
# ~35x by then at Adam 1e-3 (one run, align_metrics.jsonl) and was flattening.
ALIGN_STEPS = 300
_MINILM_LAST_BLOCK = {"blocks": (5,), "blocks_model": "minilm-l6"}

ROWS: dict[str, Row] = {r.name: r for r in (
    Row("fpt", "frozen pretrained GPT-2 (FPT)", paper_row="fpt", rothermel_row="fpt",
        draws_attention=True),
    Row("random", "frozen random GPT-2", {"init": "random"}, paper_row="random",
        rothermel_row="random", draws_attention=True),
    Row("full", "pretrained GPT-2, fully fine-tuned", {"trainable": "full"},
        rothermel_row="full"),
    Row("scratch", "transformer from scratch (random GPT-2, all trained)",
        {"init": "random", "trainable": "full"},
        per_task={t: _SCRATCH_LAYERS for t in ("cifar10", "listops", "cifar10_lra")},
        paper_row="scratch", rothermel_row="scratch"),
    # Ours: the paper's LSTM size and learning rate, every parameter trained from a zero
    # state (models/lstm.py); it solves Bit XOR, where the paper reports chance.
    Row("lstm", "LSTM (the paper's size, all trained)",
        {"model": "lstm", "init": "random", "trainable": "full",
         "learning_rate": LSTM_LEARNING_RATE}),
    # The original code's: its LayerNormLSTM (random initial state, uniform layer-norm init,
    # unbiased variance, dropout on the carried state) inside its FPT class, whose default
    # freeze_trans=True freezes every LSTM weight but the layer norms ("ln" in the name):
    # 44,546 of 14,218,754 parameters trained on Bit XOR. The paper's LSTM numbers.
    Row("lstm_original", "LSTM as the original code trains it (recurrence frozen)",
        {"model": "lstm-original", "init": "random", "trainable": "input,ln,output",
         "learning_rate": LSTM_LEARNING_RATE}, paper_row="lstm"),
    Row("lstm_matched", "LSTM, parameter-matched to FPT",
        {"model": "lstm", "init": "random", "trainable": "full",
         "learning_rate": LSTM_LEARNING_RATE}, match=Match("gpt2", "trainable")),
    Row("lstm_matched_effective", "LSTM, matched to the FPT parameters the task reads",
        {"model": "lstm", "init": "random", "trainable": "full",
         "learning_rate": LSTM_LEARNING_RATE}, match=Match("gpt2", "effective")),
    Row("lstm_frozen", "frozen random LSTM (input, layer norms, output trained)",
        {"model": "lstm", "init": "random", "trainable": FROZEN_LSTM_TRAINABLE,
         "learning_rate": LSTM_LEARNING_RATE}, paper_row="lstm_frozen"),
    Row("lstm_frozen_matched", "frozen random LSTM, recurrence as large as GPT-2's frozen part",
        {"model": "lstm", "init": "random", "trainable": FROZEN_LSTM_TRAINABLE,
         "learning_rate": LSTM_LEARNING_RATE}, match=Match("gpt2", "frozen")),
    Row("fnet", "FNet reservoir (frozen Fourier mixing)", {"model": "fnet", "init": "random"}),
    Row("fnet_orthonormal", "FNet reservoir, orthonormal mixing",
        {"model": "fnet-orthonormal", "init": "random"}),
    Row("mixer", "MLP-Mixer reservoir (frozen random token-mixing MLPs)",
        {"model": "mixer", "init": "random"}),
    Row("minilm", "frozen pretrained MiniLM", {"model": "minilm-l6", "weights": "minilm"},
        draws_attention=True),
    Row("minilm_random", "frozen random MiniLM architecture",
        {"model": "minilm-l6", "init": "random"}, draws_attention=True),
    # Beyond FPT (issue 28). ORCA's align-then-refine: the input layer first trained alone
    # to match MiniLM's own word embeddings of real text (fpt_jax/align.py), then FPT.
    Row("minilm_aligned", "frozen pretrained MiniLM, input aligned first (ORCA)",
        {"model": "minilm-l6", "weights": "minilm", "align_steps": ALIGN_STEPS}),
    # Pang et al. 2024: a small ViT trained from scratch, then with MiniLM's last block
    # appended frozen (joined by trained linear maps), and with a frozen random block of the
    # same shape in its place (their control). The ViT's size is the budget's.
    Row("vit_small", "small ViT, trained from scratch",
        {"model": "vit-tiny", "init": "random", "trainable": "encoder"}),
    Row("vit_minilm_block", "small ViT + frozen pretrained MiniLM block",
        {"model": "vit-tiny", "init": "random", "trainable": "encoder",
         **_MINILM_LAST_BLOCK}),
    Row("vit_random_block", "small ViT + frozen random block of MiniLM's shape",
        {"model": "vit-tiny", "init": "random", "trainable": "encoder",
         **_MINILM_LAST_BLOCK, "blocks_init": "random"}),
)}


def get(name: str) -> Row:
    if name not in ROWS:
        raise ValueError(f"unknown row {name!r}; accepted: {list(ROWS)}")
    return ROWS[name]


def apply(cfg: TrainConfig, name: str = "fpt", overrides: Mapping[str, Any] | None = None
          ) -> TrainConfig:
    """`cfg` (a task's FPT config) as the row `name` (see `Row.apply`)."""
    return get(name).apply(cfg, overrides)
