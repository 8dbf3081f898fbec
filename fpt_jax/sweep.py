"""K runs in one program (issue 15, part 2): runs that differ only in learning rate and seed,
trained together by `jax.vmap` of `train.make_train_step`'s step over a leading run axis,
inside the pmapped step (pmap over devices outside, vmap over runs inside).

Per run: the trainable parameters and their optimizer state (with the run's learning rate
in it, `make_optimizer`), the dropout key and the data order (`task.batch(..., seed=run
seed)`); these leaves carry a leading run axis `[K, ...]`. Shared: the frozen backbone
(`frozen['transformer']`), one copy that the step reads once for all K runs (vmap
`in_axes=None`), never copied nor written (the states are donated, the backbone is not).

Seeds. A run's seed sets its initialisation of everything outside the backbone (input and
output layers), its dropout keys (`PRNGKey(seed + 1)`, as `train._loop`) and its data
order. The backbone is the same for every run of a sweep: the pretrained checkpoint, or
for `init='random'` a random GPT-2 drawn from `backbone_seed` (so the runs of a sweep share
one random backbone, as runs from one pretrained checkpoint do; a different backbone is a
different sweep cell). This includes the backbone's trainable parts (layer norms, position
embeddings): they start from the backbone, as they do from a pretrained checkpoint. Frozen
parameters outside the backbone (the input layer of `trainable='output'`, say) belong to
the run: they come from its seed and carry the run axis, so run k of a sweep is exactly
the run trained alone with seed k on the same backbone.

The learning rate is the optimizer's injected hyperparameter (`optax.inject_hyperparams`):
the peak learning rate. For `schedule='constant'` it is the learning rate; for 'warmup' and
'cosine' the step's learning rate is `peak * unit(step)`, where `unit` is the config's
schedule with peak 1 (`optim.learning_rate_schedule` of `learning_rate=1.0`): the same
schedule as a single run's up to float32 rounding (a product instead of the schedule's own
arithmetic on the peak, within a few ulp). One compiled program serves any learning rates.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpt_jax import baselines, freeze, optim, parallel, train
from fpt_jax.config import TrainConfig
from fpt_jax.tasks import Task

BACKBONE = "transformer"  # the top-level key of the shared (backbone) parameters


# --- the optimizer, learning rate in its state ----------------------------------------------

def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """`optim.make_optimizer`'s chain (clip_by_global_norm when grad_clip, adam or adamw;
    apply_if_finite outermost when nonfinite_skips) with the peak learning rate injected
    into the optimizer state (`cfg.learning_rate` at init; change it with
    `with_learning_rate`). For the constant schedule the update is bit-identical to
    `optim.make_optimizer`'s."""
    unit = (None if cfg.schedule == "constant"
            else optim.learning_rate_schedule(dataclasses.replace(cfg, learning_rate=1.0)))

    def chain(learning_rate):
        lr = learning_rate if unit is None else (lambda count: learning_rate * unit(count))
        return optim.optimizer_chain(cfg, lr)

    tx = optax.inject_hyperparams(chain, hyperparam_dtype=jnp.float32)(cfg.learning_rate)
    return optim.skip_nonfinite(cfg, tx)


def _map_inject_state(opt_state, fn):
    """`opt_state` with `fn` applied to its InjectHyperparams state (through apply_if_finite)."""
    if hasattr(opt_state, "hyperparams") and hasattr(opt_state, "inner_state"):
        return fn(opt_state)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state._replace(inner_state=_map_inject_state(opt_state.inner_state, fn))
    raise TypeError(f"not an optimizer state of sweep.make_optimizer: {type(opt_state)}")


def learning_rate(opt_state) -> Any:
    """The injected (peak) learning rate of an optimizer state (`[K]` for stacked runs)."""
    out = []
    _map_inject_state(opt_state, lambda s: out.append(s.hyperparams["learning_rate"]) or s)
    return out[0]


def with_learning_rate(opt_state, lr) -> Any:
    """`opt_state` with its injected learning rate set to `lr` (a scalar, or `[K]` for
    stacked runs), as float32."""
    def put(s):
        old = s.hyperparams["learning_rate"]
        new = np.broadcast_to(np.asarray(lr, np.float32), np.shape(old))
        return s._replace(hyperparams={**s.hyperparams, "learning_rate": new})
    return _map_inject_state(opt_state, put)


