"""Attention maps of a finished run (issue 19): every layer's and head's weights on one input
of its task, as a PNG grid (one row per layer, one column per head).

The paper's figure is Bit XOR's: the tokens of the second string attend to the matching
bits of the first. Any attention backbone works (GPT-2, BERT, ViT); the baselines without
attention (LSTM, FNet) are refused.

    run, params = build.load_run(workdir)                # a run's best step
    x, length, labels = example(run.task, "test", 0, seed=run.cfg.seed)
    maps = attention(run.model, params, x, length)       # n_layer x [heads, query, key]
    plot(maps, "attention.png", title(run), labels)
    # or all of it: render(workdir, "attention.png")

A run is rebuilt from the identity its checkpoint records (`build.load_run`, the same
reader as `init=<workdir>`): the frozen parameters from the weights or the seed, the
trained ones from the checkpoint. It is rebuilt in float32 without dropout, so the maps of a
bfloat16 run are its float32 forward (frozen weights not rounded to bfloat16). A finished
run's directory is only read.
"""
from __future__ import annotations

import os
import textwrap
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpt_jax import build
from fpt_jax.models import backbones
from fpt_jax.models.fpt import FPT
from fpt_jax.models.layers import INTERMEDIATES
from fpt_jax.tasks import Task

WHICH = build.WHICH
MAX_GENERATED_INDEX = 10_000
MAX_TICKS = 32  # token labels on the axes up to this many tokens; beyond, they are unreadable
# Bit values as tick labels: Bit XOR's {0, 1}; Bit Memory's {-1, +1} and the query's zeroed bits.
_BIT_CHARS = {"bit_xor": {0: "0", 1: "1"}, "bit_memory": {-1: "-", 0: "0", 1: "+"}}


# --- one input and its maps -------------------------------------------------------------------

