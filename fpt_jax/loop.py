"""The one loop: a group of K >= 1 runs (learning rates x seeds around one frozen backbone)
trained in one compiled program; a single run is a group of one.

`train_and_evaluate(cfg, workdir)` trains `cfg`'s run; with `learning_rates` and `seeds` it
trains every (learning_rates[k], seeds[k]). For every run: training metrics to
WORKDIR/metrics.jsonl (tagged with the run, its learning rate and seed) and TensorBoard,
evaluation on validation, the step with the best validation accuracy selected
(`protocol.BestStep`), the test split(s) evaluated once, at that step, and
WORKDIR/summary.json. Layout on disk: `fpt_jax.runs`.

What protects a group: everything it reads is checked before its first step (build); the
workdir is locked; checkpoints (orbax, atomic, keep-N) hold every run's state and its
best-step parameters with the selection, so resume is exact; a damaged checkpoint is moved
aside and an older one used; SIGTERM/SIGINT (single process) or the pod's preemption notice
(multi-process, orbax/JAX's sync point) save a checkpoint and stop (`Preempted`); no
non-finite state is ever applied or checkpointed; a diverged run stops a group of one with
an error (rc 2 at the entry points), in a larger group it is recorded and the others go on.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fpt_jax import align, build, optim, parallel, runs
from fpt_jax.sharding import Placement, check_mesh
from fpt_jax.checkpoint import Checkpoints
from fpt_jax.config import TrainConfig
from fpt_jax.guard import MetricsBuffer, check_finite_state
from fpt_jax.metrics import MetricWriter, Progress
from fpt_jax.protocol import BestStep
from fpt_jax.steps import (MAX_STEPS_IN_FLIGHT, TrainState, group_batches, make_eval_step,
                           make_train_step, run_rngs, stack_runs)
from fpt_jax.tasks import Task
from fpt_jax.workdir import WorkdirLock

# Settings that may differ between the processes of one group (local paths).
_PER_PROCESS = ("data_dir", "weights", "blocks_weights", "align_corpus")


class Preempted(Exception):
    """The group was asked to stop (a signal, or the pod's preemption notice) and saved a
    checkpoint at `step`; the same command resumes it."""

    def __init__(self, step: int, signum: int | None):
        self.step, self.signum = step, signum
        self.exit_code = 128 + (signum or signal.SIGTERM)
        how = signal.Signals(signum).name if signum else "the preemption notice"
        super().__init__(f"stopped by {how} at step {step}; checkpoint written. Run the same "
                         "command to resume")


class _StopSignals:
    """SIGTERM and SIGINT set a flag that the loop reads between steps (a second one stops
    at once, as usual). Only in a single process, on the main thread: several processes
    agree on the step through JAX's preemption sync point instead."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "_StopSignals":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: do what the signal does by default
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logging.warning("%s: checkpointing after this step", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def train_and_evaluate(cfg: TrainConfig, workdir: str,
                       learning_rates: Sequence[float] | None = None,
                       seeds: Sequence[int] | None = None, task: Task | None = None
                       ) -> list[dict]:
    """Trains the group (default: the one run `cfg.learning_rate`, `cfg.seed`), resuming
    from `workdir/checkpoints` when it holds a readable checkpoint of the same group;
    returns the runs' summaries (summary.json's `runs`, each with its last train and
    validation metrics under `final` and its test metrics under `test`)."""
    cfg.check()
    placement = Placement(cfg.num_devices, cfg.mesh)
    per_process = placement.per_process_batch(cfg.batch_size, cfg.grad_accum)
    placement.per_process_batch(cfg.eval_batch_size or cfg.batch_size, 1,
                                name="eval_batch_size" if cfg.eval_batch_size else "batch_size")
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        g = build.build_group(cfg, learning_rates, seeds, task)
        if cfg.mesh is not None:  # the backbone's heads and widths, now that it is known
            check_mesh(cfg.mesh, len(placement.mapped), len(placement.local), g.config)
        settings = cfg.to_dict()
        for name in _PER_PROCESS:  # where this process reads its data and weights
            settings.pop(name, None)
            settings["task_options"].pop(name, None)
        parallel.check_same_on_every_process({**settings,
            "learning_rates": list(g.learning_rates), "seeds": list(g.seeds)})
        if jax.process_index() == 0:
            print(g.table, flush=True)
        ckpts = Checkpoints(os.path.join(workdir, runs.CHECKPOINTS), cfg.keep_checkpoints,
                            cfg.checkpoint_every)
        try:
            with _StopSignals() as stop:
                if cfg.align_steps and ckpts.latest_step() is None:  # not yet training
                    reached = align.align_group(g, workdir, lambda: stop.signum is not None)
                    if reached < cfg.align_steps or stop.signum is not None:
                        raise Preempted(reached, stop.signum)  # resumes where it stopped
                return _loop(g, workdir, placement, per_process, ckpts, stop)
        finally:
            ckpts.wait()  # an in-flight save completes on every exit path
            ckpts.close()
    finally:
        if lock:
            lock.release()


def _evaluate(p_eval, trainable, frozen, g: build.Group, placement: Placement, split: str,
              prefix: str) -> list[dict[str, float]]:
    """Per run `{prefix/metric: mean}` on `split`: one stream for a dataset's split, each
    run's own (seeded) batches for a generated task."""
    cfg = g.cfg
    bs = (cfg.eval_batch_size or cfg.batch_size) // jax.process_count()
    per_run = not g.task.is_dataset
    streams = [g.task.eval_batches(split, bs, seed=s, num_batches=cfg.eval_batches,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
               for s in (g.seeds if per_run else g.seeds[:1])]
    totals = None
    for batches in zip(*streams):
        shards = [parallel.shard_batch(b, placement.slots) for b in batches]
        batch = stack_runs(shards) if per_run else shards[0]  # [slots, (K,) rows, ...]
        out = p_eval(trainable, frozen, placement.put_batch(batch, 2 if per_run else 1))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = parallel.unreplicate(totals)  # [K] per sum
    count = np.maximum(np.asarray(totals.pop("count"), np.float64), 1.0)
    return [{f"{prefix}/{n[:-len('_sum')]}": float(v[i] / count[i]) for n, v in totals.items()}
            for i in range(g.num_runs)]


def _loop(g: build.Group, workdir: str, placement: Placement, per_process: int,
          ckpts: Checkpoints, stop: _StopSignals) -> list[dict]:
    cfg, k, is_main, t0 = g.cfg, g.num_runs, jax.process_index() == 0, time.monotonic()
    identity = g.identity()
    states, start, meta = g.states, 0, {}
    trainable = {"now": states.trainable, "best": states.trainable}
    resumed = ckpts.resume(trainable, states.opt_state, lambda m: (
        meta.clear(), meta.update(m),
        runs.check_identity(m.get("identity", {}), identity, workdir)))
    last_checkpoint = None
    if resumed is not None:
        start, trainable, opt_state = resumed
        last_checkpoint = start
        nonfinite = np.asarray(meta.get("nonfinite") or [0] * k, np.int32)
        states = TrainState(np.full(k, start, np.int32), trainable["now"], opt_state, nonfinite)
        del resumed, opt_state
        logging.info("resumed from step %d in %s", start, workdir)
        if is_main:
            print(f"resumed from checkpoint at step {start}", flush=True)
    trackers = [BestStep.from_json(t) for t in meta.get("protocol") or [None] * k]
    diverged = list(meta.get("diverged_step") or [None] * k)
    wall_before = float(meta.get("wall_s", 0.0))
    n_trainable = sum(int(np.prod(np.shape(x)[1:]))
                      for x in jax.tree_util.tree_leaves(states.trainable))

    writer = MetricWriter(workdir, resume_step=start)
    # the states donated (updated in place), the frozen parameters only read
    p_train = placement.map(make_train_step(g.model, g.task, g.tx, cfg.grad_accum,
                                            cfg.nonfinite_skips),
                            in_axes=(0, 0, 0, None), donate_argnums=(0,))
    p_eval = placement.map(make_eval_step(
        g.model, g.task, batch_axis=None if g.task.is_dataset else 0))
    keep_best = placement.map(lambda improved, now, best: jax.tree_util.tree_map(
        lambda a, b: jnp.where(improved.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), now,
        best), in_axes=(None, 0, 0), donate_argnums=(2,))
    states = placement.replicate(states)
    best = placement.replicate(trainable["best"])
    frozen = placement.put_frozen(g.frozen)
    g.states = g.frozen = None  # the devices hold them now; no host copy for the whole run
    del trainable
    rngs = placement.shared(run_rngs(g.seeds))
    split = cfg.eval_split or g.task.eval_split
    tags = [{"run": i, "learning_rate": g.learning_rates[i], "seed": g.seeds[i]}
            for i in range(k)]
    tb = [f"run{i}/" if k > 1 else "" for i in range(k)]
    unit = optim.unit_schedule(cfg)
    progress = Progress(cfg.steps, start)
    metrics = MetricsBuffer(start, cfg.nonfinite_skips, diverged, last_checkpoint)
    final: list[dict[str, float]] = (align.summary(workdir, k) if cfg.align_steps else
                                     [{} for _ in range(k)])
    done = start

    def finished() -> bool:  # early stop: every run ran out of patience or diverged
        return all(t.stopped_early or d is not None for t, d in zip(trackers, diverged))

    def save(step: int) -> None:
        metrics.drain()  # a diverged group of one stops here, before anything is saved
        host_states, host_best = parallel.unreplicate((states, best))
        check_finite_state(step, (host_states.trainable, host_states.opt_state))
        ckpts.save(step, {"now": host_states.trainable, "best": host_best},
                   host_states.opt_state, {
                       "identity": identity, "protocol": [t.to_json() for t in trackers],
                       "diverged_step": diverged,
                       "nonfinite": np.asarray(host_states.nonfinite).tolist(),
                       "wall_s": wall_before + time.monotonic() - t0}, force=True)
        metrics.last_checkpoint = step

    try:
        for step in range(start, cfg.steps if not finished() else start):
            batch = placement.put_batch(group_batches(
                g.task, step, per_process, g.seeds, placement.slots, cfg.grad_accum),
                rows_axis=3 if cfg.grad_accum > 1 else 2)  # [slots, K, (accum,) rows, ...]
            states, step_metrics = p_train(states, frozen, batch, rngs)
            metrics.add(step_metrics)  # stays on device until logged or checkpointed
            if len(metrics.on_device) > MAX_STEPS_IN_FLIGHT:
                jax.block_until_ready(metrics.on_device[-1 - MAX_STEPS_IN_FLIGHT])
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                host = metrics.take()
                for i in range(k):
                    row = {f"train/{n}": float(np.mean([h[n][i] for h in host]))
                           for n in host[0] if n != "nonfinite"}
                    row["train/learning_rate"] = g.learning_rates[i] * float(unit(done - 1))
                    writer.write(done, row, tags[i], tb_prefix=tb[i])
                    final[i].update(row)
                shown = ({n: final[0][n] for n in ("train/loss", "train/accuracy")
                          if n in final[0]} if k == 1 else
                         {"runs diverged": sum(d is not None for d in diverged)})
                if is_main:
                    print(progress.line(done, shown), flush=True)
            # Evaluation (on validation) before the checkpoint: a group resumed from step N
            # has step N's evaluation and selection.
            if done % cfg.eval_every == 0 or done == cfg.steps:
                metrics.drain()  # a diverged group of one is neither evaluated nor selected
                evs = _evaluate(p_eval, states.trainable, frozen, g, placement, split, "eval")
                improved = np.zeros(k, bool)
                for i, ev in enumerate(evs):
                    writer.write(done, ev, tags[i], tb_prefix=tb[i])
                    final[i].update(ev)
                    acc = ev["eval/accuracy"]
                    # a diverged run keeps the selection of its finite steps
                    if (not trackers[i].stopped_early and diverged[i] is None
                            and np.isfinite(acc) and np.isfinite(ev["eval/loss"])):
                        improved[i] = trackers[i].update(done, acc, ev["eval/loss"],
                                                         cfg.converge_at)
                        trackers[i].stopped_early = trackers[i].patience_ran_out(cfg.patience)
                if improved.any():
                    best = keep_best(placement.shared(improved), states.trainable, best)
                if is_main:
                    print(f"step {done}: " + (", ".join(f"{n} {v:.4f}" for n, v in evs[0].items())
                          if k == 1 else "eval/accuracy per run [" + ", ".join(
                              f"{e['eval/accuracy']:.4f}" for e in evs) + "]"), flush=True)
            preempted = stop.signum is not None or ckpts.reached_preemption(done)
            if (done % cfg.checkpoint_every == 0 or done == cfg.steps or preempted
                    or finished()):
                save(done)
                if preempted:
                    ckpts.wait()
                    logging.warning("preempted at step %d; checkpoint written", done)
                    raise Preempted(done, stop.signum)
            if finished():
                logging.warning("early stop at step %d: every run ran out of patience (%s) "
                                "or diverged", done, cfg.patience)
                break
    finally:
        writer.close()
    return _test_at_best(g, workdir, placement, p_eval, best, frozen, trackers, diverged,
                         final, n_trainable, done, wall_before + time.monotonic() - t0)


def _test_at_best(g: build.Group, workdir: str, placement: Placement, p_eval, best, frozen,
                  trackers: list[BestStep], diverged: list, final: list[dict],
                  n_trainable: int, last_step: int, wall_s: float) -> list[dict]:
    """Every run's test split(s) evaluated once, with its selected step's parameters (none
    for a run without a selected step); summary.json."""
    before = runs.summary_runs(workdir)
    if len(before) == g.num_runs and all(r.get("best_step") == t.best_step and r.get("test")
                                         for r, t in zip(before, trackers)):
        tests = [r["test"] for r in before]  # tested at these steps already: never twice
    else:
        per_split = {s: _evaluate(p_eval, best, frozen, g, placement, s,
                                  "test" if s == "test" else f"test_{s}")
                     for s in g.task.test_splits}
        tests = [{s: per_split[s][i] for s in per_split} for i in range(g.num_runs)]
    out = []
    for i, t in enumerate(trackers):
        selected = t.best_step is not None
        out.append({
            "run": i, "learning_rate": g.learning_rates[i], "seed": g.seeds[i],
            "best_step": t.best_step, "best_val_accuracy": t.best_accuracy if selected else None,
            "best_val_loss": t.best_loss, "test": tests[i] if selected else {},
            "steps_to_converge": t.converged_step, "converge_at": g.cfg.converge_at,
            "stopped_early": t.stopped_early, "diverged_step": diverged[i],
            "last_step": last_step, "wall_s": wall_s, "trainable_params": n_trainable,
            "eval_split": g.cfg.eval_split or g.task.eval_split, "final": final[i]})
    if jax.process_index() == 0:
        runs.write_summary(workdir, {"runs": out, "backbone_seed": g.cfg.backbone_seed,
                                     "backbone_draw": g.cfg.backbone_draw})
        for r in out:
            if r["best_step"] is None:
                continue
            who = (f"run {r['run']} (lr {r['learning_rate']:g}, seed {r['seed']}): "
                   if g.num_runs > 1 else "")
            print(f"{who}selected step {r['best_step']} (validation accuracy "
                  f"{r['best_val_accuracy']:.4f}): " + ", ".join(
                      f"{n} {v:.4f}" for s in r["test"].values() for n, v in s.items()),
                  flush=True)
    return out
