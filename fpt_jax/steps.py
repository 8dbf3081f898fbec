"""The pure steps of a group of K >= 1 runs, and the layout of what they read.

A run group is K runs (learning rate x seed) around one frozen backbone; a single run is a
group of one. `make_train_step` returns `(states[K], frozen, batches[K], rngs[K]) ->
(states[K], metrics[K])`: one run's step, `jax.vmap`ped over the run axis. Per run: the
trainable parameters and their optimizer state (with the run's learning rate in it), the
dropout key, the batch (its own data order). Shared: the frozen backbone
(`frozen['transformer']`, `in_axes=None`), one copy read once for all K runs, never written
nor copied (the states are donated, the frozen tree is an input only). Frozen parts outside
the backbone (the input layer of `trainable='output'`) come from the run's seed and carry
the run axis, so run k is exactly the run trained alone with seed k.

`parallel.map_over_devices` wraps the step over the devices (pmap outside, vmap inside):
gradients and metrics are averaged over `parallel.AXIS`; batches are laid out `[devices, K,
(grad_accum,) micro_batch, ...]` (`group_batches`).

The step counts each run's non-finite steps in a row (`TrainState.nonfinite`: a loss or
gradient norm that is not finite). Where a run must go on after one (`nonfinite_skips`, or
other runs of its group: `refuses_nonfinite`) the step never applies it: it keeps the run's
previous parameters and moments and, once the count exceeds `nonfinite_skips` (None: 0),
stops updating that run for good. The loop reads the count with the metrics and decides
(`fpt_jax.loop`: a single run stops with an error before anything non-finite is evaluated
or saved, a group records the run as diverged and the others go on).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpt_jax import freeze, parallel
from fpt_jax.models.fpt import NOISE_RNG
from fpt_jax.tasks import Task

BACKBONE = "transformer"  # the top-level key of the shared (backbone) parameters
MAX_STEPS_IN_FLIGHT = 2  # an unbounded queue of pmapped collectives deadlocks XLA:CPU
_NOISE_SALT = 0x6E6F6973  # folded into a step's dropout key: its noise key ("nois")


@flax.struct.dataclass
class TrainState:
    """What a step changes (and donates), per run: the step count, the trainable parameters,
    their optimizer state and the number of non-finite steps in a row. The frozen
    parameters are a separate, read-only argument of the step."""
    step: jax.Array
    trainable: Any
    opt_state: Any
    nonfinite: jax.Array


def frozen_axes(frozen: dict) -> dict:
    """vmap `in_axes` of the frozen tree: the backbone shared (None), other parts per run."""
    return {k: None if k == BACKBONE else 0 for k in frozen}


def _weighted_means(per_example: dict, batch: dict) -> dict:
    weight = batch.get("mask", jnp.ones(next(iter(per_example.values())).shape[0],
                                        jnp.float32))
    denom = jnp.maximum(weight.sum(), 1.0)
    return {k: (v * weight).sum() / denom for k, v in per_example.items()}


def refuses_nonfinite(num_runs: int, nonfinite_skips: int | None) -> bool:
    """Whether the step must keep a run's state through a non-finite step: when the run goes
    on after it (skips) or other runs do (a group). A single run without skips stops at its
    first non-finite step, before anything is evaluated or saved, so its step need not:
    the select over the optimizer state makes XLA:CPU copy every donated first moment before
    the update (measured on a full fine-tuning step: 1.44x -> 2.05x the minimum bytes)."""
    return num_runs > 1 or nonfinite_skips is not None


def make_train_step(model, task: Task, tx: optax.GradientTransformation, grad_accum: int = 1,
                    nonfinite_skips: int | None = None, axis_name: str | None = parallel.AXIS
                    ) -> Callable:
    """`(states[K], frozen, batches[K], rngs[K]) -> (states[K], metrics[K])`.

    Gradients are taken with respect to each run's trainable tree only, so XLA never
    computes the frozen weights' gradient matmuls nor all-reduces them. With `grad_accum >
    1` the batch leaves have an accumulation axis and gradients (and the task's metrics) are
    averaged over it with `lax.scan`.
    """
    limit = nonfinite_skips or 0

    def loss_fn(trainable, frozen, batch, rng):
        # the noise key is unused (and compiled away) unless the backbone draws noise
        rngs = {"dropout": rng, NOISE_RNG: jax.random.fold_in(rng, _NOISE_SALT)}
        logits = model.apply({"params": freeze.merge(trainable, frozen)}, batch["x"],
                             batch.get("length"), deterministic=False, rngs=rngs)
        means = _weighted_means(task.per_example_metrics(logits, batch), batch)
        return means["loss"], means

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def run_step(state: TrainState, frozen, batch, rng, refuse_nonfinite: bool):
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
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        live = state.nonfinite <= limit
        nonfinite = jnp.where(live, jnp.where(finite, 0, state.nonfinite + 1), state.nonfinite)
        metrics["nonfinite"] = nonfinite
        if refuse_nonfinite:
            apply = live & finite

            def keep(new, old):  # the previous value where the update is refused
                return jax.tree_util.tree_map(lambda a, b: jnp.where(apply, a, b), new, old)
            trainable, opt_state = keep(trainable, state.trainable), keep(opt_state,
                                                                          state.opt_state)
        return TrainState(state.step + 1, trainable, opt_state, nonfinite), metrics

    def group_step(states, frozen, batches, rngs):
        refuse = refuses_nonfinite(states.step.shape[0], nonfinite_skips)  # K: static
        return jax.vmap(functools.partial(run_step, refuse_nonfinite=refuse),
                        in_axes=(0, frozen_axes(frozen), 0, 0))(states, frozen, batches, rngs)
    return group_step


def eval_noise_key(x: jax.Array) -> jax.Array:
    """The noise key of an evaluation batch (`models.fpt.NOISE_RNG`): a function of its
    inputs only, so evaluating is deterministic, each batch gets its own draw, and a
    validation batch gets the same draw at every evaluation (selection compares parameters,
    not noise). Every input bit counts, weighted by its position."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    odd = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
    return jax.random.fold_in(jax.random.PRNGKey(0), jnp.sum(bits * odd, dtype=jnp.uint32))


def make_eval_step(model, task: Task, batch_axis: int | None = None,
                   axis_name: str | None = parallel.AXIS) -> Callable:
    """`(trainable[K], frozen, batch) -> {'<metric>_sum', 'count'}[K]`, summed over devices.
    `batch_axis=None`: one batch for every run (a dataset's split); 0: a batch per run (a
    generated task's evaluation batches depend on the run's seed). A backbone that draws
    noise at evaluation draws it from `eval_noise_key(batch['x'])`."""
    def eval_step(trainable, frozen, batch):
        logits = model.apply({"params": freeze.merge(trainable, frozen)}, batch["x"],
                             batch.get("length"), deterministic=True,
                             rngs={NOISE_RNG: eval_noise_key(batch["x"])})
        per_example = task.per_example_metrics(logits, batch)
        weight = batch.get("mask", jnp.ones(logits.shape[0], jnp.float32))
        sums = {f"{k}_sum": (v * weight).sum() for k, v in per_example.items()}
        sums["count"] = weight.sum()
        return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

    def group_eval(trainable, frozen, batch):
        return jax.vmap(eval_step, in_axes=(0, frozen_axes(frozen), batch_axis))(
            trainable, frozen, batch)
    return group_eval


def pmapped_train_step(step: Callable, devices) -> Callable:
    """The step over `devices`: states, frozen parameters and batches per device, the `[K]`
    keys shared; the states donated (updated in place), the frozen parameters only read."""
    return parallel.map_over_devices(step, devices, in_axes=(0, 0, 0, None),
                                     donate_argnums=(0,))


def pmapped_eval_step(step: Callable, devices) -> Callable:
    return parallel.map_over_devices(step, devices)


# --- what the steps read ------------------------------------------------------------------

def stack(trees: Sequence[Any]) -> Any:
    """Leaves stacked on a new leading run axis (host numpy)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, k: int) -> Any:
    """Run k's slice of a `[K, ...]` tree (host numpy)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[k], tree)


def run_rngs(seeds: Sequence[int]) -> jax.Array:
    """`[K, 2]` dropout keys: run k's is `PRNGKey(seeds[k] + 1)`."""
    return jnp.stack([jax.random.PRNGKey(int(s) + 1) for s in seeds])


def group_batches(task: Task, step: int, per_process: int, seeds: Sequence[int],
                  num_devices: int, grad_accum: int = 1, split: str = "train"
                  ) -> dict[str, np.ndarray]:
    """The `step`-th training batch of every run (each seed its own data order), laid out
    `[devices, K, (grad_accum,) micro_batch, ...]`; this process's rows of the global batch."""
    per_run = [parallel.shard_batch(
        task.batch(split, step, per_process, seed=int(s), process_index=jax.process_index(),
                   process_count=jax.process_count()), num_devices, grad_accum)
        for s in seeds]
    return stack_runs(per_run)


def stack_runs(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-run device-sharded batches `[devices, ...]` -> `[devices, K, ...]`. Bucketed token
    batches of different runs (their own data orders) are padded to the longest with zeros,
    the pad id: more right padding changes no real position (causal backbones never see it,
    bidirectional ones mask it by length)."""
    if len(batches) == 1:
        return {k: v[:, None] for k, v in batches[0].items()}  # a view, no copy
    out = {}
    for k in batches[0]:
        arrays = [b[k] for b in batches]
        if len({a.shape for a in arrays}) > 1:
            shape = np.max([a.shape for a in arrays], axis=0)
            arrays = [np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)]) for a in arrays]
        out[k] = np.stack(arrays, axis=1)
    return out
