"""The loop of K runs trained together (`sweep.py` builds them): one compiled program per
sweep cell, however many learning rates and seeds it holds.

As a single run (`train.train_and_evaluate`), per run: training metrics logged to
WORKDIR/metrics.jsonl (each row tagged with its run, learning rate and seed), evaluation on
validation, the best step by validation accuracy selected (`protocol.BestStep` per run),
the test split(s) evaluated once per run, at its selected step, and WORKDIR/summary.json
(`{"runs": [...]}`). Checkpoints hold all K runs: their current trainable parameters and
optimizer states and, per run, the trainable parameters of its best step (kept on the
devices, updated by a select when a run improves), so resume is exact and the best step
is never lost to rotation.

A run that diverges (a non-finite loss) does not stop the others: a high learning rate
that collapses is an outcome of a sweep, not a fault. It is recorded (`diverged_step`), its
best step stays its best finite evaluation. Early stopping (`patience`) ends the cell when
every run ran out of it; a run that ran out earlier keeps its selection.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpt_jax import optim, parallel, sweep, train
from fpt_jax.checkpoint import Checkpoints
from fpt_jax.config import TrainConfig
from fpt_jax.metrics import MetricWriter, Progress
from fpt_jax.protocol import BestStep, read_summary, write_summary
from fpt_jax.tasks import Task
from fpt_jax.workdir import WorkdirLock


def _evaluate(p_eval, trainable, frozen, sw: sweep.Sweep, devices, split: str,
              prefix: str) -> list[dict[str, float]]:
    """Per run `{prefix/metric: mean}` on `split`: a shared batch for dataset tasks, each
    run's own (seeded) batches for generated ones, as a single run evaluates."""
    cfg, k = sw.cfg, sw.num_runs
    bs = (cfg.eval_batch_size or cfg.batch_size) // jax.process_count()
    per_run = not sw.task.is_dataset
    streams = [sw.task.eval_batches(split, bs, seed=s if per_run else cfg.seed,
                                    num_batches=cfg.eval_batches,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
               for s in (sw.seeds if per_run else sw.seeds[:1])]
    totals = None
    for batches in zip(*streams):
        shards = [parallel.shard_batch(b, len(devices)) for b in batches]
        batch = ({n: np.stack([b[n] for b in shards], axis=1) for n in shards[0]}
                 if per_run else shards[0])
        out = p_eval(trainable, frozen, batch)
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = parallel.unreplicate(totals)  # [K] per sum
    count = np.maximum(np.asarray(totals.pop("count"), np.float64), 1.0)
    return [{f"{prefix}/{n[:-len('_sum')]}": float(v[i] / count[i]) for n, v in totals.items()}
            for i in range(k)]


def train_and_evaluate_sweep(cfg: TrainConfig, workdir: str, learning_rates: Sequence[float],
                             seeds: Sequence[int], task: Task | None = None) -> list[dict]:
    """Trains run k = (learning_rates[k], seeds[k]) for every k in one program, resumably,
    and returns the per-run summaries (also in WORKDIR/summary.json)."""
    cfg.validate()
    devices = parallel.local_devices(cfg.num_devices)
    per_device = parallel.per_device_batch(cfg.batch_size, cfg.grad_accum, len(devices))
    parallel.per_device_batch(cfg.eval_batch_size or cfg.batch_size, 1, len(devices),
                              name="eval_batch_size" if cfg.eval_batch_size else "batch_size")
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        sw = sweep.init_runs(cfg, learning_rates, seeds, task, cfg.backbone_seed)
        parallel.check_same_on_every_process({"config": str(cfg), "runs": [
            list(sw.learning_rates), list(sw.seeds)]})
        if jax.process_index() == 0:
            print(sw.table, flush=True)
        ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints,
                            cfg.checkpoint_every)
        try:
            return _loop(sw, workdir, devices, per_device * cfg.grad_accum * len(devices),
                         ckpts)
        finally:
            ckpts.wait()
            ckpts.close()
    finally:
        if lock:
            lock.release()


