"""GPT-2 as flax.linen modules, fed `inputs_embeds` (the FPT backbone).

Parameter names mirror the Hugging Face checkpoint (`wpe`, `h_{i}/attn/c_attn`, ...), so
loading pretrained weights is a rename and freezing is a rule on paths. The token
embedding `wte` is not part of the module: FPT brings its own input layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
from einops import rearrange
from flax.core import lift
from flax.core.scope import Scope

from fpt_jax import fast_rng

Dtype = Any

# Dropout masks are the bulk of jax.random's work here: fused on CPU too (same bits).
fast_rng.use_unrolled_threefry_on_cpu()

# Hugging Face's GPT-2 initialisation, so that `--init=random` is the paper's random model:
# normal(0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * n_layer).
_INIT_STD = 0.02


def _dense(features: int, dtype: Dtype, name: str, std: float = _INIT_STD) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
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

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPT2Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in GPT2_PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; accepted: {sorted(GPT2_PRESETS)}")
        return dataclasses.replace(GPT2_PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "GPT2Config":
        """Reads a Hugging Face GPT-2 `config.json` (as a dict)."""
        model_type = hf.get("model_type", "gpt2")
        missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in hf]
        if model_type != "gpt2" or missing:
            raise ValueError(f"config.json is not a GPT-2 config (model_type={model_type!r}"
                             f"{', missing ' + str(missing) if missing else ''}); accepted: "
                             "model_type 'gpt2' with n_layer, n_head, n_embd")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(
                f"config.json activation_function={act!r} is not supported; accepted: "
                "gelu_new, gelu_pytorch_tanh")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError("config.json options scale_attn_by_inverse_layer_idx / "
                             "reorder_and_upcast_attn are not supported")
        if not hf.get("scale_attn_weights", True):
            raise ValueError("config.json scale_attn_weights=false is not supported: this "
                             "GPT-2 always scales attention scores by 1/sqrt(head_dim)")
        return cls(
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf.get("vocab_size", 50257), n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            embd_pdrop=hf.get("embd_pdrop", 0.1), attn_pdrop=hf.get("attn_pdrop", 0.1),
            resid_pdrop=hf.get("resid_pdrop", 0.1),
        )

    def to_hf(self) -> dict[str, Any]:
        """The fields of a Hugging Face `config.json` that describe this model."""
        return dict(model_type="gpt2", n_layer=self.n_layer, n_head=self.n_head,
                    n_embd=self.n_embd, n_positions=self.n_positions,
                    vocab_size=self.vocab_size, n_inner=self.n_inner,
                    layer_norm_epsilon=self.layer_norm_epsilon, embd_pdrop=self.embd_pdrop,
                    attn_pdrop=self.attn_pdrop, resid_pdrop=self.resid_pdrop,
                    activation_function="gelu_new")


GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}


def _residual_std(cfg: GPT2Config) -> float:
    return _INIT_STD / (2 * cfg.n_layer) ** 0.5


class Attention(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool, query_positions: jax.Array | None = None):
        """Causal self-attention over `x` [b, t, d]; with `query_positions` ([b, r] ints)
        only those positions query (they still attend to every earlier key): [b, r, d]."""
        cfg = self.config
        qkv = _dense(3 * cfg.n_embd, self.dtype, "c_attn")(x)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=cfg.n_head)
        t = x.shape[1]
        if query_positions is None:
            causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        else:
            q = jnp.take_along_axis(q, query_positions[:, None, :, None], axis=2)
            causal = query_positions[:, None, :, None] >= jnp.arange(t)  # [b, 1, r, t]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(self.dtype)
        # Softmax in float32 even under bfloat16 compute: it is where precision is lost.
        scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        dropped = nn.Dropout(cfg.attn_pdrop)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bhqd", dropped.astype(self.dtype), v)
        out = rearrange(out, "b h t d -> b t (h d)")
        out = _dense(cfg.n_embd, self.dtype, "c_proj", _residual_std(cfg))(out)
        return nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), weights


class MLP(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = _dense(cfg.mlp_width, self.dtype, "c_fc")(x)
        h = nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" is the tanh approximation
        h = _dense(cfg.n_embd, self.dtype, "c_proj", _residual_std(cfg))(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
    """One GPT-2 block; returns the new hidden state, and the attention weights when
    `output_attentions` (only then: under remat an extra output would be one more
    `[batch, heads, seq, seq]` array per block)."""
    config: GPT2Config
    dtype: Dtype = jnp.float32
    deterministic: bool = True
    output_attentions: bool = False

    @nn.compact
    def __call__(self, x, query_positions: jax.Array | None = None):
        """`query_positions` ([b, r] ints): compute the block's output only there ([b, r, d]);
        keys and values still come from every position."""
        eps = self.config.layer_norm_epsilon
        a, weights = Attention(self.config, self.dtype, name="attn")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x), self.deterministic,
            query_positions)
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        x = x + a
        x = x + MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x), self.deterministic)
        return (x, weights) if self.output_attentions else x


# --- activation checkpointing -----------------------------------------------------------
#
# `nn.remat` (`jax.checkpoint`) saves no memory on XLA:CPU. JAX orders a block's
# recomputation after the cotangent of its output with an optimisation barrier over both,
# but XLA:CPU removes optimisation barriers early in its pipeline (`cse_barrier_expander`,
# right after CSE), long before scheduling. The recomputation then depends on the block's
# input and parameters only, and the CPU scheduler (concurrency-optimised by default) runs
# it as soon as they exist, in the forward pass, for every block: the step holds every block's
# activations as without remat, plus the recomputation's. Likewise, what depends on the
# parameters or the dropout keys only (the dropout bits of every block, broadcast layer-norm
# scales shared by the forward pass and the recomputation) is computed at the start and kept.
#
# `_remat` recomputes in a custom VJP instead, and ties, by a data dependence that no XLA
# pass removes (`_tie`), the recomputation's inputs (block input, parameters, dropout keys)
# to the cotangent of the block's output, and the forward pass's parameters and dropout
# keys to the block's input. Block i's recomputation can then only run once block i+1's
# backward has produced that cotangent, on any backend and scheduler: the step holds the
# block inputs plus one block's activations. Outputs, dropout masks and gradients are the
# plain block's (bit for bit in float32 under `jit`; in bfloat16 up to rounding, as with
# `nn.remat`). Unlike `nn.remat`, forward-mode autodiff (`jax.jvp`, `jacfwd`) is not supported.

def _zero_after(tree) -> jax.Array | None:
    """A float32 +0.0 that XLA can only compute once the first floating-point array of
    `tree` exists (None if there is none). NaN != NaN, so the product is +0.0 for any
    value, and XLA does not fold `x * 0.0` (it is NaN for an infinite or NaN `x`)."""
    leaves = [c for c in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(c.dtype, jnp.inexact) and c.size]
    if not leaves:
        return None
    first = leaves[0].reshape(-1)[0]
    return (first != first).astype(jnp.float32) * 0.0


def _tie(tree, zero: jax.Array):
    """`tree` unchanged bit for bit, but computed from `zero` (see `_zero_after`): arrays
    cannot be read before `zero` exists. Floating-point leaves are copied (`x - 0.0`) unless
    XLA fuses the subtraction into their consumers."""
    bits = jax.lax.bitcast_convert_type(zero, jnp.uint32)  # +0.0 -> 0

    def tie(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(a)
            return jax.random.wrap_key_data(tie(jax.random.key_data(a)), impl=impl)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return a - zero.astype(a.dtype)  # x - (+0.0) == x, -0.0 and NaN included
        if jnp.issubdtype(a.dtype, jnp.integer):
            return a ^ bits.astype(a.dtype)
        return a
    return jax.tree_util.tree_map(tie, tree)


def _tie_parameters(variables, zero: jax.Array, dtype: Dtype):
    """`_tie` on the parameters that the block reads through a computation of their own,
    which XLA would otherwise run ahead (and share between the forward pass and the
    recomputation): vectors, which are broadcast, and arrays that are converted to the
    compute `dtype`. Matrices that the matmuls read as they are stay untied: tying them
    would copy them."""
    def tie(a):
        if jnp.issubdtype(a.dtype, jnp.inexact) and a.ndim > 1 and a.dtype == dtype:
            return a
        return _tie(a, zero)
    return jax.tree_util.tree_map(tie, variables)


def _copy_counters(counters: dict) -> dict:
    """A copy of a flax scope's RNG counters (nested dicts; the keys are kept as they are)."""
    return {k: _copy_counters(v) if isinstance(v, dict) else v for k, v in counters.items()}


