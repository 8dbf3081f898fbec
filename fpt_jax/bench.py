"""Throughput, FLOPs, utilisation and memory of the training step: the benchmark core.

What is timed is the step training runs: `train.setup` builds the task, model, optimizer and
state; `train.make_train_step` + `train.pmapped_train_step` give the pmapped, state-donating
step over the local devices; the state is replicated with `parallel.replicate` and batches
are sharded with `parallel.shard_batch`. Forward-only cases time the pmapped eval step.

A case is (shape, mode, dtype, remat): the shape is batch x tokens x features -> classes of
a synthetic real-valued task (`SyntheticTask`; values do not change FLOPs or time), the mode
`frozen` (the paper's trainable groups, `fpt`), `full` (fine-tuning everything), `forward`,
or any trainable selection `freeze.parse_selection` accepts ('output,attn[-2:]').

For every case: compile time (apart), median and spread of the step time after warm-up,
steps/s, examples/s, tokens/s in total and per device; FLOPs and bytes accessed per step
from XLA's cost analysis of the compiled step; achieved FLOP/s and utilisation against the
device's peak (on CPU measured in the same process with large matmuls of the same dtype, on
GPU/TPU a table of published peaks); memory from XLA's memory analysis of the compiled step
and, where the backend has them, device memory stats; counts of dot and all-reduce ops in
the optimised HLO.

A PyTorch reference (`TorchRunner`, only when torch and transformers are installed) runs the
original code's recipe on the same shapes, threads and dtype: Hugging Face `GPT2Model` fed
`inputs_embeds`, `requires_grad=False` on the frozen groups, `clip_grad_norm_(1.0)`, Adam.
All runners of one shape are interleaved round by round (A B C A B C ...) so that drift of
the machine's speed cancels out of the ratios.

Only plain arguments here: `experiments/benchmark.py` reads the flags.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpt_jax import freeze, parallel, train
from fpt_jax.models.gpt2 import GPT2Config
from fpt_jax.tasks.base import Batch, Task, classification_metrics

MODES = ("frozen", "full", "forward")
MODE_SELECTIONS = {"frozen": "fpt", "full": "full"}


# --- what is measured ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    """A global batch of `batch_size` examples of `seq_len` tokens with `features` each,
    classified into `classes` (one token per input row: patch size = features)."""
    name: str
    batch_size: int
    seq_len: int
    features: int
    classes: int

    def __post_init__(self):
        for f in ("batch_size", "seq_len", "features"):
            if getattr(self, f) < 1:
                raise ValueError(f"shape {self.name!r}: {f} must be >= 1, got "
                                 f"{getattr(self, f)}")
        if self.classes < 2:
            raise ValueError(f"shape {self.name!r}: classes must be >= 2, got {self.classes}")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


# The two shapes of the issue: Bit XOR (2 strings of 5 bits, patch 1 -> 10 one-feature
# tokens, batch 4) and CIFAR-10 (32x32x3 images in 4x4 patches -> 64 tokens of 48, batch 8).
SHAPES = {
    "bit_xor": Shape("bit_xor", batch_size=4, seq_len=10, features=1, classes=2),
    "cifar10": Shape("cifar10", batch_size=8, seq_len=64, features=48, classes=10),
}


def scaling_shapes(seq_lens: Sequence[int], batch_size: int, features: int,
                   classes: int) -> list[Shape]:
    return [Shape(f"seq{t}", batch_size, t, features, classes) for t in seq_lens]


class SyntheticTask(Task):
    """Classification of `[seq_len, features]` standard-normal sequences into `classes`,
    read at the last token: the bench's stand-in for any real-valued FPT task."""
    name = "synthetic"
    input_kind = "real"
    splits = ("train", "test")
    eval_split = "test"

    def __init__(self, seq_len: int, features: int, classes: int):
        self.input_dim = features
        self.output_dim = classes
        self.example_shape = (seq_len, features)

    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        self.check_split(split)
        rng = np.random.default_rng([seed, step, process_index])
        x = rng.standard_normal((batch_size, *self.example_shape), dtype=np.float32)
        return {"x": x, "y": rng.integers(0, self.output_dim, batch_size).astype(np.int32)}

    def per_example_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        return classification_metrics(logits, batch["y"])


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    mode: str = "frozen"  # one of MODES, or a trainable selection
    dtype: str = "float32"
    remat: bool = False

    @property
    def trainable(self) -> str | None:
        """The trainable selection, None for forward only."""
        if self.mode == "forward":
            return None
        return MODE_SELECTIONS.get(self.mode, self.mode)

    @property
    def label(self) -> str:
        return f"{self.shape.name}/{self.mode}/{self.dtype}{'/remat' if self.remat else ''}"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How to measure: the backbone, the devices, how many steps, the reference."""
    model: str = "gpt2"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float = 0.1
    num_devices: int | None = None  # local devices; default all
    warmup: int = 3  # untimed steps after compilation (>= 2: see JaxRunner.warm_up)
    steps: int = 20  # timed steps per case, split over `rounds`
    rounds: int = 5  # interleaving rounds
    seed: int = 0
    torch_reference: bool = True
    torch_threads: int | None = None  # default: the machine's cores
    torch_attn: str | None = None  # HF attn_implementation ('eager', 'sdpa'); default theirs
    switch_steps: int = 1  # untimed steps of a runner each time the interleaving turns to it
    peak_tflops: float | None = None  # overrides the measured / published peak (per device)
    compile_only: bool = False  # FLOPs and memory of the compiled steps; no step is run
    memory_fraction: float = 0.6  # CPU: skip running a step whose XLA memory estimate exceeds
    # this fraction of the host's available memory (it is reported as not fitting)

    def __post_init__(self):
        if self.steps < 1 or self.rounds < 1 or self.warmup < 0:
            raise ValueError(f"steps ({self.steps}) and rounds ({self.rounds}) must be >= 1 "
                             f"and warmup ({self.warmup}) >= 0")
        if self.switch_steps < 0:
            raise ValueError(f"switch_steps must be >= 0, got {self.switch_steps}")
        if self.steps < self.rounds:
            raise ValueError(f"steps={self.steps} is fewer than rounds={self.rounds}: every "
                             "round times at least one step of each case")


def validate_mode(mode: str, n_layer: int) -> None:
    """Errors name the mode and what is accepted."""
    if mode in MODES:
        return
    try:
        freeze.parse_selection(mode, n_layer)
    except ValueError as e:
        raise ValueError(f"unknown mode {mode!r}: accepted {MODES} or a trainable selection "
                         f"({e})") from None


# --- statistics and HLO --------------------------------------------------------------------

def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median and spread of step times, in milliseconds."""
    ms = np.asarray(times_s, np.float64) * 1e3
    q10, q25, q50, q75, q90 = np.percentile(ms, [10, 25, 50, 75, 90])
    return {"median": float(q50), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max()), "p10": float(q10), "p90": float(q90),
            "iqr": float(q75 - q25), "n": int(ms.size)}


