"""The loop of K runs: per-run selection and test, metrics rows per run, exact resume; run k
of a group is the run trained alone."""
import dataclasses
import json

import numpy as np
import pytest

from fpt_jax import loop, runs
from fpt_jax.config import TrainConfig
from tests.settings import train_config

pytestmark = pytest.mark.slow  # whole trainings of groups, resumed

TINY = dict(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16, batch_size=8,
            dropout=0.1, log_every=2, eval_every=4, eval_batches=2, checkpoint_every=4,
            num_devices=2, steps=12)
LRS, SEEDS = (1e-3, 1e-2, 1e-3), (0, 0, 1)


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_selects_and_tests_each_run_and_resumes_exactly(tmp_path):
    cfg = train_config(**TINY)
    group = loop.train_and_evaluate(cfg, str(tmp_path / "straight"), LRS, SEEDS)
    assert [(r["learning_rate"], r["seed"]) for r in group] == list(zip(LRS, SEEDS))
    assert runs.summary_runs(str(tmp_path / "straight")) == group
    rows = _rows(tmp_path / "straight")
    for r in group:
        val = {row["step"]: row["eval/accuracy"] for row in rows
               if row["run"] == r["run"] and "eval/accuracy" in row}
        assert sorted(val) == [4, 8, 12]
        best = max(val, key=lambda s: (val[s], -s))
        assert r["best_step"] == best and r["best_val_accuracy"] == val[best]
        assert set(r["test"]["test"]) == {"test/loss", "test/accuracy"}
    assert {row["run"] for row in rows} == {0, 1, 2}
    assert group[0]["test"] != group[1]["test"] or group[0]["best_step"] != group[1]["best_step"]

    # killed after step 8's checkpoint, then resumed: the same metrics and summary
    loop.train_and_evaluate(dataclasses.replace(cfg, steps=8), str(tmp_path / "resumed"),
                            LRS, SEEDS)
    again = loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), LRS, SEEDS)
    assert _rows(tmp_path / "resumed") == rows
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(again) == strip(group)


def test_run_k_of_a_sweep_loop_equals_the_run_trained_alone(tmp_path):
    """Every run k of the group (its learning rate and seed; runs 0 and 2 share a learning
    rate, 0 and 1 a seed) against the same run trained alone, a group of one, by the same
    loop: its training losses in metrics.jsonl, its validation accuracies and selected
    step, its test metrics, at float32 tolerance (the vmapped program may reassociate)."""
    cfg = train_config(**{**TINY, "steps": 8})
    group = loop.train_and_evaluate(cfg, str(tmp_path / "sweep"), LRS, SEEDS)
    rows = _rows(tmp_path / "sweep")
    for k, (lr, seed) in enumerate(zip(LRS, SEEDS)):
        alone = dataclasses.replace(cfg, learning_rate=lr, seed=seed)
        (single,) = loop.train_and_evaluate(alone, str(tmp_path / f"alone{k}"))
        assert single == runs.summary_runs(str(tmp_path / f"alone{k}"))[0]
        assert (single["learning_rate"], single["seed"]) == (lr, seed)
        single_rows = _rows(tmp_path / f"alone{k}")
        for metric in ("train/loss", "eval/accuracy"):
            got = {r["step"]: r[metric] for r in rows if r["run"] == k and metric in r}
            want = {r["step"]: r[metric] for r in single_rows if metric in r}
            assert sorted(got) == sorted(want) and want, (k, metric)
            np.testing.assert_allclose([got[s] for s in sorted(got)],
                                       [want[s] for s in sorted(want)],
                                       rtol=1e-5, atol=1e-6, err_msg=f"run {k} {metric}")
        assert group[k]["best_step"] == single["best_step"], k
        np.testing.assert_allclose(group[k]["best_val_accuracy"], single["best_val_accuracy"],
                                   atol=1e-6, err_msg=f"run {k}")
        np.testing.assert_allclose(group[k]["test"]["test"]["test/accuracy"],
                                   single["test"]["test"]["test/accuracy"], atol=1e-6,
                                   err_msg=f"run {k}")
        np.testing.assert_allclose(group[k]["test"]["test"]["test/loss"],
                                   single["test"]["test"]["test/loss"], rtol=1e-5,
                                   err_msg=f"run {k}")


def test_a_sweep_reads_the_test_split_once_at_the_end(tmp_path):
    from tests.test_protocol import CountingTask
    task = CountingTask()
    cfg = train_config(**{**TINY, "steps": 8})
    loop.train_and_evaluate(cfg, str(tmp_path), LRS, SEEDS, task=task)
    # validation at steps 4 and 8, each run its own seeded batches; test once, all runs
    assert task.reads == {"validation": 2 * len(SEEDS), "test": len(SEEDS)}
    again = CountingTask()
    loop.train_and_evaluate(cfg, str(tmp_path), LRS, SEEDS, task=again)
    assert again.reads == {}
