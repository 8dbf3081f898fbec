"""The Frozen Pretrained Transformer: input layer -> backbone -> output head.

As the paper and the original code define it: a new input layer (linear, orthogonal init
with gain 1.41 and zero bias, optional ReLU hidden layers; or an embedding table for
token-id tasks), dropout, the backbone's blocks fed `inputs_embeds` (GPT-2, or another
family of `models/backbones.py`), and a linear output head (optional hidden layers) read
at the last position(s).

Parameter tree: `input/...`, `transformer/...` (the family's Hugging Face names, e.g.
GPT-2's `wpe, h_i, ln_f`), `blocks/...` (frozen blocks of another model, when appended:
models/blocks.py), `output/...`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from fpt_jax.models import mixed
from fpt_jax.models import backbones
from fpt_jax.models.blocks import FrozenBlocks
from fpt_jax.models.gpt2 import weights_requested

# The rng stream of noise a backbone draws at every forward pass, evaluation included (the
# original LSTM's random initial state; dropout is "dropout", drawn in training only). The
# steps pass it to every model: a family that draws none leaves it unused.
NOISE_RNG = "noise"

# PyTorch's nn.Linear default, which the original's output head uses.
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_uniform_init(fan_in: int):
    """PyTorch's `nn.Linear` bias init (and its LSTM's every weight): U(-1/sqrt(fan_in), +)."""
    bound = 1 / fan_in ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                     bound)


class InputLayer(nn.Module):
    """Linear layers (orthogonal init, zero bias) from token features to the model width."""
    sizes: Sequence[int]
    width: int
    orth_gain: float | None
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        kernel_init = (nn.initializers.orthogonal(self.orth_gain) if self.orth_gain is not None
                       else _torch_linear_init)
        for i, size in enumerate(self.sizes):
            x = mixed.Dense(size, dtype=self.dtype, kernel_init=kernel_init,
                         bias_init=nn.initializers.zeros, name=f"hidden_{i}")(x)
            x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=deterministic)
        return mixed.Dense(self.width, dtype=self.dtype, kernel_init=kernel_init,
                        bias_init=nn.initializers.zeros, name="proj")(x)


class OutputHead(nn.Module):
    """Linear layers from the model width to the task's logits (PyTorch's default init)."""
    sizes: Sequence[int]
    features: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        for i, size in enumerate((*self.sizes, self.features)):
            x = mixed.Dense(size, dtype=self.dtype, kernel_init=_torch_linear_init,
                         bias_init=torch_uniform_init(x.shape[-1]),
                         name="proj" if i == len(self.sizes) else f"hidden_{i}")(x)
            if i < len(self.sizes):
                x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=deterministic)
        return x


class FPT(nn.Module):
    """FPT over `x`: `[B, T, F]` real features (F a multiple of `input_dim`: each row is
    split into F / input_dim patch tokens) or `[B, T]` token ids (`input_kind='tokens'`).

    Returns `[B, ratio * output_dim]` logits of the last `ratio` positions (the patches of
    the last row) when `return_last_only`, else `[B, T * ratio, output_dim]`. With `length`
    ([B] ints, for right-padded token sequences) the last position is `length - 1`, which
    under causal attention has never seen the padding.

    `trim_last_block`: when only the last positions are read, the backbone's last block is
    computed only there (`GPT2(read_positions=...)`): the same values and gradients for
    fewer FLOPs (about 10/12 of one block at the Bit XOR and CIFAR-10 shapes). With dropout,
    the masks of the trimmed block are drawn for the read positions only.

    Attention weights: apply with `mutable=["intermediates"]` and read them with
    the family's `attention_weights(state)`; the last block is then computed at every position, so
    every map is `[B, heads, T * ratio, T * ratio]`.
    """
    config: Any  # a backbone family's config (models/backbones.py)
    input_dim: int
    output_dim: int
    input_kind: str = "real"
    in_layer_sizes: Sequence[int] = ()
    out_layer_sizes: Sequence[int] = ()
    dropout: float = 0.1
    orth_gain: float | None = 1.41
    return_last_only: bool = True
    dtype: Any = jnp.float32
    remat: bool = False
    trim_last_block: bool = True
    # Frozen blocks of another model after the backbone (models/blocks.py): their config
    # (n_layer = how many), or None. With them the backbone runs at every position and the
    # blocks' last one is the block computed at the read positions only.
    blocks: Any = None
    # The input layer's output (after its dropout), the positions as the backbone would
    # see them: what the alignment stage measures (fpt_jax/align.py). No other parameter
    # is touched, so names and dropout draws are those of the whole model.
    stop_after_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, length: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        width = self.config.n_embd
        if self.input_kind == "tokens":
            if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"token task input must be int [batch, seq], got {x.dtype} "
                                 f"{x.shape}")
            h = nn.Embed(self.input_dim, width, name="input")(x).astype(self.dtype)
            ratio = 1
        elif self.input_kind == "real":
            if x.ndim != 3:
                raise ValueError(f"real-valued input must be [batch, seq, features], got "
                                 f"{x.shape}")
            if x.shape[-1] % self.input_dim:
                raise ValueError(f"input feature size {x.shape[-1]} is not a multiple of the "
                                 f"patch size input_dim={self.input_dim}")
            ratio = x.shape[-1] // self.input_dim
            x = rearrange(x, "b t (r d) -> b (t r) d", d=self.input_dim)
            h = InputLayer(self.in_layer_sizes, width, self.orth_gain, self.dropout,
                           self.dtype, name="input")(x, deterministic)
        else:
            raise ValueError(f"input_kind must be 'real' or 'tokens', got {self.input_kind!r}")
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        if self.stop_after_input:
            return h

        read = None  # [B, r] positions the head reads
        if self.return_last_only:
            if length is not None:
                if ratio != 1:
                    raise ValueError("length is only supported for one token per row")
                read = (length - 1)[:, None]
            else:
                t = h.shape[1]
                read = jnp.broadcast_to(jnp.arange(t - ratio, t), (h.shape[0], ratio))
        # Attention maps cover every query position: no trimmed last block when they are asked for.
        trim = read is not None and self.trim_last_block and not weights_requested(self)
        family = backbones.family_of(self.config)
        # Right-padded token sequences: a family that mixes every position (BERT, ViT, FNet)
        # masks the padding with `lengths`; causal ones never see it at a real position.
        extra = {"lengths": length} if length is not None and family.takes_lengths else {}
        h = family.module_cls(self.config, self.dtype, self.remat, name="transformer")(
            h, deterministic=deterministic,
            read_positions=read if trim and self.blocks is None else None, **extra)
        if self.blocks is not None:
            h = FrozenBlocks(self.blocks, width, self.dtype, self.remat, name="blocks")(
                h, deterministic, read if trim else None, length)
        if read is not None and not trim:
            h = jnp.take_along_axis(h, read[:, :, None], axis=1)
        logits = OutputHead(self.out_layer_sizes, self.output_dim, self.dropout, self.dtype,
                            name="output")(h, deterministic).astype(jnp.float32)
        if self.return_last_only:
            logits = rearrange(logits, "b r o -> b (r o)")
        return logits


def make_model(settings: Any, task: Any, config: Any, blocks: Any = None) -> FPT:
    """FPT for `task` (its input kind and sizes) over the backbone `config`, with the FPT
    settings of `settings` (a `TrainConfig`: layer sizes, dropout, gain, dtype, remat) and
    the config of the frozen `blocks` appended (None: none)."""
    return FPT(config, input_dim=task.input_dim, output_dim=task.output_dim,
               input_kind=task.input_kind, in_layer_sizes=tuple(settings.in_layer_sizes),
               out_layer_sizes=tuple(settings.out_layer_sizes), dropout=settings.dropout,
               orth_gain=settings.orth_gain, dtype=jnp.dtype(settings.dtype),
               remat=settings.remat, blocks=blocks)
