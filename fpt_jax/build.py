"""The build layer: everything a run group is made of before its first step, and the one
reader that rebuilds a finished run. Nothing here imports the loop.

  task      `prepare_task`: the task with every split the group reads opened and checked
  backbone  `backbone`: a preset at random init, pretrained weights, or the backbone a
            finished run ended with (`init=<workdir>`, `run=k` for a group's run k)
  model     `models.fpt.make_model`; `init_params` (the random backbone never computed when
            a pretrained one replaces it)
  group     `build_group`: K runs (learning rates x seeds) around one backbone, partitioned
            into trainable (per run, `[K, ...]`) and frozen (the backbone once, in the
            compute dtype; other frozen parts per run), with their optimizer states
  reader    `load_run(workdir, run, which)`: a finished run's model and parameters, for
            `init=<workdir>`, attention maps and the report

Seeds: run k's seed sets its initialisation of everything outside the backbone, its dropout
keys and its data order; the backbone is the same for every run of a group: the pretrained
checkpoint, or for `init='random'` one drawn from `backbone_seed` (its trainable parts, layer
norms and positions, start from it too). With `backbone_draw='per_seed'` each run draws its
own from `backbone_seed` and its seed (runs of one seed at several learning rates share it),
kept per run under `transformer@per_run` (`freeze.PER_RUN`): K copies, vmapped over the run
axis like the other per-run parts, in the same one compiled step.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fpt_jax import checkpoint, fast_rng, freeze, optim, runs, weights
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones, blocks
from fpt_jax.models.fpt import FPT, make_model
from fpt_jax.steps import BACKBONE, TrainState, stack, unstack
from fpt_jax.tasks import Task

_ARCH = ("n_layer", "n_head", "n_embd")
# The preset whose pretrained weights ship as a named source (weights.NAMED_SOURCES).
_PRESET_SOURCES = {"minilm-l6": "minilm"}
WHICH = ("best", "last")


def is_run_dir(init: str) -> bool:
    """Whether `init` names a run's workdir rather than 'random' / 'pretrained'."""
    return init not in ("random", "pretrained")


# --- task and backbone ----------------------------------------------------------------------

def prepare_task(cfg: TrainConfig, task: Task | None = None) -> Task:
    """The group's task, with every split it reads opened and checked (files present,
    well-formed) and the evaluation settings checked: a bad input stops it before step 1."""
    cfg.check()
    fast_rng.use_unrolled_threefry_on_cpu()  # same dropout bits, fused on CPU
    task = task or cfg.make_task()
    eval_split = cfg.eval_split or task.eval_split
    task.check_split(eval_split)
    if cfg.eval_batches is None and not task.is_dataset:
        raise ValueError(f"eval_batches=None: task {task.name} is generated and evaluates on "
                         "a number of batches; set eval_batches")
    for split in dict.fromkeys(("train", eval_split, *task.test_splits)):
        task.prepare(split)
    return task


def backbone(cfg: TrainConfig, task: Task | None = None) -> tuple[Any, dict | None]:
    """The backbone's config (with the run's dropout) and, unless `init='random'`, its
    parameters (host numpy, float32)."""
    cfg.check()  # the settings alone (TrainConfig.check); what the files hold is checked here
    overrides = {k: getattr(cfg, k) for k in _ARCH if getattr(cfg, k) is not None}
    if is_run_dir(cfg.init):
        source, params = load_run(cfg.init, cfg.run, "last", what="init")
        if cfg.model not in ("auto", source.cfg.model):
            raise ValueError(f"init={cfg.init} is a run of model={source.cfg.model}, but "
                             f"model={cfg.model}; set model={source.cfg.model} or model=auto")
        config, params = source.model.config, params[BACKBONE]
    elif cfg.init == "random":
        config = backbones.family_of_preset(cfg.model).config_cls.preset(cfg.model, **overrides)
        params = None
    else:
        if cfg.model == "auto":  # the architecture is whatever the weights hold
            config, params = weights.load(cfg.weights)
        else:
            config, params = preset_weights(cfg.model, cfg.weights)
    return config.with_dropout(cfg.dropout), params


def weights_source(cfg: TrainConfig) -> str:
    """Where a pretrained backbone's weights come from: `weights`, else the preset's own."""
    return cfg.weights or _PRESET_SOURCES.get(cfg.model, cfg.model)