def _lifted_remat(fn, dtype: Dtype):
    """`flax.core.lift.checkpoint`, with the recomputation ordered after the cotangent of
    the output arrives (see the comment above); `dtype` is the block's compute dtype.
    Positional arguments only."""
    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        start = []  # the RNG counters before the first trace of `apply`

        def apply(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            # `apply` is traced more than once (forward, recomputation); each trace must
            # draw the same keys, so every trace starts from the same RNG counters.
            counters = [s.rng_counters for s in jax.tree_util.tree_leaves(
                scope, is_leaf=lambda x: isinstance(x, Scope))]
            if not start:
                start.extend(_copy_counters(c) for c in counters)
            else:
                for c, c0 in zip(counters, start):
                    c.clear()
                    c.update(_copy_counters(c0))
            y = fn(scope, *args)
            return y, repack_fn(scope)

        rematted = jax.custom_vjp(apply)

        def forward(variable_groups, rng_groups, *args):
            # Residuals: the inputs only; the activations are recomputed in `backward`.
            residuals = (variable_groups, rng_groups, args)
            zero = _zero_after(args)
            if zero is not None:  # nothing of the block before its input exists
                variable_groups = _tie_parameters(variable_groups, zero, dtype)
                rng_groups = _tie(rng_groups, zero)
            return apply(variable_groups, rng_groups, *args), residuals

        def backward(residuals, cotangent):
            variable_groups, rng_groups, args = residuals
            zero = _zero_after(cotangent)
            if zero is not None:
                variable_groups = _tie_parameters(variable_groups, zero, dtype)
                rng_groups, args = _tie((rng_groups, args), zero)
            _, vjp = jax.vjp(lambda v, *a: apply(v, rng_groups, *a), variable_groups, *args)
            variables_ct, *args_ct = vjp(cotangent)
            return (variables_ct, None, *args_ct)

        rematted.defvjp(forward, backward)
        return rematted(variable_groups, rng_groups, *args)

    return lift.pack(inner, (True,), (True,), (True,), name="remat")


def _remat(module_class, dtype: Dtype):
    """`nn.remat(module_class)` whose recomputation happens in the backward pass, one block
    at a time, on XLA:CPU too. Parameter names and dropout keys are those of `module_class`
    (the module is called with positional arguments only); `dtype` is its compute dtype."""
    return nn.transforms.lift_transform(_lifted_remat, module_class, dtype)


class GPT2(nn.Module):
    """GPT-2 without its token embedding: `[batch, seq, n_embd]` in, last hidden state out.

    `dtype` is the compute dtype (float32 or bfloat16); parameters are always float32.
    `remat` recomputes each block's activations in the backward pass (activation
    checkpointing, see `_remat`), trading compute for memory on long sequences and large
    presets: the train step keeps the block inputs plus one block's activations.

    `read_positions` ([batch, r] ints) returns the hidden states at those positions only
    ([batch, r, n_embd]) and computes the last block only there: a classifier that reads the
    last position skips the last block's attention output, MLP and final layer norm at every
    other position. Values and gradients are those of the whole model read afterwards.
    """
    config: GPT2Config
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool = True,
                 output_attentions: bool = False, read_positions: jax.Array | None = None):
        cfg = self.config
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.n_embd:
            raise ValueError(f"GPT2 expects inputs_embeds of shape [batch, seq, {cfg.n_embd}], "
                             f"got {inputs_embeds.shape}")
        seq = inputs_embeds.shape[1]
        if seq > cfg.n_positions:
            raise ValueError(f"sequence length {seq} exceeds the model's n_positions="
                             f"{cfg.n_positions}; shorten the input (e.g. larger patches)")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe",
                       embedding_init=nn.initializers.normal(_INIT_STD))
        x = inputs_embeds.astype(self.dtype) + wpe(jnp.arange(seq)).astype(self.dtype)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)
        block = _remat(Block, self.dtype) if self.remat else Block
        attentions = []
        for i in range(cfg.n_layer):
            if i == cfg.n_layer - 1 and read_positions is not None:
                # Recomputing the last block would buy nothing: its backward follows at once.
                out = Block(cfg, self.dtype, deterministic, output_attentions,
                            name=f"h_{i}")(x, read_positions)
            else:
                out = block(cfg, self.dtype, deterministic, output_attentions,
                            name=f"h_{i}")(x)
            if output_attentions:
                x, weights = out
                attentions.append(weights)
            else:
                x = out
        x = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        if output_attentions:
            return x, tuple(attentions)
        return x


def init_params(config: GPT2Config, rng: jax.Array, seq_len: int = 1) -> dict:
    """Randomly initialised backbone parameters (float32)."""
    dummy = jnp.zeros((1, seq_len, config.n_embd), jnp.float32)
    return GPT2(config).init(rng, dummy)["params"]


def param_shapes(config: GPT2Config) -> dict:
    """The backbone's parameter tree as `jax.ShapeDtypeStruct`s, without allocating it."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def num_params(config: GPT2Config, include_token_embedding: bool = False) -> int:
    """Parameter count; 85,842,432 for `gpt2`, 124,439,808 with the token embedding."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(param_shapes(config)))
    return n + (config.vocab_size * config.n_embd if include_token_embedding else 0)
