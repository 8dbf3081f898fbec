"""ViT encoders (Hugging Face `ViTModel`) as flax.linen modules, fed `inputs_embeds`.

FPT brings its own input layer (no patch convolution, no class token) and, as the original
code, a new position table of `n_positions` (1,024) rows, normal(0.02), trainable (`pos`),
never loaded (the checkpoint's has 197): the parameter `embeddings/position_embeddings`
`[n_positions, n_embd]`, as HF's (not an `nn.Embed`). The other names are the checkpoint's,
so loading is a rename (`torch_name_to_path`). Pre-LN, exact GELU, bidirectional attention;
numerics as gpt2.py (products through `mixed`, layer norms and softmax in float32).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from flax.typing import Dtype

from fpt_jax.models import backbones, layers, mixed

HUB_REPOS = {"vit-base": "google/vit-base-patch16-224"}
# HF draws Linear kernels from a normal(0.02) truncated at 2 std; the plain normal(0.02) of
# gpt2.py differs from it in the 5% tail only. Biases zero, layer norms (1, 0) as HF.
_INIT_STD = 0.02
_dense = functools.partial(mixed.Dense, kernel_init=nn.initializers.normal(_INIT_STD),
                           bias_init=nn.initializers.zeros)


@dataclasses.dataclass(frozen=True)
class ViTConfig(backbones.BackboneConfig):
    """Hugging Face's `ViTConfig` field names and defaults (vit-base), plus `n_positions`;
    `from_hf` ignores image_size, patch_size, num_channels (FPT brings its input layer)."""
    model_type = "vit"
    display_name = "ViT"
    # The generic names (read by the rest of the project) -> ViT's fields: read-only
    # properties, and preset overrides take either name.
    GENERIC = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_embd": "hidden_size", "mlp_width": "intermediate_size"}
    DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    HF_SUPPORTED = {"hidden_act": ("gelu",), "qkv_bias": (True,)}  # what this module implements

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact (erf) GELU
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    n_positions: int = 1024  # rows of FPT's new position table


VIT_PRESETS: dict[str, ViTConfig] = {
    "vit-base": ViTConfig(),  # google/vit-base-patch16-224, the paper's ViT
    "vit-small": ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "vit-tiny": ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768),
}


def attention_weights(state: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """Every layer's attention weights `[batch, heads, query, key]` (float32), in layer
    order, from the `state` of `apply(..., mutable=["intermediates"])`."""
    return layers.attention_weights(state, "layer_")


class SelfAttention(nn.Module):
    """HF's `ViTSelfAttention`: query/key/value and bidirectional attention, heads merged.
    With `query_positions` ([b, r] ints) only those rows query, over every key: [b, r, d]."""
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 query_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        heads = lambda a: rearrange(a, "b t (h d) -> b t h d", h=cfg.n_head)  # noqa: E731
        xq = x if query_positions is None else jnp.take_along_axis(
            x, query_positions[:, :, None], axis=1)  # project only the rows that query
        q = heads(_dense(cfg.n_embd, dtype=self.dtype, name="query")(xq))
        k = heads(_dense(cfg.n_embd, dtype=self.dtype, name="key")(x))
        v = heads(_dense(cfg.n_embd, dtype=self.dtype, name="value")(x))
        return layers.attention(self, q, k, v, dropout=cfg.attention_probs_dropout_prob,
                                deterministic=deterministic, dtype=self.dtype, lengths=lengths,
                                heads_first=True)


class _Dense(nn.Module):
    """HF's `ViTIntermediate` (a Linear `dense`, exact GELU) and `ViTSelfOutput`/`ViTOutput`
    (`dense`, hidden dropout): modules of their own for HF's names."""
    features: int
    dtype: Dtype = jnp.float32
    gelu: bool = False
    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        x = _dense(self.features, dtype=self.dtype, name="dense")(x)
        if self.gelu:
            return nn.gelu(x, approximate=False)
        return nn.Dropout(self.rate)(x, deterministic=deterministic)


class Attention(nn.Module):
    """HF's `ViTAttention`: `attention` (self-attention), then `output` (projection)."""
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 query_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        h = SelfAttention(self.config, self.dtype, name="attention")(x, deterministic,
                                                                      query_positions, lengths)
        return _Dense(self.config.n_embd, self.dtype, rate=self.config.hidden_dropout_prob,
                      name="output")(h, deterministic)


