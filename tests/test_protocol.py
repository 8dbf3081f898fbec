"""The evaluation protocol: validation during training, the best step kept, test read once
at the selected step, summary.json, early stopping, steps to converge."""
import dataclasses
import json

import numpy as np
import pytest

from fpt_jax import train
from fpt_jax.config import TrainConfig
from fpt_jax.protocol import BestStep
from fpt_jax.tasks import get_task

TINY = dict(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=32, batch_size=8,
            dropout=0.0, learning_rate=3e-3, log_every=2, eval_every=4, eval_batches=2,
            checkpoint_every=4, num_devices=1, steps=12)


class CountingTask:
    """A task double: the real Bit XOR, counting the evaluation reads per split."""

    def __init__(self):
        self.inner = get_task("bit_xor")
        self.reads: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def eval_batches(self, split, *args, **kwargs):
        self.reads[split] = self.reads.get(split, 0) + 1
        return self.inner.eval_batches(split, *args, **kwargs)


def test_test_split_is_read_once_at_the_selected_step(tmp_path):
    task = CountingTask()
    final = train.train_and_evaluate(TrainConfig(**TINY), str(tmp_path), task=task)
    assert task.reads == {"validation": 3, "test": 1}
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    best = max(val, key=lambda step: (val[step], -step))  # the first of the best
    assert summary["best_step"] == best and summary["best_val_accuracy"] == val[best]
    assert summary["test"]["test"]["test/accuracy"] == final["test/accuracy"]
    assert summary["last_step"] == 12 and summary["trainable_params"] > 0
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [str(best)]
    # the best step's parameters, evaluated on test, are what the summary holds
    again = CountingTask()
    train.train_and_evaluate(TrainConfig(**TINY), str(tmp_path), task=again)
    assert again.reads == {}  # finished: nothing trained, nothing read, summary kept


def test_resumed_run_selects_and_tests_as_an_uninterrupted_one(tmp_path):
    cfg = TrainConfig(**{**TINY, "dropout": 0.1})
    train.train_and_evaluate(cfg, str(tmp_path / "straight"))
    train.train_and_evaluate(dataclasses.replace(cfg, steps=8), str(tmp_path / "resumed"))
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    a, b = (json.loads((tmp_path / d / "summary.json").read_text())
            for d in ("straight", "resumed"))
    for key in ("best_step", "best_val_accuracy", "test", "last_step", "steps_to_converge"):
        assert a[key] == b[key], key


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    cfg = TrainConfig(**{**TINY, "learning_rate": 1e-12, "patience": 2, "steps": 40})
    train.train_and_evaluate(cfg, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    # nothing learns at lr 1e-12: the first evaluation stays the best, two more end the run
    assert summary["stopped_early"] and summary["best_step"] == 4
    assert summary["last_step"] == 12
    lines = (tmp_path / "metrics.jsonl").read_text()
    train.train_and_evaluate(cfg, str(tmp_path))  # a rerun does not train on
    assert (tmp_path / "metrics.jsonl").read_text() == lines


@pytest.mark.parametrize("accuracies, converge_at, best, converged, stops_at", [
    ([0.5, 0.7, 0.7, 0.6], 0.65, 2, 2, 4),  # ties keep the earlier step; patience 2 ends it
    ([0.5, 0.4, 0.3, 0.9], 0.95, 4, None, 3),  # patience 2 ran out at the third eval
    ([0.9, 0.95, 0.99], 0.9, 3, 1, None),
])
def test_best_step_bookkeeping(accuracies, converge_at, best, converged, stops_at):
    tracker = BestStep()
    stopped = None
    for i, acc in enumerate(accuracies, 1):
        tracker.update(i, acc, 1.0 - acc, converge_at)
        if stopped is None and tracker.patience_ran_out(2):
            stopped = i
    assert (tracker.best_step, tracker.converged_step, stopped) == (best, converged, stops_at)
    restored = BestStep.from_json(json.loads(json.dumps(tracker.to_json())))
    assert restored == tracker
    assert np.isneginf(BestStep.from_json(BestStep().to_json()).best_accuracy)


def test_a_checkpoint_is_issued_only_once_the_best_step_it_records_is_on_disk(
        tmp_path, monkeypatch):
    # A run killed after a checkpoint commits must find the best step that checkpoint
    # records: the best save issued just before it (same step) must be finished first.
    from fpt_jax import checkpoint
    managers, issued = [], []
    real_init, real_save = checkpoint.Checkpoints.__init__, checkpoint.Checkpoints.save

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        managers.append(self)

    def save(self, step, *args, **kwargs):
        if self.manager.directory.name == "checkpoints":
            issued.append((step, any(m.manager.directory.name == "best"
                                     and m.manager.is_saving_in_progress() for m in managers)))
        return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(checkpoint.Checkpoints, "__init__", init)
    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    summary = train.train_and_evaluate(TrainConfig(**TINY), str(tmp_path))
    assert "test/accuracy" in summary  # the first evaluation is a best, saved at step 4
    assert [step for step, _ in issued] == [4, 8, 12]
    assert not any(busy for _, busy in issued), issued
