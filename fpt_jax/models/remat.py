"""Activation checkpointing that saves memory on XLA:CPU too: `remat(Block, dtype)`.

`nn.remat` (`jax.checkpoint`) saves no memory on XLA:CPU. JAX orders a block's
recomputation after the cotangent of its output with an optimisation barrier over both,
but XLA:CPU removes optimisation barriers early in its pipeline (`cse_barrier_expander`,
right after CSE), long before scheduling. The recomputation then depends on the block's
input and parameters only, and the CPU scheduler (concurrency-optimised by default) runs
it as soon as they exist, in the forward pass, for every block: the step holds every block's
activations as without remat, plus the recomputation's. Likewise, what depends on the
parameters or the dropout keys only (the dropout bits of every block, broadcast layer-norm
scales shared by the forward pass and the recomputation) is computed at the start and kept.

`remat` recomputes in a custom VJP instead, and ties, by a data dependence that no XLA
pass removes (`_tie`), the recomputation's inputs (block input, parameters, dropout keys)
to the cotangent of the block's output, and the forward pass's parameters and dropout
keys to the block's input. Block i's recomputation can then only run once block i+1's
backward has produced that cotangent, on any backend and scheduler: the step holds the
block inputs plus one block's activations. Outputs, dropout masks and gradients are the
plain block's (bit for bit in float32 under `jit`; in bfloat16 up to rounding, as with
`nn.remat`). Unlike `nn.remat`, forward-mode autodiff (`jax.jvp`, `jacfwd`) is not supported.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift
from flax.core.scope import Scope
from flax.typing import Dtype


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
    the output arrives (see the module docstring); `dtype` is the block's compute dtype.
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


def remat(module_class: type[nn.Module], dtype: Dtype) -> type[nn.Module]:
    """`nn.remat(module_class)` whose recomputation happens in the backward pass, one block
    at a time, on XLA:CPU too. Parameter names and dropout keys are those of `module_class`
    (the module is called with positional arguments only); `dtype` is its compute dtype."""
    return nn.transforms.lift_transform(_lifted_remat, module_class, dtype)
