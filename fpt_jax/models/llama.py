"""Llama-family decoders (Hugging Face `LlamaModel`) as flax.linen modules fed `inputs_embeds`.

RMSNorm before attention and MLP, rotary position embeddings (with Llama 3's and linear
`rope_scaling`), a SwiGLU MLP and grouped-query attention (`num_key_value_heads` key/value
heads, each serving a group of query heads). Mistral (a sliding attention window) and Qwen2
(biases on the query, key and value projections) are this module with their differences as
config data (models/mistral.py, models/qwen2.py).

Parameter names are Hugging Face's below `model.` (`layers_{i}/self_attn/q_proj`, `mlp/
gate_proj`, `input_layernorm`, `norm`), so loading is a rename (torch `Linear` kernels
transposed). The token embedding and LM head are not part of the module: FPT brings its own
input and output layers.

Positions: these models have no learned position table (RoPE rotates queries and keys). FPT's
`pos` group is a learned table `input_positions` ([n_positions, hidden]) added to the input,
initialised to zero, so that the model starts as the checkpoint's and the group trains
as GPT-2's `wpe` does; no checkpoint holds it (`fresh_paths`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax.typing import Dtype

from fpt_jax.models import backbones, layers, mixed

# rope_type -> the keys it needs besides rope_type (Hugging Face's `rope_scaling`).
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def llama3_scaling(factor: float, original: int = 8192) -> tuple[tuple[str, Any], ...]:
    """Llama 3.1 / 3.2's `rope_scaling` with the published frequency factors (1 and 4)."""
    return (("factor", factor), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", original), ("rope_type", "llama3"))


@dataclasses.dataclass(frozen=True)
class LlamaConfig(backbones.BackboneConfig):
    """Hugging Face's `LlamaConfig` fields and defaults, plus `n_positions` (the rows of
    FPT's learned position table). `rope_scaling` is held as sorted (key, value) pairs."""
    model_type = "llama"
    display_name = "Llama"
    GENERIC = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_embd": "hidden_size", "mlp_width": "intermediate_size"}
    SIZES = ("num_key_value_heads", "head_dim")
    DROPOUT_FIELDS = ("attention_dropout",)
    HF_SUPPORTED = {"hidden_act": ("silu",), "pretraining_tp": (1,)}

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    hidden_act: str = "silu"
    vocab_size: int = 32000  # only for parameter counts: FPT does not use the token embedding
    tie_word_embeddings: bool = False  # likewise (whether the LM head is the embedding)
    initializer_range: float = 0.02
    n_positions: int = 1024  # ours: FPT's learned position table, the longest input

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        super().__post_init__()
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"{type(self).__name__}.num_attention_heads="
                             f"{self.num_attention_heads} must be divisible by "
                             f"num_key_value_heads={self.kv_heads}")
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"{type(self).__name__}.rope_scaling rope_type={kind!r} is not "
                             f"supported; accepted: {sorted(ROPE_TYPES)}")
        missing = [k for k in ROPE_TYPES[kind] if k not in scaling]
        if missing:
            raise ValueError(f"{type(self).__name__}.rope_scaling: rope_type {kind!r} needs "
                             f"{missing}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """As the base; a new head count without a new key/value head count keeps the
        preset's group size (query heads per key/value head) where it divides, else every
        head its own key/value head."""
        heads = overrides.get("n_head", overrides.get("num_attention_heads"))
        if heads is not None and "num_key_value_heads" not in overrides:
            base = backbones.family(cls.model_type).presets.get(name)
            group = base.num_attention_heads // base.kv_heads if base is not None else 1
            overrides["num_key_value_heads"] = heads // group if heads % group == 0 else heads
        return super().preset(name, **overrides)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    # The differences of the other families, as properties they override.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def out_bias(self) -> bool:
        return self.attention_bias

    @property
    def window(self) -> int | None:
        return None

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Self:
        """As the base, with RoPE read from either layout: `rope_theta` + `rope_scaling`
        (the checkpoints on the hub) or `rope_parameters` (files written by transformers 5)."""
        hf = dict(hf)
        params = hf.pop("rope_parameters", None)
        if isinstance(params, Mapping):
            params = dict(params)
            hf.setdefault("rope_theta", params.pop("rope_theta", cls.rope_theta))
            if params.get("rope_type", params.get("type", "default")) != "default":
                hf.setdefault("rope_scaling", params)
        if isinstance(hf.get("rope_scaling"), Mapping):  # theta has its own field
            hf["rope_scaling"] = dict(hf["rope_scaling"])
            theta = hf["rope_scaling"].pop("rope_theta", None)
            if theta is not None:
                hf.setdefault("rope_theta", theta)
        heads, width = hf.get("num_attention_heads"), hf.get("hidden_size")
        if heads and width and hf.get("head_dim") == width // heads:
            hf.pop("head_dim")  # the default, written out by newer files: one config either way
        return super().from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return out


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """RoPE's inverse frequencies [head_size / 2] (float32), scaled as `rope_scaling` says
    (Hugging Face's `ROPE_INIT_FUNCTIONS` for default, linear and llama3)."""
    d = cfg.head_size
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    s = dict(cfg.rope_scaling or ())
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        old = s["original_max_position_embeddings"]
        low, high = old / s["low_freq_factor"], old / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low, inv / s["factor"], inv)
        smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"]
                                                           - s["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = ~(wavelen < high) & ~(wavelen > low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotary(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., head_size] (float32) at integer `positions` [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(cfg))
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, t, h, d] rotated by cos, sin ([t, d] or [b, t, d]), in float32, as x's dtype."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    turned = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + turned * sin).astype(x.dtype)


def _dense(cfg: LlamaConfig, features: int, dtype: Dtype, name: str, bias: bool) -> mixed.Dense:
    return mixed.Dense(features, dtype=dtype, name=name, use_bias=bias,
                       kernel_init=nn.initializers.normal(cfg.initializer_range))


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool,
                 query_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        """Causal grouped-query attention over `x` [b, t, d]; with `query_positions` ([b, r]
        ints) only those rows query (rotated at their own positions): [b, r, d]."""
        cfg, d = self.config, self.config.head_size
        split = functools.partial(rearrange, pattern="b t (h d) -> b t h d", d=d)
        xq = x if query_positions is None else jnp.take_along_axis(
            x, query_positions[:, :, None], axis=1)
        q = split(_dense(cfg, cfg.num_attention_heads * d, self.dtype, "q_proj", cfg.qkv_bias)(xq))
        k = split(_dense(cfg, cfg.kv_heads * d, self.dtype, "k_proj", cfg.qkv_bias)(x))
        v = split(_dense(cfg, cfg.kv_heads * d, self.dtype, "v_proj", cfg.qkv_bias)(x))
        cos, sin = rotary(cfg, jnp.arange(x.shape[1]))
        k = rotate(k, cos, sin)
        q = rotate(q, *((cos, sin) if query_positions is None else
                        rotary(cfg, query_positions)))
        out = layers.attention(self, q, k, v, dropout=cfg.attention_dropout,
                               deterministic=deterministic, dtype=self.dtype, causal=True,
                               query_positions=query_positions, lengths=lengths,
                               window=cfg.window)
        return _dense(cfg, cfg.hidden_size, self.dtype, "o_proj", cfg.out_bias)(out)


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, self.dtype, "gate_proj", cfg.mlp_bias)(x)
        up = _dense(cfg, cfg.intermediate_size, self.dtype, "up_proj", cfg.mlp_bias)(x)
        return _dense(cfg, cfg.hidden_size, self.dtype, "down_proj", cfg.mlp_bias)(
            nn.silu(gate) * up)


