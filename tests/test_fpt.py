"""The FPT wrapper: patching, reading the last positions, input layers, token inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax.models.fpt import FPT
from fpt_jax.models.gpt2 import GPT2, GPT2Config, attention_weights

CONFIG = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=64)


def _init(model, x, **kw):
    return jax.jit(lambda x, kw: model.init(jax.random.PRNGKey(0), x, **kw))(x, kw)["params"]


@pytest.mark.slow
def test_patches_rows_and_regroups_last_row_outputs():
    # Bit XOR layout: 2 rows of 5 bits, 1 feature per token -> 10 tokens, 5 outputs of 2.
    model = FPT(CONFIG, input_dim=1, output_dim=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 5))
    params = _init(model, x)
    logits = model.apply({"params": params}, x)
    assert logits.shape == (3, 10)
    # Reference by hand: tokens in row-major order through the same layers.
    p = params
    tokens = x.reshape(3, 10, 1)
    h = tokens @ p["input"]["proj"]["kernel"] + p["input"]["proj"]["bias"]
    h = GPT2(CONFIG).apply({"params": p["transformer"]}, h)
    out = h[:, -5:] @ p["output"]["proj"]["kernel"] + p["output"]["proj"]["bias"]
    np.testing.assert_allclose(logits, out.reshape(3, 10), atol=1e-5)


def test_feature_size_not_a_multiple_of_patch_size_is_an_error():
    model = FPT(CONFIG, input_dim=3, output_dim=2)
    with pytest.raises(ValueError, match="input feature size 5 is not a multiple of the patch "
                                         "size input_dim=3"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 5)))


@pytest.mark.slow
def test_input_layer_is_orthogonal_with_gain_and_zero_bias():
    model = FPT(CONFIG, input_dim=8, output_dim=4, orth_gain=1.41)
    params = _init(model, jnp.zeros((1, 3, 8)))
    w = np.asarray(params["input"]["proj"]["kernel"])  # [8, 16]: orthonormal rows x gain
    np.testing.assert_allclose(w @ w.T, 1.41 ** 2 * np.eye(8), atol=1e-5)
    assert not np.any(params["input"]["proj"]["bias"])


@pytest.mark.slow
def test_hidden_layer_sizes_build_mlps_on_both_ends():
    model = FPT(CONFIG, input_dim=4, output_dim=3, in_layer_sizes=(32,), out_layer_sizes=(8, 8))
    params = _init(model, jnp.zeros((1, 2, 4)))
    assert params["input"]["hidden_0"]["kernel"].shape == (4, 32)
    assert params["input"]["proj"]["kernel"].shape == (32, 16)
    assert [params["output"][k]["kernel"].shape for k in ("hidden_0", "hidden_1", "proj")] == \
        [(16, 8), (8, 8), (8, 3)]


@pytest.mark.slow
def test_token_inputs_read_the_last_real_token_ignoring_padding():
    model = FPT(CONFIG, input_dim=20, output_dim=4, input_kind="tokens")
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 1, 20)
    params = _init(model, ids)
    lengths = jnp.array([5, 9])
    padded = jnp.where(jnp.arange(12) < lengths[:, None], ids, 0)
    garbage = jnp.where(jnp.arange(12) < lengths[:, None], ids, 7)
    a = model.apply({"params": params}, padded, lengths)
    b = model.apply({"params": params}, garbage, lengths)
    # Causal attention: what lies after length-1 cannot change the output read there.
    np.testing.assert_allclose(a, b, atol=1e-6)
    trimmed = model.apply({"params": params}, ids[:1, :5])
    np.testing.assert_allclose(a[0], trimmed[0], atol=1e-5)


def test_token_input_must_be_integer_ids():
    model = FPT(CONFIG, input_dim=20, output_dim=4, input_kind="tokens")
    with pytest.raises(ValueError, match="token task input must be int"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.float32))


def test_too_many_tokens_after_patching_is_an_error():
    model = FPT(CONFIG, input_dim=1, output_dim=2)
    with pytest.raises(ValueError, match="sequence length 65 exceeds the model's n_positions=64"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 13)))


@pytest.mark.slow
def test_return_all_positions_and_attention_weights():
    model = FPT(CONFIG, input_dim=2, output_dim=3, return_last_only=False)
    x = jnp.ones((2, 4, 2))
    params = _init(model, x)
    logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
    attentions = attention_weights(state)
    assert logits.shape == (2, 4, 3)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 4, 4)
    np.testing.assert_allclose(attentions[1].sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_attention_weights_cover_every_position_and_leave_the_logits_unchanged():
    # The head reads the last row's 3 patches; with the weights requested the last block is
    # computed everywhere (not trimmed), so every map is [batch, heads, 12, 12].
    model = FPT(CONFIG, input_dim=2, output_dim=3)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 6))
    params = _init(model, x)
    logits, state = jax.jit(lambda p: model.apply({"params": p}, x,
                                                  mutable=["intermediates"]))(params)
    assert [a.shape for a in attention_weights(state)] == [(2, 2, 12, 12)] * 2
    plain = jax.jit(lambda p: model.apply({"params": p}, x))(params)
    np.testing.assert_allclose(logits, plain, rtol=0, atol=1e-6)


def _loss_and_grads(model, params, x, length=None, rng=None):
    """A scalar of every logit (fixed random weights) and its gradients."""
    def loss(p):
        logits = model.apply({"params": p}, x, length)
        w = jax.random.normal(jax.random.PRNGKey(9), logits.shape)
        return jnp.sum(w * logits)
    return jax.jit(jax.value_and_grad(loss))(params)  # one program, not op by op


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["patches", "tokens_with_length"])
def test_last_block_at_the_read_positions_only_equals_the_whole_block(kind):
    # FPT computes its last block only where the head reads (the last row's patches, or
    # position length - 1); values and every gradient equal the whole block's, read after.
    if kind == "patches":
        kw, x, length = dict(input_dim=2, output_dim=3), jax.random.normal(
            jax.random.PRNGKey(1), (3, 4, 6)), None
    else:
        kw = dict(input_dim=20, output_dim=4, input_kind="tokens")
        x, length = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 1, 20), jnp.array([5, 12])
    trimmed = FPT(CONFIG, **kw)
    whole = FPT(CONFIG, **kw, trim_last_block=False)
    params = _init(whole, x, length=length)
    assert jax.tree_util.tree_structure(_init(trimmed, x, length=length)) == \
        jax.tree_util.tree_structure(params)
    (la, ga), (lb, gb) = (_loss_and_grads(m, params, x, length) for m in (trimmed, whole))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_last_block_trim_saves_its_unread_positions_flops():
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    batch, seq = 4, 32
    x = jnp.zeros((batch, seq, 1))

    def flops(model):
        params = _init(model, x)
        compiled = jax.jit(lambda p: model.apply({"params": p}, x)).lower(params).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    full = flops(FPT(cfg, input_dim=1, output_dim=2, trim_last_block=False))
    trimmed = flops(FPT(cfg, input_dim=1, output_dim=2))
    # Not computed for the seq - 1 unread positions of the last block: its attention output
    # projection (d x d) and MLP (d x 4d, 4d x d), 2 FLOPs per multiply-add.
    d = cfg.n_embd
    assert full - trimmed >= 0.9 * 2 * 9 * d * d * batch * (seq - 1), (full, trimmed)


@pytest.mark.slow
def test_unrolled_threefry_on_cpu_gives_the_same_bits_without_while_loops():
    from jax._src.random import threefry2x32 as threefry
    from fpt_jax import fast_rng
    assert fast_rng.use_unrolled_threefry_on_cpu()
    k1, k2 = jnp.uint32(12345), jnp.uint32(678)
    x1, x2 = (jnp.arange(1000, dtype=jnp.uint32), jnp.arange(1000, 2000, dtype=jnp.uint32))
    rolled = jax.jit(lambda *a: threefry._threefry2x32_lowering(*a, use_rolled_loops=True))
    registered = jax.jit(threefry.threefry_2x32)
    np.testing.assert_array_equal(rolled(k1, k2, x1, x2)[0],
                                  registered(jnp.stack([k1, k2]), jnp.concatenate([x1, x2]))[:1000])
    # A dropout step lowers without the rolled loop (one while loop per mask before).
    model = FPT(CONFIG, input_dim=1, output_dim=2, dropout=0.1)
    x = jnp.ones((2, 8, 1))
    params = _init(model, x)
    hlo = jax.jit(lambda p, r: model.apply({"params": p}, x, deterministic=False,
                                           rngs={"dropout": r})).lower(
        params, jax.random.PRNGKey(0)).compile().as_text()
    assert " while(" not in hlo