# --- K runs ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Sweep:
    """What a sweep builds before its first step. `states` and `frozen` are host copies:
    drop them once they are on the devices. `states` leaves are `[K, ...]`; `frozen` holds
    the backbone once (`frozen['transformer']`, no run axis) and any other frozen part per
    run (`[K, ...]`)."""
    cfg: TrainConfig
    task: Task
    model: Any
    config: Any
    selection: freeze.Selection
    tx: optax.GradientTransformation
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    backbone_seed: int
    states: train.TrainState | None
    frozen: dict | None
    table: str

    @property
    def num_runs(self) -> int:
        return len(self.seeds)


def stack(trees: Sequence[Any]) -> Any:
    """Leaves stacked on a new leading run axis (host numpy)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, k: int) -> Any:
    """Run k's slice of a `[K, ...]` tree (host numpy)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[k], tree)


def frozen_axes(frozen: dict) -> dict:
    """vmap `in_axes` of the frozen tree: the backbone shared (None), other parts per run."""
    return {k: None if k == BACKBONE else 0 for k in frozen}


def init_runs(cfg: TrainConfig, learning_rates: Sequence[float], seeds: Sequence[int],
              task: Task | None = None, backbone_seed: int | None = None) -> Sweep:
    """K runs of `cfg` (K = len(seeds) = len(learning_rates); `cfg.seed` and
    `cfg.learning_rate` are not used for them): run k is initialised from `seeds[k]` around
    the backbone (pretrained, or random from `backbone_seed`), with `learning_rates[k]` in
    its optimizer state. Checks what `train.setup` checks (every split opened)."""
    learning_rates, seeds = tuple(float(x) for x in learning_rates), tuple(int(s) for s in seeds)
    backbone_seed = cfg.backbone_seed if backbone_seed is None else backbone_seed
    if not seeds or len(seeds) != len(learning_rates):
        raise ValueError(f"a sweep needs one learning rate per seed, at least one run; got "
                         f"{len(learning_rates)} learning rates and {len(seeds)} seeds")
    bad = [x for x in learning_rates if not (np.isfinite(x) and x > 0)]
    if bad or any(s < 0 for s in seeds) or backbone_seed < 0:
        raise ValueError(f"learning rates must be finite and > 0, seeds and backbone_seed >= 0; "
                         f"got learning_rates={learning_rates}, seeds={seeds}, "
                         f"backbone_seed={backbone_seed}")
    task = train.prepare_task(cfg, task)
    config, pretrained = train.backbone(cfg, task)
    selection = freeze.parse_selection(cfg.trainable, config.n_layer)
    model = train.make_model(cfg, task, config)
    if pretrained is None:  # a random backbone, the same for every run
        pretrained = random_backbone(model, task, backbone_seed)
    tx = make_optimizer(cfg)
    trainables, others, table = [], [], ""
    shared = None
    for seed, lr in zip(seeds, learning_rates):
        params = train.init_params(model, task, jax.random.PRNGKey(seed), pretrained)
        if not table:
            table, _ = freeze.count_table(params, selection)
            if cfg.match_model is not None:
                table += "\n" + baselines.match(cfg, task).lines()
        trainable, frozen = freeze.partition(params, selection)
        shared = frozen.pop(BACKBONE, None) if shared is None else shared
        frozen.pop(BACKBONE, None)
        trainables.append(trainable)
        others.append(frozen)
    trainable = stack(trainables)
    opt_state = stack([with_learning_rate(tx.init(t), lr)
                       for t, lr in zip(trainables, learning_rates)])
    states = train.TrainState(np.zeros(len(seeds), np.int32), trainable, opt_state)
    frozen = stack(others) if others[0] else {}
    if shared is not None:
        frozen[BACKBONE] = shared
    frozen = freeze.cast_frozen(frozen, train.COMPUTE_DTYPES[cfg.dtype])
    return Sweep(cfg, task, model, config, selection, tx, learning_rates, seeds, backbone_seed,
                 states, frozen, table)


