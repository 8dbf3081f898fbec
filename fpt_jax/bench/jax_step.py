"""The timed JAX step, built exactly as training builds it, and what XLA says of it.

`build.build_group` builds the task, model, optimizer and the K runs' states around one
backbone (K = 1: a single run), exactly as training does; `steps.make_train_step` +
`steps.pmapped_train_step` give the pmapped step over the local devices (vmap over the
runs inside), which donates the states and reads the frozen parameters in place; both are
replicated with `parallel.replicate` and batches laid out with `steps.group_batches`.
Forward-only cases time the pmapped eval step. From the compiled step: FLOPs and bytes accessed (XLA's cost
analysis), the latter against the minimum a step must touch (`core.minimum_step_bytes`, from
the trees the runner holds, in their stored dtypes), memory (XLA's memory analysis), and dot
and all-reduce counts in its HLO.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Sequence

import jax
import numpy as np

import jax.numpy as jnp

from fpt_jax import build, parallel
from fpt_jax.steps import (BACKBONE, group_batches, make_eval_step, make_train_step,
                           pmapped_eval_step, pmapped_train_step, run_rngs)
from fpt_jax.bench.core import Bench, Case, Runner, Shape, minimum_step_bytes, timed


def _size(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def _nbytes(tree) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


class JaxRunner(Runner):
    """One case's pmapped step: the training step (or the eval step for forward only)."""
    framework = "jax"
    # The first call after `compile` reuses its executable; parallel.replicate's sharding
    # differs (in name only) from the step's output sharding, so the second call compiles
    # once more. Two untimed calls keep that out of the timings.
    min_warmup = 2

    def __init__(self, bc: Bench, case: Case, devices: Sequence[jax.Device] | None = None):
        super().__init__(case)
        self.devices = list(devices or parallel.local_devices(bc.base.num_devices))
        n_local = len(self.devices)
        cfg = dataclasses.replace(bc.train_config(case), num_devices=n_local)
        accum = cfg.grad_accum if case.trainable else 1
        parallel.per_device_batch(case.shape.batch_size, accum, n_local)  # names what fails
        self.global_devices = n_local * jax.process_count()
        # As training: the step spans every process's devices, the state lives on this one's.
        self.mapped = (self.devices if jax.process_count() == 1
                       else parallel.pmap_devices(n_local))
        self.runs = case.runs
        if case.runs > 1 and case.trainable is None:
            raise ValueError(f"case {case.label}: forward-only cases have no sweep")
        self._init_group(cfg, case, n_local, accum)
        self.i = 0
        self.donated: bool | None = None
        self.compile_s: float | None = None
        self.cost = self.memory = self.hlo = None

    def _init_group(self, cfg, case: Case, n_local: int, accum: int) -> None:
        """K runs (K = 1: a single run) built and stepped exactly as training does: learning
        rates and seeds do not change the time (every run gets the config's learning rate,
        seeds seed..seed+K-1). Forward-only cases time the group's eval step."""
        k = case.runs
        seeds = [cfg.seed + i for i in range(k)]
        g = build.build_group(cfg, [cfg.learning_rate] * k, seeds, task=case.shape.task())
        self.model, self.task, self.seed, self.seeds = g.model, g.task, cfg.seed, seeds
        per_process = case.shape.batch_size // jax.process_count()
        if case.trainable is None:
            self.batches = [parallel.shard_batch(self.host_batch("train", i), n_local)
                            for i in range(2)]
        else:
            self.batches = [group_batches(g.task, i, per_process, seeds, n_local, accum)
                            for i in range(2)]
        self.rng = run_rngs(seeds)
        trainable = g.states.trainable
        self.trainable_params = _size(trainable) if case.trainable else 0  # all K runs'
        self.total_params = _size(trainable) + _size(g.frozen)
        # the backbone once (the runs' own frozen parts are stacked: K times), K runs' trainable
        self.minimum_bytes = minimum_step_bytes(_nbytes(g.frozen), _nbytes(trainable) // k,
                                                k, training=case.trainable is not None)
        backbone = g.frozen.get(BACKBONE)
        self.backbone_bytes = _nbytes(backbone) if backbone is not None else None
        # one run's state plus its own frozen parts (not the shared backbone)
        own = {n: v for n, v in g.frozen.items() if n != BACKBONE}
        self.run_state_bytes = (_nbytes((g.states, own)) // k if case.trainable else None)
        self.frozen = parallel.replicate(g.frozen, self.devices)
        if case.trainable is None:
            self.fn = pmapped_eval_step(make_eval_step(g.model, g.task), self.mapped)
            self.state = parallel.replicate(trainable, self.devices)
        else:
            step = make_train_step(g.model, g.task, g.tx, cfg.grad_accum, cfg.nonfinite_skips)
            self.fn = pmapped_train_step(step, self.mapped)
            self.state = parallel.replicate(g.states, self.devices)
        g.states = g.frozen = None  # the devices hold them now: no host copy stays alive

    def host_batch(self, split: str, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the `step`-th global batch of the case's shape."""
        return self.task.batch(split, step, self.case.shape.batch_size // jax.process_count(),
                               seed=self.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())

    def _args(self):
        batch = self.batches[self.i % len(self.batches)]
        if self.case.trainable is None:
            return self.state, self.frozen, batch
        return self.state, self.frozen, batch, self.rng

    def compile(self) -> None:
        lowered = self.fn.lower(*self._args())
        t0 = time.perf_counter()
        compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.cost, self.memory = cost(compiled), memory(compiled)
        self.hlo = hlo_stats(compiled.as_text())

    def run_step(self) -> float:
        """One step, blocked until its outputs are ready, in seconds."""
        args = self._args()
        if self.case.trainable is None:
            dt = timed(lambda: jax.block_until_ready(self.fn(*args)))
        else:
            def call():
                self.state, metrics = self.fn(*args)
                jax.block_until_ready((self.state, metrics))
            dt = timed(call)
            if self.donated is None:  # were the input state's buffers given to the step?
                self.donated = all(x.is_deleted() for x in jax.tree_util.tree_leaves(args[0]))
        self.i += 1
        return dt

    def release(self) -> None:
        """Frees the device buffers (a case that is not run)."""
        self.state = self.frozen = self.batches = None

    def result(self) -> dict[str, Any]:
        out = super().result()
        flops = self.cost["flops"] * self.global_devices if self.cost else None
        med = out["step_ms"] and out["step_ms"]["median"] / 1e3
        accessed = self.cost and self.cost["bytes_accessed"]
        out.update({
            "global_devices": self.global_devices, "compile_s": self.compile_s,
            "flops_per_step": flops,
            "achieved_tflops": flops / med / 1e12 if flops and med else None,
            "bytes_accessed_per_step_per_device": accessed,
            # per device too: each device reads a whole replica of the parameters
            "minimum_bytes_per_step_per_device": self.minimum_bytes,
            "bytes_accessed_vs_minimum": accessed / self.minimum_bytes if accessed else None,
            "memory_per_device": self.memory, "hlo": self.hlo, "state_donated": self.donated,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            # per device: the compiled step's arguments (states, frozen parameters, batches,
            # keys); with K runs they should be backbone + K x run state (+ K batches)
            "argument_bytes": self.memory and self.memory["argument"],
            "backbone_bytes": self.backbone_bytes, "run_state_bytes": self.run_state_bytes})
        return out


# --- what XLA says of the compiled step ----------------------------------------------------

def cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {"flops": float(ca.get("flops", 0.0)),
            "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def memory(compiled) -> dict[str, int] | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if ma is None:
        return None
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp")}
    # Live at once at worst: inputs, outputs that do not reuse a donated input, temporaries.
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16|c64|c128)\[([\d,]*)\]")


def hlo_stats(hlo_text: str) -> dict[str, int]:
    """Counts in optimised HLO text: dot ops (incl. those inside fusions), and all-reduce
    ops with the number of elements of their results (a tuple all-reduce counts each
    operand; an async start/done pair counts once), scalars among them apart."""
    dots = ar_ops = ar_elems = ar_scalars = 0
    for line in hlo_text.splitlines():
        _, eq, rhs = line.strip().partition("=")
        m = re.match(r"(.*?)\s([a-z][a-z0-9\-]*)\(", rhs.strip()) if eq else None
        if not m:
            continue
        result_shape, op = m.groups()
        if op in ("dot", "convolution"):
            dots += 1
        elif op in ("all-reduce", "all-reduce-start"):
            ar_ops += 1
            for _, dims in _SHAPE.findall(result_shape):
                ar_elems += math.prod(int(d) for d in dims.split(",") if d)
                ar_scalars += not dims
    return {"dot_ops": dots, "all_reduce_ops": ar_ops, "all_reduce_elements": ar_elems,
            "all_reduce_scalars": ar_scalars}


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_on_host(memory: dict | None, n_local: int, fraction: float) -> tuple[bool, str]:
    """Whether the compiled step's memory, on all local CPU devices, fits the host."""
    avail = host_available_bytes()
    if not memory or avail is None:
        return True, ""
    # The arguments already live in memory; outputs not aliased and temporaries come on top.
    need = (memory["output"] - memory["alias"] + memory["temp"]) * n_local
    if need <= fraction * avail:
        return True, ""
    return False, (f"does not fit: the step needs {need / 2**30:.1f} GiB more (XLA memory "
                   f"analysis x {n_local} devices), the host has {avail / 2**30:.1f} GiB available")


# --- bfloat16 against float32 ----------------------------------------------------------------

BF16_LOSS_RTOL = 0.02  # the stated tolerance: |loss_bf16 - loss_fp32| <= 2% of loss_fp32


def dtype_loss_check(bc: Bench, shape: Shape, batches: int = 4,
                     devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Eval loss at initialisation (dropout off; the same parameters and batches) under
    float32 and bfloat16 compute, through the pmapped eval step, and whether they agree
    within `BF16_LOSS_RTOL`."""
    r = JaxRunner(bc, Case(shape, None, "float32"), devices)
    data = [parallel.shard_batch(r.host_batch("test", i), len(r.devices))
            for i in range(batches)]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = r.model.clone(dtype=jnp.dtype(dtype))
        p_eval = pmapped_eval_step(make_eval_step(model, r.task), r.mapped)
        sums = [p_eval(r.state, r.frozen, b) for b in data]
        losses[dtype] = float(sum(np.asarray(x["loss_sum"])[0, 0] for x in sums)
                              / sum(np.asarray(x["count"])[0, 0] for x in sums))
    rel = abs(losses["bfloat16"] - losses["float32"]) / max(abs(losses["float32"]), 1e-12)
    return {"shape": shape.name, "loss_float32": losses["float32"],
            "loss_bfloat16": losses["bfloat16"], "rel_diff": rel, "rtol": BF16_LOSS_RTOL,
            "within_tolerance": rel <= BF16_LOSS_RTOL}