def _norm(cfg: LlamaConfig, dtype: Dtype, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=dtype, name=name)


class Block(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True  # an attribute: `remat` passes positional arguments only

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        a = Attention(self.config, self.dtype, name="self_attn")(
            _norm(self.config, self.dtype, "input_layernorm")(x), self.deterministic,
            query_positions, lengths)
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        x = x + a
        return x + MLP(self.config, self.dtype, name="mlp")(
            _norm(self.config, self.dtype, "post_attention_layernorm")(x))


class Llama(nn.Module):
    """A Llama-family decoder without its token embedding: `[batch, seq, hidden_size]` in,
    the final-normed hidden state out (in `dtype`; parameters float32). `remat` and
    `read_positions` as for GPT-2 (models/gpt2.py)."""
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool = True,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        layers.check_inputs(cfg.display_name, inputs_embeds, cfg.hidden_size, cfg.n_positions,
                            lengths=lengths)
        table = nn.Embed(cfg.n_positions, cfg.hidden_size, name="input_positions",
                         embedding_init=nn.initializers.zeros)
        x = (inputs_embeds.astype(self.dtype)
             + table(jnp.arange(inputs_embeds.shape[1])).astype(self.dtype))
        x = layers.stack(Block, cfg, self.dtype, self.remat, deterministic, x, read_positions,
                         prefix="layers_", lengths=lengths)
        return _norm(cfg, self.dtype, "norm")(x)


init_params, param_shapes, _num_params = layers.param_functions(Llama)


def num_params(config: LlamaConfig) -> int:
    """The backbone's parameter count, FPT's position table included."""
    return _num_params(config)


def published_count(config: LlamaConfig) -> int:
    """The count a model card gives: the decoder without FPT's position table, plus the
    token embedding and (untied) the LM head. 134,515,008 for `smollm-135m`."""
    embeddings = config.vocab_size * config.hidden_size
    heads = 1 if config.tie_word_embeddings else 2
    return _num_params(config) - config.n_positions * config.hidden_size + heads * embeddings


def attention_weights(state: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """Every layer's attention weights `[batch, heads, query, key]`, in layer order."""
    return layers.attention_weights(state, "layers_")


# --- Hugging Face state dicts and parameter groups -----------------------------------------

_LAYER = re.compile(r"^layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
                    r"|input_layernorm|post_attention_layernorm)\.(weight|bias)$")
# The token embedding, the LM head and old checkpoints' RoPE buffers: not parameters here.
_IGNORED = re.compile(r"^(embed_tokens\.weight|lm_head\.weight"
                      r"|layers\.\d+\.self_attn\.rotary_emb\.inv_freq)$")


def torch_name_to_path(name: str) -> tuple[str, ...] | None:
    """`model.layers.3.self_attn.q_proj.weight` -> ('layers_3', 'self_attn', 'q_proj',
    'kernel'); None for keys to ignore, ('<unexpected>', name) for others."""
    short = name.removeprefix("model.")
    if _IGNORED.match(short):
        return None
    if short == "norm.weight":
        return ("norm", "scale")
    if m := _LAYER.match(short):
        index, module, leaf = m.groups()
        if module.endswith("layernorm"):
            return (f"layers_{index}", module, "scale") if leaf == "weight" else (
                "<unexpected>", name)
        return (f"layers_{index}", *module.split("."), "kernel" if leaf == "weight" else "bias")
    return ("<unexpected>", name)


def fresh_paths(config: LlamaConfig) -> set[tuple[str, ...]]:
    """FPT's position table: in no checkpoint, initialised by the run (to zero)."""
    return {("input_positions", "embedding")}


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`(group, layer)` of a path below the backbone: ('layers_3', 'self_attn', 'q_proj',
    'kernel') -> ('attn', 3); None when the path is not a Llama-family one."""
    keys = tuple(str(getattr(k, "key", k)) for k in keys)
    if keys == ("input_positions", "embedding"):
        return "pos", None
    if keys == ("norm", "scale"):
        return "ln", None
    m = re.fullmatch(r"layers_(\d+)", keys[0]) if len(keys) > 2 else None
    if m is None:
        return None
    if keys[1] in ("input_layernorm", "post_attention_layernorm"):
        return "ln", int(m.group(1))
    group = {"self_attn": "attn", "mlp": "mlp"}.get(keys[1])
    return (group, int(m.group(1))) if group else None


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "smollm-135m": LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
        vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=llama3_scaling(32.0), vocab_size=128256,
        tie_word_embeddings=True),
    "llama-3.1-8b": LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=llama3_scaling(8.0), vocab_size=128256),
}
HUB_REPOS = {"smollm-135m": "HuggingFaceTB/SmolLM-135M",
             "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
             "llama-3.1-8b": "meta-llama/Llama-3.1-8B"}


def family(config_cls: type[LlamaConfig], presets: Mapping[str, LlamaConfig],
           hub_repos: Mapping[str, str]) -> backbones.Family:
    """The `Family` of a Llama-family config class (Llama, Mistral, Qwen2): one module,
    conversion and grouping. Causal: padding follows every real position."""
    return backbones.Family(
        config_cls=config_cls, module_cls=Llama, presets=presets, hub_repos=hub_repos,
        torch_name_to_path=torch_name_to_path, needs_transpose=backbones.kernels_transposed,
        fresh_paths=fresh_paths, param_group=param_group, param_shapes=param_shapes,
        attention_weights=attention_weights, block_cls=Block, block_path="layers_{}")


FAMILY = family(LlamaConfig, LLAMA_PRESETS, HUB_REPOS)
