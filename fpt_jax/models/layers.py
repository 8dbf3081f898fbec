"""What the backbone families (gpt2.py, bert.py, vit.py) share, written once.

  * `attention(module, q, k, v, ...)`: the attention core, called from inside a family's
    compact `__call__` (it sows into that module and its dropout is that module's child);
  * `stack(layer_cls, ...)`: the layers `{prefix}{i}`, remat'd, the last one computed only at
    `read_positions` when given, each given the sequences' `lengths` when known;
  * `attention_weights(state, prefix)`: every layer's sown attention weights, in layer order;
  * `param_functions(module_cls)`: `init_params`, `param_shapes`, `num_params` of a family.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from flax import traverse_util
from flax.typing import Dtype

from fpt_jax.models import mixed
from fpt_jax.models.remat import remat

INTERMEDIATES = "intermediates"  # the collection that attention weights are sown into


def weights_requested(module: nn.Module) -> bool:
    """Whether the caller asked for attention weights (`mutable=["intermediates"]`)."""
    return module.is_mutable_collection(INTERMEDIATES)


def attention_weights(state: Mapping[str, Any], prefix: str) -> tuple[jax.Array, ...]:
    """Every layer's attention weights `[batch, heads, query, key]` (float32), in layer order,
    from the `state` of `apply(..., mutable=["intermediates"])` on a backbone (or a model
    holding one) whose layers are named `{prefix}{i}`."""
    flat = traverse_util.flatten_dict(dict(state[INTERMEDIATES]))
    layer = re.compile(rf"{re.escape(prefix)}(\d+)")
    layers = {}
    for path, sown in flat.items():
        if path[-1] == "attention_weights":  # the innermost layer name on the path
            index = next(int(m.group(1)) for k in reversed(path) if (m := layer.fullmatch(k)))
            layers[index] = sown[0]  # sow keeps a tuple of values
    return tuple(layers[i] for i in sorted(layers))


def check_inputs(family: str, inputs_embeds: jax.Array, width: int,
                 max_len: int | None = None, max_name: str = "n_positions",
                 lengths: jax.Array | None = None) -> None:
    """A backbone's input: `[batch, seq, width]`, seq at most its position table's rows;
    `lengths`, when given, ints of shape `[batch]`."""
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != width:
        raise ValueError(f"{family} expects inputs_embeds of shape [batch, seq, {width}], got "
                         f"{inputs_embeds.shape}")
    if max_len is not None and inputs_embeds.shape[1] > max_len:
        raise ValueError(f"sequence length {inputs_embeds.shape[1]} exceeds the model's "
                         f"{max_name}={max_len}; shorten the input (e.g. larger patches)")
    batch = inputs_embeds.shape[0]
    if lengths is not None and (lengths.shape != (batch,)
                                or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise ValueError(f"{family} lengths must be ints of shape [{batch}], got "
                         f"{lengths.dtype} {lengths.shape}")


def attention(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array, *,
              dropout: nn.Dropout | float, deterministic: bool, dtype: Dtype,
              causal: bool = False, query_positions: jax.Array | None = None,
              lengths: jax.Array | None = None, heads_first: bool = False,
              window: int | None = None) -> jax.Array:
    """Attention of `q` [b, r, h, d] over `k`, `v` [b, t, g, d], heads merged: [b, r, h*d].
    `g` divides `h`: with fewer key/value heads (grouped-query attention) each serves h / g
    consecutive query heads.

    Call it from `module`'s compact `__call__`: the weights are sown there, and `dropout` (on
    the probabilities; a rate makes an `nn.Dropout` there, named by flax in creation order)
    is its child. `causal`: key position <= query position, where the query positions are
    `query_positions` ([b, r] ints, the rows `q` was taken at) or else 0..t-1. `lengths`
    ([b] ints, right-padded sequences' real lengths): the keys at or after example b's length
    are masked, so padding never reaches a real position.
    `heads_first`: the explicit path's products in `[b, h, t, d]` (GPT-2's and ViT's program).
    `window` (causal only): a query attends to the `window` latest keys, itself included
    (Mistral's sliding window); no effect on sequences of at most `window` positions.
    """
    t = k.shape[1]
    mask = None  # None: no mask, or (causal) the plain causal one
    if causal and (query_positions is not None or (window is not None and t > window)):
        rows = jnp.arange(t)[None] if query_positions is None else query_positions
        mask = rows[:, None, :, None] >= jnp.arange(t)  # [b or 1, 1, r, t]
        if window is not None:
            mask &= rows[:, None, :, None] - jnp.arange(t) < window
    if lengths is not None:
        lengths = lengths.astype(jnp.int32)  # the fused path takes int32 only
    padding = None if lengths is None else jnp.arange(t) < lengths[:, None, None, None]
    if not isinstance(dropout, nn.Dropout):
        dropout = nn.Dropout(dropout)
    if weights_requested(module) or (not deterministic and dropout.rate > 0):
        # The explicit softmax: to return the weights, and for dropout on the attention
        # probabilities, which dot_product_attention lacks. Logits and softmax in float32, as
        # in the fused path.
        if causal and mask is None:
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))
        if padding is not None:  # [b, 1, 1, t]
            mask = padding if mask is None else mask & padding
        if k.shape[2] != q.shape[2]:  # grouped-query attention: each key/value head repeated
            k, v = (jnp.repeat(a, q.shape[2] // a.shape[2], axis=2) for a in (k, v))
        if heads_first:
            q, k, v = (rearrange(a, "b t h d -> b h t d") for a in (q, k, v))
            logits = mixed.einsum("bhqd,bhkd->bhqk", q, k, dtype)
        else:
            logits = mixed.einsum("bqhd,bkhd->bhqk", q, k, dtype)
        logits = logits * jnp.float32(1 / q.shape[-1] ** 0.5)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits)
        module.sow(INTERMEDIATES, "attention_weights", weights)
        weights = dropout(weights, deterministic=deterministic)
        if heads_first:
            out = mixed.einsum("bhqk,bhkd->bhqd", weights, v, dtype).astype(dtype)
            out = rearrange(out, "b h q d -> b q h d")
        else:
            out = mixed.einsum("bhqk,bkhd->bqhd", weights, v, dtype).astype(dtype)
    else:
        # The library's fused attention (cuDNN flash attention on GPU; on XLA it also computes
        # logits and softmax in float32 for bfloat16 inputs).
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal and mask is None,
                                           key_value_seq_lengths=lengths)
    return rearrange(out, "b q h d -> b q (h d)")


def stack(layer_cls: type[nn.Module], config: Any, dtype: Dtype, use_remat: bool,
          deterministic: bool, x: jax.Array, read_positions: jax.Array | None = None,
          prefix: str = "layer_", lengths: jax.Array | None = None) -> jax.Array:
    """`config.n_layer` layers `layer_cls(config, dtype, deterministic, name=f"{prefix}{i}")`
    applied in turn, children of the calling module, each called `layer(x, lengths,
    query_positions)`; `use_remat` recomputes each in the backward pass (`models/remat.py`);
    with `read_positions` the last one is computed only there ([b, r, d])."""
    layer = remat(layer_cls, dtype) if use_remat else layer_cls
    # remat passes positional arguments only, and None is no array: lengths only when known.
    known = () if lengths is None else (lengths,)
    for i in range(config.n_layer):
        if i == config.n_layer - 1 and read_positions is not None:
            # Recomputing the last layer would buy nothing: its backward follows at once.
            x = layer_cls(config, dtype, deterministic, name=f"{prefix}{i}")(
                x, lengths, read_positions)
        else:
            x = layer(config, dtype, deterministic, name=f"{prefix}{i}")(x, *known)
    return x


def param_functions(module_cls: type[nn.Module]) -> tuple[Callable, Callable, Callable]:
    """A family's `init_params(config, rng, seq_len=1)`, `param_shapes(config)` and
    `num_params(config)` for its backbone module `module_cls(config)` fed `[1, seq, n_embd]`."""

    def init_params(config: Any, rng: jax.Array, seq_len: int = 1) -> dict:
        """Randomly initialised backbone parameters (float32)."""
        dummy = jnp.zeros((1, seq_len, config.n_embd), jnp.float32)
        return module_cls(config).init(rng, dummy)["params"]

    def param_shapes(config: Any) -> dict:
        """The backbone's parameter tree as `jax.ShapeDtypeStruct`s, without allocating it."""
        return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))

    def num_params(config: Any) -> int:
        """The backbone's parameter count."""
        return sum(x.size for x in jax.tree_util.tree_leaves(param_shapes(config)))

    return init_params, param_shapes, num_params
