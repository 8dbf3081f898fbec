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

By default it differs from the original on purpose, and each difference is an
`LSTMConfig` option that restores the original's behaviour (the preset `lstm-original` has
all four; the row `lstm_original` in fpt_jax/rows.py also freezes the recurrence as the
original code does):
  * `initial_state`: 'zero' (default), or 'random' as the original, a Xavier-normal (h_0, c_0)
    (std sqrt(2 / (H + H)), 0.036 at H=768) drawn per layer at every forward pass,
    evaluation included, from the rng stream `models.fpt.NOISE_RNG` (noise in every
    prediction);
  * `norm_init`: 'ones' (scale 1, bias 0; default), or 'uniform' as the original's blanket
    reset, scales and biases from U(+-1/sqrt(n)) for a norm over n features;
  * `unbiased_variance`: False (default), or True as the original's `torch.var`;
  * `mask_carried_state` (state dropout): False (default: dropout between layers, on each
    layer's output sequence), or True as the original: every layer's h_t dropped inside the
    recurrence, so the dropped h_t is both the layer's output and the carried state.
Weights and biases start from U(+-1/sqrt(H)) as in PyTorch's LSTM either way. Presets
with one option each (`lstm-random-state`, `lstm-uniform-norm`, `lstm-unbiased-var`,
`lstm-state-dropout`) and the original without its layer-norm init
(`lstm-original-norm-ones`) measure which of them matters. Any option but `norm_init` takes the
recurrence off its custom VJP (below), which starts from zeros and drops nothing inside the
loop, onto `plain_recurrence`, a `lax.scan` differentiated by autodiff.

Speed: each layer's input projection `LN_x(W_x x + b_x)` is one product over every time step
before the recurrence; `lax.scan` then runs only the `[b, H] x [H, 4H]` product, two layer
norms and the gates per step. That loop is latency-bound: T dependent small products (batch
4: a [4, 768] x [768, 3072] product per step) that cannot fill a matrix unit, where a
transformer does one large product per layer. Its gradient has a custom VJP (`recurrence`):
autodiff's transpose of the scan adds a rank-b update into the [H, 4H] gradient of W_h at
every step, reading and writing those 9.4 MB (at H=768) T times; here the backward loop
emits each step's dz and W_h's gradient is one [H, T*b] x [T*b, 4H] product after it.
Measured on a 2-core Zen 5 (one layer, H=768, b=4, T=64, float32): 1.4 ms per step of the
backward pass through a scan of the product alone with autodiff, 0.43 ms with the gradient
after the loop.

Mixed precision: the products take compute-dtype operands with float32 accumulation
(`mixed`); the gates, layer norms and the carried (h, c) stay float32 (a bfloat16 state
would round at every one of T steps).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from flax.typing import Dtype

from fpt_jax.models import backbones, layers, mixed
from fpt_jax.models.fpt import NOISE_RNG, torch_uniform_init

_NO_POSITION_LIMIT = 2 ** 31 - 1  # a recurrence reads any length
Norms = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # LN_h scale, bias; LN_c scale, bias
INITIAL_STATES = ("zero", "random")  # LSTMConfig.initial_state, the default first
NORM_INITS = ("ones", "uniform")  # LSTMConfig.norm_init, the default first


@dataclasses.dataclass(frozen=True)
class LSTMConfig(backbones.BackboneConfig):
    """The stacked LN-LSTM's sizes; `n_head` (always 1) and `n_positions` (no limit) only
    answer the generic backbone interface."""
    model_type = "lstm"
    display_name = "LSTM"
    DROPOUT_FIELDS = ("dropout",)
    HAS_HEADS = False

    n_layer: int = 3
    n_embd: int = 768  # the hidden (and cell) width of every layer
    dropout: float = 0.1  # between layers (inside the recurrence: mask_carried_state)
    layer_norm_epsilon: float = 1e-6  # the original's
    n_head: int = 1  # no heads; the generic backbone interface names it
    # The original code's behaviours (module docstring), off by default:
    initial_state: str = "zero"  # or 'random': drawn at every forward pass, evaluation too
    norm_init: str = "ones"  # or 'uniform': layer-norm scales and biases from U(+-1/sqrt(n))
    unbiased_variance: bool = False  # True: layer norms divide by n - 1 (torch.var)
    # True: dropout on every h_t inside the recurrence (carried too), not between layers
    mask_carried_state: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, accepted in (("initial_state", INITIAL_STATES), ("norm_init", NORM_INITS)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"LSTMConfig.{name}={getattr(self, name)!r}; accepted: "
                                 f"{', '.join(map(repr, accepted))}")

    @property
    def n_positions(self) -> int:
        return _NO_POSITION_LIMIT

    @property
    def autodiff_recurrence(self) -> bool:
        """Whether the recurrence is `plain_recurrence`: the custom VJP of `recurrence`
        starts from zeros, uses the biased variance and drops nothing inside the loop."""
        return self.initial_state == "random" or self.unbiased_variance or self.mask_carried_state


LSTM_PRESETS: dict[str, LSTMConfig] = {
    "lstm": LSTMConfig(),
    # the original code's LayerNormLSTM (rows.py's lstm_original also freezes its recurrence)
    "lstm-original": LSTMConfig(initial_state="random", norm_init="uniform",
                                unbiased_variance=True, mask_carried_state=True),
    # one of the original's differences each, and the original without its layer-norm
    # init, to measure which one matters (benchmarks/results/README.md)
    "lstm-random-state": LSTMConfig(initial_state="random"),
    "lstm-uniform-norm": LSTMConfig(norm_init="uniform"),
    "lstm-unbiased-var": LSTMConfig(unbiased_variance=True),
    "lstm-state-dropout": LSTMConfig(mask_carried_state=True),
    "lstm-original-norm-ones": LSTMConfig(initial_state="random", unbiased_variance=True,
                                          mask_carried_state=True),
}


def _norm_inits(cfg: LSTMConfig, n: int) -> tuple[Callable, Callable]:
    """A layer norm's (scale, bias) initialisers over `n` features."""
    if cfg.norm_init == "uniform":  # the original's reset of every LayerNorm parameter
        return torch_uniform_init(n), torch_uniform_init(n)
    return nn.initializers.ones, nn.initializers.zeros


def _norm_params(cfg: LSTMConfig, n: int, name: str) -> tuple[jax.Array, jax.Array]:
    scale, bias = _norm_inits(cfg, n)
    p = _Leaves((("scale", (n,), scale), ("bias", (n,), bias)), name=name)()
    return p["scale"], p["bias"]


def _input_norm(cfg: LSTMConfig, x: jax.Array) -> jax.Array:
    """LN_x over every step at once (`ln_i2h`)."""
    if cfg.unbiased_variance:
        scale, bias = _norm_params(cfg, x.shape[-1], "ln_i2h")
        return _normalize(x, scale, bias, cfg.layer_norm_epsilon, unbiased=True)
    scale_init, bias_init = _norm_inits(cfg, x.shape[-1])
    # flax's LayerNorm, as before the options existed: the default's numerics unchanged
    return nn.LayerNorm(cfg.layer_norm_epsilon, dtype=jnp.float32, scale_init=scale_init,
                        bias_init=bias_init, name="ln_i2h")(x)


def _projection(cfg: LSTMConfig, dtype: Dtype, name: str) -> mixed.Dense:
    init = torch_uniform_init(cfg.n_embd)
    return mixed.Dense(4 * cfg.n_embd, dtype=dtype, kernel_init=init, bias_init=init,
                       out_dtype=jnp.float32, name=name)


def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               unbiased: bool = False) -> jax.Array:
    """`nn.LayerNorm` in float32; with `unbiased`, the variance divided by n - 1."""
    mean = x.mean(-1, keepdims=True)
    sq = jnp.square(x - mean)
    var = sq.sum(-1, keepdims=True) / (x.shape[-1] - 1) if unbiased else sq.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) \
        + bias.astype(jnp.float32)


