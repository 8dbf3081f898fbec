"""The paper's LSTM baseline: stacked layer-normalised LSTMs fed `inputs_embeds`.

A backbone family (models/backbones.py), so FPT's input layer and output head, the config,
the sweep and the benchmark serve it as they serve the transformers; the head reads the
last position(s). The original code's baseline is 3 layers of width 768, every parameter
trained, learning rate 3e-4 (`fpt_jax/baselines.py` has it as a per-task variant).

The cell is the original code's `LayerNormLSTM` (after Ba et al. 2016, eqs. 20-22), gates
in the order i, f, o, g:

    a_t = LN_x(W_x x_t + b_x) + LN_h(W_h h_{t-1} + b_h)            [4H]
    c_t = LN_c(sigmoid(f_t) * c_{t-1} + sigmoid(i_t) * tanh(g_t))   (the normalised cell
    h_t = sigmoid(o_t) * tanh(c_t)                                    is the one carried)

Where it differs from the original, on purpose: the initial state is zero (the original
draws a random Xavier-normal (h_0, c_0) at every forward pass, noise in every prediction);
layer norms use the biased variance with scale 1 and bias 0 at init (the original's
`torch.var` is unbiased and a blanket reset draws its scales from U(+-1/sqrt(n))); dropout
is applied between layers, on each layer's output sequence (the original drops h_t in place
inside the recurrence, which also perturbs the carried state). Weights and biases start
from U(+-1/sqrt(H)) as in PyTorch's LSTM.

Speed: each layer's input projection `LN_x(W_x x + b_x)` is one product over every time step
before the recurrence; `lax.scan` (flax's `nn.scan`) then runs only the `[b, H] x [H, 4H]`
product, two layer norms and the gates per step. That loop is latency-bound: T dependent
small products (batch 4: a [4, 768] x [768, 3072] product per step) that cannot fill a
matrix unit, where a transformer does one large product per layer.

Mixed precision: the products take compute-dtype operands with float32 accumulation
(`mixed`); the gates, layer norms and the carried (h, c) stay float32 (a bfloat16 state
would round at every one of T steps).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from fpt_jax.models import layers, mixed
from fpt_jax.models.fpt import torch_uniform_init

HAS_CHECKPOINTS = False  # random init only
_NO_POSITION_LIMIT = 2 ** 31 - 1  # a recurrence reads any length


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    n_layer: int = 3
    n_embd: int = 768  # the hidden (and cell) width of every layer
    dropout: float = 0.1  # between layers
    layer_norm_epsilon: float = 1e-6  # the original's
    n_head: int = 1  # no heads; the generic backbone interface names it

    def __post_init__(self):
        for name in ("n_layer", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"LSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head != 1:
            raise ValueError(f"an LSTM has no attention heads: n_head={self.n_head}; accepted: "
                             "1 (leave n_head unset)")

    @property
    def n_positions(self) -> int:
        return _NO_POSITION_LIMIT

    @classmethod
    def preset(cls, name: str, **overrides) -> "LSTMConfig":
        if name not in LSTM_PRESETS:
            raise ValueError(f"unknown LSTM preset {name!r}; accepted: {sorted(LSTM_PRESETS)}")
        return dataclasses.replace(LSTM_PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LSTMConfig":
        if hf.get("model_type") != "lstm":
            raise ValueError(f"not an LSTM config (model_type={hf.get('model_type')!r})")
        return cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})

    def to_hf(self) -> dict[str, Any]:
        return dict(model_type="lstm", **dataclasses.asdict(self))

    def with_dropout(self, rate: float) -> "LSTMConfig":
        return dataclasses.replace(self, dropout=rate)


LSTM_PRESETS: dict[str, LSTMConfig] = {"lstm": LSTMConfig()}


def _layer_norm(cfg: LSTMConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.layer_norm_epsilon, dtype=jnp.float32, name=name)


def _projection(cfg: LSTMConfig, dtype: Dtype, name: str) -> mixed.Dense:
    init = torch_uniform_init(cfg.n_embd)
    return mixed.Dense(4 * cfg.n_embd, dtype=dtype, kernel_init=init, bias_init=init,
                       out_dtype=jnp.float32, name=name)


class Cell(nn.Module):
    """One time step: `((h, c), a_x) -> ((h, c), h)`, `a_x` the normalised input projection."""
    config: LSTMConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], a_x: jax.Array):
        h, c = carry
        a = a_x + _layer_norm(self.config, "ln_h2h")(_projection(self.config, self.dtype,
                                                                  "h2h")(h))
        i, f, o, g = jnp.split(a, 4, axis=-1)
        c = _layer_norm(self.config, "ln_cell")(jax.nn.sigmoid(f) * c
                                               + jax.nn.sigmoid(i) * jnp.tanh(g))
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h.astype(self.dtype)


class Layer(nn.Module):
    """`[b, t, d] -> [b, t, H]`: the input projection for every step, then the recurrence."""
    config: LSTMConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        a_x = _layer_norm(cfg, "ln_i2h")(_projection(cfg, self.dtype, "i2h")(x))
        scan = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1, out_axes=1)
        zeros = jnp.zeros((x.shape[0], cfg.n_embd), jnp.float32)
        _, h = scan(cfg, self.dtype, name="cell")((zeros, zeros), a_x)
        return h


class LSTM(nn.Module):
    """`n_layer` LN-LSTM layers over `[batch, seq, n_embd]`: every hidden state, or those at
    `read_positions` ([batch, r] ints) when given (`[batch, r, n_embd]`; the recurrence runs
    over the whole sequence either way). No position table: order is the recurrence's."""
    config: LSTMConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array, deterministic: bool = True,
                 read_positions: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        layers.check_inputs("LSTM", inputs_embeds, cfg.n_embd)  # no position limit
        if self.remat:
            raise ValueError("remat is not supported by the LSTM baseline (its scan keeps one "
                             "[batch, 4 * width] gate vector per step); set remat=False")
        x = inputs_embeds.astype(self.dtype)
        for i in range(cfg.n_layer):
            if i:
                x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
            x = Layer(cfg, self.dtype, name=f"lstm_{i}")(x)
        if read_positions is not None:
            x = jnp.take_along_axis(x, read_positions[:, :, None], axis=1)
        return x


init_params, param_shapes, num_params = layers.param_functions(LSTM)


def torch_name_to_path(name: str) -> tuple[str, ...] | None:
    """No checkpoint of this baseline exists: every name is unexpected."""
    return ("<unexpected>", name)


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`('lstm_1', 'cell', 'ln_h2h', 'scale')` -> ('ln', 1); the products -> ('lstm', i)."""
    m = re.fullmatch(r"lstm_(\d+)", keys[0])
    if not m or len(keys) < 2:
        return None
    return ("ln" if any(k.startswith("ln_") for k in keys[1:]) else "lstm"), int(m.group(1))


def attention_weights(state: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """An LSTM has no attention: no maps."""
    return ()
