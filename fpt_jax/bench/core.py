"""What is measured: shapes, cases, the benchmark's settings, and what every runner shares.

A case is (shape, trainable selection, dtype, remat, runs) over a base training config: the
shape (batch x tokens x features -> classes) is a `synthetic` task, the selection is what the
step trains (None: forward only), `runs` the K runs trained together by one vmapped group step
(`fpt_jax.steps`; 1: a single run, the group of one that training runs). Modes name
selections: `frozen` is the base config's
`trainable` (the paper's `fpt` by default), `full` fine-tunes everything, `forward` times the
eval step; any other selection string is a mode of its own.

Baselines (`BenchConfig.baselines`: presets of the lstm and fnet families) are timed next to
the base config's model, for every shape, dtype and K: a baseline case (`Case.model` set)
trains the selection the paper's comparisons train it with, as `fpt_jax.baselines.variant`
defines it (the LSTM fully trained, FNet frozen as FPT), at random init, at the base config's
n_layer/n_embd when those are set (the family's preset sizes otherwise).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from fpt_jax import baselines, build, freeze
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones
from fpt_jax.tasks import Task, get_task

MODES = ("frozen", "full", "forward")
# The baseline families; each is also the name of its `baselines.variant`.
BASELINE_FAMILIES = ("lstm", "fnet")


def baseline_presets() -> list[str]:
    """The model presets `BenchConfig.baselines` accepts."""
    return [p for p in backbones.preset_names()
            if backbones.family_of_preset(p).name in BASELINE_FAMILIES]


@dataclasses.dataclass(frozen=True)
class Shape:
    """A global batch of `batch_size` examples of `seq_len` tokens with `features` each,
    classified into `classes` (one token per input row)."""
    name: str
    batch_size: int
    seq_len: int
    features: int
    classes: int

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"shape {self.name!r}: batch_size must be >= 1, got "
                             f"{self.batch_size}")
        try:
            self.task()
        except ValueError as e:
            raise ValueError(f"shape {self.name!r}: {e}") from None

    def task(self) -> Task:
        return get_task("synthetic", seq_len=self.seq_len, features=self.features,
                        classes=self.classes)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


# The paper's Bit XOR (2 strings of 5 bits, patch 1 -> 10 one-feature tokens, batch 4) and
# CIFAR-10 (32x32x3 images in 4x4 patches -> 64 tokens of 48 features, batch 8).
SHAPES = {
    "bit_xor": Shape("bit_xor", batch_size=4, seq_len=10, features=1, classes=2),
    "cifar10": Shape("cifar10", batch_size=8, seq_len=64, features=48, classes=10),
}


def scaling_shapes(seq_lens: Sequence[int], batch_size: int, features: int,
                   classes: int) -> list[Shape]:
    return [Shape(f"seq{t}", batch_size, t, features, classes) for t in seq_lens]


def mode_of(trainable: str | None) -> str:
    """The mode that names a trainable selection (None: forward only)."""
    return {None: "forward", "fpt": "frozen", "full": "full"}.get(trainable, trainable)


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    trainable: str | None = "fpt"  # the trainable selection; None: forward only
    dtype: str = "float32"
    remat: bool = False
    runs: int = 1  # K > 1: K runs in one vmapped group step (fpt_jax.steps)
    model: str | None = None  # a baseline preset; None: the base config's model

    @property
    def mode(self) -> str:
        return mode_of(self.trainable)

    @property
    def label(self) -> str:
        return (f"{self.shape.name}/{self.model + '/' if self.model else ''}{self.mode}/"
                f"{self.dtype}{'/remat' if self.remat else ''}"
                + (f"/K{self.runs}" if self.runs != 1 else ""))


@dataclasses.dataclass
class BenchConfig:
    """The training run to time (`base`, a `TrainConfig`) and how to time it. From `base`
    every step-shaping setting is used (model and sizes, dropout, input/output layers,
    trainable, optimizer, grad_accum, seed, dtype, remat, num_devices); its task and batch
    size are replaced by each shape's, and `init` is always 'random': FLOPs and time do not
    depend on the weights' values."""
    base: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    shapes: tuple[Shape, ...] = tuple(SHAPES.values())
    modes: tuple[str, ...] = MODES  # and/or trainable selections
    dtypes: tuple[str, ...] | None = None  # None: (base.dtype,)
    remats: tuple[bool, ...] | None = None  # None: (base.remat,)
    # K values: training cases of K runs in one vmapped group step (fpt_jax.steps), timed
    # per K; K=1 is the single-run training step (forward-only cases are never swept).
    sweeps: tuple[int, ...] = (1,)
    # Baseline presets (lstm, fnet families) timed for every shape, dtype and K next to the
    # base config's modes, each training its own selection (`baseline_config`).
    baselines: tuple[str, ...] = ()
    steps: int = 20  # timed steps per case, split over `rounds`
    warmup: int = 3  # untimed steps after compilation
    rounds: int = 5  # interleaving rounds (A B C A B C ...)
    switch_steps: int = 1  # untimed steps each time the interleaving turns to a runner
    torch_reference: bool = True
    torch_threads: int | None = None  # default: the machine's cores
    torch_attn: str | None = None  # HF attn_implementation ('eager', 'sdpa'); default theirs
    peak_tflops: float | None = None  # per device; default measured (CPU) or published
    compile_only: bool = False  # FLOPs and memory of the compiled steps; no step is run
    memory_fraction: float = 0.6  # CPU: a step needing more of the available memory is not run

    def __post_init__(self):
        self.shapes, self.modes = tuple(self.shapes), tuple(self.modes)
        self.dtypes = tuple(dict.fromkeys(self.dtypes or (self.base.dtype,)))
        self.remats = tuple(dict.fromkeys(self.remats or (self.base.remat,)))
        self.sweeps = tuple(dict.fromkeys(self.sweeps))
        self.baselines = tuple(dict.fromkeys(self.baselines))
        self.validate()

    def validate(self) -> "BenchConfig":
        if self.steps < 1 or self.rounds < 1 or self.warmup < 0 or self.switch_steps < 0:
            raise ValueError(f"steps ({self.steps}) and rounds ({self.rounds}) must be >= 1, "
                             f"warmup ({self.warmup}) and switch_steps ({self.switch_steps}) "
                             ">= 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads}; accepted: an integer >= 1 "
                             "(or unset: the machine's cores)")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < float("inf"):
            raise ValueError(f"peak_tflops={self.peak_tflops}; accepted: a number > 0 (or "
                             "unset: measured or published)")
        if self.steps < self.rounds:
            raise ValueError(f"steps={self.steps} is fewer than rounds={self.rounds}: every "
                             "round times at least one step of each case")
        if not self.shapes:
            raise ValueError("no shape to measure")
        if not self.sweeps or any(isinstance(k, bool) or not isinstance(k, (int, np.integer))
                                  or k < 1 for k in self.sweeps):
            raise ValueError(f"sweeps={','.join(map(str, self.sweeps))}; accepted: integers >= 1 "
                             "(the runs K of a vmapped sweep step; 1: the single-run step)")
        if self.base.model == "auto":
            raise ValueError("model='auto' reads the architecture from pretrained weights; "
                             "the benchmark initialises at random: set a preset as model")
        for dtype in self.dtypes:  # TrainConfig's own check names what is accepted
            try:
                dataclasses.replace(self.base, dtype=dtype)
            except ValueError as e:
                raise ValueError(f"dtypes={','.join(self.dtypes)}: {e}") from None
        n_layer = self.backbone().n_layer
        freeze.check_named_groups(freeze.parse_selection(self.base.trainable, n_layer),
                                  freeze.fpt_paths(self.backbone()))  # the 'frozen' mode's
        for mode in self.modes:
            if mode not in MODES:
                try:
                    freeze.check_named_groups(freeze.parse_selection(mode, n_layer),
                                              freeze.fpt_paths(self.backbone()))
                except ValueError as e:
                    raise ValueError(f"unknown mode {mode!r}: accepted {MODES} or a "
                                     f"trainable selection ({e})") from None
        for name in self.baselines:
            try:
                ok = backbones.family_of_preset(name).name in BASELINE_FAMILIES
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"baselines={','.join(self.baselines)}: unknown baseline "
                                 f"{name!r}; accepted: {baseline_presets()} (presets of the "
                                 f"{' and '.join(BASELINE_FAMILIES)} families)")
            try:  # the base's sizes must make a valid baseline too
                selection = freeze.parse_selection(self.baseline_config(name).trainable,
                                                   self.backbone(name).n_layer)
                freeze.check_named_groups(selection, freeze.fpt_paths(self.backbone(name)))
            except ValueError as e:
                raise ValueError(f"baselines={','.join(self.baselines)}: {name}: {e}") from None
        return self

    def check_shapes(self, num_devices: int) -> None:
        """Every shape fits the model and splits over `num_devices` (all processes' devices)
        in every mode: checked before anything is timed, so a later shape cannot fail after
        the earlier ones were measured. ShapeError names the shape."""
        # the base model's positions and every baseline's (the LSTM has no limit)
        limits = {"the model's": self.backbone().n_positions,
                  **{f"baseline {m}'s": self.backbone(m).n_positions for m in self.baselines}}
        accums = {self.base.grad_accum if sel else 1 for sel in self.selections()}
        if self.baselines:  # baseline cases train
            accums.add(self.base.grad_accum)
        for shape in self.shapes:
            for whose, n_positions in limits.items():
                if shape.seq_len > n_positions:
                    raise ShapeError(shape, "positions", f"{shape.seq_len} tokens exceed "
                                            f"{whose} n_positions={n_positions}; accepted: "
                                            f"sequence lengths <= {n_positions}")
            for accum in sorted(accums):
                if shape.batch_size % (num_devices * accum):
                    raise ShapeError(shape, "batch", f"a batch of {shape.batch_size} does not split "
                                            f"over {num_devices} devices x grad_accum {accum}; "
                                            f"accepted: a multiple of {num_devices * accum}, "
                                            f"or a device count that divides the batch")

    def backbone(self, model: str | None = None) -> Any:
        """The backbone's config (any family; its architecture as the base config sets it),
        or the baseline `model`'s (`baseline_config`)."""
        cfg = (self.baseline_config(model) if model
               else dataclasses.replace(self.base, init="random"))
        return build.backbone(cfg)[0]

    def baseline_config(self, model: str) -> TrainConfig:
        """The base config as the baseline `model` (a preset of the lstm or fnet family) runs
        in the paper's comparisons: `baselines.variant` of its family (the one definition of
        what it trains: lstm 'full', fnet the base's FPT selection), at random init, no heads
        and no matched width; the base's n_layer/n_embd stay when set (a small config stays
        small), the preset's sizes otherwise."""
        base = dataclasses.replace(self.base, init="random", weights=None, n_head=None,
                                   match_model=None)
        cfg = baselines.variant(base, backbones.family_of_preset(model).name)
        return dataclasses.replace(cfg, model=model)

    def selections(self) -> list[str | None]:
        named = {"frozen": self.base.trainable, "full": "full", "forward": None}
        return list(dict.fromkeys(named.get(m, m) for m in self.modes))

    def cases(self, shape: Shape) -> list[Case]:
        """The base model's cases, then each baseline's: its one selection per dtype and K
        (sweeps of K > 1 runs work for the baselines as for the base model), remat off (the
        LSTM has none; remat is the base model's setting)."""
        base = [Case(shape, sel, dtype, remat, k) for sel in self.selections()
                for dtype in self.dtypes for remat in (self.remats if sel else (False,))
                for k in (self.sweeps if sel else (1,))]
        return base + [Case(shape, self.baseline_config(m).trainable, dtype, False, k, m)
                       for m in self.baselines for dtype in self.dtypes for k in self.sweeps]

    def train_config(self, case: Case) -> TrainConfig:
        """The training config whose step the case times."""
        base = self.baseline_config(case.model) if case.model else self.base
        return dataclasses.replace(
            base, task="synthetic", init="random", weights=None,
            trainable=case.trainable or base.trainable, batch_size=case.shape.batch_size,
            dtype=case.dtype, remat=case.remat)