def cell_step(norms: Norms, z: jax.Array, c: jax.Array, a_x: jax.Array, eps: float,
              unbiased: bool = False) -> tuple[jax.Array, jax.Array]:
    """One step after the recurrent product `z = W_h h_{t-1} + b_h`: `(h_t, c_t)`."""
    i, f, o, g = jnp.split(a_x + _normalize(z, *norms[:2], eps, unbiased), 4, axis=-1)
    c = _normalize(jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g), *norms[2:], eps,
                   unbiased)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _scan(dtype: Any, eps: float, kernel: jax.Array, bias: jax.Array, norms: Norms,
          a_x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The recurrence over time-major `a_x` [t, b, 4H] from a zero state: every h_t
    [t, b, H], and per step the h_{t-1}, c_{t-1} and z_t the gradient needs."""
    w, b = kernel.astype(dtype), bias.astype(jnp.float32)

    def step(carry, a_x_t):
        h, c = carry
        z = jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32) + b
        h_next, c_next = cell_step(norms, z, c, a_x_t, eps)
        return (h_next, c_next), (h_next, (h, c, z))

    zeros = jnp.zeros((a_x.shape[1], kernel.shape[0]), jnp.float32)
    return jax.lax.scan(step, (zeros, zeros), a_x)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(dtype: Any, eps: float, kernel: jax.Array, bias: jax.Array, norms: Norms,
               a_x: jax.Array) -> jax.Array:
    """Every h_t [t, b, H] of the LN-LSTM recurrence over time-major `a_x` [t, b, 4H]
    (`kernel`, `bias`: W_h, b_h; `norms`: LN_h's and LN_c's scale and bias). Its gradient
    is autodiff's, but the recurrent weight's gradient is one product after the loop
    (module docstring)."""
    return _scan(dtype, eps, kernel, bias, norms, a_x)[0]


def _recurrence_fwd(dtype, eps, kernel, bias, norms, a_x):
    hs, saved = _scan(dtype, eps, kernel, bias, norms, a_x)
    return hs, (kernel, bias, norms, a_x, saved)


def _recurrence_bwd(dtype, eps, residuals, d_hs):
    kernel, bias, norms, a_x, (h_prev, c_prev, z) = residuals
    w_t = kernel.astype(dtype).T

    def step(carry, xs):
        dh, dc, d_norms = carry
        d_out, c_t, z_t, a_x_t = xs
        _, vjp = jax.vjp(lambda n, z_, c_, a_: cell_step(n, z_, c_, a_, eps),
                         norms, z_t, c_t, a_x_t)
        dn, dz, dc_prev, da_x = vjp((dh + d_out, dc))
        dh_prev = jnp.dot(dz.astype(dtype), w_t, preferred_element_type=jnp.float32)
        d_norms = jax.tree_util.tree_map(jnp.add, d_norms, dn)
        return (dh_prev, dc_prev, d_norms), (dz, da_x)

    zeros = jnp.zeros_like(h_prev[0])
    zero_norms = jax.tree_util.tree_map(lambda n: jnp.zeros(n.shape, jnp.float32), norms)
    (_, _, d_norms), (dz, da_x) = jax.lax.scan(
        step, (zeros, zeros, zero_norms), (d_hs.astype(jnp.float32), c_prev, z, a_x),
        reverse=True)
    # The weight gradient as one [H, t*b] x [t*b, 4H] product, not t rank-b updates of a
    # [H, 4H] accumulator inside the loop (autodiff's transpose of the scan).
    d_kernel = jnp.einsum("tbh,tbk->hk", h_prev.astype(dtype), dz.astype(dtype),
                          preferred_element_type=jnp.float32)
    d_norms = jax.tree_util.tree_map(lambda d, n: d.astype(n.dtype), d_norms, norms)
    return (d_kernel.astype(kernel.dtype), dz.sum((0, 1)).astype(bias.dtype), d_norms,
            da_x.astype(a_x.dtype))


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def plain_recurrence(dtype: Any, eps: float, unbiased: bool, kernel: jax.Array,
                     bias: jax.Array, norms: Norms, a_x: jax.Array, h0: jax.Array,
                     c0: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """Every h_t [t, b, H] over time-major `a_x` [t, b, 4H] as the original code runs it:
    from `(h0, c0)` [b, H], the variance unbiased if asked, and each h_t multiplied by
    `keep[t]` (dropout's mask over 1 - rate) before it is carried. Autodiff's gradient: the
    original's setting trains none of the recurrence's products, so the custom VJP's saving
    on W_h would not apply."""
    w, b = kernel.astype(dtype), bias.astype(jnp.float32)

    def step(carry, xs):
        h, c = carry
        a_x_t, keep_t = xs
        z = jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32) + b
        h, c = cell_step(norms, z, c, a_x_t, eps, unbiased)
        if keep_t is not None:
            h = h * keep_t  # the dropped h_t is the output and the next step's state
        return (h, c), h

    return jax.lax.scan(step, (h0, c0), (a_x, keep))[1]


class _Leaves(nn.Module):
    """Parameters only, `{name: array}` under this module's name: the recurrence reads its
    weights as arrays, kept under the names and initialisation of the layers they are."""
    leaves: tuple[tuple[str, tuple[int, ...], Callable], ...]

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {name: self.param(name, init, shape, jnp.float32)
                for name, shape, init in self.leaves}


class Cell(nn.Module):
    """The recurrence's parameters (`h2h`, `ln_h2h`, `ln_cell`) and the recurrence:
    `a_x` [b, t, 4H], the normalised input projection, -> every h_t [b, t, H] (float32)."""
    config: LSTMConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, a_x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        width, init = 4 * cfg.n_embd, torch_uniform_init(cfg.n_embd)
        h2h = _Leaves((("kernel", (cfg.n_embd, width), init),
                       ("bias", (width,), init)), name="h2h")()
        norms = (*_norm_params(cfg, width, "ln_h2h"), *_norm_params(cfg, cfg.n_embd, "ln_cell"))
        dtype, a_x = jnp.dtype(self.dtype).type, rearrange(a_x, "b t k -> t b k")
        if not cfg.autodiff_recurrence:
            hs = recurrence(dtype, cfg.layer_norm_epsilon, h2h["kernel"], h2h["bias"], norms,
                            a_x)
        else:
            h0, c0 = self.initial_state(a_x.shape[1])
            hs = plain_recurrence(dtype, cfg.layer_norm_epsilon, cfg.unbiased_variance,
                                  h2h["kernel"], h2h["bias"], norms, a_x, h0, c0,
                                  self.state_dropout(a_x.shape[:2], deterministic))
        return rearrange(hs, "t b h -> b t h")

    def initial_state(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """(h_0, c_0) [batch, H]: zeros, or the original's draw at every forward pass."""
        n, zeros = self.config.n_embd, jnp.zeros((2, batch, self.config.n_embd), jnp.float32)
        if self.config.initial_state == "zero":
            return zeros[0], zeros[1]
        if not self.has_rng(NOISE_RNG):
            if self.is_initializing():  # shapes only: no draw, and no key taken from 'params'
                return zeros[0], zeros[1]
            raise ValueError(f"LSTM initial_state='random' draws (h_0, c_0) at every forward "
                             f"pass, evaluation included: apply with rngs={{{NOISE_RNG!r}: key}}")
        # Xavier-normal of the layer's [input, hidden] = [H, H], as the original's init_hidden
        std = (2 / (n + n)) ** 0.5
        h0, c0 = std * jax.random.normal(self.make_rng(NOISE_RNG), (2, batch, n), jnp.float32)
        return h0, c0

    def state_dropout(self, steps_batch: tuple[int, int], deterministic: bool
                      ) -> jax.Array | None:
        """`[t, b, H]` multipliers of each h_t (mask / (1 - rate)), or None: no dropout."""
        rate = self.config.dropout
        if not self.config.mask_carried_state or deterministic or rate == 0:
            return None
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - rate,
                                    (*steps_batch, self.config.n_embd))
        return keep.astype(jnp.float32) / (1 - rate)


class Layer(nn.Module):
    """`[b, t, d] -> [b, t, H]`: the input projection for every step, then the recurrence."""
    config: LSTMConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        a_x = _input_norm(cfg, _projection(cfg, self.dtype, "i2h")(x))
        return Cell(cfg, self.dtype, name="cell")(a_x, deterministic).astype(self.dtype)


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
            if i and not cfg.mask_carried_state:  # state dropout drops inside the recurrence
                x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
            x = Layer(cfg, self.dtype, name=f"lstm_{i}")(x, deterministic)
        if read_positions is not None:
            x = jnp.take_along_axis(x, read_positions[:, :, None], axis=1)
        return x


init_params, param_shapes, num_params = layers.param_functions(LSTM)


def param_group(keys: tuple[str, ...]) -> tuple[str, int | None] | None:
    """`('lstm_1', 'cell', 'ln_h2h', 'scale')` -> ('ln', 1); the products -> ('lstm', i)."""
    m = re.fullmatch(r"lstm_(\d+)", keys[0])
    if not m or len(keys) < 2:
        return None
    return ("ln" if any(k.startswith("ln_") for k in keys[1:]) else "lstm"), int(m.group(1))


# Random init only: no checkpoint exists (every state-dict name is unexpected); no
# attention, so no maps; causal, so FPT passes no `lengths`.
FAMILY = backbones.Family(
    config_cls=LSTMConfig, module_cls=LSTM, presets=LSTM_PRESETS, param_group=param_group,
    param_shapes=param_shapes, has_checkpoints=False)
