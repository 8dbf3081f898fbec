"""Trivial baselines: what a predictor that learns nothing about the task scores, computed
from the task's own data, and whether a result is distinguishable from them.

Every comparison table and plot shows them, so that a number is read against the level a
model reaches without solving the task:
  * `majority`: a constant prediction of the class most frequent among the training labels
    (every output position counts: a Bit XOR bit, a ListOps answer, an image's class), scored
    on the test split. Bit XOR's 50% and Fashion-MNIST's 10% are this; so is a model that
    collapsed to one class (ListOps: label 0 is 46 of the 500 generated test examples).
  * a task's structural shortcut, where it has one (`SHORTCUTS`): Bit Memory shows half of
    the query's bits in the last row, so copying those and guessing the majority class for
    the hidden ones scores 0.5 + 0.5 x 0.5 = 75% with no memory at all.

Generated tasks are drawn (`num_batches` x `batch_size` examples of the test split, from
its evaluation seed); dataset tasks are counted over the whole split (its `mask`).
`interval(values)` is a mean's 95% t interval over seeds; a result `within` an interval of a
trivial baseline is not distinguishable from it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from fpt_jax.tasks.base import Batch, Task

TRAIN_BATCHES = 40  # generated tasks: training labels drawn to find the majority class
TEST_BATCHES = 40  # generated tasks: test examples drawn (x batch_size)
BATCH_SIZE = 128
SEED = 0


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str  # in tables and plots
    accuracy: float  # on the test split
    examples: int  # test examples it was computed on
    how: str  # one line, for the report


def _labels_and_mask(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Every label of the batch as [B, P] (P output positions) and its [B] example mask."""
    y = np.asarray(batch["y"])
    y = y.reshape(y.shape[0], -1)
    mask = np.asarray(batch.get("mask", np.ones(y.shape[0]))) > 0
    return y, mask


def _batches(task: Task, split: str, num_batches: int) -> Iterable[Batch]:
    return task.eval_batches(split, BATCH_SIZE, seed=SEED,
                             num_batches=None if task.is_dataset else num_batches)


def _copy_visible_bits(batch: Batch, majority: int) -> np.ndarray:
    """Bit Memory: the masked query (the last row, +-1 where shown, 0 where hidden) copied;
    the majority class where a bit is hidden."""
    query = np.asarray(batch["x"])[:, -1, :]
    return np.where(query > 0, 1, np.where(query < 0, 0, majority))


# task name -> (label, how, predictions of a batch given the training majority class)
SHORTCUTS: dict[str, tuple[str, str, Callable[[Batch, int], np.ndarray]]] = {
    "bit_memory": ("copy the visible bits",
                   "the query's shown bits copied, the majority class for the hidden half",
                   _copy_visible_bits),
}


def majority_class(task: Task) -> int:
    """The class most frequent among the training labels (ties: the smaller class)."""
    counts: np.ndarray = np.zeros(0, np.int64)
    for batch in _batches(task, "train", TRAIN_BATCHES):
        y, mask = _labels_and_mask(batch)
        found = np.bincount(y[mask].ravel(), minlength=counts.size)
        counts = np.pad(counts, (0, found.size - counts.size)) + found
    if not counts.sum():
        raise ValueError(f"task {task.name}: no training labels")
    return int(np.argmax(counts))


def _accuracy(task: Task, predict: Callable[[Batch], np.ndarray]) -> tuple[float, int]:
    """Mean over test examples of the fraction of their positions predicted right."""
    split = task.test_splits[0]
    total, examples = 0.0, 0
    for batch in _batches(task, split, TEST_BATCHES):
        y, mask = _labels_and_mask(batch)
        hit = (np.broadcast_to(predict(batch), y.shape).reshape(y.shape) == y).mean(axis=1)
        total += float(hit[mask].sum())
        examples += int(mask.sum())
    return total / examples, examples


def baselines(task: Task) -> list[Baseline]:
    """The task's trivial baselines: the majority class, then its shortcut if it has one."""
    majority = majority_class(task)
    acc, n = _accuracy(task, lambda batch: np.full(1, majority))
    out = [Baseline("majority class", acc, n,
                    f"always class {majority}, the most frequent training label")]
    if task.name in SHORTCUTS:
        label, how, fn = SHORTCUTS[task.name]
        acc, n = _accuracy(task, lambda batch: fn(batch, majority))
        out.append(Baseline(label, acc, n, how))
    return out