class ShapeError(ValueError):
    """A shape that the model or the devices cannot take: `.shape` is the shape, `.kind`
    'positions' (too long for the model) or 'batch' (does not split over the devices)."""

    def __init__(self, shape: Shape, kind: str, message: str):
        super().__init__(f"shape {shape.name!r}: {message}")
        self.shape, self.kind = shape, kind


# The minimum bytes of a step, as the report states it (report.py prints this text).
MINIMUM_BYTES_DEFINITION = (
    "2 x the bytes of all model parameters (frozen + trainable, in their stored dtypes: the "
    "forward pass reads every weight once, the backward pass once more for the input "
    "gradients) + 9 x the bytes of the trainable parameters (the gradient written once and "
    "read once by the global-norm clip; Adam reads parameter, gradient and both moments and "
    "writes parameter and both moments: 1 + 1 + 7). K runs in one sweep step: the shared "
    "backbone counts once, each run's own parameters K times. Forward only: 1 x the bytes of "
    "all parameters. Activations, batches and keys are not counted")


def minimum_step_bytes(frozen_bytes: int, trainable_bytes: int, runs: int = 1,
                       training: bool = True) -> int:
    """The fewest bytes a step can touch (read + written), per device (every device holds
    and reads a whole replica), by `MINIMUM_BYTES_DEFINITION`:

      training:     2 x (frozen + runs x trainable) + 9 x runs x trainable
      forward only: frozen + trainable  (runs = 1)

    `frozen_bytes`: the frozen tree as the step holds it, in its stored dtypes (a sweep's
    shared backbone once, with the runs' own frozen parts, stacked, K times);
    `trainable_bytes`: one run's trainable parameters. Activations are not counted: the
    parameters, gradients and moments are what every step must touch whatever the batch."""
    if runs < 1 or (runs != 1 and not training):
        raise ValueError(f"runs={runs}: >= 1, and 1 for a forward-only step")
    if not training:
        return frozen_bytes + trainable_bytes
    return 2 * (frozen_bytes + runs * trainable_bytes) + 9 * runs * trainable_bytes


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median and spread of step times, in milliseconds."""
    q10, q50, q90 = np.percentile(np.asarray(times_s, np.float64) * 1e3, [10, 50, 90])
    return {"median": float(q50), "p10": float(q10), "p90": float(q90), "n": len(times_s)}


class Runner:
    """A case's step, timed: `run_step` runs one step to completion and returns seconds."""
    framework: str
    min_warmup = 1

    def __init__(self, case: Case):
        self.case = case
        self.times: list[float] = []
        self.skipped: str | None = None  # why no step was timed

    def run_step(self) -> float:
        raise NotImplementedError

    def warm_up(self, n: int) -> None:
        for _ in range(max(n, self.min_warmup)):
            self.run_step()

    def step(self) -> None:
        self.times.append(self.run_step())

    def result(self) -> dict[str, Any]:
        case = self.case
        out = {"case": case.label, "framework": self.framework,
               "shape": dataclasses.asdict(case.shape), "model": case.model, "mode": case.mode,
               "trainable": case.trainable, "dtype": case.dtype, "remat": case.remat,
               "runs": case.runs, "step_ms": None, "per_run_ms": None, "tokens_per_s": None}
        if self.times:
            out["step_ms"] = summarize(self.times)
            # a step of K runs trains K batches: per run, a K-th of the step's time
            out["per_run_ms"] = {k: v / case.runs if k != "n" else v
                                 for k, v in out["step_ms"].items()}
            out["tokens_per_s"] = (case.runs * case.shape.tokens
                                   / (out["step_ms"]["median"] / 1e3))
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def timed(call) -> float:
    """Seconds that `call()` takes (it waits for its own result)."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0