_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16|c64|c128)\[([\d,]*)\]")


def _elements(shape_text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) for _, dims in
            _SHAPE.findall(shape_text)]


def hlo_stats(hlo_text: str) -> dict[str, Any]:
    """Counts in optimised HLO text: dot ops (incl. those inside fusions), and all-reduce
    ops with the number of elements of their results (a tuple all-reduce counts each
    operand; an async start/done pair counts once)."""
    dots, ar_ops, ar_elems, ar_scalar_elems = 0, 0, 0, 0
    for line in hlo_text.splitlines():
        line = line.strip()
        if "=" not in line:
            continue
        lhs, _, rhs = line.partition("=")
        rhs = rhs.strip()
        m = re.match(r"(.*?)\s([a-z][a-z0-9\-]*)\(", rhs)
        if not m:
            continue
        result_shape, op = m.group(1), m.group(2)
        if op in ("dot", "convolution"):
            dots += 1
        elif op in ("all-reduce", "all-reduce-start"):
            ar_ops += 1
            for n in _elements(result_shape):
                ar_elems += n
            ar_scalar_elems += sum(1 for _, dims in _SHAPE.findall(result_shape) if not dims)
    return {"dot_ops": dots, "all_reduce_ops": ar_ops, "all_reduce_elements": ar_elems,
            "all_reduce_scalars": ar_scalar_elems}


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {"flops": float(ca.get("flops", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0)),
            "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def _memory(compiled) -> dict[str, int] | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if ma is None:
        return None
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    # Live at once at worst: inputs, outputs that do not reuse a donated input, temporaries.
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_memory_stats(devices) -> dict[str, int] | None:
    stats = {}
    for d in devices:
        try:
            s = d.memory_stats()
        except Exception:
            s = None
        if not s:
            return None
        for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
            if k in s:
                stats[k] = max(stats.get(k, 0), int(s[k]))
    return stats or None


# --- the JAX step ----------------------------------------------------------------------------

class JaxRunner:
    """One case's pmapped step, built exactly as training builds it."""
    framework = "jax"

    def __init__(self, bc: BenchConfig, case: Case, devices: Sequence[jax.Device] | None = None):
        self.bc, self.case = bc, case
        shape = case.shape
        self.devices = list(devices) if devices is not None else parallel.local_devices(
            bc.num_devices)
        self.task = SyntheticTask(shape.seq_len, shape.features, shape.classes)
        self.cfg = train.TrainConfig(
            task="synthetic", model=bc.model, init="random", n_layer=bc.n_layer,
            n_head=bc.n_head, n_embd=bc.n_embd, dropout=bc.dropout,
            trainable=case.trainable or "fpt", batch_size=shape.batch_size, dtype=case.dtype,
            remat=case.remat, seed=bc.seed, num_devices=len(self.devices))
        validate_mode(case.mode, (bc.n_layer or GPT2Config.preset(bc.model).n_layer))
        n_local = len(self.devices)
        parallel.per_device_batch(shape.batch_size, 1, n_local)  # errors name what fails
        self.global_devices = n_local * jax.process_count()
        # As training: the step spans every process's devices, the state lives on this
        # process's ones.
        self.mapped = (self.devices if jax.process_count() == 1
                       else parallel.pmap_devices(len(self.devices)))
        per_process = shape.batch_size // jax.process_count()
        self.s = train.setup(self.cfg, self.task)
        self.batches = [parallel.shard_batch(self.task.batch(
            "train", i, per_process, seed=bc.seed, process_index=jax.process_index(),
            process_count=jax.process_count()), n_local) for i in range(2)]
        self.rng = jax.random.PRNGKey(bc.seed + 1)
        _, counts = freeze.count_table(self.s.state.params, self.s.selection)
        self.trainable_params = counts["total"]["trainable"] if case.trainable else 0
        self.total_params = counts["total"]["trainable"] + counts["total"]["frozen"]
        if case.trainable is None:
            self.fn = train.pmapped_eval_step(train.make_eval_step(self.s.model, self.task),
                                              self.mapped)
            self.carry = parallel.replicate(self.s.state.params, self.devices)
        else:
            step = train.make_train_step(self.s.model, self.task, self.s.tx,
                                         self.s.trainable_mask, self.cfg.grad_accum)
            self.fn = train.pmapped_train_step(step, self.mapped)
            self.carry = parallel.replicate(self.s.state, self.devices)
        self.s.state = None  # the host copy: the devices hold the state now
        self.i = 0
        self.losses: list[float] = []
        self.times: list[float] = []
        self.warmup_times: list[float] = []
        self.compiled = None
        self.donated: bool | None = None
        self.skipped: str | None = None  # why no step was timed

    def _args(self):
        batch = self.batches[self.i % len(self.batches)]
        return (self.carry, batch, self.rng) if self.case.trainable else (self.carry, batch)

    def compile(self) -> None:
        t0 = time.perf_counter()
        lowered = self.fn.lower(*self._args())
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.cost = _cost(self.compiled)
        self.memory = _memory(self.compiled)
        try:
            self.hlo = hlo_stats(self.compiled.as_text())
        except Exception:
            self.hlo = None

    def run_step(self) -> float:
        """One synchronous step (blocked until its outputs are ready), in seconds."""
        args = self._args()
        t0 = time.perf_counter()
        if self.case.trainable:
            self.carry, metrics = self.fn(*args)
            loss = metrics["loss"]
            jax.block_until_ready((self.carry, metrics))
            if self.donated is None:  # were the input state's buffers given to the step?
                self.donated = all(x.is_deleted() for x in jax.tree_util.tree_leaves(args[0]))
        else:
            sums = self.fn(*args)
            jax.block_until_ready(sums)
            loss = sums["loss_sum"] / sums["count"]
        dt = time.perf_counter() - t0
        self.i += 1
        self.losses.append(float(np.asarray(loss)[0]))
        return dt

    def warm_up(self, n: int) -> None:
        # The first call after `compile` reuses its executable; parallel.replicate's
        # sharding differs (in name only) from the step's output sharding, so the second
        # call compiles once more. At least two untimed calls keep that out of the timings.
        for _ in range(max(n, 2)):
            self.warmup_times.append(self.run_step())

    def step(self) -> None:
        self.times.append(self.run_step())

    def result(self) -> dict[str, Any]:
        shape, n_glob = self.case.shape, self.global_devices
        flops_per_device = self.cost["flops"]
        out = _throughput(self.case, self.times, n_glob)
        out.update({
            "framework": "jax", "local_devices": len(self.devices),
            "compile_s": self.compile_s, "lower_s": self.lower_s,
            "warmup_ms": [t * 1e3 for t in self.warmup_times],
            "flops_per_step": flops_per_device * n_glob,
            "flops_per_step_per_device": flops_per_device,
            "transcendentals_per_step": self.cost["transcendentals"] * n_glob,
            "bytes_accessed_per_step_per_device": self.cost["bytes_accessed"],
            "memory_per_device": self.memory, "hlo": self.hlo, "state_donated": self.donated,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "first_loss": self.losses[0] if self.losses else None,
        })
        if out["step_ms"]:
            med_s = out["step_ms"]["median"] / 1e3
            out["achieved_tflops"] = out["flops_per_step"] / med_s / 1e12
        else:
            out["achieved_tflops"] = None
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def _throughput(case: Case, times: Sequence[float], n_devices: int) -> dict[str, Any]:
    shape = case.shape
    out = {"case": case.label, "shape": dataclasses.asdict(shape), "mode": case.mode,
           "trainable": case.trainable, "dtype": case.dtype, "remat": case.remat,
           "global_devices": n_devices, "step_ms": None, "steps_per_s": None,
           "examples_per_s": None, "tokens_per_s": None, "tokens_per_s_per_device": None}
    if not times:  # compiled only
        return out
    stats = summarize(times)
    med_s = stats["median"] / 1e3
    out.update({"step_ms": stats, "steps_per_s": 1 / med_s,
                "examples_per_s": shape.batch_size / med_s, "tokens_per_s": shape.tokens / med_s,
                "tokens_per_s_per_device": shape.tokens / med_s / n_devices})
    return out


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
    # The arguments already live in memory; the outputs not aliased and temporaries come on top.
    need = (memory["output"] - memory["alias"] + memory["temp"]) * n_local
    if need <= fraction * avail:
        return True, ""
    return False, (f"does not fit: the step needs {need / 2**30:.1f} GiB more (XLA memory "
                   f"analysis x {n_local} devices), the host has {avail / 2**30:.1f} GiB available")


# --- the PyTorch reference ----------------------------------------------------------------

def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_param_path(name: str) -> tuple[str, ...] | None:
    """The fpt-jax path of a parameter of the reference model (None: the unused `wte`)."""
    if name.startswith("in_net."):
        return ("input",)
    if name.startswith("out_net."):
        return ("output",)
    name = name.removeprefix("sequence_model.")
    parts = name.split(".")
    if parts[0] == "wte":
        return None
    if parts[0] == "h":
        return ("transformer", f"h_{parts[1]}", *parts[2:])
    return ("transformer", *parts)


class TorchRunner:
    """The original code's recipe (universal_computation/fpt.py + trainer.py) in PyTorch, on
    the same shape, dtype and threads: a Linear input layer (orthogonal init, gain 1.41, zero
    bias) + dropout, Hugging Face `GPT2Model(inputs_embeds=...)` with the frozen groups'
    `requires_grad=False`, a Linear head on the last token, cross-entropy,
    `clip_grad_norm_(model.parameters(), 1.0)`, `Adam(model.parameters(), 1e-3)`,
    `zero_grad()`, `loss.item()`. bfloat16 runs under `torch.autocast`."""
    framework = "torch"

    def __init__(self, bc: BenchConfig, case: Case, batches: Sequence[Batch],
                 device: str = "cpu"):
        import torch
        import transformers
        from torch import nn
        self.torch, self.bc, self.case, self.device = torch, bc, case, device
        if bc.torch_threads:
            torch.set_num_threads(bc.torch_threads)
        torch.manual_seed(bc.seed)
        gcfg = GPT2Config.preset(bc.model, **{k: getattr(bc, k) for k in
                                                    ("n_layer", "n_head", "n_embd")
                                                    if getattr(bc, k) is not None})
        hf = transformers.GPT2Config(
            n_layer=gcfg.n_layer, n_head=gcfg.n_head, n_embd=gcfg.n_embd,
            n_positions=gcfg.n_positions, vocab_size=gcfg.vocab_size,
            resid_pdrop=bc.dropout, embd_pdrop=bc.dropout, attn_pdrop=bc.dropout,
            **({"attn_implementation": bc.torch_attn} if bc.torch_attn else {}))
        shape = case.shape
        width = gcfg.n_embd

        class Reference(nn.Module):
            def __init__(self):
                super().__init__()
                proj = nn.Linear(shape.features, width)
                nn.init.orthogonal_(proj.weight, gain=1.41)
                proj.bias.data.zero_()
                self.in_net = nn.Sequential(proj, nn.Dropout(bc.dropout))
                self.sequence_model = transformers.GPT2Model(hf)
                self.out_net = nn.Linear(width, shape.classes)

            def forward(self, x):
                h = self.in_net(x)
                h = self.sequence_model(inputs_embeds=h, return_dict=True).last_hidden_state
                return self.out_net(h[:, -1:])[:, 0]

        self.model = Reference().to(device)
        self.attn_implementation = getattr(self.model.sequence_model.config,
                                           "_attn_implementation", None)
        selection = (freeze.parse_selection(case.trainable, gcfg.n_layer)
                     if case.trainable else None)
        for name, p in self.model.named_parameters():
            path = _torch_param_path(name)
            p.requires_grad = bool(selection and path is not None
                                   and selection.is_trainable(*freeze.param_group(path)))
        self.trainable_params = sum(p.numel() for p in self.model.parameters()
                                    if p.requires_grad)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = nn.CrossEntropyLoss()
        self.batches = [(torch.from_numpy(np.asarray(b["x"])).to(device),
                         torch.from_numpy(np.asarray(b["y"]).astype(np.int64)).to(device))
                        for b in batches]
        self.autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                         if case.dtype == "bfloat16" else None)
        self.i = 0
        self.times: list[float] = []
        self.warmup_times: list[float] = []
        self.losses: list[float] = []

    def _sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def run_step(self) -> float:
        torch = self.torch
        x, y = self.batches[self.i % len(self.batches)]
        self._sync()
        t0 = time.perf_counter()
        if self.case.trainable is None:
            self.model.eval()
            with torch.inference_mode():
                with self.autocast or _null():
                    loss = self.loss_fn(self.model(x).float(), y)
                value = loss.item()
        else:
            self.model.train()
            with self.autocast or _null():
                loss = self.loss_fn(self.model(x).float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optim.step()
            self.optim.zero_grad()
            value = loss.item()
        self._sync()
        dt = time.perf_counter() - t0
        self.i += 1
        self.losses.append(value)
        return dt

    def compile(self) -> None:
        pass

    def warm_up(self, n: int) -> None:
        for _ in range(max(n, 1)):
            self.warmup_times.append(self.run_step())

    def step(self) -> None:
        self.times.append(self.run_step())

    def result(self) -> dict[str, Any]:
        out = _throughput(self.case, self.times, 1)
        out.update({"framework": "torch", "device": self.device,
                    "threads": self.torch.get_num_threads(),
                    "attn_implementation": self.attn_implementation,
                    "warmup_ms": [t * 1e3 for t in self.warmup_times],
                    "trainable_params": self.trainable_params,
                    "first_loss": self.losses[0] if self.losses else None})
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def torch_device_for(backend: str) -> str | None:
    """Where the reference runs: the CPU next to a CPU backend, CUDA next to a GPU; none
    next to a TPU (a host-CPU reference says nothing about the TPU)."""
    if not torch_available():
        return None
    import torch
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    return None


# --- peaks --------------------------------------------------------------------------------

# Published dense peak TFLOP/s per JAX device (substring of `device_kind`, lower case) for
# the matmul unit a dtype uses by default: fp32 matmuls run as TF32 on Ampere/Hopper GPUs and
# as bf16 passes on TPUs. Sources: NVIDIA data sheets; Google Cloud TPU system architecture
# pages (per chip; v2/v3 expose one JAX device per core = half a chip). Override with
# --peak_tflops when your part differs (clocks, PCIe vs SXM).
PUBLISHED_PEAK_TFLOPS = {
    # device_kind substring: {dtype: TFLOP/s}
    "h100": {"float32": 494.7, "bfloat16": 989.4},
    "a100": {"float32": 156.0, "bfloat16": 312.0},
    "l4": {"float32": 60.0, "bfloat16": 121.0},
    "a10": {"float32": 62.5, "bfloat16": 125.0},
    "v100": {"float32": 15.7, "bfloat16": 15.7},  # no bf16 tensor cores
    "t4": {"float32": 8.1, "bfloat16": 8.1},  # no bf16 tensor cores
    "tpu v2": {"float32": 22.5, "bfloat16": 22.5},
    "tpu v3": {"float32": 61.5, "bfloat16": 61.5},
    "tpu v4": {"float32": 275.0, "bfloat16": 275.0},
    "tpu v5 lite": {"float32": 197.0, "bfloat16": 197.0},
    "tpu v5e": {"float32": 197.0, "bfloat16": 197.0},
    "tpu v5p": {"float32": 459.0, "bfloat16": 459.0},
    "tpu v5": {"float32": 459.0, "bfloat16": 459.0},
    "tpu v6": {"float32": 918.0, "bfloat16": 918.0},
}


def published_peak(device_kind: str, dtype: str) -> float | None:
    kind = device_kind.lower()
    for key, peaks in PUBLISHED_PEAK_TFLOPS.items():
        if key in kind:
            return peaks.get(dtype)
    return None


PEAK_MATMULS = ((2048, 768, 3072), (2048, 3072, 768), (2048, 2048, 2048))


def _best_seconds(call: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `call` (which waits for its result), after
    one untimed call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_peak(devices: Sequence[jax.Device], dtype: str, repeats: int = 10,
                        sizes: Sequence[tuple[int, int, int]] = PEAK_MATMULS
                        ) -> dict[str, Any]:
    """Best FLOP/s of `[m, k] @ [k, n]` matmuls of `dtype`, one per device at once (pmap
    over `devices`, as the step runs): the peak the step's utilisation is measured against,
    in total over the devices. `repeats` calls of each size; the best counts."""
    n = len(devices)
    jdtype = train.DTYPES[dtype]
    mm = jax.pmap(lambda a, b: jnp.dot(a, b, preferred_element_type=jdtype), devices=devices)
    per_size = []
    for m, k, nn in sizes:
        rng = np.random.default_rng(0)
        a = parallel.replicate(jnp.asarray(rng.standard_normal((m, k), np.float32), jdtype),
                               devices)
        b = parallel.replicate(jnp.asarray(rng.standard_normal((k, nn), np.float32), jdtype),
                               devices)
        best = _best_seconds(lambda: jax.block_until_ready(mm(a, b)), repeats)
        per_size.append({"m": m, "k": k, "n": nn,
                         "tflops": 2 * m * k * nn * n / best / 1e12})
    best = max(per_size, key=lambda r: r["tflops"])
    return {"tflops": best["tflops"], "source": "measured", "dtype": dtype,
            "devices": n, "matmuls": per_size}


def _gpt2_matmuls(width: int, rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """The backbone's weight matmuls (`[rows, width] @ [width, 4 width]` and back) at the
    given row counts (batch x tokens)."""
    return [(m, k, n) for m in rows for k, n in ((width, 4 * width), (4 * width, width))]


def measure_torch_matmul_peak(dtype: str, threads: int | None, repeats: int = 10,
                              sizes: Sequence[tuple[int, int, int]] = PEAK_MATMULS,
                              device: str = "cpu") -> dict[str, Any]:
    """`measure_matmul_peak` for PyTorch (one device, its `threads`): what the reference's
    matmuls reach on the same sizes, next to XLA's."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    per_size = []
    for m, k, n in sizes:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=tdtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=tdtype)
        with torch.inference_mode():
            best = _best_seconds(lambda: (a @ b, sync()), repeats)
        per_size.append({"m": m, "k": k, "n": n, "tflops": 2 * m * k * n / best / 1e12})
    best = max(per_size, key=lambda r: r["tflops"])
    return {"tflops": best["tflops"], "source": "measured", "dtype": dtype, "devices": 1,
            "matmuls": per_size}


def matmul_comparison(devices: Sequence[jax.Device], dtype: str, threads: int | None,
                      sizes: Sequence[tuple[int, int, int]], torch_device: str = "cpu"
                      ) -> dict[str, Any]:
    """XLA's and PyTorch's matmul rates on the step's own weight shapes, measured in this
    process on one device (A B per size, so that drift cancels)."""
    rows = []
    for size in sizes:
        xla = measure_matmul_peak(devices[:1], dtype, sizes=(size,))["tflops"]
        ref = measure_torch_matmul_peak(dtype, threads, sizes=(size,),
                                        device=torch_device)["tflops"]
        rows.append({"m": size[0], "k": size[1], "n": size[2], "xla_tflops": xla,
                     "torch_tflops": ref, "ratio": xla / ref})
    return {"dtype": dtype, "threads": threads, "sizes": rows}


def peak_for(bc: BenchConfig, devices, dtype: str, cache: dict) -> dict[str, Any] | None:
    """The peak (total over `devices` and processes) that utilisation is computed against."""
    n_glob = len(devices) * jax.process_count()
    if bc.peak_tflops:
        return {"tflops": bc.peak_tflops * n_glob, "source": "flag --peak_tflops (per device)",
                "dtype": dtype, "devices": n_glob}
    if dtype in cache:
        return cache[dtype]
    backend = devices[0].platform
    if backend == "cpu":
        peak = measure_matmul_peak(devices, dtype)
        peak["tflops"] *= jax.process_count()
    else:
        per = published_peak(devices[0].device_kind, dtype)
        peak = None if per is None else {
            "tflops": per * n_glob, "source": f"published ({devices[0].device_kind})",
            "dtype": dtype, "devices": n_glob}
    cache[dtype] = peak
    return peak


# --- checks ------------------------------------------------------------------------------

BF16_LOSS_RTOL = 0.02  # the stated tolerance: |loss_bf16 - loss_fp32| <= 2% of loss_fp32


def dtype_loss_check(bc: BenchConfig, shape: Shape, batches: int = 4,
                     devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Eval loss at initialisation (dropout off; the same parameters and batches) under
    float32 and bfloat16 compute, through the pmapped eval step, and whether they agree
    within `BF16_LOSS_RTOL`."""
    r = JaxRunner(bc, Case(shape, "forward", "float32"), devices)
    data = [parallel.shard_batch(r.task.batch(
        "test", i, shape.batch_size // jax.process_count(), seed=bc.seed,
        process_index=jax.process_index(), process_count=jax.process_count()),
        len(r.devices)) for i in range(batches)]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = r.s.model.clone(dtype=train.DTYPES[dtype])
        p_eval = train.pmapped_eval_step(train.make_eval_step(model, r.task), r.mapped)
        sums = [p_eval(r.carry, b) for b in data]
        losses[dtype] = float(sum(np.asarray(x["loss_sum"])[0] for x in sums)
                              / sum(np.asarray(x["count"])[0] for x in sums))
    diff = abs(losses["bfloat16"] - losses["float32"])
    rel = diff / max(abs(losses["float32"]), 1e-12)
    return {"shape": shape.name, "loss_float32": losses["float32"],
            "loss_bfloat16": losses["bfloat16"], "abs_diff": diff, "rel_diff": rel,
            "rtol": BF16_LOSS_RTOL, "within_tolerance": rel <= BF16_LOSS_RTOL}


# --- the suite ----------------------------------------------------------------------------

def interleave(runners: Sequence[Any], steps: int, rounds: int, switch_steps: int = 1,
               log: Callable[[str], None] | None = None) -> None:
    """Times `steps` steps of every runner, split into `rounds` rounds of A B C ... . Each
    turn starts with `switch_steps` untimed steps, which absorb what the previous runner
    leaves behind (its threads spinning down, caches holding its weights)."""
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for r, k in enumerate(per_round):
        for runner in runners:
            for _ in range(switch_steps if len(runners) > 1 else 0):
                runner.run_step()
            for _ in range(k):
                runner.step()
        if log:
            log(f"  round {r + 1}/{rounds} done")


def environment(devices) -> dict[str, Any]:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__), timeout=10
                                ).stdout.strip() or None
    except Exception:
        commit = None
    d = devices[0]
    return {
        "backend": d.platform, "device_kind": d.device_kind,
        "local_devices": len(devices), "process_count": jax.process_count(),
        "global_devices": len(devices) * jax.process_count(),
        "cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy",
                                             "torch", "transformers")},
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "git_commit": commit,
        "env": {k: os.environ[k] for k in PERF_ENV if k in os.environ},
        "load_average": _loadavg(),
    }


