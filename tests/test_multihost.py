"""Multi-process training on one machine: 2 processes x 2 CPU devices over jax.distributed
(gloo collectives) against one process with 4 devices and the same global batch.

The processes run the real entry point (`experiments.train`, through
tests/multihost_worker.py) with its multi-process flags. One run of 4 steps writes a
checkpoint; a second run resumes from it in both processes and is then killed in one of
them, which must make the other fail with a clear error within --distributed_timeout.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fpt_jax import loop, parallel
from fpt_jax.config import TrainConfig
from tests.settings import train_config

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
# Losses of the 2-process run equal the 1-process run up to float32 reduction order (the
# gradient all-reduce sums in a different order over gloo); measured: <= 1e-7 relative
# (float32 epsilon).
RTOL, ATOL = 1e-5, 1e-6
DEATH_TIMEOUT = 10  # --distributed_timeout of the run that loses a process
DEATH_DEADLINE = 60  # the survivor must be gone this long after the kill

RUN_FLAGS = ["--config.task=bit_xor", "--config.init=random", "--config.n_layer=1",
             "--config.n_embd=32", "--config.n_head=2", "--config.dropout=0",
             "--config.batch_size=8", "--config.log_every=1", "--config.eval_every=2",
             "--config.eval_batches=1", "--config.checkpoint_every=1000", "--config.seed=3"]
# The same run as a TrainConfig (the flags' defaults are TrainConfig's defaults otherwise).
REF_CONFIG = train_config(task="bit_xor", init="random", n_layer=1, n_embd=32, n_head=2,
                               dropout=0.0, batch_size=8, log_every=1, eval_every=2,
                               eval_batches=1, checkpoint_every=1000, seed=3, steps=6)
FIRST_STEPS = 4  # the first multi-process run; the resumed one continues past REF_CONFIG.steps


def _cache(fallback: Path) -> Path:
    """The session's compilation cache (conftest.py) when there is one, so that every cluster
    of this file reuses what the ones before it compiled."""
    return Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or fallback / "jax_cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`NUM_PROCESSES` local processes of one multi-process run, output in files."""

    def __init__(self, logdir: Path, flags: list[str], cache_dir: Path, timeout: int,
                 per_process: list[list[str]] | None = None,
                 module: str = "tests.multihost_worker"):
        env = dict(os.environ)
        env.update({
            # the suite's XLA flags (conftest.py), with this process's share of the devices
            "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
                                   *(f for f in os.environ.get("XLA_FLAGS", "").split()
                                     if "device_count" not in f)]),
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            # the second run reuses the first run's compilations
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
        port = _free_port()
        # process 0's coordinator listens on loopback only (JAX's default is every interface)
        env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
        logdir.mkdir(parents=True, exist_ok=True)
        self.logs = [(logdir / f"out{i}.txt", logdir / f"err{i}.txt")
                     for i in range(NUM_PROCESSES)]
        self.procs = []
        for i, (out, err) in enumerate(self.logs):
            own = per_process[i] if per_process else []
            cmd = [sys.executable, "-m", module, *flags, *own,
                   f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={NUM_PROCESSES}", f"--process_id={i}",
                   f"--distributed_timeout={timeout}", "--distributed_init_timeout=120"]
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo,
                                                   stderr=fe))

    def output(self, i: int) -> tuple[str, str]:
        return tuple(p.read_text(errors="replace") for p in self.logs[i])

    def report(self) -> str:
        parts = []
        for i, p in enumerate(self.procs):
            out, err = self.output(i)
            parts.append(f"--- process {i} (rc {p.poll()}) stdout:\n{out[-3000:]}\n"
                         f"--- stderr:\n{err[-3000:]}")
        return "\n".join(parts)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"multi-process run did not finish in {timeout} s\n{self.report()}")
        if any(p.returncode for p in self.procs):
            pytest.fail(f"multi-process run failed\n{self.report()}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _metrics(workdir: Path, run: int = 0) -> dict[int, dict[str, float]]:
    """Run `run`'s rows of a group's metrics.jsonl, by step."""
    by_step: dict[int, dict[str, float]] = {}
    path = workdir / "metrics.jsonl"
    if path.exists():
        lines = path.read_text().split("\n")[:-1]  # the last line may be half-written
        for line in lines:
            if line.strip():
                record = json.loads(line)
                if record.get("run", 0) == run:
                    by_step.setdefault(record.pop("step"), {}).update(record)
    return by_step


def _assert_metrics_match(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert step in got, f"step {step} missing from the multi-process metrics: {sorted(got)}"
        for key, value in want[step].items():
            np.testing.assert_allclose(got[step][key], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{key} at step {step}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The first 2-process run (FIRST_STEPS steps, one checkpoint) and the 1-process,
    4-device reference of REF_CONFIG.steps steps, run meanwhile in this process."""
    import jax
    if jax.local_device_count() != NUM_PROCESSES * DEVICES_PER_PROCESS:
        pytest.skip(f"the reference run needs {NUM_PROCESSES * DEVICES_PER_PROCESS} devices "
                    "(XLA_FLAGS from conftest.py)")
    root = tmp_path_factory.mktemp("multihost")
    multi, ref = root / "multi", root / "ref"
    cluster = Cluster(root / "logs_first", [*RUN_FLAGS, f"--config.steps={FIRST_STEPS}",
                                            f"--workdir={multi}",
                                            f"--restored_to={root}/restored_{{process}}.npz"],
                      _cache(root), timeout=120)
    try:
        loop.train_and_evaluate(REF_CONFIG, str(ref))
        cluster.wait(timeout=300)
    finally:
        cluster.kill()
    return {"root": root, "multi": multi, "ref": ref, "multi_metrics": _metrics(multi),
            "ref_metrics": _metrics(ref), "first": cluster}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    got, want = runs["multi_metrics"], runs["ref_metrics"]
    assert max(got) == FIRST_STEPS
    _assert_metrics_match(got, want, range(1, FIRST_STEPS + 1))
    assert "eval/loss" in got[FIRST_STEPS]
    # only process 0 logs and prints
    out0, _ = runs["first"].output(0)
    out1, _ = runs["first"].output(1)
    assert f"step {FIRST_STEPS}/{FIRST_STEPS}" in out0 and "final:" in out0
    assert "step 1/" not in out1 and "final:" not in out1


@pytest.mark.slow
def test_checkpoint_is_written_once_and_restored_in_every_process(runs):
    ckpt_dir = runs["multi"] / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [str(FIRST_STEPS)]

    def top_level(step_dir: Path) -> list[str]:
        # The items and their first level; ocdbt's internal files (manifests, hashed data
        # files) vary from write to write and are not compared.
        return sorted(str(p.relative_to(step_dir)) for p in [*step_dir.iterdir(),
                                                             *step_dir.glob("*/*")]
                      if not p.name.startswith(("ocdbt.process_", "manifest.", "d")))

    multi_step = ckpt_dir / str(FIRST_STEPS)
    ref_step = runs["ref"] / "checkpoints" / str(REF_CONFIG.steps)
    files = [str(p.relative_to(multi_step)) for p in multi_step.rglob("*")]
    assert not [f for f in files if "process_1" in f or "tmp" in f], files
    assert top_level(multi_step) == top_level(ref_step)  # one copy, as one process writes it

    restored = [np.load(runs["root"] / f"restored_{i}.npz") for i in range(NUM_PROCESSES)]
    assert [int(r["step"]) for r in restored] == [FIRST_STEPS] * NUM_PROCESSES
    keys = set(restored[0].files) - {"step"}
    assert any(k.startswith("params/") for k in keys) and any(
        k.startswith("opt_state/") for k in keys)
    for r in restored[1:]:
        assert set(r.files) - {"step"} == keys
        for k in keys:
            np.testing.assert_array_equal(r[k], restored[0][k], err_msg=k)


@pytest.mark.slow
def test_resume_in_every_process_then_a_dead_process_fails_the_run(runs):
    """The second run resumes from the checkpoint (its losses continue the reference's),
    then process 1 is killed: process 0 must exit non-zero with a clear error in time."""
    multi = runs["multi"]
    cluster = Cluster(runs["root"] / "logs_resume", [*RUN_FLAGS, "--config.steps=1000000",
                                                     f"--workdir={multi}"],
                      _cache(runs["root"]), timeout=DEATH_TIMEOUT)
    try:
        deadline = time.monotonic() + 300
        while REF_CONFIG.steps not in _metrics(multi) or "eval/loss" not in _metrics(
                multi)[REF_CONFIG.steps]:
            if any(p.poll() is not None for p in cluster.procs):
                pytest.fail(f"a process of the resumed run ended early\n{cluster.report()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the resumed run made no progress\n{cluster.report()}")
            time.sleep(0.2)
        assert f"resumed from checkpoint at step {FIRST_STEPS}" in cluster.output(0)[0]
        # Steps 5 and 6 equal the uninterrupted reference only if every process restored:
        # each process's devices compute their half of the batch with the params it restored.
        _assert_metrics_match(_metrics(multi), runs["ref_metrics"],
                              range(1, REF_CONFIG.steps + 1))

        cluster.procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            rc = cluster.procs[0].wait(DEATH_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still runs {DEATH_DEADLINE} s after process 1 died\n"
                        f"{cluster.report()}")
        elapsed = time.monotonic() - killed
        _, err = cluster.output(0)
        assert rc != 0, cluster.report()
        assert re.search(r"another task died|stopped sending heartbeats|unhealthy", err), \
            cluster.report()
        print(f"process 0 exited (rc {rc}) {elapsed:.1f} s after process 1 was killed "
              f"(--distributed_timeout={DEATH_TIMEOUT})")
    finally:
        cluster.kill()


# --- when a run becomes multi-process (no processes launched) ------------------------------

@pytest.fixture
def no_cluster_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_")):
            monkeypatch.delenv(key)
    return monkeypatch


def test_tpu_slices_are_counted_from_the_env_or_the_metadata_server(no_cluster_env):
    no_cluster_env.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3")
    assert parallel.detect_cluster() == ("GkeTpuCluster", 4)
    no_cluster_env.delenv("TPU_WORKER_HOSTNAMES")
    # A TPU VM (runtime + chips) asks the metadata server; one host is one process.
    no_cluster_env.setattr(parallel, "tpu_vm", lambda: True)
    no_cluster_env.setattr(parallel, "gce_metadata", lambda key, environ: "10.0.0.2")
    assert parallel.detect_cluster() == ("GceTpuCluster", 1)
    assert parallel.initialize_distributed("auto") is False
    no_cluster_env.setattr(parallel, "gce_metadata", lambda key, environ: "10.0.0.2,10.0.0.3")
    assert parallel.detect_cluster() == ("GceTpuCluster", 2)
    no_cluster_env.setattr(parallel, "gce_metadata", lambda key, environ: None)
    assert parallel.detect_cluster() is None  # unreachable: a plain single process


def test_auto_is_one_process_on_a_plain_machine(no_cluster_env):
    assert parallel.detect_cluster() is None
    assert parallel.initialize_distributed("auto") is False
    assert parallel.initialize_distributed("off") is False


def test_auto_joins_a_detected_cluster_of_several_processes(no_cluster_env):
    import jax
    jax.devices()  # this process's backend is up: initializing now must be refused
    slurm = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}
    for key, value in {**slurm, "SLURM_NTASKS": "1"}.items():
        no_cluster_env.setenv(key, value)
    assert parallel.detect_cluster() == ("SlurmCluster", 1)
    assert parallel.initialize_distributed("auto") is False  # one task: all devices stay
    no_cluster_env.setenv("SLURM_NTASKS", "2")
    assert parallel.detect_cluster() == ("SlurmCluster", 2)
    with pytest.raises(RuntimeError, match="before anything touches a JAX device"):
        parallel.initialize_distributed("auto")
    no_cluster_env.delenv("SLURM_JOB_ID")
    no_cluster_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(RuntimeError, match="before anything touches a JAX device"):
        parallel.initialize_distributed("auto")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="sometimes"), "unknown distributed mode 'sometimes'"),
    (dict(mode="off", process_id=1), r"--distributed=off but \['process_id'\]"),
    (dict(mode="on", num_processes=2, process_id=2), r"process_id=2 must be in \[0, "),
    (dict(mode="on", timeout_seconds=0), "timeout must be >= 1 second"),
])
def test_bad_distributed_settings_are_named(no_cluster_env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel.initialize_distributed(kwargs.pop("mode"), **kwargs)


def test_pmap_devices_of_one_process_are_its_local_devices():
    import jax
    assert parallel.pmap_devices() == jax.local_devices()
    assert parallel.pmap_devices(2) == jax.local_devices()[:2]
    with pytest.raises(ValueError, match="num_devices=99"):
        parallel.pmap_devices(99)


@pytest.mark.slow
def test_processes_that_disagree_on_the_config_fail_naming_the_difference(tmp_path):
    cluster = Cluster(tmp_path / "logs", [*RUN_FLAGS, "--config.steps=2",
                                          f"--workdir={tmp_path / 'run'}"],
                      _cache(tmp_path), timeout=60,
                      per_process=[[], ["--config.n_embd=64"]])
    try:
        for p in cluster.procs:
            p.wait(240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the mismatched run hung\n{cluster.report()}")
    finally:
        cluster.kill()
    for i, p in enumerate(cluster.procs):
        _, err = cluster.output(i)
        assert p.returncode == 2, cluster.report()
        assert "the processes disagree on the config: n_embd" in err, cluster.report()
    assert "n_embd=64" in cluster.output(1)[1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any step


@pytest.mark.slow
def test_a_group_of_runs_over_two_processes_matches_one_process(tmp_path):
    """experiments.sweep with the multi-process flags: one cell, a group of 2 learning rates
    x 1 seed trained by both processes together (4 devices), equals the same group trained
    by one process over 4 devices, run by run: losses, evaluations, selection and test."""
    import jax
    if jax.local_device_count() != NUM_PROCESSES * DEVICES_PER_PROCESS:
        pytest.skip("the reference needs 4 devices (XLA_FLAGS from conftest.py)")
    lrs, seeds, steps = (1e-3, 3e-2), (3,), 4
    flags = [*RUN_FLAGS, f"--config.steps={steps}", "--sweep.learning_rates=" + ",".join(map(str, lrs)),
             "--sweep.seeds=" + ",".join(map(str, seeds)), f"--workdir={tmp_path / 'multi'}"]
    cluster = Cluster(tmp_path / "logs", flags, _cache(tmp_path), timeout=120,
                      module="experiments.sweep")
    try:
        import dataclasses
        ref = loop.train_and_evaluate(dataclasses.replace(REF_CONFIG, steps=steps),
                                      str(tmp_path / "ref"), lrs, seeds * len(lrs))
        cluster.wait(timeout=300)
    finally:
        cluster.kill()
    cell = tmp_path / "multi" / "cells" / "base"
    for k in range(len(lrs)):
        got, want = _metrics(cell, k), _metrics(tmp_path / "ref", k)
        assert max(got) == steps and got[steps]["learning_rate"] == lrs[k]
        _assert_metrics_match(got, want, range(1, steps + 1))
    summary = json.loads((cell / "summary.json").read_text())["runs"]
    for got, want in zip(summary, ref):
        assert got["best_step"] == want["best_step"]
        np.testing.assert_allclose(got["test"]["test"]["test/accuracy"],
                                   want["test"]["test"]["test/accuracy"], rtol=RTOL)
    out0, out1 = cluster.output(0)[0], cluster.output(1)[0]
    assert "results.md" in out0 and "# Sweep results" not in out1  # process 0 reports
