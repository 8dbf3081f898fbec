"""GPT-2 as flax.linen modules, fed `inputs_embeds` (the FPT backbone).

Parameter names mirror the Hugging Face checkpoint (`wpe`, `h_{i}/attn/c_attn`, ...), so
loading pretrained weights is a rename and freezing is a rule on paths. The token
embedding `wte` is not part of the module: FPT brings its own input layer.

Attention weights (maps) are asked for one way: apply with `intermediates` mutable.

    y, state = GPT2(config).apply({"params": params}, x, mutable=["intermediates"])
    maps = attention_weights(state)  # n_layer arrays [batch, heads, query, key], float32
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
from fpt_jax.models.layers import INTERMEDIATES, weights_requested  # noqa: F401 (re-exported)

# Hugging Face's GPT-2 initialisation, so that `init='random'` is the paper's random model:
# normal(0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * n_layer).
_INIT_STD = 0.02


def _dense(features: int, dtype: Dtype, name: str, std: float = _INIT_STD) -> mixed.Dense:
    return mixed.Dense(features, dtype=dtype, name=name,
                       kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros)


@dataclasses.dataclass(frozen=True)
class GPT2Config(backbones.BackboneConfig):
    """Hugging Face's `GPT2Config` field names and defaults (gpt2), which are the generic
    names the rest of the project reads."""
    model_type = "gpt2"
    display_name = "GPT-2"
    SIZES = ("n_inner",)
    DROPOUT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")
    # The values of Hugging Face GPT-2 options that this module implements (first: default).
    HF_SUPPORTED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                    "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                    "reorder_and_upcast_attn": (False,)}
    HF_REQUIRED = ("n_layer", "n_head", "n_embd")
    HF_FALLBACK = {"n_positions": "n_ctx"}  # older files
    HF_UNTYPED = True  # older files carry no model_type

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257  # only for parameter counts: FPT does not use the token embedding
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}
HUB_REPOS = {name: f"openai-community/{name}" for name in GPT2_PRESETS}


def _residual_std(cfg: GPT2Config) -> float:
    return _INIT_STD / (2 * cfg.n_layer) ** 0.5


def attention_weights(state: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """Every block's attention weights `[batch, heads, query, key]`, in layer order, from the
    `state` of `apply(..., mutable=["intermediates"])` on a `GPT2` or a model holding one."""
    return layers.attention_weights(state, "h_")


class Attention(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 query_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        """Causal self-attention over `x` [b, t, d]; with `query_positions` ([b, r] ints)
        only those positions query (they still attend to every earlier key): [b, r, d].
        `lengths` ([b] ints): keys at or after an example's length are masked."""
        cfg = self.config
        # Both built first, whichever path runs: their names (Dropout_0/1) fix their keys.
        attn_dropout, resid_dropout = nn.Dropout(cfg.attn_pdrop), nn.Dropout(cfg.resid_pdrop)
        qkv = _dense(3 * cfg.n_embd, self.dtype, "c_attn")(x)
        # split, not a reshape and index: the gradient is then one concatenation of
        # dq, dk, dv, where indexing gives three zero-padded copies and two adds.
        q, k, v = (rearrange(a, "b t (h d) -> b t h d", h=cfg.n_head)
                   for a in jnp.split(qkv, 3, axis=-1))
        if query_positions is not None:
            q = jnp.take_along_axis(q, query_positions[:, :, None, None], axis=1)
        # Heads first in the explicit path: the training step's program from before the fused
        # path (the same bits in float32).
        out = layers.attention(self, q, k, v, dropout=attn_dropout, deterministic=deterministic,
                               dtype=self.dtype, causal=True, query_positions=query_positions,
                               lengths=lengths, heads_first=True)
        out = _dense(cfg.n_embd, self.dtype, "c_proj", _residual_std(cfg))(out)
        return resid_dropout(out, deterministic=deterministic)


class MLP(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _dense(cfg.mlp_width, self.dtype, "c_fc")(x)
        h = nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" is the tanh approximation
        h = _dense(cfg.n_embd, self.dtype, "c_proj", _residual_std(cfg))(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    deterministic: bool = True  # an attribute: `remat` passes positional arguments only

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """`query_positions` ([b, r] ints): compute the block's output only there ([b, r, d]);
        keys and values still come from every position (before `lengths`, when given)."""
        eps = self.config.layer_norm_epsilon
        a = Attention(self.config, self.dtype, name="attn")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x), self.deterministic,
            query_positions, lengths)
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        x = x + a
        return x + MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x), self.deterministic)


