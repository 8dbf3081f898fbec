"""FPT training: the pieces a run builds, the pure train/eval steps, and the loop.

`train_step(state, frozen, batch, rng) -> (state, metrics)` and `eval_step(params, batch)`
are pure; `pmapped_train_step` wraps the first in `jax.pmap` over the devices of every
process, with the named axis `parallel.AXIS`. The state (trainable parameters, optimizer
state) is donated and updated in place; the frozen parameters are an input only, read in
place and never copied. Gradients and metrics are averaged across every device of every
process with `lax.pmean`. The settings are `fpt_jax.config.TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from fpt_jax import baselines, fast_rng, freeze, optim, parallel
from fpt_jax.checkpoint import Checkpoints
from fpt_jax.config import TrainConfig
from fpt_jax.guard import MetricsBuffer, check_finite_state
from fpt_jax.protocol import BestStep, read_summary, write_summary
from fpt_jax.metrics import MetricWriter, Progress
from fpt_jax.backbone_init import backbone  # noqa: F401 (train.backbone: the public name)
from fpt_jax.models import backbones
from fpt_jax.models.fpt import FPT
from fpt_jax.tasks import Task, get_task
from fpt_jax.workdir import WorkdirLock

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_STEPS_IN_FLIGHT = 2


@flax.struct.dataclass
class TrainState:
    """What a step changes (and donates): the trainable parameters and their optimizer
    state. The frozen parameters are a separate, read-only argument of the step."""
    step: jax.Array
    trainable: Any
    opt_state: Any


# --- building the pieces ------------------------------------------------------------------

def make_model(cfg: TrainConfig, task: Task, config: Any) -> FPT:
    return FPT(config, input_dim=task.input_dim, output_dim=task.output_dim,
               input_kind=task.input_kind, in_layer_sizes=tuple(cfg.in_layer_sizes),
               out_layer_sizes=tuple(cfg.out_layer_sizes), dropout=cfg.dropout,
               orth_gain=cfg.orth_gain, dtype=COMPUTE_DTYPES[cfg.dtype], remat=cfg.remat)


def init_params(model: FPT, task: Task, rng: jax.Array, pretrained: dict | None = None
                ) -> dict:
    """FPT parameters (host numpy): random, with the pretrained backbone in place when given.
    The random backbone is then never computed (only the other parts are returned from
    the jitted init, so XLA drops its initialisers); flax derives each parameter's key
    from its path, so the other parts equal those of a full random init. Backbone
    parameters that no checkpoint holds (the family's `fresh_paths`, e.g. ViT's new
    position table) come from this initialisation too."""
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    x = jnp.zeros((1, *task.example_shape), dtype)
    init = lambda r: model.init(r, x)["params"]  # noqa: E731
    if pretrained is None:
        return jax.tree_util.tree_map(np.asarray, jax.jit(init)(rng))
    expected = traverse_util.flatten_dict(jax.eval_shape(init, rng)["transformer"])
    got = traverse_util.flatten_dict(pretrained)
    fresh = backbones.family_of(model.config).fresh_paths(model.config)
    fresh = {p for p in fresh if p not in got}  # a run's own backbone has them already
    if set(got) != set(expected) - fresh or any(np.shape(got[p]) != expected[p].shape
                                                 for p in got):
        raise ValueError("the pretrained backbone's parameters do not match the model's "
                         "architecture")

    def rest(r):
        params = init(r)
        new = traverse_util.flatten_dict(params["transformer"])
        return ({k: v for k, v in params.items() if k != "transformer"},
                {p: new[p] for p in fresh})
    others, new = jax.tree_util.tree_map(np.asarray, jax.jit(rest)(rng))
    return {**others, "transformer": traverse_util.unflatten_dict({**got, **new})}


# --- the pure steps -------------------------------------------------------------------------

def _weighted_means(per_example: dict, batch: dict) -> dict:
    weight = batch.get("mask", jnp.ones(next(iter(per_example.values())).shape[0],
                                        jnp.float32))
    denom = jnp.maximum(weight.sum(), 1.0)
    return {k: (v * weight).sum() / denom for k, v in per_example.items()}


def make_train_step(model: FPT, task: Task, tx: optax.GradientTransformation,
                    grad_accum: int = 1, axis_name: str | None = parallel.AXIS) -> Callable:
    """`(state, frozen, batch, rng) -> (state, metrics)`.

    Gradients are taken with respect to `state.trainable` only, so XLA never computes the
    frozen weights' gradient matmuls nor all-reduces them; `frozen` is read, never written.
    With `grad_accum > 1` the batch leaves have a leading accumulation axis and gradients
    (and the task's metrics) are averaged over it with `lax.scan`.
    """
    def loss_fn(trainable, frozen, batch, rng):
        logits = model.apply({"params": freeze.merge(trainable, frozen)}, batch["x"],
                             batch.get("length"), deterministic=False, rngs={"dropout": rng})
        means = _weighted_means(task.per_example_metrics(logits, batch), batch)
        return means["loss"], means

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if grad_accum == 1:
            grads, metrics = grad_fn(state.trainable, frozen, batch, rng)
        else:
            def micro(carry, xs):
                i, micro_batch = xs
                out = grad_fn(state.trainable, frozen, micro_batch, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, out), None
            first = jax.tree_util.tree_map(lambda x: x[0], batch)
            zeros = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(grad_fn, state.trainable, frozen, first, rng))
            (grads, metrics), _ = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum), batch))
            grads, metrics = jax.tree_util.tree_map(lambda x: x / grad_accum, (grads, metrics))
        if axis_name is not None and jax.lax.psum(1, axis_name) > 1:
            # Over one device the mean is the identity; skipping the all-reduce matters on
            # XLA:CPU, where any all-reduce in the step makes it copy every donated state
            # buffer (parameters and moments) before the update instead of updating in place.
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return train_step


def make_eval_step(model: FPT, task: Task, axis_name: str | None = parallel.AXIS) -> Callable:
    """`(params, batch) -> {'<metric>_sum', 'count'}`, summed over devices; `params` is the
    whole tree (`freeze.merge(state.trainable, frozen)`)."""
    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["x"], batch.get("length"),
                             deterministic=True)
        per_example = task.per_example_metrics(logits, batch)
        weight = batch.get("mask", jnp.ones(logits.shape[0], jnp.float32))
        sums = {f"{k}_sum": (v * weight).sum() for k, v in per_example.items()}
        sums["count"] = weight.sum()
        return jax.lax.psum(sums, axis_name) if axis_name is not None else sums
    return eval_step


def pmapped_train_step(train_step: Callable, devices) -> Callable:
    """The step over `devices`: state, frozen parameters and batch per device, one rng;
    the state is donated (updated in place), the frozen parameters only read."""
    return parallel.map_over_devices(train_step, devices, in_axes=(0, 0, 0, None),
                                     donate_argnums=(0,))


def pmapped_eval_step(eval_step: Callable, devices) -> Callable:
    return parallel.map_over_devices(eval_step, devices)


# --- the loop ---------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step (also used by the benchmark). `state`
    and `frozen` are host copies: drop them once they are on the devices."""
    cfg: TrainConfig
    task: Task
    model: FPT
    config: Any  # the backbone family's config
    selection: freeze.Selection
    tx: optax.GradientTransformation
    state: TrainState | None  # on the host, unreplicated
    frozen: dict | None  # the frozen parameters, on the host
    table: str


def prepare_task(cfg: TrainConfig, task: Task | None = None) -> Task:
    """The run's task, with every split the run reads opened and checked (files present,
    well-formed) and the evaluation settings checked: a bad input stops it before step 1."""
    cfg.validate()
    fast_rng.use_unrolled_threefry_on_cpu()  # same dropout bits, fused on CPU
    task = task or get_task(cfg.task, **cfg.task_options())
    eval_split = cfg.eval_split or task.eval_split
    task.check_split(eval_split)
    if cfg.eval_batches is None and not task.is_dataset:
        raise ValueError(f"eval_batches=None: task {task.name} is generated and evaluates on "
                         "a number of batches; set eval_batches")
    for split in dict.fromkeys(("train", eval_split, *task.test_splits)):
        task.prepare(split)
    return task


def setup(cfg: TrainConfig, task: Task | None = None) -> Setup:
    task = prepare_task(cfg, task)
    config, pretrained = backbone(cfg, task)
    selection = freeze.parse_selection(cfg.trainable, config.n_layer)
    model = make_model(cfg, task, config)
    if pretrained is None:  # init='random': the backbone from its own seed (config.py)
        pretrained = init_params(model, task, jax.random.PRNGKey(cfg.backbone_seed))[
            "transformer"]
    params = init_params(model, task, jax.random.PRNGKey(cfg.seed), pretrained)
    table, _ = freeze.count_table(params, selection)
    if cfg.match_model is not None:
        table += "\n" + baselines.match(cfg, task).lines()
    trainable, frozen = freeze.partition(params, selection)
    frozen = freeze.cast_frozen(frozen, COMPUTE_DTYPES[cfg.dtype])
    tx = optim.make_optimizer(cfg)
    state = TrainState(np.int32(0), trainable, tx.init(trainable))
    return Setup(cfg, task, model, config, selection, tx, state, frozen, table)


def run_identity(cfg: TrainConfig, config: Any) -> dict:
    """What must not change between a run and its resumption (and what rebuilds its model:
    `backbone_init.run_config`)."""
    return {"task": cfg.task, "task_options": cfg.task_options(), "model": cfg.model,
            "init": cfg.init, "weights": cfg.weights,
            "family": backbones.family_of(config).name, "backbone": dataclasses.asdict(config),
            "trainable": cfg.trainable, "seed": cfg.seed, "backbone_seed": cfg.backbone_seed,
            "in_layer_sizes": list(cfg.in_layer_sizes),
            "out_layer_sizes": list(cfg.out_layer_sizes)}


def evaluate(p_eval_step, params, s: Setup, devices, split: str,
             prefix: str = "eval") -> dict[str, float]:
    cfg = s.cfg
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    totals = None
    for batch in s.task.eval_batches(split, eval_bs // jax.process_count(), seed=cfg.seed,
                                     num_batches=cfg.eval_batches,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
        out = p_eval_step(params, parallel.shard_batch(batch, len(devices)))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = parallel.unreplicate(totals)
    count = max(float(totals.pop("count")), 1.0)
    return {f"{prefix}/{k[:-len('_sum')]}": float(v) / count for k, v in totals.items()}


def train_and_evaluate(cfg: TrainConfig, workdir: str, task: Task | None = None
                       ) -> dict[str, float]:
    """Trains (resuming from `workdir/checkpoints` when it holds a readable checkpoint),
    selects the step with the best validation accuracy, evaluates the test split(s) once
    at that step and writes `workdir/summary.json`; returns the last logged train and
    validation metrics and the test metrics. Everything the run will read is checked before
    its first step; the workdir is locked for this run."""
    cfg.validate()
    devices = parallel.local_devices(cfg.num_devices)
    per_device = parallel.per_device_batch(cfg.batch_size, cfg.grad_accum, len(devices))
    parallel.per_device_batch(cfg.eval_batch_size or cfg.batch_size, 1, len(devices),
                              name="eval_batch_size" if cfg.eval_batch_size else "batch_size")
    per_process = per_device * cfg.grad_accum * len(devices)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        s = setup(cfg, task)
        parallel.check_same_on_every_process(
            {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir",
                                                                          "weights")})
        if jax.process_index() == 0:
            print(s.table, flush=True)
        ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints,
                            cfg.checkpoint_every)
        best = Checkpoints(os.path.join(workdir, "best"), keep=1)
        try:
            return _loop(s, workdir, devices, per_process, ckpts, best)
        finally:
            for c in (ckpts, best):
                c.wait()  # an in-flight save completes on every exit path
                c.close()
    finally:
        if lock:
            lock.release()


