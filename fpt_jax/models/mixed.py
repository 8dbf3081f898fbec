"""Matmuls that accumulate in float32, with a gradient written in each operand's layout.

Under `dtype=bfloat16` every matmul of a backbone takes bfloat16 operands and accumulates
(and returns) float32. The product's dtype decides XLA:CPU's path: measured on a 2-core Zen 5
(512x768 @ 768x3072), bfloat16 operands with a float32 result run at 975 GFLOP/s, with a
bfloat16 result at 420, float32 at 487. Autodiff of such a product would feed its float32
cotangent into the transposed products next to a bfloat16 operand, which XLA then runs in
float32; the custom VJP here casts the cotangent to the compute dtype first, so the two
transposed products take the same fast path.

The same VJP serves float32 (the casts are no-ops): it computes each operand's gradient as
one einsum into that operand's own index order. Autodiff's transpose rule computes a dense
layer's weight gradient as `[out, in]` and transposes it, and XLA:CPU then reads it strided
in the optimizer's pass (measured: a `gpt2` full fine-tuning step at the Bit XOR shape,
333 ms with autodiff's gradient, 158 ms with this one).

`Dense` is `flax.linen.Dense` with the same parameter names, shapes and initialisation
(kernel `[in, out]`, bias `[out]`, float32 unless stored otherwise): the bias is added in
float32 and the result cast to the compute dtype. A frozen kernel stored in the compute
dtype (`freeze.cast_frozen`) is used as stored; a trainable float32 kernel is cast inside the
product, so its gradient comes back in float32 from the float32 accumulation.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer


def _terms(spec: str) -> tuple[str, str, str]:
    lhs, rest = spec.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    for letter in set(lhs + rhs + out) - {"."}:
        if sum(letter in t for t in (lhs, rhs, out)) < 2:
            raise ValueError(f"einsum {spec!r}: index {letter!r} is in one term only; the "
                             "transposed products need each index in two terms")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec: str, dtype: Any, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _fwd(spec, dtype, a, b):
    return _low_precision_einsum(spec, dtype, a, b), (a, b)


def _bwd(spec, dtype, residuals, g):
    a, b = residuals
    lhs, rhs, out = _terms(spec)
    g = g.astype(dtype)
    da = jnp.einsum(f"{out},{rhs}->{lhs}", g, b.astype(dtype), preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{lhs},{out}->{rhs}", a.astype(dtype), g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_einsum.defvjp(_fwd, _bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
    """`jnp.einsum(spec, a, b)` in float32 out of operands cast to `dtype`: float32
    accumulation in the forward product and in both products of its gradient, each operand's
    gradient in its own dtype and index order. `spec` names two operands; each index
    appears in at least two of the three terms."""
    _terms(spec)
    return _low_precision_einsum(spec, jnp.dtype(dtype).type, a, b)


class Dense(nn.Module):
    """`nn.Dense` whose product accumulates in float32 under a low-precision `dtype`."""
    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    out_dtype: Dtype | None = None  # None: the compute dtype (float32: an LSTM's gates)
    use_bias: bool = True  # False: no `bias` parameter (Llama's projections)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            jnp.float32)
        y = einsum("...k,kn->...n", x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,),
                               jnp.float32).astype(jnp.float32)
        return y.astype(self.out_dtype or self.dtype)
