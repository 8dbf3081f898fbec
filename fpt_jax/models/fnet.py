"""FNet: GPT-2's block with attention replaced by a fixed Fourier mixing (the reservoir baseline).

What it is: FNet (Lee-Thorp et al. 2021, "FNet: Mixing Tokens with Fourier Transforms") in
GPT-2's shape. Each block is `x + Mix(ln_1(x))`, then `x + MLP(ln_2(x))` with GPT-2's MLP
(`gpt2.MLP`: `mlp/c_fc`, `mlp/c_proj`, gelu_new, residual-scaled init); the model around
the blocks is GPT-2's (`FNet` is `gpt2.GPT2` with these blocks: position table `wpe`,
embedding dropout, `ln_f`). The parameter names are GPT-2's minus `attn`, so the parameter
groups (pos, ln, mlp) and trainable selections are GPT-2's too.

Why: FPT at `init=random` freezes a random attention, which is a reservoir; the question is
whether frozen random attention is any better than a mixing with no parameters at all.
Frozen (`trainable='fpt'`) at random init this is that fixed-mixing reservoir.

The mixing, exactly: `y = Re(F_T x F_D)` with `F_N[k, j] = exp(-2 pi i k j / N)` over the
sequence (T) and hidden (D) axes, i.e. `numpy.fft.fft2(x).real`; for real `x`,
`y = C_T x C_D - S_T x S_D` with C, S the cosines and sines of the angles. It is computed
as two products (`mixed.einsum`: operands in the compute dtype, float32 accumulation, the
project's mixed-precision rule; `jnp.fft` takes no bfloat16): first over the sequence,
`[C_T x; S_T x]` (so a block trimmed to the read positions mixes only those rows), then
over the hidden axis with `[C_D; -S_D]`, both halves in one product. Under bfloat16 the
DFT matrices and the float32 intermediate enter the products rounded to bfloat16 (about
3 significant digits, as any frozen weight). Angles come from exact integer products,
`(k * j) mod N`, before the multiplication by 2 pi / N, so that large `k * j` lose no
precision. It has no parameters and no dropout.

It is bidirectional: every position sees every other. That is fine for FPT, whose head
reads the last position(s), except for right-padded token sequences, where the padding would
reach the real positions. How padding is masked: with `lengths` ([batch] ints, each in
[1, seq]; FPT passes them since the family `takes_lengths`), example b's sequence transform
is the DFT over its own length L_b: `C_T[b, q, t] = cos(2 pi ((q t) mod L_b) / L_b)` for
q, t < L_b and 0 otherwise (likewise S_T). The zero columns keep padding out of the real positions,
and a real position's value does not depend on how much padding follows; padded rows get
no mixing (the residual carries them, and nothing reads them).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from fpt_jax.models import backbones, gpt2, layers, mixed


@dataclasses.dataclass(frozen=True)
class FNetConfig(backbones.BackboneConfig):
    """GPT-2's sizes without the heads; the field names are the ones `gpt2.MLP` reads."""
    model_type = "fnet"
    display_name = "FNet"
    SIZES = ("n_inner",)
    DROPOUT_FIELDS = ("embd_pdrop", "resid_pdrop")
    HAS_HEADS = False  # `n_head` is a read-only 1 for the generic interface
    HF_SUPPORTED = {"activation_function": ("gelu_new",)}  # GPT-2's MLP
    # Only `to_hf`'s own files: Hugging Face's FNet (google/fnet-base: hidden_size, ...) is a
    # post-LN encoder with another layout, with nothing to load for this one.
    HF_REQUIRED = ("n_layer", "n_embd")
    HF_NOTE = " (Hugging Face's google/fnet-* models are a different architecture)"

    n_layer: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    # False: FNet's unnormalised transform (Re fft2), whose output is ~sqrt(T * D / 2) times
    # its unit-variance input, so that in this pre-LN block it swamps the residual stream
    # (the input layer's and position table's contribution) from the first block on. True:
    # the orthonormal transform (divided by sqrt(T * D), T the real length), which keeps the
    # stream's scale as GPT-2's small random-init attention output does.
    normalized: bool = False

    n_head = property(lambda self: 1)

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


FNET_PRESETS: dict[str, FNetConfig] = {
    "fnet": FNetConfig(n_layer=12, n_embd=768),  # gpt2's shape
    "fnet-medium": FNetConfig(n_layer=24, n_embd=1024),  # gpt2-medium's
    "fnet-orthonormal": FNetConfig(n_layer=12, n_embd=768, normalized=True),
}


# --- the mixing -------------------------------------------------------------------------