# Environment variables that change speed (allocator, threads, XLA), recorded with results.
PERF_ENV = ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS",
            "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")


def env_prefix() -> str:
    """`NAME=value ...` of the speed-relevant variables set, to prefix a command with."""
    import shlex
    return " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in PERF_ENV
                    if k in os.environ and k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"))


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run(bc: BenchConfig, shapes: Sequence[Shape], modes: Sequence[str],
        dtypes: Sequence[str] = ("float32",), remats: Sequence[bool] = (False,),
        command: str = "", log: Callable[[str], None] | None = print,
        loss_check: bool | None = None) -> dict[str, Any]:
    """Measures every (shape, mode, dtype, remat) case, shape by shape, with the PyTorch
    reference of every (mode, dtype) interleaved; returns the report as a dict."""
    log = log or (lambda _: None)
    devices = parallel.local_devices(bc.num_devices)
    n_layer = bc.n_layer or GPT2Config.preset(bc.model).n_layer
    for mode in modes:
        validate_mode(mode, n_layer)
    for dtype in dtypes:
        train._one_of("dtype", dtype, tuple(train.DTYPES))
    env = environment(devices)
    torch_device = torch_device_for(env["backend"]) if bc.torch_reference else None
    if bc.torch_reference and torch_device and bc.torch_threads is None and torch_device == "cpu":
        bc = dataclasses.replace(bc, torch_threads=os.cpu_count())
    report: dict[str, Any] = {
        "command": command, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "environment": env, "config": dataclasses.asdict(bc),
        "model": dataclasses.asdict(GPT2Config.preset(
            bc.model, **{k: getattr(bc, k) for k in ("n_layer", "n_head", "n_embd")
                         if getattr(bc, k) is not None})),
        "torch_reference": torch_device, "peaks": {}, "results": [], "checks": {},
        "scaling_shapes": [s.name for s in shapes if s.name.startswith("seq")],
    }
    if bc.torch_reference and torch_device is None:
        report["torch_reference_note"] = ("not run: torch/transformers missing"
                                          if not torch_available() else
                                          f"not run: no torch device next to {env['backend']}")
    peak_cache: dict = {}
    for dtype in dtypes if not bc.compile_only else ():
        peak = peak_for(bc, devices, dtype, peak_cache)
        report["peaks"][dtype] = peak
        if peak:
            log(f"peak {dtype}: {peak['tflops']:.3f} TFLOP/s ({peak['source']})")
    if torch_device and not bc.compile_only:
        width = report["model"]["n_embd"]
        sizes = _gpt2_matmuls(width, sorted({s.tokens for s in shapes}))
        for dtype in dtypes:
            cmp = matmul_comparison(devices, dtype, bc.torch_threads, sizes, torch_device)
            report.setdefault("matmul_comparison", []).append(cmp)
            for row in cmp["sizes"]:
                log(f"matmul {dtype} {row['m']}x{row['k']}@{row['k']}x{row['n']}: XLA "
                    f"{row['xla_tflops'] * 1e3:.0f}, PyTorch {row['torch_tflops'] * 1e3:.0f} "
                    f"GFLOP/s ({row['ratio']:.2f}x)")
    for shape in shapes:
        log(f"shape {shape.name}: batch {shape.batch_size} x {shape.seq_len} tokens x "
            f"{shape.features} features -> {shape.classes} classes")
        runners: list[Any] = []
        compiled_only: list[JaxRunner] = []
        for mode in modes:
            for dtype in dtypes:
                for remat in (remats if mode != "forward" else (False,)):
                    case = Case(shape, mode, dtype, remat)
                    r = JaxRunner(bc, case, devices)
                    log(f"  compiling {case.label}")
                    r.compile()
                    log(f"  compiled in {r.compile_s:.1f} s")
                    fits, why = (fits_on_host(r.memory, len(devices), bc.memory_fraction)
                                 if devices[0].platform == "cpu" else (True, ""))
                    if bc.compile_only or not fits:
                        r.skipped = "compile only" if bc.compile_only else why
                        log(f"  {r.skipped}")
                        compiled_only.append(r)
                        r.carry = r.s = None  # frees the state
                        gc.collect()
                        continue
                    log("  warming up")
                    r.warm_up(bc.warmup)
                    runners.append(r)
                if torch_device and not bc.compile_only:
                    case = Case(shape, mode, dtype, False)
                    global_batches = [SyntheticTask(shape.seq_len, shape.features,
                                                    shape.classes).batch(
                        "train", i, shape.batch_size, seed=bc.seed) for i in range(2)]
                    r = TorchRunner(bc, case, global_batches, torch_device)
                    log(f"  torch {case.label}: warming up")
                    r.warm_up(bc.warmup)
                    runners.append(r)
        if runners:
            log(f"  timing {bc.steps} steps of {len(runners)} runners in {bc.rounds} rounds")
            interleave(runners, bc.steps, bc.rounds, bc.switch_steps, log)
        for r in [*compiled_only, *runners]:
            res = r.result()
            if r.framework == "jax":
                peak = report["peaks"].get(r.case.dtype)
                res["utilisation"] = (res["achieved_tflops"] / peak["tflops"]
                                      if peak and res["achieved_tflops"] else None)
            report["results"].append(res)
            if res["step_ms"]:
                log(f"  {r.framework:5s} {r.case.label:32s} {res['step_ms']['median']:9.2f} ms "
                    f"(p10 {res['step_ms']['p10']:.2f}, p90 {res['step_ms']['p90']:.2f})")
        del runners, compiled_only
    if not bc.peak_tflops and devices[0].platform == "cpu" and not bc.compile_only:
        # Measured again at the end: the best of both is the peak (machine drift, load).
        for dtype, peak in report["peaks"].items():
            again = measure_matmul_peak(devices, dtype)
            again["tflops"] *= jax.process_count()
            peak["tflops_start"], peak["tflops_end"] = peak["tflops"], again["tflops"]
            if again["tflops"] > peak["tflops"]:
                peak.update({k: again[k] for k in ("tflops", "matmuls")})
            log(f"peak {dtype} at the end: {again['tflops']:.3f} TFLOP/s; using "
                f"{peak['tflops']:.3f}")
        for res in report["results"]:
            peak = report["peaks"].get(res["dtype"])
            if res["framework"] == "jax" and peak and res["achieved_tflops"]:
                res["utilisation"] = res["achieved_tflops"] / peak["tflops"]
    report["device_memory_stats"] = device_memory_stats(devices)
    if loss_check if loss_check is not None else ("bfloat16" in dtypes
                                                   and not bc.compile_only):
        for shape in shapes[:1] if len(shapes) > 2 else shapes:
            log(f"bf16 loss check on {shape.name}")
            report["checks"].setdefault("bf16_loss", []).append(
                dtype_loss_check(bc, shape, devices=devices))
    report["comparisons"] = comparisons(report["results"])
    report["environment"]["load_average_end"] = _loadavg()
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    return report


