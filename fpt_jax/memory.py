"""Will it fit? A run group's bytes per device, from shapes only, before a pod is booked.

`plan(cfg, num_runs)` builds the group's parameter, optimizer-state and batch shapes
abstractly (`jax.eval_shape`: no weights read, no device memory allocated; a preset's
architecture, or `config.json` alone for `model=auto`), places them as the run would (the
frozen backbone in the compute dtype, sharded over a (data, model) mesh by
`sharding.frozen_spec`; trainable parameters and optimizer state replicated, K runs), and
compiles the train step for those abstract inputs on this process's devices
(`jit(...).lower(...).compile()`, nothing executed) for the step's temporaries and outputs.

What the compiler reports is the backend it compiles for: on a TPU host, the TPU's numbers;
on this project's CPU machines, XLA:CPU's (fusion and layouts differ across backends, so the
temporaries are an estimate there; the argument bytes are exact everywhere). A mesh needs
that many devices in the process: a CPU-only entry point forces host devices
(experiments/plan_memory.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fpt_jax import build, freeze, optim, weights
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones
from fpt_jax.models.fpt import make_model
from fpt_jax.sharding import Placement, frozen_spec
from fpt_jax.steps import BACKBONE, TrainState, make_train_step

GIB = 1024 ** 3
# Accelerator memories (GiB) a plan is judged against: TPU v5e / V100 16, V100 / TPU v4 32,
# A100 / H100 80, H200 141.
CAPACITIES_GIB = (16, 32, 80, 141)


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device (the largest device's, under a mesh)."""
    devices: int
    mesh: tuple[int, int] | None
    frozen: int  # the frozen parameters (backbone in the compute dtype, sharded if a mesh)
    trainable: int  # K runs' trainable parameters (float32)
    optimizer: int  # K runs' optimizer states
    batch: int  # one step's batches and keys
    temporaries: int | None  # the compiled step's scratch (None: not compiled)
    outputs: int | None  # outputs not written in place of a donated input
    compiled_arguments: int | None  # the compiled step's own count of its argument bytes
    backend: str

    @property
    def arguments(self) -> int:
        return self.frozen + self.trainable + self.optimizer + self.batch

    @property
    def total(self) -> int:
        return self.arguments + (self.temporaries or 0) + (self.outputs or 0)

    def fits(self, gib: float) -> bool:
        return self.total <= gib * GIB

    def table(self, capacities: Sequence[float] = CAPACITIES_GIB) -> str:
        rows = [("frozen weights", self.frozen), ("trainable weights", self.trainable),
                ("optimizer state", self.optimizer), ("batch and keys", self.batch),
                ("step temporaries", self.temporaries), ("outputs not in place", self.outputs),
                ("total", self.total)]
        where = (f"mesh (data {self.mesh[0]} x model {self.mesh[1]})" if self.mesh else
                 f"data parallel over {self.devices} device(s)")
        lines = [f"per device, {where}; compiled for {self.backend}", "",
                 "| what | bytes | GiB |", "|---|---|---|"]
        lines += [f"| {name} | {'-' if n is None else f'{n:,}'} | "
                  f"{'-' if n is None else f'{n / GIB:.3f}'} |" for name, n in rows]
        lines += ["", "fits: " + ", ".join(
            f"{c:g} GiB {'yes' if self.fits(c) else 'no'}" for c in capacities)]
        return "\n".join(lines)


def _nbytes(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def _sharded_nbytes(x: Any, spec: Any, model: int) -> int:
    split = math.prod(model for axis in spec if axis == "model")
    return _nbytes(x) // split


def backbone_config(cfg: TrainConfig) -> Any:
    """The architecture the run would build, without reading any weights."""
    cfg.check()
    if cfg.model == "auto":
        if not cfg.weights:
            raise ValueError("model='auto': the planner reads the architecture from "
                             "weights' config.json; set weights to a local directory")
        return weights.read_config(cfg.weights)
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd")
                 if getattr(cfg, k) is not None and cfg.init == "random"}
    return backbones.family_of_preset(cfg.model).config_cls.preset(cfg.model, **overrides)


def abstract_group(cfg: TrainConfig, num_runs: int = 1):
    """(model, task, states [K, ...], frozen) of a group of `num_runs`, as ShapeDtypeStructs."""
    task = cfg.make_task()
    config = backbone_config(cfg).with_dropout(cfg.dropout)
    model = make_model(cfg, task, config, build.blocks_config(cfg))
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    x = jax.ShapeDtypeStruct((1, *task.example_shape), dtype)
    params = jax.eval_shape(lambda r, x: model.init(r, x)["params"],
                            jax.ShapeDtypeStruct((2,), jnp.uint32), x)
    trainable, frozen = freeze.partition(params, freeze.parse_selection(
        cfg.trainable, config.n_layer, len(cfg.blocks)))
    tx = optim.make_optimizer(cfg)
    opt_state = jax.eval_shape(tx.init, trainable)
    per_run = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jax.ShapeDtypeStruct((num_runs, *s.shape), s.dtype), t)
    k_scalar = jax.ShapeDtypeStruct((num_runs,), jnp.int32)
    states = TrainState(k_scalar, per_run(trainable), per_run(opt_state), k_scalar)
    backbone = frozen.pop(BACKBONE, None)
    frozen = per_run(frozen)
    if backbone is not None:
        frozen[BACKBONE] = backbone
    frozen = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.dtype)
                                       if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        frozen)
    return model, task, tx, states, frozen


