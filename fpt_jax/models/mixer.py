"""MLP-Mixer reservoir: GPT-2's block with attention replaced by a token-mixing MLP.

What it is: the token-mixing MLP of MLP-Mixer (Tolstikhin et al. 2021, "MLP-Mixer: An
all-MLP Architecture for Vision") in GPT-2's shape. Each block is `x + TokenMix(ln_1(x))`,
then `x + MLP(ln_2(x))` with GPT-2's MLP (`gpt2.MLP`: `mlp/c_fc`, `mlp/c_proj`, gelu_new,
residual-scaled init); the model around the blocks is GPT-2's (`Mixer` is `gpt2.GPT2` with
these blocks: position table `wpe`, embedding dropout, `ln_f`).

Why: FPT at `init=random` freezes a random attention, which is a reservoir; FNet
(models/fnet.py) freezes a mixing with no parameters. This is the third: a frozen random
mixing *with* parameters that is not attention (no input-dependent weights). Frozen
(`trainable='fpt'`) at random init it is that reservoir.

The mixing, exactly: for `x` [b, T, d] (one block's `ln_1` output), along the token axis
and shared by every channel,

    TokenMix(x)[t] = sum_k W2[k, t] gelu(sum_s W1[s, k] x[s] + b1[k]) + b2[t]

with `W1` [P, Dt], `b1` [Dt], `W2` [Dt, P], `b2` [P] sized for the model's longest sequence
P = `n_positions`: a sequence of T <= P tokens uses the first T rows of W1 and the first T
columns of W2 (and of b2), as the position table gives it its first T rows. `Dt` is
`n_token_inner`, by default `n_embd // 2`, MLP-Mixer's own ratio (Mixer-S/B/L: token-mixing
width D_S = D / 2, e.g. 384 at 768): a width tied to the model's width, not to P, so the
preset's reservoir is a fixed object whatever the task's length. gelu is the tanh
approximation (flax's and MLP-Mixer's `nn.gelu`, GPT-2's gelu_new). Both products go
through `mixed.einsum` (operands in the compute dtype, float32 accumulation).

Initialisation: MLP-Mixer's (flax `nn.Dense`'s defaults: lecun-normal kernels, fan-in the
full table's, P for W1 and Dt for W2, zero biases), not GPT-2's normal(0.02) with the
residual scaling. W1 sums over T tokens (10 on Bit XOR), not 768 channels, so GPT-2's
scales leave a branch that barely mixes: measured on unit-variance input at 768 wide, the
branch's std is 0.0026 at T = 10 (0.031 at 1024), against 0.034 for GPT-2's random
attention output; MLP-Mixer's give 0.047 at T = 10 and 0.65 at 1024 (its own unit-scale
branch, where attention averages down to 0.006). The trainable `ln_1` (`fpt` trains `ln`)
rescales the mixing's input either way.

Padding: the mixing is bidirectional (every position reads every other, as in MLP-Mixer),
which is fine for FPT, whose head reads the last position(s), except for right-padded token
sequences. With `lengths` ([b] ints, each in [1, T]; FPT passes them since the family
`takes_lengths`) the padded positions are zeroed in W1's input, so `W1`'s rows past an
example's length read nothing: a real position's value is independent of the padding after
it and of how much there is. (A causal token MLP has no [T, T] matrix to mask: the gelu sits
between W1 and W2, so causality would need per-output hidden units, T times the cost, or
hidden units tied to positions, which is no longer MLP-Mixer.) Padded rows still get W2's
output (nothing reads them: the next block masks them again, the head reads real ones).

Parameter names and groups: the token-mixing weights are `h_{i}/attn/token_mix/{w1, b1, w2,
b2}`, under the `attn` name of the GPT-2 block slot they fill, so they are the `attn`
group: `trainable='fpt'` freezes them with the MLPs, `full` trains them, and `attn[-2:]`
selects the last two blocks' mixing, so every trainable selection keeps its meaning. The
rest are GPT-2's names (`wpe`, `ln_1`, `ln_2`, `mlp`, `ln_f`) and groups (pos, ln, mlp).
No checkpoint of this layout exists: random init only (`has_checkpoints=False`), and
`init=pretrained` is refused by `TrainConfig.check`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fpt_jax.models import backbones, gpt2, layers, mixed


@dataclasses.dataclass(frozen=True)
class MixerConfig(backbones.BackboneConfig):
    """GPT-2's sizes without the heads, plus the token-mixing width; the field names are the
    ones `gpt2.MLP` reads."""
    model_type = "mixer"
    display_name = "MLP-Mixer"
    SIZES = ("n_inner", "n_token_inner")
    DROPOUT_FIELDS = ("embd_pdrop", "resid_pdrop")
    HAS_HEADS = False  # `n_head` is a read-only 1 for the generic interface
    HF_SUPPORTED = {"activation_function": ("gelu_new",)}  # GPT-2's MLP
    # Only `to_hf`'s own files: Hugging Face has no MLP-Mixer of this layout to load.
    HF_REQUIRED = ("n_layer", "n_embd")

    n_layer: int = 12
    n_embd: int = 768
    n_positions: int = 1024  # P: the token-mixing tables' rows (W1) and columns (W2)
    n_inner: int | None = None  # channel MLP width; None means 4 * n_embd
    n_token_inner: int | None = None  # Dt, token-mixing width; None means n_embd // 2
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1  # on both residual branches, as GPT-2's attention and MLP

    n_head = property(lambda self: 1)

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def token_mlp_width(self) -> int:
        return self.n_token_inner if self.n_token_inner is not None else max(1, self.n_embd // 2)


MIXER_PRESETS: dict[str, MixerConfig] = {
    "mixer": MixerConfig(n_layer=12, n_embd=768),  # gpt2's shape, Dt = 384
}


# --- the mixing -------------------------------------------------------------------------

def token_mix(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array,
              dtype: Dtype = jnp.float32, rows: jax.Array | None = None) -> jax.Array:
    """MLP-Mixer's token-mixing MLP of `x` [b, T, d] along T, float32 [b, T, d]: `w1` [P, Dt],
    `b1` [Dt], `w2` [Dt, P], `b2` [P] with P >= T, of which the first T rows / columns are
    used. `rows` ([b, r] ints): only those output positions, [b, r, d] (the hidden units
    still read every position). Products take `dtype` operands, accumulate in float32."""
    seq = x.shape[1]
    # The weights first: XLA:CPU (jax 0.10) refuses "btd,tk->bkd" with bfloat16 operands and
    # a float32 result ("Unsupported element type for DotThunk"), "tk,btd->bkd" runs.
    hidden = mixed.einsum("tk,btd->bkd", w1[:seq], x, dtype)  # [b, Dt, d]
    hidden = nn.gelu((hidden + b1.astype(jnp.float32)[:, None]).astype(dtype),
                     approximate=True)
    if rows is None:
        out = mixed.einsum("kt,bkd->btd", w2[:, :seq], hidden, dtype)
        return out + b2[:seq].astype(jnp.float32)[:, None]
    # Only W2's columns at the read rows: the trimmed last block's output.
    out = mixed.einsum("kbr,bkd->brd", jnp.take(w2, rows, axis=1), hidden, dtype)
    return out + b2[rows].astype(jnp.float32)[:, :, None]


class TokenMix(nn.Module):
    """The token-mixing MLP's parameters (`w1`, `b1`, `w2`, `b2`) and `token_mix`."""
    config: MixerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        p, dt = self.config.n_positions, self.config.token_mlp_width
        kernel, zeros = nn.initializers.lecun_normal(), nn.initializers.zeros
        w1 = self.param("w1", kernel, (p, dt), jnp.float32)  # fan-in P
        b1 = self.param("b1", zeros, (dt,), jnp.float32)
        w2 = self.param("w2", kernel, (dt, p), jnp.float32)  # fan-in Dt
        b2 = self.param("b2", zeros, (p,), jnp.float32)
        return token_mix(x, w1, b1, w2, b2, self.dtype, rows)


