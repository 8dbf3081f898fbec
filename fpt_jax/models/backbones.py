"""Backbone families: transformers that map `[batch, seq, width]` to `[batch, seq, width]`.

FPT takes any of them as its `transformer`. A family is one module of `fpt_jax.models`,
named as the family (= Hugging Face's `model_type`: gpt2, bert, vit, llama, mistral,
qwen2; the baselines fnet, mixer and lstm), that brings:
  * a config, a frozen dataclass deriving from `BackboneConfig`, with the family's
    `model_type` and `display_name` (the name in messages) and its differences as class
    data (generic names, dropout fields, Hugging Face options, renames); the base class
    gives it `preset(name, **overrides)`, `with_dropout(rate)`, `from_hf` / `to_hf` and the
    validation of the generic sizes `n_layer`, `n_head`, `n_embd`, `n_positions`, which the
    rest of the project reads whatever the family's own field names;
  * the flax module, `Module(config, dtype, remat)(inputs_embeds, deterministic,
    read_positions[, lengths])`, whose last block is computed only at `read_positions` when
    given;
  * `FAMILY = backbones.Family(...)`, the one place that names its config and module
    classes, presets, hub repositories, Hugging Face conversion (`torch_name_to_path(name)`:
    a state-dict key -> our path below the backbone, None to ignore, ('<unexpected>', name)
    otherwise; `needs_transpose`: torch `Linear` kernels are `[out, in]`; `fresh_paths(
    config)`: parameters no checkpoint holds, which start from the run's own init),
    `param_group(keys)` -> (group, layer) of a path below the backbone or None if not its
    own (so trainable selections, count tables, the benchmark and sweeps work for every
    family), `param_shapes`, `attention_weights`, `takes_lengths` (the module takes
    `lengths`, [batch] ints of right-padded token sequences, and keeps the padding out of
    the real positions) and `has_checkpoints`.
The family is named by the preset (`model`) or, for pretrained weights, by `config.json`'s
`model_type`. Nothing here imports a family until it is asked for: a GPT-2 run never
imports the others.

To add a family `foo`: write `fpt_jax/models/foo.py` with `FooConfig(BackboneConfig)`
(`model_type = "foo"`, its class data), its module, presets and functions, and
`FAMILY = backbones.Family(...)` at its end; add "foo" to `_NAMES` below. Its parameter
names must not collide with another family's groups (`param_group`, tested in
tests/test_backbones.py, which also checks every family's config contract).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import operator
from typing import Any, Callable, ClassVar, Mapping, Self

# The families, in the order `param_group` asks them (GPT-2 first: a GPT-2 run imports no
# other family). Each is the module of the same name in this package, holding `FAMILY`.
_NAMES = ("gpt2", "bert", "vit", "llama", "mistral", "qwen2", "fnet", "mixer", "lstm")
# The generic sizes every config answers to, by the family's own field names (`GENERIC`).
_GENERIC_SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "mlp_width")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The base of every family's config: the shared methods, driven by the class data that
    a family sets (plain class attributes, not dataclass fields: the fields are the
    family's architecture, written to run identities and `config.json`)."""
    model_type: ClassVar[str]  # the family's name, Hugging Face's `model_type`
    display_name: ClassVar[str]  # the family in messages: GPT-2, BERT, ...
    # Generic name -> the family's field (BERT: n_layer -> num_hidden_layers): preset
    # overrides take either, and each becomes a read-only property of the generic name.
    GENERIC: ClassVar[Mapping[str, str]] = {}
    SIZES: ClassVar[tuple[str, ...]] = ()  # further fields that must be >= 1 (or None)
    DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = ()  # what `with_dropout` sets
    HAS_HEADS: ClassVar[bool] = True  # False: n_head is 1 (Fourier mixing, LSTM)
    # Hugging Face options this family implements, first the default; a field among them is
    # checked at construction, any of them in `from_hf`, and `to_hf` writes the others.
    HF_SUPPORTED: ClassVar[Mapping[str, tuple]] = {}
    HF_NAMES: ClassVar[Mapping[str, str]] = {}  # our field -> its config.json key
    HF_FALLBACK: ClassVar[Mapping[str, str]] = {}  # field -> an older key read in its absence
    HF_REQUIRED: ClassVar[tuple[str, ...]] = ()  # keys without Hugging Face defaults
    HF_UNTYPED: ClassVar[bool] = False  # True: a config.json without model_type is ours
    HF_NOTE: ClassVar[str] = ""  # added to the error for a config.json not of this family

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for generic, field in cls.GENERIC.items():
            setattr(cls, generic, property(operator.attrgetter(field),
                                           doc=f"`{field}` by its generic name (read-only)"))

    def __post_init__(self) -> None:
        cls, fields = type(self), _field_names(type(self))
        if not cls.HAS_HEADS:
            cls._check_no_heads(self.n_head)
        sizes = [cls.GENERIC.get(name, name) for name in _GENERIC_SIZES] + list(cls.SIZES)
        for name in (name for name in sizes if name in fields):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{cls.__name__}.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{cls.__name__}.{cls.GENERIC.get('n_embd', 'n_embd')}="
                             f"{self.n_embd} must be divisible by "
                             f"{cls.GENERIC.get('n_head', 'n_head')}={self.n_head}")
        for name in cls.DROPOUT_FIELDS:
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{cls.__name__}.{name} must be in [0, 1), got "
                                 f"{getattr(self, name)}")
        for name, ok in cls.HF_SUPPORTED.items():
            if name in fields and getattr(self, name) not in ok:
                raise ValueError(f"{cls.__name__}.{name}={getattr(self, name)!r} is not "
                                 f"supported; accepted: {name} in {ok}")

    @classmethod
    def _check_no_heads(cls, n_head: Any) -> None:
        if n_head != 1:
            raise ValueError(f"{cls.__name__}.n_head={n_head!r}: {cls.display_name} has no "
                             "attention heads; accepted: 1 (leave n_head unset)")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """The preset `name` with fields replaced, by the family's or the generic names.
        A new width without a new MLP width gets 4 x the width (every preset's ratio)."""
        presets = family(cls.model_type).presets
        if name not in presets:
            raise ValueError(f"unknown {cls.display_name} preset {name!r}; accepted: "
                             f"{sorted(presets)}")
        fields = {cls.GENERIC.get(k, k): v for k, v in overrides.items()}
        names = _field_names(cls)
        if "n_head" not in names and "n_head" in fields:  # a head-less family's generic 1
            cls._check_no_heads(fields.pop("n_head"))
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.display_name} config fields {unknown}; accepted: "
                             f"{[*cls.GENERIC, *names]}")
        mlp, width = cls.GENERIC.get("mlp_width"), cls.GENERIC.get("n_embd", "n_embd")
        if mlp and width in fields and mlp not in fields:
            fields[mlp] = 4 * fields[width]
        return dataclasses.replace(presets[name], **fields)

    def with_dropout(self, rate: float) -> Self:
        """A copy with every dropout probability (`DROPOUT_FIELDS`) set to `rate`."""
        return dataclasses.replace(self, **dict.fromkeys(self.DROPOUT_FIELDS, rate))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Self:
        """Reads a Hugging Face `config.json` (as a dict) of this family: our field names
        are Hugging Face's (but `HF_NAMES`), and so are the defaults of absent ones. Errors
        start with "config.json" (`weights` puts the file's path in front)."""
        model_type = hf.get("model_type", cls.model_type if cls.HF_UNTYPED else None)
        missing = sorted(set(cls.HF_REQUIRED) - set(hf))
        if model_type != cls.model_type or missing:
            lacks = f", missing {missing}" if missing else ""
            needs = f" with {', '.join(cls.HF_REQUIRED)}" if cls.HF_REQUIRED else ""
            raise ValueError(f"config.json is not a config of {cls.display_name} (model_type="
                             f"{model_type!r}{lacks}); accepted: model_type "
                             f"{cls.model_type!r}{needs}{cls.HF_NOTE}")
        wrong = [f"{k}={hf[k]!r}" for k, ok in cls.HF_SUPPORTED.items()
                 if hf.get(k, ok[0]) not in ok]
        if wrong:
            raise ValueError(f"config.json {', '.join(wrong)} is not supported; accepted: "
                             + ", ".join(f"{k} in {ok}" for k, ok in cls.HF_SUPPORTED.items()))
        keys = {cls.HF_NAMES.get(f, f): f for f in _field_names(cls)}
        fields = {field: hf[key] for key, field in keys.items() if key in hf}
        for field, old in cls.HF_FALLBACK.items():
            if field not in fields and old in hf:
                fields[field] = hf[old]
        try:
            if "n_head" not in keys and not cls.HAS_HEADS:
                cls._check_no_heads(hf.get("n_head", 1))
            return cls(**fields)
        except ValueError as e:  # the field, its value and what is accepted
            raise ValueError(f"config.json {str(e).removeprefix(cls.__name__ + '.')}") from e

    def to_hf(self) -> dict[str, Any]:
        """The fields of a Hugging Face `config.json` that describe this model (plus ours),
        with the Hugging Face options this family implements at their defaults."""
        fields = dataclasses.asdict(self)
        options = {k: ok[0] for k, ok in self.HF_SUPPORTED.items() if k not in fields}
        return {"model_type": self.model_type, **options,
                **{self.HF_NAMES.get(k, k): v for k, v in fields.items()}}


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def unexpected_names(name: str) -> tuple[str, ...]:
    """`torch_name_to_path` of a family without checkpoints: every name is unexpected."""
    return ("<unexpected>", name)