def random_backbone(model, task: Task, backbone_seed: int) -> dict:
    """The random backbone (`params['transformer']`) of `init='random'`, from `backbone_seed`
    (as `train.setup` draws it)."""
    return train.init_params(model, task, jax.random.PRNGKey(backbone_seed))[BACKBONE]


def run_rngs(seeds: Sequence[int]) -> jax.Array:
    """`[K, 2]` dropout keys: run k's is `PRNGKey(seeds[k] + 1)`, as a single run's loop."""
    return jnp.stack([jax.random.PRNGKey(int(s) + 1) for s in seeds])


def sweep_batches(task: Task, step: int, per_process: int, seeds: Sequence[int],
                  num_devices: int, grad_accum: int = 1, split: str = "train"
                  ) -> dict[str, np.ndarray]:
    """The `step`-th training batch of every run (each seed its own data order), laid out
    `[devices, K, (grad_accum,) micro_batch, ...]` for the pmapped sweep step."""
    per_run = [parallel.shard_batch(
        task.batch(split, step, per_process, seed=int(s), process_index=jax.process_index(),
                   process_count=jax.process_count()), num_devices, grad_accum)
        for s in seeds]
    return {k: np.stack(_same_shape([b[k] for b in per_run]), axis=1) for k in per_run[0]}


def _same_shape(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Bucketed token batches of different runs (their own data orders) padded to the longest
    with zeros, the pad id: more right padding changes no real position (causal backbones
    never see it, bidirectional ones mask it by length), and the runs stack into one batch."""
    if len({a.shape for a in arrays}) == 1:
        return arrays  # the common case: no copy before the stack
    shape = np.max([a.shape for a in arrays], axis=0)
    return [np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)]) for a in arrays]


# --- the step ------------------------------------------------------------------------------

def make_sweep_step(model, task: Task, tx: optax.GradientTransformation, grad_accum: int = 1,
                    axis_name: str | None = parallel.AXIS) -> Callable:
    """`(states[K], frozen, batches[K, ...], rngs[K]) -> (states[K], metrics[K])`: the vmap of
    `train.make_train_step`'s step over the run axis. The backbone `frozen['transformer']`
    is shared (`in_axes=None`), other frozen parts are per run; each run has its own batch
    and dropout key (folded with the step and device index as in a single run)."""
    train_step = train.make_train_step(model, task, tx, grad_accum, axis_name)

    def sweep_step(states, frozen, batches, rngs):
        return jax.vmap(train_step, in_axes=(0, frozen_axes(frozen), 0, 0))(
            states, frozen, batches, rngs)
    return sweep_step


def make_sweep_eval_step(model, task: Task, batch_axis: int | None = None,
                         axis_name: str | None = parallel.AXIS) -> Callable:
    """`(trainable[K], frozen, batch) -> sums[K]`: `train.make_eval_step`'s step for every
    run, the backbone shared. `batch_axis=None`: one batch for all runs (a shared validation
    set); 0: a batch per run (`sweep_batches` layout; a single run's generated validation
    batches depend on its seed). Pmap it with `train.pmapped_eval_step`."""
    eval_step = train.make_eval_step(model, task, axis_name)

    def sweep_eval_step(trainable, frozen, batch):
        def one(t, f, b):
            return eval_step(freeze.merge(t, f), b)
        return jax.vmap(one, in_axes=(0, frozen_axes(frozen), batch_axis))(
            trainable, frozen, batch)
    return sweep_eval_step


def pmapped_sweep_step(sweep_step: Callable, devices) -> Callable:
    """The sweep step over `devices` (pmap outside, vmap inside): states, frozen parameters
    and batches per device (`parallel.replicate`, `sweep_batches`), the `[K]` keys shared;
    the states are donated (updated in place), the frozen parameters only read."""
    return parallel.map_over_devices(sweep_step, devices, in_axes=(0, 0, 0, None),
                                     donate_argnums=(0,))


def train_and_evaluate_sweep(cfg: TrainConfig, workdir: str, learning_rates: Sequence[float],
                             seeds: Sequence[int], task: Task | None = None) -> list[dict]:
    """The K runs' loop (`fpt_jax.sweep_loop`, which builds on this module)."""
    from fpt_jax import sweep_loop  # the loop imports this module
    return sweep_loop.train_and_evaluate_sweep(cfg, workdir, learning_rates, seeds, task)
