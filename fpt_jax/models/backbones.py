"""Backbone families: transformers that map `[batch, seq, width]` to `[batch, seq, width]`.

FPT takes any of them as its `transformer`. Each family is a module of `fpt_jax.models`
that brings, under the same names:
  * a config dataclass with Hugging Face's `from_hf` / `to_hf`, `preset(name, **overrides)`
    (overrides by the generic names `n_layer`, `n_head`, `n_embd`), `with_dropout(rate)`
    and the generic sizes `n_layer`, `n_head`, `n_embd`, `n_positions`;
  * the flax module, `Module(config, dtype, remat)(inputs_embeds, deterministic,
    read_positions[, lengths])`, whose last block is computed only at `read_positions` when
    given;
  * its Hugging Face conversion: `torch_name_to_path(name)` (a state-dict key -> our path
    below the backbone, None to ignore, ('<unexpected>', name) otherwise), `needs_transpose`
    (torch `Linear` kernels are `[out, in]`), `fresh_paths(config)` (parameters that no
    checkpoint holds and that start from the run's own initialisation);
  * `param_group(keys)` -> (group, layer) of a path below the backbone, None if not its own:
    so trainable selections, count tables, the benchmark and sweeps work for every family;
  * optionally `TAKES_LENGTHS = True`: the module takes `lengths` ([batch] ints) for
    right-padded token sequences and keeps the padding out of the real positions.
The baselines (`fnet`: attention replaced by fixed Fourier mixing; `lstm`: layer-normalised
LSTM) are families too, with no checkpoint to convert (`torch_name_to_path` refuses).
The family is named by the preset (`model`) or, for pretrained weights, by `config.json`'s
`model_type`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping

# family name (= Hugging Face model_type) -> module, config class, module class, presets,
# the name in messages
_FAMILIES = {"gpt2": ("fpt_jax.models.gpt2", "GPT2Config", "GPT2", "GPT2_PRESETS", "GPT-2"),
             "bert": ("fpt_jax.models.bert", "BertConfig", "Bert", "BERT_PRESETS", "BERT"),
             "vit": ("fpt_jax.models.vit", "ViTConfig", "ViT", "VIT_PRESETS", "ViT"),
             # the baselines: a fixed Fourier-mixing transformer and an LSTM (no checkpoints)
             "fnet": ("fpt_jax.models.fnet", "FNetConfig", "FNet", "FNET_PRESETS", "FNet"),
             "lstm": ("fpt_jax.models.lstm", "LSTMConfig", "LSTM", "LSTM_PRESETS", "LSTM")}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    module_cls: type
    presets: Mapping[str, Any]
    hub_repos: Mapping[str, str]
    torch_name_to_path: Callable[[str], tuple[str, ...] | None]
    needs_transpose: Callable[[tuple[str, ...]], bool]
    fresh_paths: Callable[[Any], set[tuple[str, ...]]]
    param_group: Callable[[tuple[str, ...]], tuple[str, int | None] | None]
    param_shapes: Callable[[Any], dict]
    attention_weights: Callable[[Mapping[str, Any]], tuple]
    # Whether FPT passes `lengths` ([batch] ints of right-padded token sequences) so that
    # the module keeps padding out of real positions: the bidirectional ones (BERT, ViT,
    # FNet); the causal ones (GPT-2, LSTM) need not, padding comes after every real position.
    takes_lengths: bool = False
    has_checkpoints: bool = True  # False: random init only (the baselines)
    display_name: str = ""  # the family's name in messages (GPT-2, BERT, ...)


@functools.cache
def family(name: str) -> Family:
    """The family named `name` (gpt2, bert, vit)."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; accepted: {sorted(_FAMILIES)}")
    module_name, config_name, module_cls, presets, display = _FAMILIES[name]
    m = importlib.import_module(module_name)
    return Family(name, getattr(m, config_name), getattr(m, module_cls), getattr(m, presets),
                  getattr(m, "HUB_REPOS", {}), m.torch_name_to_path,
                  getattr(m, "needs_transpose", lambda path: False),
                  getattr(m, "fresh_paths", lambda config: set()), m.param_group,
                  m.param_shapes, m.attention_weights, getattr(m, "TAKES_LENGTHS", False),
                  getattr(m, "HAS_CHECKPOINTS", True), display)


def families() -> list[Family]:
    return [family(name) for name in _FAMILIES]


def family_of(config: Any) -> Family:
    """The family whose config class `config` is."""
    for name in _FAMILIES:
        if isinstance(config, family(name).config_cls):
            return family(name)
    raise TypeError(f"not a backbone config: {type(config).__name__}")


def preset_names() -> list[str]:
    return [name for f in families() for name in f.presets]


def family_of_preset(name: str) -> Family:
    """The family that has the preset `name`; the error lists every preset."""
    for f in families():
        if name in f.presets:
            return f
    raise ValueError(f"unknown model preset {name!r}; accepted: {preset_names()}, or 'auto' "
                     "(the architecture of the weights)")


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`(group, layer)` of a parameter path below the backbone, whichever family it is; the
    families' parameter names do not collide (tested)."""
    for name in _FAMILIES:  # in order: a GPT-2 run never imports the other families
        group = family(name).param_group(keys)
        if group is not None:
            return group
    return None