def example(task: Task, split: str = "test", index: int = 0, seed: int = 0
            ) -> tuple[np.ndarray, int | None, list[str]]:
    """`(x, length, labels)`: the `index`-th example of `split`'s evaluation stream, read in
    batches of one (a generated task draws it from `seed`, as a run's evaluation with that
    seed does), its number of real tokens (token tasks; else None) and one label per model
    token: the bit values of each token for Bit XOR / Bit Memory (with patch 1, Bit XOR's
    tokens 0..n-1 are the first string, n..2n-1 the second), else the position index."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index={index!r}; accepted: an integer >= 0")
    if not task.is_dataset and index >= MAX_GENERATED_INDEX:  # drawn one by one: bounded
        raise ValueError(f"index={index}: task {task.name} is generated (every example a "
                         f"fresh draw); accepted: 0..{MAX_GENERATED_INDEX - 1}")
    try:
        task.prepare(split)  # an unknown split or missing files: a clear error here
    except ValueError as e:
        raise ValueError(f"split={split!r}: {e}") from None
    batch, count = None, 0
    for batch in task.eval_batches(split, 1, seed=seed, num_batches=index + 1):
        count += 1
        if count > index:
            break
    if count <= index:
        raise ValueError(f"index={index}: split {split!r} of task {task.name} has {count} "
                         f"examples; accepted: 0..{count - 1}")
    x = np.asarray(batch["x"][0])
    length = int(batch["length"][0]) if "length" in batch else None
    if task.name in _BIT_CHARS:
        chars = _BIT_CHARS[task.name]
        tokens = x.reshape(-1, task.input_dim)  # FPT's patch order: row by row
        labels = ["".join(chars[int(v)] for v in tok) for tok in tokens]
    else:
        n = (length if length is not None else x.shape[0]) if task.input_kind == "tokens" \
            else x.shape[0] * (x.shape[-1] // task.input_dim)
        labels = [str(i) for i in range(n)]
    return x, length, labels


def attention(model: FPT, params: dict, x: np.ndarray, length: int | None = None,
              preset: str | None = None) -> list[np.ndarray]:
    """Every layer's attention weights `[heads, query, key]` (float32) for ONE example `x`
    (without its batch axis), deterministic, through the family's `attention_weights` (the
    last block is then computed at every position). With `length` (right-padded tokens) the
    maps keep the real tokens only: causal families never attend to padding from a real
    position, so their rows still sum to 1; a bidirectional family that does not mask padding
    (BERT) loses the weight it put there. `preset` names the model in the error of a family
    without attention (LSTM, FNet: ValueError)."""
    family = backbones.family_of(model.config)
    batch_length = None if length is None else jnp.asarray([length], jnp.int32)
    _, state = model.apply({"params": params}, jnp.asarray(x)[None], batch_length,
                           deterministic=True, mutable=[INTERMEDIATES])
    maps = family.attention_weights(state)
    if not maps:
        raise ValueError(f"model={preset or family.name} has no attention maps (family "
                         f"{family.name}: no attention weights); accepted: a run of an "
                         "attention backbone (GPT-2, BERT, ViT)")
    keep = slice(None) if length is None else slice(0, length)
    return [np.asarray(m[0], np.float32)[:, keep, keep] for m in maps]


# --- the figure -------------------------------------------------------------------------------

def figure(maps: Sequence[np.ndarray], title: str, tick_labels: Sequence[str] | None = None):
    """The grid as a matplotlib figure: row i = layer i, column j = head j, each panel the
    `[query, key]` map (query tokens down, key tokens across) on ONE colour scale for every
    panel, 0..1 (the weights are probabilities, comparable across layers and heads), with a
    colour bar. Token labels on the axes when there are at most `MAX_TICKS` tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not maps or any(np.ndim(m) != 3 or np.shape(m) != np.shape(maps[0]) for m in maps):
        raise ValueError(f"maps must be layers of [heads, query, key], all one shape; got "
                         f"{[np.shape(m) for m in maps]}")
    n_layer, (n_head, n_query, n_key) = len(maps), np.shape(maps[0])
    if tick_labels is not None and len(tick_labels) != n_key:
        raise ValueError(f"{len(tick_labels)} tick labels for maps of {n_key} tokens")
    size = 1.6 if max(n_query, n_key) <= MAX_TICKS else 1.3
    width = max(size * n_head + 1.2, 5.0)  # room for the title of a one- or two-head model
    fig, axes = plt.subplots(n_layer, n_head, squeeze=False, layout="constrained",
                             figsize=(width, size * n_layer + 1.0))
    ticks = tick_labels is not None and max(n_query, n_key) <= MAX_TICKS
    font = 5 if max(n_query, n_key) > 16 else 6
    image = None
    for i, layer in enumerate(maps):
        for j in range(n_head):
            ax = axes[i, j]
            image = ax.imshow(np.asarray(layer[j]), vmin=0.0, vmax=1.0, cmap="viridis",
                              interpolation="nearest", aspect="auto")
            if ticks:
                ax.set_xticks(range(n_key), list(tick_labels), fontsize=font)
                ax.set_yticks(range(n_query), list(tick_labels), fontsize=font)
                ax.tick_params(length=1, pad=1)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {j}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"layer {i}", fontsize=8)
    fig.suptitle("\n".join(textwrap.fill(line, int(width * 13)) for line in title.splitlines()),
                 fontsize=9)
    fig.supxlabel("key (attended token)", fontsize=8)
    fig.supylabel("query token", fontsize=8)
    bar = fig.colorbar(image, ax=axes, shrink=0.6)
    bar.set_label("attention weight", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def plot(maps: Sequence[np.ndarray], path: str | os.PathLike, title: str,
         tick_labels: Sequence[str] | None = None) -> str:
    """`figure(...)` saved as a PNG at `path` (written to a temporary file, then renamed:
    never a partial image); returns the path."""
    import matplotlib.pyplot as plt
    fig = figure(maps, title, tick_labels)
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def title(r: build.LoadedRun) -> str:
    """Names the run: model, task, init and trainable selection, run, step, test accuracy."""
    cfg = r.cfg
    init = cfg.init if not build.is_run_dir(cfg.init) else \
        f"init from {os.path.basename(os.path.normpath(cfg.init))}"
    parts = [f"{cfg.model} on {cfg.task} ({init}, trainable={cfg.trainable})"]
    if r.num_runs > 1:
        cell = os.path.basename(os.path.normpath(r.workdir))
        parts.append(f"run {r.run} of {cell} (lr {cfg.learning_rate:g}, seed {cfg.seed})")
    parts.append(f"{r.which} step {r.step}")
    test = ((r.summary or {}).get("test") or {}).get("test", {}).get("test/accuracy")
    if test is not None and r.which == "best" and (r.summary or {}).get("best_step") == r.step:
        parts.append(f"test accuracy {test:.3f}")
    return ", ".join(parts)


def render(workdir: str, out_png: str | os.PathLike, run: int | None = None,
           which: str = "best", split: str = "test", index: int = 0) -> str:
    """The attention maps of the run in `workdir` (`run`: its index in a sweep cell) on the
    `index`-th example of `split`, as a PNG grid at `out_png`; returns the path."""
    r, params = build.load_run(workdir, run, which)
    x, length, labels = example(r.task, split, index, seed=r.cfg.seed)
    try:
        maps = attention(r.model, params, x, length, preset=r.cfg.model)
    except ValueError as e:
        raise ValueError(f"workdir={workdir}: {e}") from None
    return plot(maps, out_png, title(r) + f"\n{split} example {index}", labels)