def _loop(s: Setup, workdir: str, devices, per_process: int, ckpts: Checkpoints,
          best: Checkpoints) -> dict[str, float]:
    cfg, is_main, t0 = s.cfg, jax.process_index() == 0, time.monotonic()
    identity = run_identity(cfg, s.config)
    state, start, saved = s.state, 0, {}
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      (state.trainable, state.opt_state))
    resumed = ckpts.resume(state.trainable, state.opt_state, lambda meta: (
        saved.update(meta), _check_identity(meta.get("identity", {}), identity, workdir)))
    last_checkpoint = None if resumed is None else resumed[0]
    if resumed is not None:
        start, trainable, opt_state = resumed
        state = TrainState(np.int32(start), trainable, opt_state)
        del resumed, trainable, opt_state  # the devices get them below; no host copy stays
        logging.info("resumed from step %d in %s", start, workdir)
        if is_main:
            print(f"resumed from checkpoint at step {start}", flush=True)
    tracker = BestStep.from_json(saved.get("protocol"))
    wall_before = float(saved.get("wall_s", 0.0))
    for step in best.manager.all_steps():  # a best step saved after the checkpoint resumed
        if step != tracker.best_step:
            best.manager.delete(step)

    writer = MetricWriter(workdir, resume_step=start)
    train_step = make_train_step(s.model, s.task, s.tx, cfg.grad_accum)
    mapped = parallel.pmap_devices(cfg.num_devices)  # every process's devices
    p_train = pmapped_train_step(train_step, mapped)
    p_eval = pmapped_eval_step(make_eval_step(s.model, s.task), mapped)
    state = parallel.replicate(state, devices)
    frozen = parallel.replicate(s.frozen, devices)
    s.state = s.frozen = None  # the devices hold them now; no host copy for the whole run
    rng = jax.random.PRNGKey(cfg.seed + 1)
    split = cfg.eval_split or s.task.eval_split
    lr_at = optim.learning_rate_schedule(cfg)
    progress = Progress(cfg.steps, start)
    metrics = MetricsBuffer(start, cfg.nonfinite_skips, last_checkpoint)
    last: dict[str, float] = {}
    done = start

    def save(step: int, manager: Checkpoints) -> None:
        host = parallel.unreplicate(state)
        check_finite_state(step, (host.trainable, host.opt_state))
        manager.save(step, host.trainable, host.opt_state, {
            "identity": identity, "protocol": tracker.to_json(),
            "wall_s": wall_before + time.monotonic() - t0}, force=True)

    try:
        for step in range(start, cfg.steps if not tracker.stopped_early else start):
            batch = s.task.batch("train", step, per_process, seed=cfg.seed,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
            state, step_metrics = p_train(state, frozen, parallel.shard_batch(
                batch, len(devices), cfg.grad_accum), rng)
            metrics.add(step_metrics)  # stays on device until logged or checkpointed
            # Keep at most a couple of steps in flight: enough to overlap dispatch with
            # compute; an unbounded queue of pmapped collectives deadlocks XLA's CPU runtime.
            if len(metrics.on_device) > MAX_STEPS_IN_FLIGHT:
                jax.block_until_ready(metrics.on_device[-1 - MAX_STEPS_IN_FLIGHT])
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                host = metrics.take()
                last = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
                last["train/learning_rate"] = float(lr_at(done - 1))
                writer.write(done, last)
                line = progress.line(done, {k: v for k, v in last.items()
                                            if k in ("train/loss", "train/accuracy")})
                if is_main:
                    print(line, flush=True)
            # Evaluation (on validation) before the checkpoint: a run resumed from step N
            # has step N's evaluation and selection.
            if done % cfg.eval_every == 0 or done == cfg.steps:
                metrics.drain()  # a diverged model is neither evaluated nor selected
                ev = evaluate(p_eval, freeze.merge(state.trainable, frozen), s, devices, split)
                writer.write(done, ev)
                last.update(ev)
                if is_main:
                    print(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                          flush=True)
                if tracker.update(done, ev["eval/accuracy"], ev["eval/loss"], cfg.converge_at):
                    save(done, best)  # keep=1: the previous best is rotated away
                tracker.stopped_early = tracker.patience_ran_out(cfg.patience)
            preempted = ckpts.reached_preemption(done)
            if (done % cfg.checkpoint_every == 0 or done == cfg.steps or preempted
                    or tracker.stopped_early):
                metrics.drain()  # a diverged run stops here, before its state is saved
                # The best step this checkpoint records must be on disk before it is: a kill
                # -9 after the checkpoint and before an in-flight best save finished left a
                # run whose resume found no checkpoint of its best step.
                best.wait()
                save(done, ckpts)
                metrics.last_checkpoint = done
                if preempted:
                    ckpts.wait()
                    logging.warning("preempted at step %d; checkpoint written", done)
                    return last
            if tracker.stopped_early:
                logging.warning("early stop at step %d: no better validation accuracy in %d "
                                "evaluations (best %.4f at step %d)", done, cfg.patience,
                                tracker.best_accuracy, tracker.best_step)
                break
    finally:
        writer.close()
    if tracker.best_step is not None:
        last.update(_test_at_best(s, workdir, devices, p_eval, frozen, best, tracker,
                                  template, done, wall_before + time.monotonic() - t0))
    return last


def _test_at_best(s: Setup, workdir: str, devices, p_eval, frozen, best: Checkpoints,
                  tracker: BestStep, template, last_step: int, wall_s: float
                  ) -> dict[str, float]:
    """Each test split evaluated once, at the selected step; WORKDIR/summary.json."""
    previous = read_summary(workdir)
    if previous and previous.get("best_step") == tracker.best_step and previous.get("test"):
        test = previous["test"]  # tested at this step already: never read test twice
    else:
        best.wait()
        trainable, _ = best.restore(tracker.best_step, *template)
        params = freeze.merge(parallel.replicate(trainable, devices), frozen)
        test = {split: evaluate(p_eval, params, s, devices, split,
                                prefix="test" if split == "test" else f"test_{split}")
                for split in s.task.test_splits}
    if jax.process_index() == 0:
        n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(template[0]))
        write_summary(workdir, {
            "best_step": tracker.best_step, "best_val_accuracy": tracker.best_accuracy,
            "best_val_loss": tracker.best_loss, "test": test,
            "steps_to_converge": tracker.converged_step, "converge_at": s.cfg.converge_at,
            "stopped_early": tracker.stopped_early, "last_step": last_step,
            "wall_s": wall_s, "trainable_params": n_trainable,
            "eval_split": s.cfg.eval_split or s.task.eval_split})
        print(f"selected step {tracker.best_step} (validation accuracy "
              f"{tracker.best_accuracy:.4f}): " + ", ".join(
                  f"{k} {v:.4f}" for t in test.values() for k, v in t.items()), flush=True)
    return {k: v for t in test.values() for k, v in t.items()}


def _check_identity(saved: dict, current: dict, workdir: str) -> None:
    saved = {"family": "gpt2", **json.loads(json.dumps(saved))}  # before families: GPT-2
    current = json.loads(json.dumps(current))
    diff = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if diff:
        raise ValueError(
            f"{workdir} holds a checkpoint of a different run; differing settings "
            f"(checkpoint, now): {diff}. Use a new workdir, or the run's own settings")
