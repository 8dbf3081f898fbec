"""What is measured: cases, the benchmark (`Bench`: a training config and its settings,
joined), and what every runner shares.

A case is (shape, trainable selection, dtype, remat, runs) over a base training config: the
shape (batch x tokens x features -> classes) is a `synthetic` task, the selection is what the
step trains (None: forward only), `runs` the K runs trained together by one vmapped group step
(`fpt_jax.steps`; 1: a single run, the group of one that training runs). Modes name
selections: `frozen` is the base config's `trainable` (the paper's `fpt` by default), `full`
fine-tunes everything, `forward` times the eval step; `BenchConfig.selections` adds
selections of their own.

Baselines (`BenchConfig.baselines`: presets of the lstm and fnet families) are timed next to
the base config's model, for every shape, dtype and K: a baseline case (`Case.model` set)
runs as the comparison row of its family (`fpt_jax.rows`: the LSTM fully trained, FNet
frozen as FPT), at random init, at the base config's n_layer/n_embd when those are set (the
family's preset sizes otherwise).
"""
import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from fpt_jax import build, freeze, rows
from fpt_jax.bench.settings import (BASELINE_FAMILIES, MODES, SHAPES, BenchConfig, Shape,
                                    baseline_presets, scaling_shapes)
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones

__all__ = ["BASELINE_FAMILIES", "MODES", "SHAPES", "Bench", "BenchConfig", "Case", "Runner",
           "Shape", "ShapeError", "baseline_presets", "minimum_step_bytes", "scaling_shapes"]


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
class Bench:
    """One benchmark: the training run whose step is timed (`base`, a `TrainConfig`) and how
    it is timed (`settings`, a `BenchConfig`), checked against each other when made
    (ValueError naming the setting). From `base` every step-shaping setting is used (model
    and sizes, dropout, input/output layers, trainable, optimizer, grad_accum, seed, dtype,
    remat, num_devices); its task and batch size are replaced by each shape's, and `init` is
    always 'random': FLOPs and time do not depend on the weights' values."""
    base: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    settings: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    # The shapes timed; empty: those the settings name (a caller of the library may time
    # shapes of its own).
    shapes: tuple[Shape, ...] = ()

    def __post_init__(self):
        self.settings = dataclasses.replace(self.settings).validate()  # a copy, normalised
        self.shapes = tuple(self.shapes) or self.settings.make_shapes()
        self.validate()

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes, then the selections of their own."""
        return tuple(dict.fromkeys((*self.settings.modes, *self.settings.selection_list())))

    @property
    def dtypes(self) -> tuple[str, ...]:
        return self.settings.dtypes or (self.base.dtype,)

    @property
    def remats(self) -> tuple[bool, ...]:
        return self.settings.remats or (self.base.remat,)

    @property
    def sweeps(self) -> tuple[int, ...]:
        return self.settings.sweeps

    @property
    def baselines(self) -> tuple[str, ...]:
        return self.settings.baselines

    def validate(self) -> "Bench":
        """The settings against the model (each field on its own: `BenchConfig.validate`):
        a preset to initialise at random, the selections and the baselines' on their
        backbones."""
        if not self.shapes:
            raise ValueError("no shape to measure")
        if self.base.model == "auto":
            raise ValueError("--config.model='auto' reads the architecture from pretrained "
                             "weights; the benchmark initialises at random: accepted: a "
                             "model preset")
        _check_selection(self.base.trainable, self.backbone(), self.base.blocks)  # 'frozen' 
        for sel in self.settings.selection_list():
            try:
                _check_selection(sel, self.backbone(), self.base.blocks)
            except ValueError as e:
                raise ValueError(f"--bench.selections={self.settings.selections}: {sel!r}: "
                                 f"{e}; accepted: trainable selections of this model as "
                                 "--config.trainable takes them, separated by '|'") from None
        for name in self.baselines:
            try:  # the base's sizes and selection must make a valid baseline too
                _check_selection(self.baseline_config(name).trainable, self.backbone(name),
                                 self.baseline_config(name).blocks)
            except ValueError as e:
                raise ValueError(f"--bench.baselines={','.join(self.baselines)}: {name}: "
                                 f"{e}") from None
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
                    raise ShapeError(shape, "batch", f"a batch of {shape.batch_size} does not "
                                     f"split over {num_devices} devices x grad_accum {accum}; "
                                     f"accepted: a multiple of {num_devices * accum}, or a "
                                     "device count that divides the batch")

    def backbone(self, model: str | None = None) -> Any:
        """The backbone's config (any family; its architecture as the base config sets it),
        or the baseline `model`'s (`baseline_config`)."""
        cfg = (self.baseline_config(model) if model
               else dataclasses.replace(self.base, init="random"))
        return build.backbone(cfg)[0]

    def baseline_config(self, model: str) -> TrainConfig:
        """The base config as the baseline `model` (a preset of the lstm or fnet family) runs:
        the comparison row of its family in `fpt_jax.rows` (the one definition of what it
        trains: 'lstm' every parameter, 'fnet' the base's FPT selection), as `model`, at
        random init without weights or heads; the base's n_layer/n_embd stay when set (a
        small config stays small), the preset's sizes otherwise."""
        base = dataclasses.replace(self.base, n_head=None, weights=None)
        cfg = rows.apply(base, backbones.family_of_preset(model).name)
        return dataclasses.replace(cfg, model=model, init="random")

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
            dtype=case.dtype, remat=case.remat,
            task_options=dict(seq_len=case.shape.seq_len, features=case.shape.features,
                              classes=case.shape.classes))

    def to_dict(self) -> dict[str, Any]:
        """As the report records it: the base config, the settings as given, and what they
        resolve to (shapes, modes, dtypes, remats)."""
        return {"base": self.base.to_dict(), "bench": dataclasses.asdict(self.settings),
                "shapes": [dataclasses.asdict(s) for s in self.shapes],
                "modes": list(self.modes), "dtypes": list(self.dtypes),
                "remats": list(self.remats)}


def _check_selection(selection: str, backbone: Any, blocks: tuple[int, ...] = ()) -> None:
    """`selection` parses on the backbone (and the frozen `blocks` appended to it) and names
    no group the model lacks (ValueError)."""
    freeze.check_named_groups(freeze.parse_selection(selection, backbone.n_layer, len(blocks)),
                              freeze.fpt_paths(backbone) + (freeze.BLOCKS_PATHS if blocks
                                                            else ()))


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