def kernels_transposed(path: tuple[str, ...]) -> bool:
    """`needs_transpose` of a family whose checkpoints hold torch `Linear` weights: those
    are `[out, in]`, a flax `Dense` kernel `[in, out]`."""
    return path[-1] == "kernel"


def _never_transposed(path: tuple[str, ...]) -> bool:
    return False


def _no_fresh_paths(config: Any) -> set[tuple[str, ...]]:
    return set()


def no_attention_weights(state: Mapping[str, Any]) -> tuple:
    """`attention_weights` of a family without attention (the baselines): no maps."""
    return ()


@dataclasses.dataclass(frozen=True)
class Family:
    """A family as its module declares it (`FAMILY = backbones.Family(...)`). Its `name`
    and `display_name` are its config class's `model_type` and `display_name`."""
    config_cls: type[BackboneConfig]
    module_cls: type
    presets: Mapping[str, BackboneConfig]
    param_group: Callable[[tuple[str, ...]], tuple[str, int | None] | None]
    param_shapes: Callable[[Any], dict]
    hub_repos: Mapping[str, str] = dataclasses.field(default_factory=dict)
    torch_name_to_path: Callable[[str], tuple[str, ...] | None] = unexpected_names
    needs_transpose: Callable[[tuple[str, ...]], bool] = _never_transposed
    fresh_paths: Callable[[Any], set[tuple[str, ...]]] = _no_fresh_paths
    attention_weights: Callable[[Mapping[str, Any]], tuple] = no_attention_weights
    # Whether FPT passes `lengths` ([batch] ints of right-padded token sequences) so that
    # the module keeps padding out of real positions: the bidirectional ones (BERT, ViT,
    # FNet, MLP-Mixer); the causal ones (GPT-2, LSTM) need not, padding comes after every
    # real position.
    takes_lengths: bool = False
    has_checkpoints: bool = True  # False: random init only (the baselines)
    # One block alone, for frozen blocks inside another model (models/blocks.py): its class,
    # called as `layers.stack` calls it, and where block i sits in the backbone's tree
    # ('h_{}', 'encoder/layer_{}'); None for a family whose blocks are not offered.
    block_cls: type | None = None
    block_path: str | None = None

    def __post_init__(self) -> None:
        # A slip in a declaration fails at import, not in the middle of a run.
        cls = self.config_cls
        if not issubclass(cls, BackboneConfig):
            raise TypeError(f"{cls.__name__} does not derive from backbones.BackboneConfig")
        wrong = [name for name, preset in self.presets.items() if not isinstance(preset, cls)]
        if wrong:
            raise TypeError(f"family {cls.model_type}: presets {wrong} are not {cls.__name__}s")
        if not set(self.hub_repos) <= set(self.presets):
            raise TypeError(f"family {cls.model_type}: hub repositories of no preset: "
                            f"{sorted(set(self.hub_repos) - set(self.presets))}")
        if self.hub_repos and not self.has_checkpoints:
            raise TypeError(f"family {cls.model_type} has hub repositories but no checkpoints")

    @property
    def name(self) -> str:
        return self.config_cls.model_type

    @property
    def display_name(self) -> str:
        return self.config_cls.display_name


