"""The benchmark's settings, each defined once: `BenchConfig` (`--bench.<field>=<value>`),
and the shapes, modes and baselines they name.

`BenchConfig` says what is timed around a training config (the `TrainConfig` whose step is
timed is not part of it: `core.Bench` joins the two) and how. Tuple fields take
comma-separated values on the command line (`--bench.shapes=bit_xor,cifar10`,
`--bench.sweeps=1,4,16`; a tuple flag given twice collects both values, as config_flags
does); an empty tuple means the default its help names. `validate()` checks every field on
its own (ValueError naming the field and what it accepts) and normalises the tuples; what
depends on the model (trainable selections, baselines against its sizes, shapes against its
positions and the devices) is checked by `core.Bench`.

(No `from __future__ import annotations` here: ml_collections' config_flags reads the fields'
real types.)
"""
import dataclasses
import math
import numbers
from typing import Any, Sequence

from fpt_jax.config import DTYPES, setting
from fpt_jax.models import backbones
from fpt_jax.tasks import Task, get_task

MODES = ("frozen", "full", "forward")
# Baseline families: a baseline preset of one runs as the comparison row of the same name
# (fpt_jax.rows: 'lstm' fully trained, 'fnet' frozen as FPT).
BASELINE_FAMILIES = ("lstm", "fnet")
PLOTS = ("auto", "yes", "no")
TORCH_ATTENTIONS = ("eager", "sdpa")
SELECTION_SEPARATOR = "|"  # commas belong to a selection ('output,attn[-2:]')


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


@dataclasses.dataclass
class BenchConfig:
    """What the benchmark times around the training config, and how
    (`--bench.<field>=<value>`)."""
    # --- what is timed
    shapes: tuple[str, ...] = setting(
        (), f"Named shapes {tuple(SHAPES)}: bit_xor (batch 4 x 10 tokens x 1 feature, 2 "
        "classes), cifar10 (batch 8 x 64 tokens x 48 features, 10 classes). Empty: both, "
        "unless seq_lens is given.")
    seq_lens: tuple[int, ...] = setting(
        (), "Sequence lengths of synthetic shapes seq<T> (batch_size x T tokens x features "
        "-> classes), e.g. 64,128,256.")
    batch_size: int = setting(8, "Global batch of the seq_lens shapes (the shapes set the "
                                 "batch size; --config.batch_size is not read).")
    features: int = setting(48, "Features per token of the seq_lens shapes.")
    classes: int = setting(10, "Classes of the seq_lens shapes (>= 2).")
    modes: tuple[str, ...] = setting(
        MODES, f"Modes {MODES}: frozen trains --config.trainable (the paper's 'fpt' by "
        "default), full fine-tunes everything, forward times the eval step only.")
    selections: str = setting(
        "", "Further train modes: trainable selections as --config.trainable takes them, "
        f"separated by '{SELECTION_SEPARATOR}' (commas belong to a selection), e.g. "
        "'output,attn[-2:]|fpt,mlp'.")
    dtypes: tuple[str, ...] = setting(
        (), f"Compute dtypes to time {DTYPES} (trainable parameters stay float32, frozen "
        "ones are stored in the compute dtype); with bfloat16 the eval loss is checked "
        "against float32. Empty: --config.dtype.")
    remats: tuple[bool, ...] = setting(
        (), "Activation checkpointing per block to time: false, true, or false,true for "
        "both. Empty: --config.remat.")
    sweeps: tuple[int, ...] = setting(
        (1,), "K values (integers >= 1): every training case is timed as K runs trained by "
        "one vmapped group step (fpt_jax.steps: the backbone shared, states donated), "
        "reported per run (step time / K) and against K=1, the single-run step.")
    baselines: tuple[str, ...] = setting(
        (), "Baseline presets timed next to --config's model for every shape, dtype and K, "
        "each as its family's comparison row in fpt_jax.rows trains it: lstm (the LSTM, "
        "every parameter trained), fnet (fixed Fourier mixing, frozen as FPT), or another "
        "preset of those families; at --config.n_layer/n_embd when set, the preset's sizes "
        "otherwise; no remat, no PyTorch reference.")
    # --- how it is timed
    steps: int = setting(20, "Timed steps per case, split over rounds (--config.steps is "
                             "not read).")
    warmup: int = setting(3, "Untimed steps per case after compilation.")
    rounds: int = setting(5, "Interleaving rounds: each round times steps/rounds steps of "
                             "every case and of the PyTorch reference, in turn (<= steps).")
    switch_steps: int = setting(1, "Untimed steps each time the interleaving turns to a case "
                                   "(absorbs the previous case's threads and cache).")
    torch_reference: bool = setting(True, "Also time the original recipe in PyTorch (GPT-2 "
                                          "only; when torch and transformers are installed).")
    torch_threads: int | None = setting(None, "PyTorch threads; None: the machine's cores.")
    torch_attn: str | None = setting(
        None, f"Attention of the PyTorch reference {TORCH_ATTENTIONS} (Hugging Face "
        "attn_implementation); None: the installed transformers' default. The original code "
        "ran eager attention (transformers 4.x, 2021).")
    peak_tflops: float | None = setting(None, "Peak TFLOP/s per device for utilisation; "
                                              "None: measured (CPU) or published (GPU/TPU).")
    compile_only: bool = setting(False, "Compile the steps and report FLOPs and memory "
                                        "(XLA's analyses) without running them.")
    memory_fraction: float = setting(0.6, "CPU: a step whose compiled memory needs more than "
                                          "this fraction of the available host memory is "
                                          "compiled but not run; in (0, 1].")
    plot: str = setting("auto", f"Tokens/s against sequence length plot {PLOTS}; auto: when "
                                "several sequence lengths are measured.")

    def validate(self) -> "BenchConfig":
        """Every field on its own, normalised (tuples of distinct values); raises ValueError
        naming the field, its value and what is accepted."""
        self.shapes = _choices("shapes", self.shapes, SHAPES, "shape", "; sequence lengths "
                               "of your own: seq_lens")
        self.seq_lens = _ints("seq_lens", self.seq_lens, 1)
        for name, low in (("batch_size", 1), ("features", 1), ("classes", 2), ("steps", 1),
                          ("warmup", 0), ("rounds", 1), ("switch_steps", 0)):
            _int(name, getattr(self, name), low)
        self.modes = _choices("modes", self.modes, MODES, "mode",
                              "; other trainable selections: selections")
        if not isinstance(self.selections, str):
            raise ValueError(f"selections={self.selections!r}; accepted: a string of "
                             f"selections separated by '{SELECTION_SEPARATOR}'")
        if not self.modes and not self.selection_list():
            raise ValueError("modes=(empty) and no selections: nothing to time; accepted: "
                             f"one or more of {', '.join(MODES)}, or selections")
        self.dtypes = _choices("dtypes", self.dtypes, DTYPES, "dtype", "; empty: --config.dtype")
        self.remats = _bools("remats", self.remats)
        self.sweeps = _ints("sweeps", self.sweeps, 1, " (the runs K of a vmapped sweep step; "
                            "1: the single-run step)")
        if not self.sweeps:
            raise ValueError("sweeps=(empty); accepted: integers >= 1, e.g. 1,4,16")
        self.baselines = _choices("baselines", self.baselines, baseline_presets(), "baseline",
                                  f" (presets of the {' and '.join(BASELINE_FAMILIES)} "
                                  "families)")
        if self.steps < self.rounds:
            raise ValueError(f"steps={self.steps} is fewer than rounds={self.rounds}: every "
                             "round times at least one step of each case; accepted: steps >= "
                             "rounds")
        for name in ("torch_reference", "compile_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: true or false")
        if self.torch_threads is not None:
            _int("torch_threads", self.torch_threads, 1, " (or none: the machine's cores)")
        if self.torch_attn is not None and self.torch_attn not in TORCH_ATTENTIONS:
            raise ValueError(f"torch_attn={self.torch_attn!r}; accepted: "
                             f"{', '.join(TORCH_ATTENTIONS)} (or none: transformers' default)")
        if self.peak_tflops is not None and not (_number(self.peak_tflops)
                                                 and self.peak_tflops > 0):
            raise ValueError(f"peak_tflops={self.peak_tflops}; accepted: a finite number > 0 "
                             "(or none: measured or published)")
        if not (_number(self.memory_fraction) and 0 < self.memory_fraction <= 1):
            raise ValueError(f"memory_fraction={self.memory_fraction}; accepted: a number in "
                             "(0, 1]")
        if self.plot not in PLOTS:
            raise ValueError(f"plot={self.plot!r}; accepted: {', '.join(PLOTS)}")
        return self

    def selection_list(self) -> list[str]:
        """`selections` as a list of trainable selections."""
        return [s.strip() for s in self.selections.split(SELECTION_SEPARATOR) if s.strip()]

    def make_shapes(self) -> tuple[Shape, ...]:
        """The named shapes (both when neither shapes nor seq_lens is given), then the
        seq<T> shapes."""
        names = self.shapes or (() if self.seq_lens else tuple(SHAPES))
        return tuple(SHAPES[n] for n in names) + tuple(scaling_shapes(
            self.seq_lens, self.batch_size, self.features, self.classes))

    def plot_choice(self) -> bool | None:
        """`plot` as `report.write` takes it (None: when several sequence lengths)."""
        return {"auto": None, "yes": True, "no": False}[self.plot]