def plan(cfg: TrainConfig, num_runs: int = 1, compile_step: bool = True) -> MemoryPlan:
    """The group's bytes per device on `cfg.mesh` (or data parallel over the devices)."""
    model, task, tx, states, frozen = abstract_group(cfg, num_runs)
    config = backbone_config(cfg)
    placement = Placement(cfg.num_devices, cfg.mesh, config)
    per_process = placement.per_process_batch(cfg.batch_size, cfg.grad_accum)
    m = placement.mesh.shape["model"] if placement.mesh is not None else 1
    flat = traverse_util.flatten_dict(frozen)
    frozen_bytes = sum(_sharded_nbytes(v, frozen_spec(k[1:], v.shape, m), m)
                       if k[0] == BACKBONE else _nbytes(v) for k, v in flat.items())
    tree_bytes = lambda t: sum(_nbytes(x) for x in jax.tree_util.tree_leaves(t))  # noqa
    # one step's batch: this device's rows of every run's batch, and the runs' keys
    rows = per_process // placement.slots if placement.mesh is None else (
        cfg.batch_size // placement.data_parallel)
    example = jax.eval_shape(lambda: {k: jnp.zeros((rows, *v.shape[1:]), v.dtype)
                                      for k, v in _batch_shapes(task).items()})
    batch_bytes = num_runs * tree_bytes(example) + num_runs * 2 * 4
    temporaries = outputs = compiled = None
    backend = jax.default_backend()
    if compile_step:
        compiled_step = _compile(model, task, tx, cfg, placement, states, frozen, num_runs,
                                 per_process)
        analysis = compiled_step.memory_analysis()
        if analysis is not None:
            temporaries = int(analysis.temp_size_in_bytes)
            outputs = int(analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
            compiled = int(analysis.argument_size_in_bytes)
    return MemoryPlan(len(placement.mapped), cfg.mesh, frozen_bytes,
                      tree_bytes(states.trainable), tree_bytes(states.opt_state)
                      + 2 * 4 * num_runs,  # the step counter and non-finite count
                      batch_bytes, temporaries, outputs, compiled, backend)


def _batch_shapes(task) -> dict[str, Any]:
    """One training example's arrays (a batch of one), as ShapeDtypeStructs."""
    batch = task.batch("train", 0, 1, seed=0) if not task.is_dataset else None
    if batch is not None:
        return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
                for k, v in batch.items()}
    # a dataset's examples (read from its files): inputs at their longest, one class label
    dtype = jnp.int32 if task.input_kind == "tokens" else jnp.float32
    shapes = {"x": jax.ShapeDtypeStruct((1, *task.example_shape), dtype),
              "y": jax.ShapeDtypeStruct((1,), jnp.int32)}
    if task.input_kind == "tokens":
        shapes["length"] = jax.ShapeDtypeStruct((1,), jnp.int32)
    return shapes


def _compile(model, task, tx, cfg: TrainConfig, placement: Placement, states, frozen,
             k: int, per_process: int):
    """The train step compiled for abstract inputs laid out as the loop lays them out."""
    step = placement.map(make_train_step(model, task, tx, cfg.grad_accum, cfg.nonfinite_skips),
                         in_axes=(0, 0, 0, None), donate_argnums=(0,))
    slots = placement.slots
    lead = lambda s, sharding=None: jax.ShapeDtypeStruct(  # noqa: E731
        (slots, *s.shape), s.dtype, sharding=sharding)
    rows = per_process // slots
    accum = (cfg.grad_accum,) if cfg.grad_accum > 1 else ()
    batch = {n: jax.ShapeDtypeStruct((slots, k, *accum, rows // cfg.grad_accum, *s.shape[1:]),
                                     s.dtype) for n, s in _batch_shapes(task).items()}
    keys = jax.ShapeDtypeStruct((k, 2), jnp.uint32)
    if placement.mesh is None:
        args = (jax.tree_util.tree_map(lead, states), jax.tree_util.tree_map(lead, frozen),
                batch, keys)
    else:
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh, m = placement.mesh, placement.mesh.shape["model"]
        whole = NamedSharding(mesh, P())

        def frozen_leaf(path, s):
            names = [str(getattr(p, "key", p)) for p in path]
            spec = (P(None, *frozen_spec(names[1:], s.shape, m)) if names[0] == BACKBONE
                    else P())
            return lead(s, NamedSharding(mesh, spec))
        rows_axis = 3 if cfg.grad_accum > 1 else 2
        args = (jax.tree_util.tree_map(lambda s: lead(s, whole), states),
                jax.tree_util.tree_map_with_path(frozen_leaf, frozen),
                {n: jax.ShapeDtypeStruct(
                    (s.shape[0], s.shape[1], *s.shape[2:rows_axis],
                     s.shape[rows_axis] * jax.process_count(), *s.shape[rows_axis + 1:]),
                    s.dtype, sharding=NamedSharding(mesh, P(*[
                        "data" if i == rows_axis else None for i in range(len(s.shape))])))
                 for n, s in batch.items()},
                jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=whole))
    return step.lower(*args).compile()