class GPT2(nn.Module):
    """GPT-2 without its token embedding: `[batch, seq, n_embd]` in, last hidden state out.

    `dtype` is the compute dtype (float32 or bfloat16); parameters are always float32.
    `remat` recomputes each block in the backward pass (`models/remat.py`): the train step
    keeps the block inputs plus one block's activations, for long sequences and large presets.

    `read_positions` ([batch, r] ints) returns the hidden states there only ([batch, r,
    n_embd]) and computes the last block only there (its attention output, MLP, final layer
    norm; its attention weights have r query rows): the values and gradients of the whole
    model read afterwards, for fewer FLOPs when a classifier reads the last position.
    """
    config: GPT2Config
    dtype: Dtype = jnp.float32
    remat: bool = False
    # The blocks `h_{i}` (a class attribute, not a module field): FNet is this model with
    # the attention of its blocks replaced (models/fnet.py).
    block = Block

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool = True,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        layers.check_inputs(type(self).__name__, inputs_embeds, cfg.n_embd, cfg.n_positions,
                            lengths=lengths)
        seq = inputs_embeds.shape[1]
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe",
                       embedding_init=nn.initializers.normal(_INIT_STD))
        x = inputs_embeds.astype(self.dtype) + wpe(jnp.arange(seq)).astype(self.dtype)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)
        x = layers.stack(self.block, cfg, self.dtype, self.remat, deterministic, x,
                         read_positions, prefix="h_", lengths=lengths)
        return nn.LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)


init_params, param_shapes, _num_params = layers.param_functions(GPT2)


def num_params(config: GPT2Config, include_token_embedding: bool = False) -> int:
    """Parameter count; 85,842,432 for `gpt2`, 124,439,808 with the token embedding."""
    extra = config.vocab_size * config.n_embd if include_token_embedding else 0
    return _num_params(config) + extra


# --- Hugging Face names and parameter groups ----------------------------------------------

_LEAF = {"weight": "kernel", "bias": "bias"}
_LN_LEAF = {"weight": "scale", "bias": "bias"}
# The token embedding (FPT brings its own input layer), the LM head and attention-mask
# buffers: real checkpoints carry them, the backbone has no such parameters.
_IGNORED = re.compile(r"^(wte\.weight|lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")


def torch_name_to_path(name: str) -> tuple[str, ...] | None:
    """`h.0.attn.c_attn.weight` -> ('h_0', 'attn', 'c_attn', 'kernel'); None for ignored
    keys, ('<unexpected>', name) for keys that are not GPT-2's. Hugging Face's `Conv1D`
    stores `[in, out]`, the layout of a Flax `Dense` kernel: nothing is transposed."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if _IGNORED.match(name):
        return None
    parts = name.split(".")
    if parts[0] == "wpe" and len(parts) == 2 and parts[1] == "weight":
        return ("wpe", "embedding")
    if parts[0] == "h" and len(parts) >= 4 and parts[1].isdigit():
        module, leaf = parts[2:-1], parts[-1]
        table = _LN_LEAF if module[0].startswith("ln_") else _LEAF
        if leaf in table:
            return (f"h_{parts[1]}", *module, table[leaf])
    if parts[0] == "ln_f" and len(parts) == 2 and parts[1] in _LN_LEAF:
        return ("ln_f", _LN_LEAF[parts[1]])
    return ("<unexpected>", name)


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`(group, layer)` of a path below the backbone: ('h_3', 'attn', 'c_attn', 'kernel') ->
    ('attn', 3); None when the path is not GPT-2's."""
    if keys[0] == "wpe":
        return "pos", None
    if keys[0] == "ln_f":
        return "ln", None
    m = re.fullmatch(r"h_(\d+)", keys[0])
    if m and len(keys) > 1:
        if keys[1].startswith("ln_"):
            return "ln", int(m.group(1))
        if keys[1] in ("attn", "mlp"):
            return keys[1], int(m.group(1))
    return None


# Causal: no `lengths` (padding follows every real position); Hugging Face's `Conv1D`
# kernels load as they are (no transpose); every parameter is in the checkpoints.
FAMILY = backbones.Family(
    config_cls=GPT2Config, module_cls=GPT2, presets=GPT2_PRESETS, hub_repos=HUB_REPOS,
    torch_name_to_path=torch_name_to_path, param_group=param_group, param_shapes=param_shapes,
    attention_weights=attention_weights, block_cls=Block, block_path="h_{}")
