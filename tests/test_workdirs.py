"""What a workdir survives: any path the OS accepts, a stop by signal (checkpoint, then an
exact resume), and workdirs written by f28d936 (a sweep cell resumes; a single run is
refused with what to do)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fpt_jax import build, loop, runs, weights
from fpt_jax.checkpoint import literal_path
from fpt_jax.config import TrainConfig
from fpt_jax.tasks import get_task
from tests.settings import train_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "f28d936"
# The settings the f28d936 fixtures were trained with (tests/fixtures/f28d936).
TINY = train_config(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16,
                   batch_size=4, dropout=0.0, eval_every=2, eval_batches=1, log_every=1,
                   checkpoint_every=2, keep_checkpoints=1, steps=4)
# Brackets, glob and separator characters, spaces, punctuation, non-ASCII: one name holds them
# all (each run costs a few seconds of compilation).
ODD_NAME = "sel[fpt] a:b,c é ü 日本 #% back\\slash *? 'q\""


def _rows(workdir: Path, run: int = 0) -> dict[int, dict]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("run", 0) == run:
            out.setdefault(row["step"], {}).update(row)
    return out


@pytest.mark.slow
def test_any_workdir_path_trains_checkpoints_resumes_and_tests(tmp_path, capsys):
    workdir = tmp_path / ODD_NAME / f"run {ODD_NAME}"  # the parent holds them too
    (first,) = loop.train_and_evaluate(TINY, str(workdir))
    assert first["best_step"] is not None and np.isfinite(first["test"]["test"]["test/accuracy"])
    (again,) = loop.train_and_evaluate(dataclasses.replace(TINY, steps=6), str(workdir))
    assert "resumed from checkpoint at step 4" in capsys.readouterr().out
    assert sorted(_rows(workdir)) == [1, 2, 3, 4, 5, 6] and again["last_step"] == 6
    loaded, params = build.load_run(str(workdir))  # the reader finds its best step
    assert loaded.step == again["best_step"] and loaded.summary["best_step"] == loaded.step
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]


def test_literal_path_reaches_the_directory_itself(tmp_path):
    plain = tmp_path / "plain"
    odd = tmp_path / "a[b]\\c"
    for d in (plain, odd):
        d.mkdir()
    assert literal_path(plain) == (str(plain), None)
    path, fd = literal_path(odd)
    try:
        (Path(path) / "probe").write_text("x")
        assert (odd / "probe").read_text() == "x" and "[" not in path
    finally:
        os.close(fd)


@pytest.mark.slow
def test_converted_weights_under_a_bracketed_path_load(tmp_path):
    from fpt_jax.models.gpt2 import GPT2Config, init_params
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16)
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    where = weights.save_converted(tmp_path / "w[1] é", config, params)
    _, loaded = weights.load_converted(where)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


# --- stopped by a signal ------------------------------------------------------------------

class _SignalsAtStep:
    """Bit XOR whose training batch of step `at` sends `signum` to this process (as a
    scheduler would, at a point the test fixes)."""

    def __init__(self, at: int, signum: int):
        self.task, self.at, self.signum, self.sent = get_task("bit_xor"), at, signum, False

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, split, step, *args, **kwargs):
        if split == "train" and step == self.at and not self.sent:
            self.sent = True  # once: a second signal stops at once, as it should
            os.kill(os.getpid(), self.signum)
        return self.task.batch(split, step, *args, **kwargs)


@pytest.mark.slow
def test_a_group_stopped_by_sigint_checkpoints_and_resumes_exactly(tmp_path):
    cfg = dataclasses.replace(TINY, steps=8, checkpoint_every=100)
    lrs, seeds = [1e-3, 1e-2], [0, 1]
    straight = loop.train_and_evaluate(cfg, str(tmp_path / "straight"), lrs, seeds)
    with pytest.raises(loop.Preempted) as stop:
        loop.train_and_evaluate(cfg, str(tmp_path / "stopped"), lrs, seeds,
                                task=_SignalsAtStep(3, signal.SIGINT))
    assert stop.value.step == 4 and stop.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["4"]
    assert not (tmp_path / "stopped" / "summary.json").exists()  # not tested before its end
    resumed = loop.train_and_evaluate(cfg, str(tmp_path / "stopped"), lrs, seeds)
    for k in range(2):
        a, b = _rows(tmp_path / "straight", k), _rows(tmp_path / "stopped", k)
        assert sorted(a) == sorted(b) == list(range(1, 9))
        for step in a:
            for key in ("train/loss", "eval/accuracy"):
                if key in a[step]:
                    assert a[step][key] == b[step][key], (k, step, key)
        for key in ("best_step", "best_val_accuracy", "test"):
            assert straight[k][key] == resumed[k][key], key


@pytest.mark.slow
def test_sigterm_stops_the_train_command_with_a_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/bit_xor.py",
           "--config.init=random", "--config.n_layer=1", "--config.n_head=2",
           "--config.n_embd=16", "--config.batch_size=4", "--config.steps=100000",
           "--config.log_every=1", "--config.eval_every=100000",
           "--config.checkpoint_every=100000", f"--workdir={workdir}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "FPT_JAX_HUGEPAGES": "0"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped: stopped by SIGTERM at step" in err and "Traceback" not in err, err[-2000:]
    step = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(step)]
    assert step >= 3 and max(_rows(workdir)) == step  # every step it logged is checkpointed


# --- workdirs of f28d936 ------------------------------------------------------------------

@pytest.mark.slow
def test_a_sweep_cell_of_f28d936_resumes_where_it_stopped(tmp_path, capsys):
    cell = shutil.copytree(FIXTURES / "sweep_cell", tmp_path / "cell")
    lrs, seeds = [1e-3, 1e-2], [0, 0]  # its 2 learning rates x 1 seed
    cfg = dataclasses.replace(TINY, log_every=2, steps=6)
    resumed = loop.train_and_evaluate(cfg, str(cell), lrs, seeds)
    assert "resumed from checkpoint at step 4" in capsys.readouterr().out
    fresh = loop.train_and_evaluate(cfg, str(tmp_path / "fresh"), lrs, seeds)
    for k in range(2):  # steps 5-6 continue f28d936's training as this version trains it
        np.testing.assert_allclose(_rows(cell, k)[6]["train/loss"],
                                   _rows(tmp_path / "fresh", k)[6]["train/loss"], rtol=1e-5)
        assert resumed[k]["last_step"] == 6
        assert resumed[k]["best_step"] == fresh[k]["best_step"]
    loaded, _ = build.load_run(str(cell), run=1)  # and it reads as a group
    assert loaded.cfg.learning_rate == 1e-2 and loaded.num_runs == 2
    with pytest.raises(ValueError, match="holds a checkpoint of a different run"):
        loop.train_and_evaluate(cfg, str(cell), [1e-3, 3e-2], seeds)


@pytest.mark.slow
def test_a_group_of_64da4ce_resumes_with_its_task_options_nested(tmp_path, capsys):
    # tests/fixtures/64da4ce/group: written by 64da4ce (identity format 2: the task's options
    # as top-level fields) with TINY's settings on 1 device, stopped at step 4
    group = shutil.copytree(FIXTURES.parent / "64da4ce" / "group", tmp_path / "group")
    lrs, seeds = [1e-3, 1e-2], [0, 0]
    cfg = dataclasses.replace(TINY, log_every=2, steps=6, num_devices=1)
    resumed = loop.train_and_evaluate(cfg, str(group), lrs, seeds)
    assert "resumed from checkpoint at step 4" in capsys.readouterr().out
    fresh = loop.train_and_evaluate(cfg, str(tmp_path / "fresh"), lrs, seeds)
    for k in range(2):
        np.testing.assert_allclose(_rows(group, k)[6]["train/loss"],
                                   _rows(tmp_path / "fresh", k)[6]["train/loss"], rtol=1e-5)
        assert resumed[k]["best_step"] == fresh[k]["best_step"]
    loaded, _ = build.load_run(str(group), run=1)
    assert loaded.cfg.task_options.n == 5 and loaded.cfg.learning_rate == 1e-2
    other = dataclasses.replace(cfg, task_options={"n": 4, "num_patterns": 2, "patch_size": 1})
    with pytest.raises(ValueError, match="task_options"):
        loop.train_and_evaluate(other, str(group), lrs, seeds)


def test_a_single_run_of_f28d936_is_refused_with_what_to_do(tmp_path):
    old = shutil.copytree(FIXTURES / "single_run", tmp_path / "old")
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    for attempt in (lambda: loop.train_and_evaluate(TINY, str(old)),
                    lambda: build.load_run(str(old)),
                    lambda: build.build_group(dataclasses.replace(
                        TINY, init=str(old), n_layer=None, n_head=None, n_embd=None))):
        with pytest.raises(runs.OldLayoutError, match="f28d936.*new workdir"):
            attempt()
    assert runs.summary_runs(str(old)) == []  # its summary.json is left as it was
    after = sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.name != "lock")
    assert after == before
