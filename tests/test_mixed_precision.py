"""bfloat16 compute: products in bfloat16 that accumulate in float32 (forward and backward),
frozen weights stored in the compute dtype, and the one-pass clip."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fpt_jax import build, freeze, optim, steps
from fpt_jax.config import TrainConfig
from fpt_jax.models import mixed
from tests.settings import train_config

TINY = dict(task="bit_xor", init="random", n_layer=2, n_head=2, n_embd=32, batch_size=8,
            eval_batches=2)

# (spec, lhs shape, rhs shape): the dense layer's and attention's two products.
SPECS = [("...k,kn->...n", (2, 5, 16), (16, 24)),
         ("bhqd,bhkd->bhqk", (2, 3, 5, 8), (2, 3, 7, 8)),
         ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 8))]


def _operands(shapes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


@pytest.mark.parametrize("spec,lhs,rhs", SPECS)
def test_low_precision_einsum_and_its_gradients_follow_float32(spec, lhs, rhs):
    a, b = _operands((lhs, rhs))
    cot = _operands((jax.eval_shape(lambda: jnp.einsum(spec, a, b)).shape,), seed=1)[0]

    def loss(a, b, dtype):
        return jnp.sum(mixed.einsum(spec, a, b, dtype) * cot)

    y16 = mixed.einsum(spec, a, b, jnp.bfloat16)
    y32 = jnp.einsum(spec, a, b)
    assert y16.dtype == jnp.float32  # accumulated and returned in float32
    # The operands are rounded to bfloat16 (relative 2**-8 each); sums of products of
    # unit normals: bound 4 unit roundoffs of the result's scale.
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(y16, y32, rtol=0, atol=4 * 2**-8 * scale)
    g16 = jax.grad(loss, argnums=(0, 1))(a, b, jnp.bfloat16)
    g32 = jax.grad(loss, argnums=(0, 1))(a, b, jnp.float32)
    for x, got, want in zip((a, b), g16, g32):
        assert got.dtype == x.dtype == jnp.float32  # a float32 parameter gets a float32 grad
        np.testing.assert_allclose(got, want, rtol=0, atol=4 * 2**-8 * float(jnp.abs(want).max()))
        assert not np.array_equal(got, want)  # it did compute in bfloat16


def test_low_precision_einsum_gives_each_operand_a_gradient_of_its_dtype():
    a, b = _operands(((4, 8), (8, 6)))
    a = a.astype(jnp.bfloat16)  # an activation in the compute dtype, a float32 parameter
    ga, gb = jax.grad(lambda a, b: mixed.einsum("...k,kn->...n", a, b, jnp.bfloat16).sum(),
                      argnums=(0, 1))(a, b)
    assert (ga.dtype, gb.dtype) == (jnp.bfloat16, jnp.float32)


def test_einsum_rejects_an_index_its_gradient_cannot_transpose():
    with pytest.raises(ValueError, match="index 'k' is in one term only"):
        mixed.einsum("mk,mn->mn", jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.bfloat16)


def test_dense_is_flax_dense_in_float32_and_accumulates_in_float32_in_bfloat16():
    x = _operands(((3, 5, 16),))[0]
    init = dict(kernel_init=nn.initializers.normal(0.5), bias_init=nn.initializers.normal(0.5))
    params = nn.Dense(24, **init).init(jax.random.PRNGKey(0), x)
    ours = mixed.Dense(24, **init).init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, ours))
    np.testing.assert_array_equal(mixed.Dense(24).apply(params, x),
                                  nn.Dense(24).apply(params, x))
    y = mixed.Dense(24, dtype=jnp.bfloat16).apply(params, x)
    exact = (np.asarray(x.astype(jnp.bfloat16), np.float64)
             @ np.asarray(params["params"]["kernel"].astype(jnp.bfloat16), np.float64)
             + np.asarray(params["params"]["bias"], np.float64))
    assert y.dtype == jnp.bfloat16
    # float32 accumulation, then one rounding to bfloat16: within half a bfloat16 ulp.
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=2**-8, atol=1e-6)


def _weight_dots(hlo: str, n_embd: int) -> list[tuple[list[str], str]]:
    """(operand dtypes, result dtype) of every dot of the backbone's weight layers (c_attn,
    c_proj, c_fc: forward and backward) in an optimized HLO module's text, inside fusions
    too. Instruction names are unique in a module; operands are printed by name only.

    A dot is recognised by its shapes: no batch dimensions, and every dimension of its
    operands and result one of the layers' widths (n_embd, 3 n_embd, 4 n_embd) but the
    token count, present twice (forward: [T, in] x [in, out]; input gradient: [T, out] x
    [in, out]; weight gradient: [in, T] x [T, out]). Not by its op_name: the group step
    vmaps the run axis, and with trainable weights ([K=1, in, out]) XLA drops the size-1
    batch dimension of their products and their metadata with it. Where XLA keeps the
    op_name it must agree."""
    widths = {n_embd, 3 * n_embd, 4 * n_embd}
    shape_of = {m.group(1): (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
                for m in re.finditer(r"%(\S+) = \(?(\w+)\[([\d,]*)\]", hlo)}
    out = []
    for line in hlo.splitlines():
        m = re.search(r"%\S+ = (\w+)\[([\d,]*)\]\S* dot\(%(\S+), %(\S+?)\)", line)
        if not m:
            continue
        (a_dtype, a), (b_dtype, b) = shape_of[m.group(3)], shape_of[m.group(4)]
        result = tuple(int(d) for d in m.group(2).split(",") if d)
        dims = [*a, *b, *result]
        tokens = [d for d in dims if d not in widths]
        by_shape = ("batch_dims" not in line and len(a) == len(b) == len(result) == 2
                    and len(tokens) == 2 and tokens[0] == tokens[1])
        name = re.search(r"op_name=\"([^\"]+)\"", line)
        if name and re.search(r"/(c_attn|c_proj|c_fc)/", name.group(1)):
            assert by_shape, line  # the shape rule finds every dot the metadata names
        if by_shape:
            out.append(([a_dtype, b_dtype], m.group(1)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["fpt", "full"])
def test_bfloat16_step_multiplies_bfloat16_operands_into_float32(trainable):
    cfg = train_config(**TINY, trainable=trainable, dtype="bfloat16")
    g = build.build_group(cfg)
    step = steps.make_train_step(g.model, g.task, g.tx, axis_name=None)
    # A group of one: every leaf of the batch with the run axis [K=1, ...].
    batch = {k: v[None] for k, v in g.task.batch("train", 0, cfg.batch_size, seed=0).items()}
    lowered = jax.jit(step).lower(g.states, g.frozen, batch, steps.run_rngs([0]))
    # What the step asks for: every product of the forward and backward pass.
    emitted = re.findall(r"stablehlo.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)"
                         r" -> tensor<[^>]*x(\w+)>", lowered.as_text())
    assert len(emitted) >= 8 * cfg.n_layer, len(emitted)
    assert set(emitted) == {("bf16", "bf16", "f32")}, set(emitted)
    # What XLA runs: the weight layers' products (forward, input gradients and, in full
    # fine-tuning, weight gradients) keep bfloat16 operands. (XLA:CPU itself runs the small
    # batched attention products in float32; on GPU/TPU they stay bfloat16.)
    dots = _weight_dots(lowered.compile().as_text(), cfg.n_embd)
    per_layer = 3 * 4 if trainable == "full" else 2 * 4
    assert len(dots) >= per_layer * cfg.n_layer - 1, dots  # the last layer is trimmed
    assert all(ops == ["bf16", "bf16"] and out == "f32" for ops, out in dots), dots


@pytest.mark.slow
def test_frozen_part_is_the_float32_init_cast_once():
    f32 = build.build_group(train_config(**TINY, trainable="output", dtype="float32"))
    bf16 = build.build_group(train_config(**TINY, trainable="output", dtype="bfloat16"))
    for a, b in zip(jax.tree_util.tree_leaves(f32.frozen), jax.tree_util.tree_leaves(bf16.frozen)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(jnp.bfloat16))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        np.array_equal, f32.states.trainable, bf16.states.trainable))
    assert freeze.cast_frozen({"n": np.arange(3)}, jnp.bfloat16)["n"].dtype == np.arange(3).dtype


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_scalar_clip_equals_optax_clip_by_global_norm(max_norm):
    grads = {"a": _operands(((7, 5),))[0], "b": {"c": _operands(((11,),), seed=2)[0]}}
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)
    assert float(optax.tree.norm(ours)) == pytest.approx(min(max_norm,
                                                             float(optax.tree.norm(grads))),
                                                         rel=1e-6)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
    clipped, _ = optim.clip_by_global_norm(max_norm).update(zeros, optax.EmptyState())
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(clipped))


@pytest.mark.slow
def test_full_finetuning_step_updates_in_place_in_four_passes():
    """The full fine-tuning step's bytes (XLA's cost analysis) against the minimum a step
    must touch (`bench.core.minimum_step_bytes`: 2 reads of the weights for the forward and
    backward passes, then per trainable parameter the gradient written and read by the clip,
    and Adam's 4 reads and 3 writes: 11 float32 accesses). XLA:CPU has no multi-output
    fusion, so the clip's norm, each moment and the parameter are a pass each, the last
    reading both new moments: 14 accesses, 1.27x. Measured on this config: 1.33-1.44x with
    no copy of a donated buffer; optax's clip (a divide per element, its own pass) gave
    15 accesses for the update alone, pmap's lowering a copy of every parameter and moment
    (2.1x). Since the one loop (a single run is a group of one, its step vmapped over a run
    axis of 1, the learning rate in the optimizer state): 1.60x, no copy; run outside the
    vmap, the same step copied every first moment. Bound 1.65 until that is understood."""
    from fpt_jax.bench.core import Bench, BenchConfig, Case, Shape
    from fpt_jax.bench.jax_step import JaxRunner
    bc = Bench(train_config(init="random", n_layer=2, n_head=4, n_embd=256, num_devices=1),
               BenchConfig(torch_reference=False))
    r = JaxRunner(bc, Case(Shape("bit_xor", 4, 10, 1, 2), "full", "float32"))
    r.compile()
    hlo = r.fn.lower(*r._args()).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    # No copy of a donated parameter or moment (XLA may copy a logits-sized bias: harmless).
    copied = [(name, int(np.prod([int(d) for d in dims.split(",") if d])))
              for dims, name in re.findall(r"= \w+\[([\d,]*)\]\S* copy\(%(\S+?)\)", entry)]
    state = [c for c in copied if ("trainable" in c[0] or "opt_state" in c[0]) and c[1] > 256]
    assert not state, state[:5]
    ratio = r.result()["bytes_accessed_vs_minimum"]
    assert 1.0 <= ratio <= 1.65, ratio