def _loop(sw: sweep.Sweep, workdir: str, devices, per_process: int, ckpts: Checkpoints
          ) -> list[dict]:
    cfg, k, is_main, t0 = sw.cfg, sw.num_runs, jax.process_index() == 0, time.monotonic()
    identity = {**train.run_identity(cfg, sw.config), "learning_rates": list(sw.learning_rates),
                "seeds": list(sw.seeds), "seed": None}
    states, start, saved = sw.states, 0, {}
    trainable = {"now": states.trainable, "best": states.trainable}
    resumed = ckpts.resume(trainable, states.opt_state, lambda meta: (
        saved.update(meta), train._check_identity(meta.get("identity", {}), identity,
                                                  workdir)))
    if resumed is not None:
        start, trainable, opt_state = resumed
        states = train.TrainState(np.full(k, start, np.int32), trainable["now"], opt_state)
        if is_main:
            print(f"resumed from checkpoint at step {start}", flush=True)
    trackers = [BestStep.from_json(t) for t in saved.get("protocol", [None] * k)]
    diverged = list(saved.get("diverged_step", [None] * k))
    wall_before = float(saved.get("wall_s", 0.0))
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      states.trainable)

    writer = MetricWriter(workdir, resume_step=start)
    mapped = parallel.pmap_devices(cfg.num_devices)
    p_train = sweep.pmapped_sweep_step(sweep.make_sweep_step(sw.model, sw.task, sw.tx,
                                                             cfg.grad_accum), mapped)
    p_eval = train.pmapped_eval_step(sweep.make_sweep_eval_step(
        sw.model, sw.task, batch_axis=None if sw.task.is_dataset else 0), mapped)
    keep_best = jax.pmap(lambda mask, now, best: jax.tree_util.tree_map(
        lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), now, best),
        devices=mapped)
    states = parallel.replicate(states, devices)
    best = parallel.replicate(trainable["best"], devices)
    frozen = parallel.replicate(sw.frozen, devices)
    sw.states = sw.frozen = None
    del trainable
    rngs = sweep.run_rngs(sw.seeds)
    split = cfg.eval_split or sw.task.eval_split
    tags = [{"run": i, "learning_rate": sw.learning_rates[i], "seed": sw.seeds[i]}
            for i in range(k)]
    lr_unit = optim.learning_rate_schedule(dataclasses.replace(cfg, learning_rate=1.0))
    progress, pending, done = Progress(cfg.steps, start), [], start
    stopped = all(t.stopped_early for t in trackers)
    try:
        for step in range(start, cfg.steps if not stopped else start):
            batch = sweep.sweep_batches(sw.task, step, per_process, sw.seeds, len(devices),
                                        cfg.grad_accum)
            states, m = p_train(states, frozen, batch, rngs)
            pending.append(m)
            if len(pending) > train.MAX_STEPS_IN_FLIGHT:
                jax.block_until_ready(pending[-1 - train.MAX_STEPS_IN_FLIGHT])
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                host = parallel.unreplicate(pending)  # per step: {name: [K]}
                for s, m_step in zip(range(done - len(host) + 1, done + 1), host):
                    for i in range(k):
                        if diverged[i] is None and not math.isfinite(float(m_step["loss"][i])):
                            diverged[i] = s
                pending = []
                for i in range(k):
                    row = {f"train/{n}": float(np.mean([h[n][i] for h in host]))
                           for n in host[0]}
                    row["train/learning_rate"] = sw.learning_rates[i] * float(lr_unit(done - 1))
                    writer.write(done, row, tags[i], tb_prefix=f"run{i}/")
                if is_main:
                    print(progress.line(done, {"runs diverged": sum(d is not None
                                                                    for d in diverged)}),
                          flush=True)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                evs = _evaluate(p_eval, states.trainable, frozen, sw, devices, split, "eval")
                improved = np.zeros(k, bool)
                for i, ev in enumerate(evs):
                    writer.write(done, ev, tags[i], tb_prefix=f"run{i}/")
                    acc = ev["eval/accuracy"]
                    if not trackers[i].stopped_early and math.isfinite(acc):
                        improved[i] = trackers[i].update(done, acc, ev["eval/loss"],
                                                         cfg.converge_at)
                        trackers[i].stopped_early = trackers[i].patience_ran_out(cfg.patience)
                if improved.any():
                    best = keep_best(parallel.replicate(improved, devices), states.trainable,
                                     best)
                stopped = all(t.stopped_early for t in trackers)
                if is_main:
                    accs = ", ".join(f"{e['eval/accuracy']:.4f}" for e in evs)
                    print(f"step {done}: eval/accuracy per run [{accs}]", flush=True)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopped:
                host = parallel.unreplicate((states, best))
                ckpts.save(done, {"now": host[0].trainable, "best": host[1]},
                           host[0].opt_state, {
                               "identity": identity, "protocol": [t.to_json() for t in trackers],
                               "diverged_step": diverged,
                               "wall_s": wall_before + time.monotonic() - t0}, force=True)
                del host
            if stopped:
                break
    finally:
        writer.close()
    return _test_at_best(sw, workdir, devices, p_eval, best, frozen, trackers, diverged,
                         template, done, wall_before + time.monotonic() - t0)


def _test_at_best(sw: sweep.Sweep, workdir: str, devices, p_eval, best, frozen,
                  trackers: list[BestStep], diverged: list, template, last_step: int,
                  wall_s: float) -> list[dict]:
    """Every run's test split(s) evaluated once, with its best step's parameters."""
    previous = read_summary(workdir)
    runs_before = (previous or {}).get("runs", [])
    same = (len(runs_before) == sw.num_runs and all(
        r.get("best_step") == t.best_step and r.get("test") for r, t in zip(runs_before,
                                                                          trackers)))
    if same:
        tests = [r["test"] for r in runs_before]
    else:
        per_split = {s: _evaluate(p_eval, best, frozen, sw, devices, s,
                                  "test" if s == "test" else f"test_{s}")
                     for s in sw.task.test_splits}
        tests = [{s: per_split[s][i] for s in per_split} for i in range(sw.num_runs)]
    n_trainable = sum(int(np.prod(x.shape[1:])) for x in jax.tree_util.tree_leaves(template))
    runs = []
    for i, t in enumerate(trackers):
        selected = t.best_step is not None
        runs.append({
            "run": i, "learning_rate": sw.learning_rates[i], "seed": sw.seeds[i],
            "best_step": t.best_step, "best_val_accuracy": t.best_accuracy if selected else None,
            "best_val_loss": t.best_loss, "test": tests[i] if selected else {},
            "steps_to_converge": t.converged_step, "converge_at": sw.cfg.converge_at,
            "stopped_early": t.stopped_early, "diverged_step": diverged[i],
            "last_step": last_step, "wall_s": wall_s, "trainable_params": n_trainable,
            "eval_split": sw.cfg.eval_split or sw.task.eval_split})
    if jax.process_index() == 0:
        write_summary(workdir, {"runs": runs, "backbone_seed": sw.cfg.backbone_seed})
    return runs