def preset_weights(model: str, source: str | None, what: str = "weights",
                   model_field: str = "model") -> tuple[Any, dict]:
    """The pretrained weights of preset `model` from `source` (None: the preset's own), as
    (config, host params); ValueError naming `what` when they hold another architecture."""
    fam = backbones.family_of_preset(model)  # an unknown preset is an error first
    expected = fam.presets[model]
    config, params = weights.load(source or _PRESET_SOURCES.get(model, model))
    got_fam = backbones.family_of(config)
    if got_fam.name != fam.name or any(getattr(config, a) != getattr(expected, a)
                                       for a in _ARCH):
        got = {a: getattr(config, a) for a in _ARCH}
        want = {a: getattr(expected, a) for a in _ARCH}
        raise ValueError(f"{what}={source} holds a {got_fam.display_name} with {got}, but "
                         f"{model_field}={model} is a {fam.display_name} with {want}; set the "
                         f"matching {model_field} (or {model_field}='auto' to take the "
                         "architecture from the weights)")
    return config, params


def blocks_config(cfg: TrainConfig) -> Any:
    """The config of the blocks `cfg.blocks` appends (None: none), without reading weights
    (a preset's, or `blocks_weights`' config.json for blocks_model='auto')."""
    if not cfg.blocks:
        return None
    if cfg.blocks_model == "auto":
        source = (weights.read_config(cfg.blocks_weights) if os.path.isdir(cfg.blocks_weights)
                  else weights.load(cfg.blocks_weights)[0])
    else:
        source = backbones.family_of_preset(cfg.blocks_model).config_cls.preset(
            cfg.blocks_model)
    return blocks.blocks_config(source, cfg.blocks).with_dropout(cfg.dropout)


def frozen_blocks(cfg: TrainConfig) -> tuple[Any, dict | None]:
    """The config of the blocks `cfg.blocks` appends (None: none) and, for
    `blocks_init='pretrained'`, their parameters (`{block_j: ...}`, host numpy)."""
    if not cfg.blocks:
        return None, None
    if cfg.blocks_init == "random":  # each run draws its own (init_params, from its seed)
        source, params = backbones.family_of_preset(cfg.blocks_model).config_cls.preset(
            cfg.blocks_model), None
    elif cfg.blocks_model == "auto":
        source, params = weights.load(cfg.blocks_weights)
    else:
        source, params = preset_weights(cfg.blocks_model, cfg.blocks_weights,
                                        "blocks_weights", "blocks_model")
    fam = backbones.family_of(source)
    if fam.block_cls is None:
        raise ValueError(f"blocks_weights={cfg.blocks_weights} holds a {fam.display_name}, "
                         "whose family offers no blocks; accepted: GPT-2, BERT/MiniLM, ViT "
                         "or a Llama-family checkpoint")
    config = blocks.blocks_config(source, cfg.blocks).with_dropout(cfg.dropout)
    return config, params and blocks.take_blocks(source, params, cfg.blocks)


# --- parameters -----------------------------------------------------------------------------

def init_params(model: FPT, task: Task, rng: jax.Array, pretrained: dict | None = None
                ) -> dict:
    """FPT parameters (host numpy): random, with the pretrained backbone in place when given.
    The random backbone is then never computed (only the other parts are returned from
    the jitted init, so XLA drops its initialisers); flax derives each parameter's key
    from its path, so the other parts equal those of a full random init. Backbone
    parameters that no checkpoint holds (the family's `fresh_paths`, e.g. ViT's new
    position table) come from this initialisation too."""
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    example = (tuple(task.example_shape), jnp.dtype(dtype).name)
    if pretrained is None:
        return jax.tree_util.tree_map(np.asarray, _jitted_init(model, example, None)(rng))
    expected = traverse_util.flatten_dict(
        jax.eval_shape(_jitted_init(model, example, None), rng)[BACKBONE])
    got = traverse_util.flatten_dict(pretrained)
    fresh = backbones.family_of(model.config).fresh_paths(model.config)
    fresh = {p for p in fresh if p not in got}  # a run's own backbone has them already
    if set(got) != set(expected) - fresh or any(np.shape(got[p]) != expected[p].shape
                                                 for p in got):
        raise ValueError("the pretrained backbone's parameters do not match the model's "
                         "architecture")
    others, new = jax.tree_util.tree_map(
        np.asarray, _jitted_init(model, example, tuple(sorted(fresh)))(rng))
    return {**others, BACKBONE: traverse_util.unflatten_dict({**got, **new})}


def _jitted_init(model: FPT, example: tuple, fresh: tuple | None):
    """The jitted initialiser of `model` on inputs of `example` = (shape, dtype), kept per
    process: a group of K runs, the cells of a sweep and a resumed run build equal models
    (flax modules compare by their fields), and tracing the init again for each costs as
    much as running it. `fresh=None`: every parameter; else the parts outside the backbone
    and the backbone's `fresh` paths only (the rest comes from a checkpoint)."""
    try:
        hash(model)
    except TypeError:  # a model with an unhashable field: traced anew each time
        return _jitted_init_uncached(model, example, fresh)
    return _jitted_init_cached(model, example, fresh)


