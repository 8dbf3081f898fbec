"""FPT training: the config, the pure train/eval steps, and the loop.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(params, batch)` are pure;
`pmapped_train_step` wraps the first in `jax.pmap` over the devices of every process, with the named
axis `parallel.AXIS`, donating the state so frozen weights are read in place. Gradients
and metrics are averaged across every device of every process with `lax.pmean`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fpt_jax import freeze, parallel, weights
from fpt_jax.checkpoint import Checkpoints
from fpt_jax.metrics import MetricWriter, Progress
from fpt_jax.models.fpt import FPT
from fpt_jax.models.gpt2 import GPT2Config
from fpt_jax.tasks import Task, get_task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("constant", "warmup", "cosine")
OPTIMIZERS = ("adam", "adamw")
MAX_STEPS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # what to learn
    task: str = "bit_xor"
    task_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # the backbone
    model: str = "gpt2"  # preset name; "auto" = the architecture of --weights
    init: str = "random"  # 'pretrained' or 'random'
    weights: str | None = None  # hub name, local HF dir or converted checkpoint; default: model
    n_layer: int | None = None  # architecture overrides, random init only
    n_head: int | None = None
    n_embd: int | None = None
    # the FPT wrapper
    dropout: float = 0.1
    orth_gain: float | None = 1.41
    in_layer_sizes: Sequence[int] = ()
    out_layer_sizes: Sequence[int] = ()
    trainable: str = "fpt"  # see fpt_jax.freeze
    # optimisation (the paper: Adam, lr 1e-3, clip 1.0, no schedule, no weight decay)
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 4  # global, over all devices of all processes
    grad_accum: int = 1
    steps: int = 1000
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int | None = 10  # generated tasks; dataset tasks cover their split
    eval_batch_size: int | None = None  # default: batch_size
    eval_split: str | None = None  # default: the task's
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # execution
    seed: int = 0
    dtype: str = "float32"
    remat: bool = False
    num_devices: int | None = None  # local devices to use; default all

    def __post_init__(self):
        _one_of("init", self.init, ("pretrained", "random"))
        _one_of("dtype", self.dtype, tuple(DTYPES))
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name in ("eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {list(accepted)}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# --- building the pieces ------------------------------------------------------------------

def backbone(cfg: TrainConfig) -> tuple[GPT2Config, dict | None]:
    """The GPT-2 config and, for `init='pretrained'`, its converted parameters."""
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd")
                 if getattr(cfg, k) is not None}
    if cfg.init == "random":
        config = GPT2Config.preset(cfg.model, **overrides)
        params = None
    else:
        if overrides:
            raise ValueError(f"architecture overrides {overrides} apply to --init=random only; "
                             "pretrained weights fix the architecture")
        if cfg.model == "auto":  # the architecture is whatever the weights hold
            if not cfg.weights:
                raise ValueError("--model=auto takes the architecture from --weights; pass "
                                 "--weights or a preset name as --model")
            return _with_dropout(*weights.load_gpt2(cfg.weights), cfg)
        expected = GPT2Config.preset(cfg.model)  # an unknown preset is an error first
        config, params = weights.load_gpt2(cfg.weights or cfg.model)
        arch = ("n_layer", "n_head", "n_embd")
        if any(getattr(config, a) != getattr(expected, a) for a in arch):
            got = {a: getattr(config, a) for a in arch}
            want = {a: getattr(expected, a) for a in arch}
            raise ValueError(f"--weights={cfg.weights} holds a GPT-2 with {got}, but "
                             f"--model={cfg.model} is {want}; pass the matching --model "
                             "(or --model=auto to take the architecture from the weights)")
    return _with_dropout(config, params, cfg)


def _with_dropout(config: GPT2Config, params, cfg: TrainConfig):
    return dataclasses.replace(config, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                               resid_pdrop=cfg.dropout), params


def make_model(cfg: TrainConfig, task: Task, config: GPT2Config) -> FPT:
    return FPT(config, input_dim=task.input_dim, output_dim=task.output_dim,
               input_kind=task.input_kind, in_layer_sizes=tuple(cfg.in_layer_sizes),
               out_layer_sizes=tuple(cfg.out_layer_sizes), dropout=cfg.dropout,
               orth_gain=cfg.orth_gain, dtype=DTYPES[cfg.dtype], remat=cfg.remat)


def init_params(model: FPT, task: Task, rng: jax.Array, pretrained: dict | None = None):
    """Random FPT parameters, with the pretrained backbone swapped in when given."""
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    x = jnp.zeros((1, *task.example_shape), dtype)
    params = jax.jit(lambda r: model.init(r, x)["params"])(rng)
    params = jax.tree_util.tree_map(np.asarray, params)
    if pretrained is not None:
        params = {**params, "transformer": pretrained}
    return params


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "warmup":
        return optax.linear_schedule(0.0, lr, max(warm, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(cfg.steps, warm + 1))


def make_optimizer(cfg: TrainConfig, params, selection: freeze.Selection
                   ) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg)
    if cfg.optimizer == "adam":
        opt = optax.adam(schedule)
    else:
        opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    return freeze.make_optimizer(optax.chain(*chain, opt), params, selection)


# --- the pure steps -------------------------------------------------------------------------

def make_train_step(model: FPT, task: Task, tx: optax.GradientTransformation, trainable_mask,
                    grad_accum: int = 1, axis_name: str | None = parallel.AXIS) -> Callable:
    """`(state, batch, rng) -> (state, metrics)`. With `grad_accum > 1` the batch leaves have
    a leading accumulation axis and gradients are summed over it with `lax.scan`.

    Frozen leaves (by `trainable_mask`) are passed through untouched: no gradient is kept for
    them, and their output buffers alias the donated inputs.
    """
    mask_leaves = jax.tree_util.tree_leaves(trainable_mask)

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"], batch.get("length"),
                             deterministic=False, rngs={"dropout": rng})
        per_example = task.per_example_metrics(logits, batch)
        weight = batch.get("mask", jnp.ones(logits.shape[0], jnp.float32))
        denom = jnp.maximum(weight.sum(), 1.0)
        means = {k: (v * weight).sum() / denom for k, v in per_example.items()}
        return means["loss"], means

    def trainable_grads(params, batch, rng):
        """Gradients of the trainable leaves only, as a list: the frozen ones are dropped
        here, so XLA never computes their weight-gradient matmuls nor all-reduces them."""
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, rng)
        leaves = jax.tree_util.tree_leaves(grads)
        return [g for g, m in zip(leaves, mask_leaves) if m], metrics

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if grad_accum == 1:
            grads, metrics = trainable_grads(state.params, batch, rng)
        else:
            def micro(carry, xs):
                i, micro_batch = xs
                g, m = trainable_grads(state.params, micro_batch, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None
            params_leaves = jax.tree_util.tree_leaves(state.params)
            zero_g = [jnp.zeros_like(p) for p, m in zip(params_leaves, mask_leaves) if m]
            zero_m = {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
            (grads, metrics), _ = jax.lax.scan(
                micro, (zero_g, zero_m), (jnp.arange(grad_accum), batch))
            grads, metrics = jax.tree_util.tree_map(lambda x: x / grad_accum, (grads, metrics))
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # Back to a full tree for optax; the frozen zeros are never read (set_to_zero).
        trainable = iter(grads)
        full = [next(trainable) if m else jnp.zeros_like(p)
                for p, m in zip(jax.tree_util.tree_leaves(state.params), mask_leaves)]
        full = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.params), full)
        updates, opt_state = tx.update(full, state.opt_state, state.params)
        params = jax.tree_util.tree_map(
            lambda p, u, m: (p + u).astype(p.dtype) if m else p,
            state.params, updates, trainable_mask)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(model: FPT, task: Task, axis_name: str | None = parallel.AXIS) -> Callable:
    """`(params, batch) -> {'loss_sum', 'accuracy_sum', 'count'}`, summed over devices."""
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
    return jax.pmap(train_step, axis_name=parallel.AXIS, in_axes=(0, 0, None),
                    donate_argnums=(0,), devices=devices)


def pmapped_eval_step(eval_step: Callable, devices) -> Callable:
    return jax.pmap(eval_step, axis_name=parallel.AXIS, devices=devices)


# --- the loop ---------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step (also used by the benchmark)."""
    cfg: TrainConfig
    task: Task
    model: FPT
    config: GPT2Config
    selection: freeze.Selection
    tx: optax.GradientTransformation
    state: TrainState  # on the host, unreplicated
    trainable_mask: Any
    table: str