def comparisons(results: Sequence[dict]) -> list[dict[str, Any]]:
    """Per JAX case: speed-up over the PyTorch reference of the same shape, mode and dtype;
    per training case: time relative to full fine-tuning of the same shape/dtype/remat."""
    def key(r, **over):
        k = {"shape": r["shape"]["name"], "mode": r["mode"], "dtype": r["dtype"],
             "remat": r["remat"], "framework": r["framework"]}
        k.update(over)
        return tuple(sorted(k.items()))
    results = [r for r in results if r["step_ms"]]
    index = {key(r): r for r in results}
    out = []
    for r in results:
        if r["framework"] != "jax":
            continue
        ref = index.get(key(r, framework="torch", remat=False))
        full = index.get(key(r, mode="full"))
        med = r["step_ms"]["median"]
        out.append({
            "case": r["case"],
            "jax_ms": med,
            "torch_ms": ref["step_ms"]["median"] if ref else None,
            "speedup_vs_torch": ref["step_ms"]["median"] / med if ref else None,
            "time_vs_full": (med / full["step_ms"]["median"]
                             if full and r["mode"] not in ("full", "forward") else None),
        })
    return out


# --- output -------------------------------------------------------------------------------

def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _f(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    v = env["versions"]
    lines = ["# fpt-jax benchmark", ""]
    lines.append(f"Command: `{report['command']}`")
    lines.append("")
    lines.append(
        f"Measured {report['started']} on {env['backend']} ({env['device_kind']}; "
        f"CPU {env['cpu']}, {env['cpu_cores']} cores), {env['local_devices']} local device(s) x "
        f"{env['process_count']} process(es); environment "
        f"`{' '.join(f'{k}={v}' for k, v in env.get('env', {}).items()) or '(none set)'}`; "
        f"load average at "
        f"start {_f(env['load_average'] and env['load_average'][0])}, at end "
        f"{_f(env.get('load_average_end') and env['load_average_end'][0])}.")
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) +
                 f", python {env['python']}; fpt-jax commit {env['git_commit']}.")
    m = report["model"]
    bc = report["config"]
    lines.append("")
    lines.append(f"Model: GPT-2 preset `{bc['model']}` (random init), {m['n_layer']} layers, "
                 f"width {m['n_embd']}, {m['n_head']} heads; dropout {bc['dropout']}. "
                 f"{bc['steps']} timed steps per case after {bc['warmup']} warm-up steps, "
                 f"interleaved over {bc['rounds']} rounds (A B C .. A B C ..), each turn "
                 f"after {bc.get('switch_steps', 0)} untimed step(s).")
    for dtype, peak in report["peaks"].items():
        if peak:
            lines.append("")
            lines.append(f"Peak ({dtype}): {peak['tflops'] * 1e3:.0f} GFLOP/s over "
                         f"{peak['devices']} device(s), {peak['source']}"
                         + (" (best of " + ", ".join(
                             f"{x['m']}x{x['k']}@{x['k']}x{x['n']}: {x['tflops'] * 1e3:.0f}"
                             for x in peak["matmuls"]) + " GFLOP/s)" if "matmuls" in peak
                            else "")
                         + (f"; measured at the start {peak['tflops_start'] * 1e3:.0f} and at "
                            f"the end {peak['tflops_end'] * 1e3:.0f} GFLOP/s, the best counts"
                            if "tflops_end" in peak else "") + ".")
    if report.get("torch_reference"):
        tr = next((r for r in report["results"] if r["framework"] == "torch"), None)
        if tr:
            lines.append("")
            lines.append(f"PyTorch reference: the original recipe on {tr['device']}, "
                         f"{tr['threads']} threads, attention `{tr['attn_implementation']}`.")
    elif report.get("torch_reference_note"):
        lines.append("")
        lines.append(f"PyTorch reference {report['torch_reference_note']}.")
    for cmp in report.get("matmul_comparison", []):
        lines += ["", f"Matmuls of the backbone's weight shapes ({cmp['dtype']}, one device, "
                  f"PyTorch with {cmp['threads']} threads): what each library's matmuls reach "
                  "on the step's own weight shapes, best of several calls.", "",
                  "| rows x in @ in x out | XLA GFLOP/s | PyTorch GFLOP/s | XLA / PyTorch |",
                  "|---|---:|---:|---:|"]
        for row in cmp["sizes"]:
            lines.append(f"| {row['m']}x{row['k']} @ {row['k']}x{row['n']} | "
                         f"{row['xla_tflops'] * 1e3:.0f} | {row['torch_tflops'] * 1e3:.0f} | "
                         f"{row['ratio']:.2f} |")
    lines += ["", "| shape (batch x tokens x feat) | mode | dtype | remat | framework | "
              "ms/step median | p10-p90 | steps/s | examples/s | tokens/s | tokens/s/device | "
              "GFLOP/step | GFLOP/s | % of peak | peak mem/device | compile s |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        s = r["shape"]
        mem = r.get("memory_per_device") or {}
        util = r.get("utilisation")
        st = r["step_ms"]
        timing = (f"{st['median']:.2f} | {st['p10']:.2f}-{st['p90']:.2f} | "
                  f"{r['steps_per_s']:.2f} | {r['examples_per_s']:.1f} | "
                  f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f}" if st else
                  f"{r.get('skipped', 'not run')} | - | - | - | - | -")
        lines.append(
            f"| {s['name']} ({s['batch_size']}x{s['seq_len']}x{s['features']}) | {r['mode']} | "
            f"{r['dtype']} | {'yes' if r['remat'] else 'no'} | {r['framework']} | "
            f"{timing} | "
            f"{_f(r.get('flops_per_step') and r['flops_per_step'] / 1e9, '.4g')} | "
            f"{_f(r.get('achieved_tflops') and r['achieved_tflops'] * 1e3, '.0f')} | "
            f"{_f(util and 100 * util, '.1f')} | {_fmt_bytes(mem.get('peak_estimate'))} | "
            f"{_f(r.get('compile_s'), '.1f')} |")
    comps = [c for c in report.get("comparisons", [])
             if c["speedup_vs_torch"] is not None or c["time_vs_full"] is not None]
    if comps:
        lines += ["", "| case | fpt-jax ms | PyTorch ms | speed-up vs PyTorch | "
                  "time vs full fine-tuning |", "|---|---:|---:|---:|---:|"]
        for c in comps:
            lines.append(f"| {c['case']} | {c['jax_ms']:.2f} | {_f(c['torch_ms'])} | "
                         f"{_f(c['speedup_vs_torch'], '.2f')}{'x' if c['speedup_vs_torch'] else ''}"
                         f" | {_f(c['time_vs_full'], '.2f')} |")
    for chk in report.get("checks", {}).get("bf16_loss", []):
        lines.append("")
        lines.append(f"bfloat16 loss check ({chk['shape']}, eval loss at init): float32 "
                     f"{chk['loss_float32']:.5f}, bfloat16 {chk['loss_bfloat16']:.5f}, "
                     f"relative difference {chk['rel_diff']:.2e} (tolerance {chk['rtol']}): "
                     f"{'within' if chk['within_tolerance'] else 'OUTSIDE'} tolerance.")
    hlo_rows = [r for r in report["results"] if r.get("hlo")]
    if hlo_rows:
        lines += ["", "Compiled step per device (XLA): dot ops, all-reduced elements (the "
                  "trainable gradients plus metric scalars), bytes accessed, memory.", "",
                  "| case | trainable params | dot ops | all-reduce ops | all-reduced elements |"
                  " bytes accessed | arguments | temporaries | donated (aliased) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in hlo_rows:
            h, mem = r["hlo"], r.get("memory_per_device") or {}
            lines.append(f"| {r['case']} | {r['trainable_params']:,} | {h['dot_ops']} | "
                         f"{h['all_reduce_ops']} | {h['all_reduce_elements']:,} | "
                         f"{_fmt_bytes(r['bytes_accessed_per_step_per_device'])} | "
                         f"{_fmt_bytes(mem.get('argument'))} | {_fmt_bytes(mem.get('temp'))} | "
                         f"{_fmt_bytes(mem.get('alias'))} |")
    if report.get("device_memory_stats"):
        lines.append("")
        lines.append("Device memory stats (whole run): " + ", ".join(
            f"{k} {_fmt_bytes(val)}" for k, val in report["device_memory_stats"].items()))
    return "\n".join(lines) + "\n"


def scaling_series(report: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """tokens/s against sequence length per (framework, mode, dtype, remat) series."""
    series: dict[str, list[tuple[int, float]]] = {}
    names = report.get("scaling_shapes")
    for r in report["results"]:
        if (names and r["shape"]["name"] not in names) or not r["tokens_per_s"]:
            continue
        name = ("fpt-jax " if r["framework"] == "jax" else "PyTorch ") + r["mode"]
        if r["dtype"] != "float32":
            name += f" {r['dtype']}"
        if r["remat"]:
            name += " remat"
        series.setdefault(name, []).append((r["shape"]["seq_len"], r["tokens_per_s"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_scaling(report: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in scaling_series(report).items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", linestyle="--" if name.startswith("PyTorch") else "-",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lens = sorted({t for pts in scaling_series(report).values() for t, _ in pts})
    ax.set_xticks(lens)
    ax.set_xticklabels([str(t) for t in lens])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("tokens / s (training step)")
    env, m = report["environment"], report["model"]
    b = sorted({r["shape"]["batch_size"] for r in report["results"]
                if r["shape"]["name"] in (report.get("scaling_shapes") or [r["shape"]["name"]])})
    b = "/".join(str(x) for x in b)
    ax.set_title(f"{report['config']['model']} ({m['n_layer']}x{m['n_embd']}), batch {b}, "
                 f"{env['device_kind']} x{env['global_devices']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: str, name: str, plot: bool | None = None
          ) -> dict[str, str]:
    """Writes `<name>.json`, `<name>.md` and, for several sequence lengths, `<name>.png`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"),
             "markdown": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
        f.write("\n")
    text = markdown(report)
    if plot is None:
        plot = len(report.get("scaling_shapes") or []) > 1
    if plot:
        paths["png"] = os.path.join(out_dir, f"{name}.png")
        plot_scaling(report, paths["png"])
        text += ("\n## Scaling with sequence length\n\n"
                 f"![tokens/s against sequence length]({name}.png)\n\n"
                 + scaling_table(report))
    with open(paths["markdown"], "w") as f:
        f.write(text)
    return paths


def scaling_table(report: dict[str, Any]) -> str:
    series = scaling_series(report)
    lens = sorted({t for pts in series.values() for t, _ in pts})
    lines = ["| tokens/s | " + " | ".join(str(t) for t in lens) + " |",
             "|---|" + "---:|" * len(lens)]
    for name, pts in series.items():
        d = dict(pts)
        lines.append(f"| {name} | " + " | ".join(_f(d.get(t), '.0f') for t in lens) + " |")
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, frozenset):
        return sorted(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")