def _jitted_init_uncached(model: FPT, example: tuple, fresh: tuple | None):
    x = jnp.zeros((1, *example[0]), example[1])

    def init(r):
        params = model.init(r, x)["params"]
        if fresh is None:
            return params
        new = traverse_util.flatten_dict(params[BACKBONE])
        return ({k: v for k, v in params.items() if k != BACKBONE},
                {p: new[p] for p in fresh})
    return jax.jit(init)


_jitted_init_cached = functools.lru_cache(maxsize=16)(_jitted_init_uncached)


def _same_shapes(drawn: dict, taken: dict) -> dict:
    got, want = (traverse_util.flatten_dict({k: t[k] for k in taken}) for t in (taken, drawn))
    if set(got) != set(want) or any(np.shape(got[p]) != np.shape(want[p]) for p in got):
        raise ValueError("the pretrained blocks' parameters do not match their architecture")
    return taken


# --- a group of K runs ----------------------------------------------------------------------

@dataclasses.dataclass
class Group:
    """What a group builds before its first step. `states` and `frozen` are host copies:
    drop them once they are on the devices. `states` leaves are `[K, ...]`; `frozen` holds
    the backbone once (no run axis) and any other frozen part per run (`[K, ...]`)."""
    cfg: TrainConfig
    task: Task
    model: FPT
    config: Any  # the backbone family's config
    selection: freeze.Selection
    tx: optax.GradientTransformation
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    states: TrainState | None
    frozen: dict | None
    table: str

    @property
    def num_runs(self) -> int:
        return len(self.seeds)

    def identity(self) -> dict:
        return runs.identity(self.cfg, self.learning_rates, self.seeds,
                             backbones.family_of(self.config).name, self.config)


def check_runs(learning_rates: Sequence[float], seeds: Sequence[int]) -> None:
    if not seeds or len(seeds) != len(learning_rates):
        raise ValueError(f"a group needs one learning rate per seed, at least one run; got "
                         f"{len(learning_rates)} learning rates and {len(seeds)} seeds")
    bad = [x for x in learning_rates if not (np.isfinite(x) and x > 0)]
    if bad or any(s < 0 for s in seeds):
        raise ValueError(f"learning rates must be finite and > 0, seeds >= 0; got "
                         f"learning_rates={tuple(learning_rates)}, seeds={tuple(seeds)}")


def build_group(cfg: TrainConfig, learning_rates: Sequence[float] | None = None,
                seeds: Sequence[int] | None = None, task: Task | None = None) -> Group:
    """K runs of `cfg` (default: one, `cfg.learning_rate` and `cfg.seed`): run k initialised
    from `seeds[k]` around the backbone, with `learning_rates[k]` in its optimizer state.
    Every split the group reads is opened and checked first."""
    learning_rates = tuple(float(x) for x in (learning_rates or (cfg.learning_rate,)))
    seeds = tuple(int(s) for s in (seeds if seeds is not None else (cfg.seed,)))
    check_runs(learning_rates, seeds)
    task = prepare_task(cfg, task)
    config, pretrained = backbone(cfg, task)
    selection = freeze.parse_selection(cfg.trainable, config.n_layer, len(cfg.blocks))
    blocks_cfg, taken = frozen_blocks(cfg)
    model = make_model(cfg, task, config, blocks_cfg)
    per_seed = cfg.backbone_draw == "per_seed"
    if pretrained is None and not per_seed:  # one random backbone for every run
        pretrained = init_params(model, task, jax.random.PRNGKey(cfg.backbone_seed))[BACKBONE]
    tx = optim.make_optimizer(cfg)
    trainables, others, table, shared = [], [], "", None
    for seed in seeds:
        if per_seed:  # this seed's own backbone (its trainable parts start from it too)
            pretrained = init_params(model, task, jax.random.fold_in(
                jax.random.PRNGKey(cfg.backbone_seed), seed))[BACKBONE]
        params = init_params(model, task, jax.random.PRNGKey(seed), pretrained)
        if taken is not None:  # the pretrained blocks in place of this draw
            params["blocks"] = {**params["blocks"], **_same_shapes(params["blocks"], taken)}
        if not table:
            table, _ = freeze.count_table(params, selection)
        trainable, frozen = freeze.partition(params, selection)
        if per_seed and BACKBONE in frozen:  # stacked over runs with the other per-run parts
            frozen[BACKBONE + freeze.PER_RUN] = frozen.pop(BACKBONE)
        shared = frozen.pop(BACKBONE, None) if shared is None else shared
        frozen.pop(BACKBONE, None)
        trainables.append(trainable)
        others.append(frozen)
    opt_states = [optim.with_learning_rate(tx.init(t), lr)
                  for t, lr in zip(trainables, learning_rates)]
    k = len(seeds)
    states = TrainState(np.zeros(k, np.int32), stack(trainables), stack(opt_states),
                        np.zeros(k, np.int32))
    frozen = stack(others) if others[0] else {}
    if shared is not None:
        frozen[BACKBONE] = shared
    frozen = freeze.cast_frozen(frozen, jnp.dtype(cfg.dtype))
    return Group(cfg, task, model, config, selection, tx, learning_rates, seeds, states,
                 frozen, table)


