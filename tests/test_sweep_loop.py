"""The loop of K runs: per-run selection and test, metrics rows per run, exact resume."""
import dataclasses
import json

import numpy as np

from fpt_jax import sweep, train
from fpt_jax.config import TrainConfig

TINY = dict(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16, batch_size=8,
            dropout=0.1, log_every=2, eval_every=4, eval_batches=2, checkpoint_every=4,
            num_devices=2, steps=12)
LRS, SEEDS = (1e-3, 1e-2, 1e-3), (0, 0, 1)


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_selects_and_tests_each_run_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(**TINY)
    runs = sweep.train_and_evaluate_sweep(cfg, str(tmp_path / "straight"), LRS, SEEDS)
    assert [(r["learning_rate"], r["seed"]) for r in runs] == list(zip(LRS, SEEDS))
    rows = _rows(tmp_path / "straight")
    for r in runs:
        val = {row["step"]: row["eval/accuracy"] for row in rows
               if row["run"] == r["run"] and "eval/accuracy" in row}
        assert sorted(val) == [4, 8, 12]
        best = max(val, key=lambda s: (val[s], -s))
        assert r["best_step"] == best and r["best_val_accuracy"] == val[best]
        assert set(r["test"]["test"]) == {"test/loss", "test/accuracy"}
    assert {row["run"] for row in rows} == {0, 1, 2}
    assert runs[0]["test"] != runs[1]["test"] or runs[0]["best_step"] != runs[1]["best_step"]

    # killed after step 8's checkpoint, then resumed: the same metrics and summary
    sweep.train_and_evaluate_sweep(dataclasses.replace(cfg, steps=8), str(tmp_path / "resumed"),
                                   LRS, SEEDS)
    again = sweep.train_and_evaluate_sweep(cfg, str(tmp_path / "resumed"), LRS, SEEDS)
    assert _rows(tmp_path / "resumed") == rows
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(again) == strip(runs)


def test_run_k_of_a_sweep_loop_equals_the_run_trained_alone(tmp_path):
    cfg = TrainConfig(**{**TINY, "steps": 8})
    runs = sweep.train_and_evaluate_sweep(cfg, str(tmp_path / "sweep"), LRS, SEEDS)
    alone = dataclasses.replace(cfg, learning_rate=LRS[2], seed=SEEDS[2])
    train.train_and_evaluate(alone, str(tmp_path / "alone"))
    single = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert runs[2]["best_step"] == single["best_step"]
    np.testing.assert_allclose(runs[2]["best_val_accuracy"], single["best_val_accuracy"],
                               atol=1e-6)
    np.testing.assert_allclose(runs[2]["test"]["test"]["test/loss"],
                               single["test"]["test"]["test/loss"], rtol=1e-5)


def test_a_sweep_reads_the_test_split_once_at_the_end(tmp_path):
    from tests.test_protocol import CountingTask
    task = CountingTask()
    cfg = TrainConfig(**{**TINY, "steps": 8})
    sweep.train_and_evaluate_sweep(cfg, str(tmp_path), LRS, SEEDS, task=task)
    # validation at steps 4 and 8, each run its own seeded batches; test once, all runs
    assert task.reads == {"validation": 2 * len(SEEDS), "test": len(SEEDS)}
    again = CountingTask()
    sweep.train_and_evaluate_sweep(cfg, str(tmp_path), LRS, SEEDS, task=again)
    assert again.reads == {}