class Layer(nn.Module):
    """HF's pre-LN `ViTLayer`; with `query_positions` ([b, r] ints) the output at those
    rows only ([b, r, d]), keys and values still from every position (before `lengths[b]`,
    when given)."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True  # an attribute: `remat` passes positional arguments only

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        cfg, det = self.config, self.deterministic
        ln = functools.partial(nn.LayerNorm, cfg.layer_norm_eps, dtype=self.dtype)
        a = Attention(cfg, self.dtype, name="attention")(ln(name="layernorm_before")(x), det,
                                                         query_positions, lengths)
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        x = x + a
        h = _Dense(cfg.intermediate_size, self.dtype, gelu=True, name="intermediate")(
            ln(name="layernorm_after")(x), det)
        return x + _Dense(cfg.n_embd, self.dtype, rate=cfg.hidden_dropout_prob,
                          name="output")(h, det)


class Embeddings(nn.Module):
    """FPT's new position table added to the inputs, then hidden dropout."""
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        table = self.param("position_embeddings", nn.initializers.normal(_INIT_STD),
                           (cfg.n_positions, cfg.n_embd), jnp.float32)
        x = inputs_embeds.astype(self.dtype) + table[:inputs_embeds.shape[1]].astype(self.dtype)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class Encoder(nn.Module):
    """The layers `layer_{i}`; with `read_positions`, the last one computed only there."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        return layers.stack(Layer, self.config, self.dtype, self.remat, deterministic, x,
                            read_positions, lengths=lengths)


class ViT(nn.Module):
    """ViT's encoder without patch embedding and class token: `[batch, seq, n_embd]` in,
    final-LayerNorm'd last hidden state out (`dtype`: compute dtype; parameters float32).
    `remat` recomputes each layer in the backward pass (`models/remat.py`).
    `read_positions` ([batch, r] ints) returns only those positions ([batch, r, n_embd]) and
    computes the last layer only there, with the values and gradients of the full model.
    `lengths` ([batch] ints, in [1, seq]): right-padded sequences' real lengths, masked out
    of every key so that padding never reaches a real position."""
    config: ViTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool = True,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        layers.check_inputs("ViT", inputs_embeds, cfg.n_embd, cfg.n_positions, lengths=lengths)
        x = Embeddings(cfg, self.dtype, name="embeddings")(inputs_embeds, deterministic)
        x = Encoder(cfg, self.dtype, self.remat, name="encoder")(x, deterministic, read_positions,
                                                                  lengths)
        return nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)


# num_params: the new position table included; 85,842,432 for `vit-base`.
init_params, param_shapes, num_params = layers.param_functions(ViT)


# A layer's modules -> (our path below `encoder/layer_{i}`, group), by their names in the
# checkpoint files (which `save_pretrained` still writes) and in transformers >= 5's modules
# (a live model's `state_dict()`).
_QKV = ("query", "key", "value")
_LAYER_MODULES = {
    "layernorm_before": (("layernorm_before",), "ln"),
    "layernorm_after": (("layernorm_after",), "ln"),
    **{f"attention.attention.{n}": (("attention", "attention", n), "attn") for n in _QKV},
    **{f"attention.{n[0]}_proj": (("attention", "attention", n), "attn") for n in _QKV},
    "attention.output.dense": (("attention", "output", "dense"), "attn"),
    "attention.o_proj": (("attention", "output", "dense"), "attn"),
    "intermediate.dense": (("intermediate", "dense"), "mlp"),
    "mlp.fc1": (("intermediate", "dense"), "mlp"),
    "output.dense": (("output", "dense"), "mlp"), "mlp.fc2": (("output", "dense"), "mlp"),
}
_LEAVES = {"ln": {"weight": "scale", "bias": "bias"}}  # otherwise {weight: kernel, bias: bias}
_LAYER_KEY = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")
# The input side FPT replaces (class/mask token, patch convolution, the 197-row position
# table) and heads (pooler, classifier, the masked-image-modeling decoder).
_IGNORED = re.compile(r"embeddings\.(cls_token|mask_token|position_embeddings|patch_embeddings"
                      r"\..+)|(pooler|classifier|decoder)\..+")


def torch_name_to_path(name: str) -> tuple[str, ...] | None:
    """HF state-dict key -> our path below the backbone: `encoder.layer.3.attention.attention.
    query.weight` -> ('encoder', 'layer_3', 'attention', 'attention', 'query', 'kernel'). A
    `vit.` prefix (ViTForImageClassification) is accepted; None for keys FPT does not use;
    ('<unexpected>', name) for anything else. Kernels need a transpose (`needs_transpose`)."""
    key = name.removeprefix("vit.")
    if _IGNORED.fullmatch(key):
        return None
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _LAYER_MODULES:
        module, group = _LAYER_MODULES[m.group(2)]
        leaf = _LEAVES.get(group, {"weight": "kernel", "bias": "bias"})[m.group(3)]
        return ("encoder", f"layer_{m.group(1)}", *module, leaf)
    if key in ("layernorm.weight", "layernorm.bias"):
        return ("layernorm", _LEAVES["ln"][key.split(".")[1]])
    return ("<unexpected>", name)


needs_transpose = backbones.kernels_transposed  # torch `Linear` weights


def fresh_paths(config: ViTConfig) -> set[tuple[str, ...]]:
    """Our paths that no checkpoint supplies, to be freshly initialised rather than reported
    missing: FPT's new position table."""
    return {("embeddings", "position_embeddings")}


_BLOCK_GROUPS = {(*module, leaf): group for module, group in _LAYER_MODULES.values()
                 for leaf in (("scale", "bias") if group == "ln" else ("kernel", "bias"))}


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`(group, layer)` of a path below the backbone; None for a path that is not ViT's
    (GPT-2's; BERT's own `attention/self`, `LayerNorm`, `token_type_embeddings`). ViT and
    BERT share `intermediate/dense`, `output/dense`, `attention/output/dense`: alike in both."""
    keys = tuple(str(getattr(k, "key", k)) for k in keys)
    if keys == ("embeddings", "position_embeddings"):
        return "pos", None
    if keys in (("layernorm", "scale"), ("layernorm", "bias")):
        return "ln", None
    m = re.fullmatch(r"layer_(\d+)", keys[1]) if len(keys) > 2 and keys[0] == "encoder" else None
    if m and keys[2:] in _BLOCK_GROUPS:
        return _BLOCK_GROUPS[keys[2:]], int(m.group(1))
    return None


# Bidirectional: right padding is masked out of the keys with `lengths`.
FAMILY = backbones.Family(
    config_cls=ViTConfig, module_cls=ViT, presets=VIT_PRESETS, hub_repos=HUB_REPOS,
    torch_name_to_path=torch_name_to_path, needs_transpose=needs_transpose,
    fresh_paths=fresh_paths, param_group=param_group, param_shapes=param_shapes,
    attention_weights=attention_weights, takes_lengths=True, block_cls=Layer,
    block_path="encoder/layer_{}")