# --- the finished-run reader ----------------------------------------------------------------

@dataclasses.dataclass
class LoadedRun:
    """Run `run` of the group in `workdir`, rebuilt: its model and what names it."""
    workdir: str
    cfg: TrainConfig  # runs.config_of's: the run's settings, float32, no dropout
    task: Task
    model: FPT
    run: int
    num_runs: int
    which: str  # 'best' or 'last'
    step: int  # the step whose parameters were loaded
    summary: dict | None  # this run's entry of summary.json; None before the group ended


def _not_a_run(workdir: str, what: str) -> ValueError:
    accepted = (f"accepted: the workdir of a run or run group (experiments.train or a sweep "
                f"cell, WORKDIR/cells/<name>), holding {runs.CHECKPOINTS}/")
    if not os.path.isdir(workdir):
        return ValueError(f"{what}={workdir}: no such directory; {accepted}")
    cells = os.path.join(workdir, "cells")
    if os.path.isdir(cells):
        names = sorted(os.listdir(cells))
        return ValueError(f"{what}={workdir} is a sweep's workdir; pass one of its cells, "
                          f"{os.path.join(workdir, 'cells', '<name>')} (cells: "
                          f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    return ValueError(f"{what}={workdir} has no {runs.CHECKPOINTS}/; {accepted}")


def load_run(workdir: str, run: int | None = None, which: str = "best", what: str = "workdir"
             ) -> tuple[LoadedRun, dict]:
    """Run `run` of the group in `workdir` (None: its only run) and its full parameter tree
    (trainable merged with frozen, host numpy): `which='best'` the parameters of its
    selected step (best validation accuracy), 'last' the newest checkpoint's. The frozen
    parameters are rebuilt from the recorded identity (weights or seed), in float32. `what`
    names the setting in errors ('workdir', 'init'). The workdir is only read."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}; accepted: {', '.join(WHICH)}")
    ckpt_dir = os.path.join(workdir, runs.CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise _not_a_run(workdir, what)
    manager = checkpoint.Checkpoints(ckpt_dir, read_only=True)
    try:
        latest = manager.latest_step()
        if latest is None:
            raise ValueError(f"{what}={workdir}: the run has no checkpoint yet "
                             f"({runs.CHECKPOINTS}/ is empty); train it first")
        meta = manager.meta(latest)
        saved = meta.get("identity", {})
        if runs.is_legacy_single_run(saved):
            raise runs.OldLayoutError(str(runs._old_single_run(workdir)))
        k = runs.num_runs(saved)
        if run is None and k == 1:
            run = 0
        if run is None or not isinstance(run, int) or isinstance(run, bool) or not 0 <= run < k:
            got = "run not given" if run is None else f"run={run!r} is out of range"
            raise ValueError(f"{what}={workdir} is a group of {k} runs: {got}; accepted: "
                             f"run = one of {runs.describe_runs(saved)}")
        try:
            cfg = runs.config_of(saved, run, workdir)
            g = build_group(cfg)
        except ValueError as e:
            raise ValueError(f"{what}={workdir}: cannot rebuild its model: {e}") from None
        step = latest
        if which == "best":
            step = (meta.get("protocol") or [{}] * k)[run].get("best_step")
            if step is None:
                raise ValueError(f"{what}={workdir}: run {run} has no selected step (no finite "
                                 "validation accuracy yet); use which=last")
        key = "best" if which == "best" else "now"
        template = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((k, *np.shape(x)[1:]), np.asarray(x).dtype),
            g.states.trainable)
        stacked = manager.restore_trainable(latest, {key: template})[key]
    finally:
        manager.close()
    summaries = runs.summary_runs(workdir)
    loaded = LoadedRun(workdir, cfg, g.task, g.model, run, k, which, step,
                       summaries[run] if run < len(summaries) else None)
    return loaded, freeze.merge(unstack(stacked, run), _run_frozen(g.frozen))


def _run_frozen(frozen: dict) -> dict:
    """A group of one's frozen tree without its run axis (a shared backbone has none)."""
    return {k.removesuffix(freeze.PER_RUN): v if k == BACKBONE else unstack(v, 0)
            for k, v in frozen.items()}