class Mixing(nn.Module):
    """The block's `attn` slot: padding masked out of the token mixing, residual dropout."""
    config: MixerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        if lengths is not None:  # padded positions read as 0 by W1 (module docstring)
            x = jnp.where(jnp.arange(x.shape[1])[:, None] < lengths[:, None, None], x, 0)
        out = TokenMix(self.config, self.dtype, name="token_mix")(x, query_positions)
        out = out.astype(self.dtype)
        return nn.Dropout(self.config.resid_pdrop)(out, deterministic=deterministic)


# --- the model --------------------------------------------------------------------------

class Block(nn.Module):
    config: MixerConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True  # an attribute: `remat` passes positional arguments only

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """`query_positions` ([b, r] ints): the block's output only there ([b, r, d]); the
        mixing still reads every (real) position."""
        eps = self.config.layer_norm_epsilon
        mix = Mixing(self.config, self.dtype, name="attn")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x), self.deterministic,
            lengths, query_positions)
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        x = x + mix
        return x + gpt2.MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x), self.deterministic)


class Mixer(gpt2.GPT2):
    """The MLP-Mixer reservoir without a token embedding: `[batch, seq, n_embd]` in, last
    hidden state out.

    GPT-2's model (`gpt2.GPT2`: position table `wpe`, embedding dropout, the blocks `h_{i}`,
    `ln_f`) with token-mixing blocks: `dtype` is the compute dtype (parameters float32),
    `remat` recomputes each block in the backward pass, `read_positions` ([batch, r] ints)
    returns `[batch, r, n_embd]` and computes the last block only there. `lengths` ([batch]
    ints, in [1, seq]) masks right padding (module docstring).
    """
    config: MixerConfig
    block = Block


init_params, param_shapes, num_params = layers.param_functions(Mixer)


# No attention weights to draw; no checkpoint of this layout exists, so every state-dict
# name is unexpected.
attention_weights = backbones.no_attention_weights
torch_name_to_path = backbones.unexpected_names


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """GPT-2's groups (pos, ln, attn, mlp) for this family's names: `h_{i}/attn/token_mix/...`
    is ('attn', i); None for GPT-2's attention (`attn/c_attn`, ...) and anything else."""
    group = gpt2.param_group(keys)
    if group is not None and group[0] == "attn" and keys[2:3] != ("token_mix",):
        return None
    return group


# Random init only (no checkpoints); bidirectional, so right padding is masked with `lengths`.
FAMILY = backbones.Family(
    config_cls=MixerConfig, module_cls=Mixer, presets=MIXER_PRESETS, param_group=param_group,
    param_shapes=param_shapes, takes_lengths=True, has_checkpoints=False)
