"""The evaluation protocol: validation during training, the best step kept, test read once
at the selected step, summary.json, early stopping, steps to converge."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import build, checkpoint, freeze, loop, parallel, runs, steps
from fpt_jax.config import TrainConfig
from fpt_jax.protocol import BestStep
from fpt_jax.tasks import get_task
from tests.settings import train_config

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


@pytest.mark.slow
def test_test_split_is_read_once_at_the_selected_step(tmp_path):
    task = CountingTask()
    (final,) = loop.train_and_evaluate(train_config(**TINY), str(tmp_path), task=task)
    assert task.reads == {"validation": 3, "test": 1}
    (summary,) = runs.summary_runs(str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    best = max(val, key=lambda step: (val[step], -step))  # the first of the best
    assert summary["best_step"] == best and summary["best_val_accuracy"] == val[best]
    assert summary["test"]["test"]["test/accuracy"] == final["test"]["test"]["test/accuracy"]
    assert summary["last_step"] == 12 and summary["trainable_params"] > 0
    # the best step travels in the checkpoint (no best/ directory): the newest one records it
    assert not (tmp_path / "best").exists()
    assert _checkpoint_protocol(tmp_path)[0]["best_step"] == best
    # the best step's parameters, evaluated on test, are what the summary holds (below:
    # test_the_newest_checkpoint_holds_the_best_step_that_summary_json_reports)
    again = CountingTask()
    loop.train_and_evaluate(train_config(**TINY), str(tmp_path), task=again)
    assert again.reads == {}  # finished: nothing trained, nothing read, summary kept


@pytest.mark.slow
def test_resumed_run_selects_and_tests_as_an_uninterrupted_one(tmp_path):
    cfg = train_config(**{**TINY, "dropout": 0.1})
    loop.train_and_evaluate(cfg, str(tmp_path / "straight"))
    loop.train_and_evaluate(dataclasses.replace(cfg, steps=8), str(tmp_path / "resumed"))
    loop.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    (a,), (b,) = (runs.summary_runs(str(tmp_path / d)) for d in ("straight", "resumed"))
    for key in ("best_step", "best_val_accuracy", "test", "last_step", "steps_to_converge"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    cfg = train_config(**{**TINY, "learning_rate": 1e-12, "patience": 2, "steps": 40})
    loop.train_and_evaluate(cfg, str(tmp_path))
    (summary,) = runs.summary_runs(str(tmp_path))
    # nothing learns at lr 1e-12: the first evaluation stays the best, two more end the run
    assert summary["stopped_early"] and summary["best_step"] == 4
    assert summary["last_step"] == 12
    lines = (tmp_path / "metrics.jsonl").read_text()
    loop.train_and_evaluate(cfg, str(tmp_path))  # a rerun does not train on
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


def _checkpoint_protocol(workdir) -> list[dict]:
    """The selection (one BestStep per run) that the newest checkpoint records."""
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, runs.CHECKPOINTS), read_only=True)
    try:
        return ckpts.meta(ckpts.latest_step())["protocol"]
    finally:
        ckpts.close()


def _test_metrics(workdir, cfg: TrainConfig, which: str = "best") -> dict[str, float]:
    """The run's test metrics from its checkpoint's parameters (`build.load_run`), evaluated
    as the loop evaluates a group of one on a generated task: the run's seeded test batches
    with the run axis (`batch_axis=0`), per device, summed in float32, divided in float64."""
    loaded, params = build.load_run(str(workdir), which=which)
    selection = freeze.parse_selection(loaded.cfg.trainable, loaded.model.config.n_layer)
    trainable, frozen = freeze.partition(params, selection)
    trainable = steps.stack([trainable])  # the run axis: a group of one
    frozen = {k: v if k == steps.BACKBONE else steps.stack([v]) for k, v in frozen.items()}
    devices = parallel.local_devices(cfg.num_devices)
    p_eval = steps.pmapped_eval_step(
        steps.make_eval_step(loaded.model, loaded.task, batch_axis=0), devices)
    trainable, frozen = parallel.replicate(trainable, devices), parallel.replicate(frozen, devices)
    totals = None
    for batch in loaded.task.eval_batches("test", cfg.eval_batch_size or cfg.batch_size,
                                          seed=loaded.cfg.seed, num_batches=cfg.eval_batches):
        out = p_eval(trainable, frozen,
                     steps.stack_runs([parallel.shard_batch(batch, len(devices))]))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = parallel.unreplicate(totals)
    count = np.maximum(np.asarray(totals.pop("count"), np.float64), 1.0)
    return {f"test/{n[:-len('_sum')]}": float(np.asarray(v)[0] / count[0])
            for n, v in totals.items()}


@pytest.mark.slow
def test_the_newest_checkpoint_holds_the_best_step_that_summary_json_reports(tmp_path):
    # The best step's parameters travel inside every checkpoint, with the selection that
    # names them (one atomic write): a run killed after any checkpoint finds its best step.
    # (This replaces the ordering of best/ saves before checkpoints; there is no best/.)
    cfg = train_config(**TINY)
    (run,) = loop.train_and_evaluate(cfg, str(tmp_path))
    (summary,) = runs.summary_runs(str(tmp_path))
    assert not (tmp_path / "best").exists()
    ckpts = checkpoint.Checkpoints(tmp_path / runs.CHECKPOINTS, read_only=True)
    try:
        assert ckpts.manager.all_steps() == [4, 8, 12]
    finally:
        ckpts.close()
    best = summary["best_step"]
    assert _checkpoint_protocol(tmp_path)[0]["best_step"] == best == run["best_step"]
    # at this seed the first evaluation stays the best: the best parameters are not the last
    assert best < summary["last_step"]
    loaded, _ = build.load_run(str(tmp_path), which="best")
    assert loaded.step == best and loaded.summary == summary
    # the checkpoint's best parameters give exactly the test metrics the summary records
    # (and the last ones do not)
    tested = _test_metrics(tmp_path, cfg, "best")
    assert tested["test/accuracy"] == summary["test"]["test"]["test/accuracy"]
    assert tested == summary["test"]["test"]
    assert _test_metrics(tmp_path, cfg, "last") != summary["test"]["test"]