def _dft(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines and sines of the length-n DFT's angles, `[n, n]` float64, from exact integer
    angles `(k j) mod n`."""
    k = np.arange(n, dtype=np.int64)
    angle = 2 * np.pi * (np.outer(k, k) % n) / n
    return np.cos(angle), np.sin(angle)


# Static constants, cached: one array object per size, which a trace holds once however
# many blocks read it (a new array per block put n_layer copies into the program).
@functools.cache
def _hidden_matrix(d: int) -> np.ndarray:
    """`[C_D; -S_D]`, `[2, d, d]` float32."""
    cos, sin = _dft(d)
    return np.stack([cos, -sin]).astype(np.float32)


@functools.cache
def _sequence_matrix(t: int) -> np.ndarray:
    """`[C_T; S_T]` as `[t, 2, t]` float32 (output row, cos/sin, input position)."""
    return np.stack(_dft(t), axis=1).astype(np.float32)


def _sequence_dft(rows: jax.Array, seq: int, lengths: jax.Array) -> jax.Array:
    """`[C_T; S_T]` rows of each example's DFT over its own length, `[b, r, 2, seq]` float32:
    `rows` [b, r] output positions, `lengths` [b]; zero where the row or column is >= the
    length. Built in the graph from integer products (lengths are traced)."""
    n = lengths[:, None, None]
    q, t = rows[:, :, None], jnp.arange(seq)[None, None, :]
    angle = (2 * jnp.pi / n.astype(jnp.float32)) * ((q * t) % n).astype(jnp.float32)
    keep = (q < n) & (t < n)
    # where, not a product: a length of 0 gives NaN angles, which must not leak.
    return jnp.stack([jnp.where(keep, jnp.cos(angle), 0.0),
                      jnp.where(keep, jnp.sin(angle), 0.0)], axis=2)


def fourier_mix(x: jax.Array, dtype: Dtype = jnp.float32, lengths: jax.Array | None = None,
                rows: jax.Array | None = None) -> jax.Array:
    """`Re(fft2(x))` over the sequence and hidden axes of `x` [b, t, d], float32 [b, t, d].

    `lengths` ([b] ints): example b is transformed over its first `lengths[b]` positions
    only, and rows past it are 0. `rows` ([b, r] ints): only those output rows, [b, r, d].
    Products take `dtype` operands and accumulate in float32.
    """
    b, seq, d = x.shape
    if lengths is None and rows is None:
        # One static matrix for the whole batch: v = [C_T x; S_T x], [b, t, 2, d].
        v = mixed.einsum("qst,btd->bqsd", _sequence_matrix(seq), x, dtype)
    else:
        if rows is None:
            rows = jnp.broadcast_to(jnp.arange(seq), (b, seq))
        if lengths is None:
            lengths = jnp.full((b,), seq)
        seq_dft = _sequence_dft(rows, seq, lengths)
        v = mixed.einsum("bqst,btd->bqsd", seq_dft, x, dtype)
    # C_T x C_D - S_T x S_D in one product: the hidden matrices stacked as [C_D; -S_D].
    return mixed.einsum("bqsd,sde->bqe", v, _hidden_matrix(d), dtype)


# --- the model --------------------------------------------------------------------------

class Block(nn.Module):
    config: FNetConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True  # an attribute: `remat` passes positional arguments only

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """`query_positions` ([b, r] ints): the block's output only there ([b, r, d]); the
        mixing still reads every (real) position."""
        eps = self.config.layer_norm_epsilon
        mix = fourier_mix(nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x), self.dtype,
                          lengths, query_positions)
        if self.config.normalized:  # the orthonormal DFT over each example's real length
            length = (jnp.full((x.shape[0],), x.shape[1]) if lengths is None else lengths)
            mix = mix * jax.lax.rsqrt(length * x.shape[-1] * 1.0)[:, None, None]
        if query_positions is not None:
            x = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
        x = x + mix.astype(self.dtype)
        return x + gpt2.MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x), self.deterministic)


class FNet(gpt2.GPT2):
    """FNet without a token embedding: `[batch, seq, n_embd]` in, last hidden state out.

    GPT-2's model (`gpt2.GPT2`: position table `wpe`, embedding dropout, the blocks `h_{i}`,
    `ln_f`) with FNet's blocks: `dtype` is the compute dtype (parameters float32), `remat`
    recomputes each block in the backward pass, `read_positions` ([batch, r] ints) returns
    `[batch, r, n_embd]` and computes the last block only there. `lengths` ([batch] ints,
    in [1, seq]) masks right padding (module docstring).
    """
    config: FNetConfig
    block = Block


init_params, param_shapes, num_params = layers.param_functions(FNet)


# No attention, so no attention weights; no checkpoint of this layout exists, so every
# state-dict name is unexpected.
attention_weights = backbones.no_attention_weights
torch_name_to_path = backbones.unexpected_names


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """GPT-2's groups (pos, ln, mlp) for GPT-2's names; None for attention, which FNet
    lacks, and for anything else."""
    group = gpt2.param_group(keys)
    return None if group is None or group[0] == "attn" else group


# Random init only (no checkpoints); bidirectional, so right padding is masked with `lengths`.
FAMILY = backbones.Family(
    config_cls=FNetConfig, module_cls=FNet, presets=FNET_PRESETS, param_group=param_group,
    param_shapes=param_shapes, takes_lengths=True, has_checkpoints=False)