def interval(mean: float, se: float, n: int, confidence: float = 0.95
             ) -> tuple[float, float] | None:
    """The two-sided t interval of a mean over `n` seeds with standard error `se` (None for
    fewer than 2 seeds: one value has no spread to estimate)."""
    if n < 2:
        return None
    from scipy import stats
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return mean - half, mean + half


def within(mean: float, se: float, n: int, level: float, tolerance: float = 0.005) -> bool:
    """Whether a mean over `n` seeds is not distinguishable from `level`: `level` lies
    inside its 95% t interval, or within `tolerance` of it (one seed, or seeds that agree
    to the last digit: no interval to speak of)."""
    ci = interval(mean, se, n)
    if abs(mean - level) <= tolerance:
        return True
    return ci is not None and ci[0] <= level <= ci[1]


def closest(mean: float, se: float, n: int, found: Sequence[Baseline]) -> Baseline | None:
    """The trivial baseline a result is not distinguishable from (the highest such)."""
    hits = [b for b in found if within(mean, se, n, b.accuracy)]
    return max(hits, key=lambda b: b.accuracy) if hits else None


def _label(config: dict) -> str:
    options = dict(config.get("task_options") or {})
    shown = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if v is not None)
    return config["task"] + (f" ({shown})" if shown else "")


def not_above(selections: Sequence, found: Sequence[tuple[str, list[Baseline] | str]]
              ) -> list[tuple[str, str]]:
    """(cell, baseline) for each selected cell (`fpt_jax.results.Selection`) whose test
    accuracy is not distinguishable from one of its task's trivial baselines."""
    by_label = {label: b for label, b in found if not isinstance(b, str)}
    out = []
    for sel in selections:
        test = sel.test.get("test") if sel.learning_rate is not None else None
        task = by_label.get(_label(sel.cell.config)) if sel.cell.config.get("task") else None
        same = closest(*test, sel.n_seeds, task) if test and task else None
        if same is not None:
            out.append((sel.cell.name, same.name))
    return out


def for_configs(configs: Sequence[dict]) -> list[tuple[str, list[Baseline] | str]]:
    """Per distinct task (name and options) among recorded TrainConfig dicts (a sweep's
    cells): a label and its baselines, or why they could not be computed (its data moved)."""
    from fpt_jax.config import TrainConfig
    out, seen = [], set()
    for config in configs:
        if not config.get("task"):
            continue
        options = dict(config.get("task_options") or {})
        key = (config["task"], tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key in seen:
            continue
        seen.add(key)
        label = _label(config)
        try:
            task = TrainConfig(task=config["task"], task_options=options).make_task()
            out.append((label, baselines(task)))
        except (ValueError, OSError) as e:
            out.append((label, f"not computed: {str(e).splitlines()[0]}"))
    return out


def markdown(found: Sequence[tuple[str, list[Baseline] | str]],
             flagged: Sequence[tuple[str, str]] = ()) -> list[str]:
    """A results.md section: each task's trivial baselines, and the cells whose test
    accuracy is not distinguishable from one (`not_above`)."""
    if not found:
        return []
    lines = ["", "## Trivial baselines", "",
             "What a predictor that learns nothing about the task scores on its test split, "
             "computed from the data (fpt_jax/trivial.py): a cell whose test accuracy's 95% "
             "interval holds one has not shown it learned the task.", ""]
    for label, baselines_or_why in found:
        if isinstance(baselines_or_why, str):
            lines.append(f"- {label}: {baselines_or_why}")
            continue
        lines += [f"- {label}: {b.name} {100 * b.accuracy:.1f}% ({b.how}; {b.examples:,} "
                  "test examples)" for b in baselines_or_why]
    if flagged:
        lines += ["", "Not distinguishable from a trivial baseline (its 95% interval holds it): "
                  + ", ".join(f"**{cell}** ({name})" for cell, name in flagged) + "."]
    return lines
