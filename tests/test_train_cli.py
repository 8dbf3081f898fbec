"""`python -m experiments.train` as a user runs it: errors, progress, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.entry_runner import run_all

pytestmark = pytest.mark.slow  # the entry point's processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=experiments/configs/bit_xor.py", "--config.init=random",
        "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=16", "--config.batch_size=4",
        "--config.dropout=0.1", "--config.eval_batches=2", "--config.log_every=1",
        "--config.num_devices=1"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("flag, message", [
    ("--config.task=bit_parity", "error: unknown task 'bit_parity'; accepted:"),
    ("--config.trainable=input,embeddings", "error: unknown trainable group 'embeddings'"),
    ("--config.batch_size=0", "error: batch_size=0; accepted: an integer >= 1"),
    ("--config.task_options.patch_size=2", "error: bit_xor: patch_size=2 must divide n=5"),
    ("--config.weights=/no/such/dir", "error: '/no/such/dir' is neither an existing directory "
                                      "nor a known name"),
    ("--config.learning_rat=1", "error: --config.learning_rat: not a setting; accepted: "
                                "--config.<field> for the fields task, task_options,"),
    ("--config.steps=ten", "error: flag --config.steps=ten: invalid literal for int()"),
    ("--config.task_options.max_length=64", "error: --config.task_options.max_length: not a "
     "setting; accepted: --config.<field> for the fields"),
    ("--config.task_options.max_length=64", "options of task bit_xor: n, num_patterns, "
                                            "patch_size"),
    ("--config=experiments/configs/nothing.py", "error: flag --config=experiments/configs/"
                                                "nothing.py: no such file; accepted: a python "
                                                "file whose get_config() returns a TrainConfig"),
    ("--config.steps=none", "error: steps=None; steps has no 'not set' value"),
    ("--config.seed=-1", "error: seed=-1; accepted: an integer >= 0"),
])
def test_bad_flag_exits_with_a_clear_message(tmp_path, flag, message):
    extra = ["--config.init=pretrained"] if flag.startswith("--config.weights") else []
    args = [a for a in TINY if not (extra and a.startswith(("--config.n_", "--config.init")))]
    if flag.startswith("--config="):
        args = []
    # the entry point's own process, forked from a server that imported it once
    result, = run_all("experiments.train", [[*args, *extra, flag, f"--workdir={tmp_path}"]],
                      env=_env(), timeout=300)
    assert result["rc"] == 2, result["stderr"][-2000:]
    assert message in result["stderr"]
    assert "Traceback" not in result["stderr"]


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path):
    common = [*TINY, "--config.steps=60", "--config.eval_every=20",
              "--config.checkpoint_every=20"]
    straight = tmp_path / "straight"
    done = _train([*common, f"--workdir={straight}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 60/60" in done.stdout and "steps/s" in done.stdout and "ETA" in done.stdout

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *common,
                             f"--workdir={killed}"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "20").exists() and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "20").exists()
    assert not (killed / "checkpoints" / "60").exists(), "the run ended before it was killed"

    again = _train([*common, f"--workdir={killed}"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from checkpoint at step" in again.stdout
    assert _records(killed) == _records(straight)