@functools.cache
def family(name: str) -> Family:
    """The family named `name` (one of `_NAMES`); imports its module only."""
    if name not in _NAMES:
        raise ValueError(f"unknown backbone family {name!r}; accepted: {sorted(_NAMES)}")
    found = importlib.import_module(f"{__package__}.{name}").FAMILY
    if found.name != name:
        raise TypeError(f"{__package__}.{name}.FAMILY is the family {found.name!r}")
    return found


def families() -> list[Family]:
    return [family(name) for name in _NAMES]


def family_of(config: Any) -> Family:
    """The family whose config `config` is."""
    if isinstance(config, BackboneConfig):
        return family(config.model_type)
    raise TypeError(f"not a backbone config: {type(config).__name__}")


def preset_names() -> list[str]:
    return [name for f in families() for name in f.presets]


def family_of_preset(name: str) -> Family:
    """The family that has the preset `name`; the error lists every preset."""
    for f in map(family, _NAMES):  # in order, up to the one that has it (imports)
        if name in f.presets:
            return f
    raise ValueError(f"unknown model preset {name!r}; accepted: {preset_names()}, or 'auto' "
                     "(the architecture of the weights)")


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`(group, layer)` of a parameter path below the backbone, whichever family it is; the
    families' parameter names do not collide (tested)."""
    for name in _NAMES:  # in order: a GPT-2 run never imports the other families
        group = family(name).param_group(keys)
        if group is not None:
            return group
    return None