def setup(cfg: TrainConfig, task: Task | None = None) -> Setup:
    task = task or get_task(cfg.task, **dict(cfg.task_options))
    config, pretrained = backbone(cfg)
    model = make_model(cfg, task, config)
    params = init_params(model, task, jax.random.PRNGKey(cfg.seed), pretrained)
    selection = freeze.parse_selection(cfg.trainable, config.n_layer)
    tx = make_optimizer(cfg, params, selection)
    state = TrainState(np.int32(0), params, tx.init(params))
    table, _ = freeze.count_table(params, selection)
    return Setup(cfg, task, model, config, selection, tx, state,
                 freeze.trainable_mask(params, selection), table)


def run_identity(cfg: TrainConfig, config: GPT2Config) -> dict:
    """What must not change between a run and its resumption."""
    return {"task": cfg.task, "task_options": dict(cfg.task_options), "model": cfg.model,
            "init": cfg.init, "weights": cfg.weights, "backbone": dataclasses.asdict(config),
            "trainable": cfg.trainable, "seed": cfg.seed,
            "in_layer_sizes": list(cfg.in_layer_sizes),
            "out_layer_sizes": list(cfg.out_layer_sizes)}


def evaluate(p_eval_step, params, s: Setup, devices, split: str) -> dict[str, float]:
    cfg = s.cfg
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    per_process = eval_bs // jax.process_count()
    parallel.per_device_batch(eval_bs, 1, len(devices))
    totals = None
    for batch in s.task.eval_batches(split, per_process, seed=cfg.seed,
                                     num_batches=cfg.eval_batches,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
        out = p_eval_step(params, parallel.shard_batch(batch, len(devices)))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = parallel.unreplicate(totals)
    count = max(float(totals["count"]), 1.0)
    return {"eval/loss": float(totals["loss_sum"]) / count,
            "eval/accuracy": float(totals["accuracy_sum"]) / count}


def train_and_evaluate(cfg: TrainConfig, workdir: str) -> dict[str, float]:
    """Trains (resuming from `workdir/checkpoints` when it holds a checkpoint) and returns
    the last logged train and eval metrics."""
    s = setup(cfg)
    devices = parallel.local_devices(cfg.num_devices)
    per_device = parallel.per_device_batch(cfg.batch_size, cfg.grad_accum, len(devices))
    per_process = per_device * cfg.grad_accum * len(devices)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        print(s.table, flush=True)

    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints,
                        cfg.checkpoint_every)
    identity = run_identity(cfg, s.config)
    state, start = s.state, 0
    latest = ckpts.latest_step()
    if latest is not None:
        _check_identity(ckpts.meta(latest).get("identity", {}), identity, workdir)
        params, opt_state = ckpts.restore(latest, state.params, state.opt_state,
                                          s.trainable_mask)
        state, start = TrainState(np.int32(latest), params, opt_state), latest
        logging.info("resumed from step %d in %s", latest, workdir)
        if is_main:
            print(f"resumed from checkpoint at step {latest}", flush=True)

    writer = MetricWriter(workdir, resume_step=start)
    train_step = make_train_step(s.model, s.task, s.tx, s.trainable_mask, cfg.grad_accum)
    mapped = parallel.pmap_devices(cfg.num_devices)  # every process's devices
    p_train = pmapped_train_step(train_step, mapped)
    p_eval = pmapped_eval_step(make_eval_step(s.model, s.task), mapped)
    state = parallel.replicate(state, devices)
    rng = jax.random.PRNGKey(cfg.seed + 1)
    split = cfg.eval_split or s.task.eval_split
    progress = Progress(cfg.steps, start)
    pending: list[dict] = []
    last: dict[str, float] = {}

    for step in range(start, cfg.steps):
        batch = s.task.batch("train", step, per_process, seed=cfg.seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
        state, metrics = p_train(state, parallel.shard_batch(batch, len(devices),
                                                             cfg.grad_accum), rng)
        pending.append(metrics)  # stays on device until logged
        # Keep at most a couple of steps in flight: enough to overlap dispatch with compute;
        # an unbounded queue of pmapped collectives deadlocks XLA's CPU runtime.
        if len(pending) > MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(pending[-1 - MAX_STEPS_IN_FLIGHT])
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            host = parallel.unreplicate(pending)
            pending = []
            last = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
            last["train/learning_rate"] = float(learning_rate_schedule(cfg)(done - 1))
            writer.write(done, last)
            line = progress.line(done, {k: v for k, v in last.items()
                                        if k in ("train/loss", "train/accuracy")})
            if is_main:
                print(line, flush=True)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            ev = evaluate(p_eval, state.params, s, devices, split)
            writer.write(done, ev)
            last.update(ev)
            if is_main:
                print(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                      flush=True)
        preempted = ckpts.reached_preemption(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or preempted:
            host_state = parallel.unreplicate(state)
            ckpts.save(done, host_state.params, host_state.opt_state, s.trainable_mask,
                       {"identity": identity}, force=True)
            if preempted:
                ckpts.wait()
                logging.warning("preempted at step %d; checkpoint written", done)
                break
    ckpts.wait()
    ckpts.close()
    writer.close()
    return last


def _check_identity(saved: dict, current: dict, workdir: str) -> None:
    saved = json.loads(json.dumps(saved))
    current = json.loads(json.dumps(current))
    diff = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if diff:
        raise ValueError(
            f"{workdir} holds a checkpoint of a different run; differing settings "
            f"(checkpoint, now): {diff}. Use a new --workdir, or the run's own flags")