def _items(values: Any) -> tuple:
    """A tuple field's items as config_flags gives them (`a,b` -> ('a,b',), `1,2` -> (1, 2),
    one value -> (v,)): strings split on commas, blanks dropped."""
    out = []
    for v in values if isinstance(values, (tuple, list)) else (values,):
        out += [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else [v]
    return tuple(out)


def _shown(values: Any) -> str:
    return ",".join(map(str, _items(values))) or "(empty)"


def _choices(name: str, values: Any, accepted, what: str, more: str = "") -> tuple[str, ...]:
    items = _items(values)
    for v in items:
        if v not in accepted:
            raise ValueError(f"{name}={_shown(values)}: unknown {what} {v!r}; accepted: "
                             f"{', '.join(accepted)}, comma-separated{more}")
    return tuple(dict.fromkeys(items))


def _ints(name: str, values: Any, low: int, more: str = "") -> tuple[int, ...]:
    items = _items(values)
    try:
        ints = [int(v) if isinstance(v, str) else v for v in items]
    except ValueError:
        ints = None
    if ints is None or any(not _integer(v) or v < low for v in ints):
        raise ValueError(f"{name}={_shown(values)}; accepted: integers >= {low}, "
                         f"comma-separated{more}")
    return tuple(dict.fromkeys(int(v) for v in ints))


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _bools(name: str, values: Any) -> tuple[bool, ...]:
    out = []
    for v in _items(values):
        key = v.lower() if isinstance(v, str) else {True: "true", False: "false"}.get(v)
        if key not in _BOOLS or (isinstance(v, float)):
            raise ValueError(f"{name}={_shown(values)}: {v!r} is not a boolean; accepted: "
                             "true, false or false,true")
        out.append(_BOOLS[key])
    return tuple(dict.fromkeys(out))


def _int(name: str, value: Any, low: int, more: str = "") -> None:
    if not _integer(value) or value < low:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {low}{more}")


def _integer(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
