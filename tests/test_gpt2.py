"""The flax GPT-2 backbone: config, presets, parameter counts, dtype, remat and dropout.

Numerical equivalence to the Hugging Face reference is in test_weights.py, where the
reference's weights are converted; here the module is checked on its own terms.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax.models.gpt2 import (GPT2, GPT2_PRESETS, Attention, GPT2Config, attention_weights,
                                 num_params, param_shapes)

TINY = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32)
TINY_INNER = GPT2Config(n_layer=3, n_head=3, n_embd=48, n_positions=24, n_inner=80)
CONFIGS = pytest.mark.parametrize("config", [TINY, TINY_INNER], ids=["2x64h4", "3x48h3inner80"])


def random_params(config: GPT2Config, seed: int) -> dict:
    """Every leaf random (init gives zero biases and unit LayerNorm scales, which hide bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: ((1.0 if path[-1].key == "scale" else 0.0)
                            + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32),
        param_shapes(config))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "remat", "deterministic",
                                             "output_attentions"))
def forward(params, x, rng=None, *, config, dtype=jnp.float32, remat=False, deterministic=True,
            output_attentions=False):
    """`GPT2(...).apply` under jit (eager flax compiles op by op, which is slow on CPU); with
    `output_attentions`, also the attention weights (`mutable=["intermediates"]`)."""
    model, rngs = GPT2(config, dtype=dtype, remat=remat), {} if rng is None else {"dropout": rng}
    if not output_attentions:
        return model.apply({"params": params}, x, deterministic=deterministic, rngs=rngs)
    out, state = model.apply({"params": params}, x, deterministic=deterministic, rngs=rngs,
                             mutable=["intermediates"])
    return out, attention_weights(state)


def inputs(config: GPT2Config, seed: int = 0, seq: int | None = None) -> np.ndarray:
    seq = config.n_positions if seq is None else seq
    return np.random.default_rng(seed).standard_normal((2, seq, config.n_embd), np.float32)


@pytest.fixture(scope="module")
def tiny_params():
    return {TINY: random_params(TINY, 0), TINY_INNER: random_params(TINY_INNER, 1)}


# --- presets and configs -----------------------------------------------------------------

@pytest.mark.parametrize("name,layers,heads,width", [
    ("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024),
    ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600)])
def test_preset_has_published_layers_heads_width_and_1024_positions(name, layers, heads, width):
    cfg = GPT2Config.preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (layers, heads, width)
    assert cfg.n_positions == 1024
    assert cfg.vocab_size == 50257
    assert cfg.mlp_width == 4 * width


def test_preset_list_is_exactly_the_four_published_sizes():
    assert sorted(GPT2_PRESETS) == ["gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl"]


def test_preset_overrides_replace_fields():
    cfg = GPT2Config.preset("gpt2", n_layer=3, attn_pdrop=0.0)
    assert (cfg.n_layer, cfg.n_embd, cfg.attn_pdrop) == (3, 768, 0.0)
    assert GPT2Config.preset("gpt2").n_layer == 12  # the shared preset is not mutated


def test_unknown_preset_raises_naming_it_and_the_accepted_names():
    with pytest.raises(ValueError, match="gpt3") as info:
        GPT2Config.preset("gpt3")
    assert "gpt2-medium" in str(info.value)


def test_config_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="n_embd=50.*n_head=3"):
        GPT2Config(n_layer=1, n_head=3, n_embd=50)


@pytest.mark.parametrize("hf_kwargs,expected", [
    ({}, GPT2Config.preset("gpt2")),  # transformers' default GPT2Config is the `gpt2` size
    (dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=100), None),
    (dict(n_layer=3, n_head=3, n_embd=48, n_positions=24, vocab_size=100, n_inner=80,
          layer_norm_epsilon=1e-6, embd_pdrop=0.0, attn_pdrop=0.2, resid_pdrop=0.3), None),
], ids=["default", "2x64h4", "3x48h3inner80"])
def test_from_hf_of_reference_config_json_gives_same_config(tmp_path, hf_kwargs, expected):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **hf_kwargs)
    hf.save_pretrained(tmp_path)
    cfg = GPT2Config.from_hf(json.loads((tmp_path / "config.json").read_text()))
    if expected is None:
        expected = GPT2Config(
            n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, n_positions=hf.n_positions,
            vocab_size=hf.vocab_size, n_inner=hf.n_inner,
            layer_norm_epsilon=hf.layer_norm_epsilon, embd_pdrop=hf.embd_pdrop,
            attn_pdrop=hf.attn_pdrop, resid_pdrop=hf.resid_pdrop)
    assert cfg == expected
    assert GPT2Config.from_hf(cfg.to_hf()) == cfg  # our own config.json round-trips


# --- parameter counts -----------------------------------------------------------------

def test_num_params_of_gpt2_preset_matches_published_count():
    cfg = GPT2Config.preset("gpt2")
    assert num_params(cfg) == 85_842_432
    assert num_params(cfg, include_token_embedding=True) == 124_439_808


@CONFIGS
def test_num_params_equals_hf_reference_minus_token_embedding(config):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Model(transformers.GPT2Config(
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        n_positions=config.n_positions, n_inner=config.n_inner, vocab_size=config.vocab_size,
        bos_token_id=0, eos_token_id=0))
    total = sum(p.numel() for p in hf.parameters())
    assert num_params(config) == total - hf.wte.weight.numel()
    assert num_params(config, include_token_embedding=True) == total


@CONFIGS
def test_param_tree_is_float32_with_hf_names_and_shapes(config):
    params = param_shapes(config)
    assert set(params) == {"wpe", "ln_f", *(f"h_{i}" for i in range(config.n_layer))}
    assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (config.n_embd, config.mlp_width)
    assert params["wpe"]["embedding"].shape == (config.n_positions, config.n_embd)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


# --- apply-time checks -----------------------------------------------------------------

def test_sequence_longer_than_n_positions_raises_naming_both_lengths(tiny_params):
    x = inputs(TINY, seq=TINY.n_positions + 1)
    with pytest.raises(ValueError, match=r"sequence length 33 exceeds .*n_positions=32"):
        GPT2(TINY).apply({"params": tiny_params[TINY]}, x)


def test_sequence_of_exactly_n_positions_is_accepted(tiny_params):
    out = jax.eval_shape(lambda p, x: GPT2(TINY).apply({"params": p}, x),
                         tiny_params[TINY], inputs(TINY))
    assert isinstance(out, jax.ShapeDtypeStruct)  # weights not requested: just the array
    assert out.shape == (2, TINY.n_positions, TINY.n_embd) and out.dtype == jnp.float32


def test_inputs_of_wrong_width_raise_naming_expected_width(tiny_params):
    with pytest.raises(ValueError, match=r"\[batch, seq, 64\].*\(2, 5, 48\)"):
        GPT2(TINY).apply({"params": tiny_params[TINY]}, jnp.zeros((2, 5, 48)))


@pytest.mark.slow
@CONFIGS
def test_attention_weights_are_causal_and_normalised(config, tiny_params):
    _, attn = forward(tiny_params[config], inputs(config), config=config,
                      output_attentions=True)
    t = config.n_positions
    assert len(attn) == config.n_layer
    for a in attn:
        a = np.asarray(a)
        assert a.shape == (2, config.n_head, t, t)
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        assert np.all(a[..., np.triu_indices(t, k=1)[0], np.triu_indices(t, k=1)[1]] == 0)
    # Causality end to end, on both attention paths: changing the last token leaves earlier
    # outputs unchanged. (A random change: LayerNorm removes a constant shift of a token.)
    x = inputs(config)
    x[:, -1] += np.random.default_rng(1).standard_normal(x[:, -1].shape, np.float32)
    for weights in (True, False):
        before = forward(tiny_params[config], inputs(config), config=config,
                         output_attentions=weights)
        after = forward(tiny_params[config], x, config=config, output_attentions=weights)
        before, after = (np.asarray(y[0] if weights else y) for y in (before, after))
        np.testing.assert_array_equal(after[:, :-1], before[:, :-1])
        assert np.abs(after[:, -1] - before[:, -1]).max() > 0.1


# --- the two attention paths --------------------------------------------------------------
# jax.nn.dot_product_attention unless the weights are requested or attention dropout is
# active; the explicit softmax otherwise. Both must compute the same attention.

def _attention(config, params, x, query_positions=None, dtype=jnp.float32, weights=False):
    """One Attention layer under jit; `weights` requests them (the explicit path)."""
    def run(p, x, qp):
        model = Attention(config, dtype)
        if not weights:
            return model.apply({"params": p}, x, True, qp)
        out, state = model.apply({"params": p}, x, True, qp, mutable=["intermediates"])
        return out, state["intermediates"]["attention_weights"][0]
    return jax.jit(run)(params["h_0"]["attn"], x, query_positions)


def _query_positions(config, seed=0):
    """Two query positions per row, in no particular order, the last one included."""
    rng, t = np.random.default_rng(seed), config.n_positions
    return jnp.array([[t - 1, rng.integers(t - 1)], [rng.integers(1, t), 0]])


@pytest.mark.slow
@CONFIGS
@pytest.mark.parametrize("queries", ["every_position", "query_positions"])
def test_fused_attention_equals_explicit_softmax_within_1e6(config, queries, tiny_params):
    x = inputs(config, seed=11)
    qp = _query_positions(config) if queries == "query_positions" else None
    fused = np.asarray(_attention(config, tiny_params[config], x, qp))
    explicit, weights = _attention(config, tiny_params[config], x, qp, weights=True)
    rows = config.n_positions if qp is None else qp.shape[1]
    assert fused.shape == explicit.shape == (2, rows, config.n_embd)
    assert weights.shape == (2, config.n_head, rows, config.n_positions)
    assert np.abs(fused).max() > 0.1  # not trivially equal
    np.testing.assert_allclose(fused, np.asarray(explicit), rtol=0, atol=1e-6)
    if qp is not None:  # the rows of the whole sequence's attention at those positions
        everywhere = np.asarray(_attention(config, tiny_params[config], x))
        np.testing.assert_allclose(fused, np.take_along_axis(everywhere, qp[:, :, None], 1),
                                   rtol=0, atol=1e-6)
        _, all_weights = _attention(config, tiny_params[config], x, weights=True)
        np.testing.assert_allclose(
            weights, np.take_along_axis(np.asarray(all_weights), qp[:, None, :, None], 2),
            rtol=0, atol=1e-6)


@pytest.mark.slow
@CONFIGS
def test_fused_and_explicit_attention_agree_under_bfloat16(config, tiny_params):
    # Both take float32 logits of bfloat16 q, k and a float32 softmax, and round the
    # probabilities to bfloat16 for the product with v (measured here: bit-identical). Bound:
    # one bfloat16 unit roundoff (2**-8) of the output's scale.
    x = inputs(config, seed=12)
    fused = np.asarray(_attention(config, tiny_params[config], x, dtype=jnp.bfloat16), np.float32)
    explicit, weights = _attention(config, tiny_params[config], x, dtype=jnp.bfloat16,
                                   weights=True)
    assert weights.dtype == jnp.float32  # the softmax stays float32
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    diff = np.abs(fused - np.asarray(explicit, np.float32)).max()
    assert diff <= 2 ** -8 * np.abs(fused).max(), diff


@pytest.mark.parametrize("case,expected", [
    ("deterministic", "fused"), ("dropout_without_attn_pdrop", "fused"),
    ("attn_dropout", "explicit"), ("weights_requested", "explicit")])
def test_attention_takes_the_fused_path_unless_weights_or_attention_dropout(
        case, expected, tiny_params, monkeypatch):
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    config = dataclasses.replace(TINY, attn_pdrop=0.0 if case == "dropout_without_attn_pdrop"
                                 else 0.1)
    deterministic = case in ("deterministic", "weights_requested")
    jax.eval_shape(  # traces the model (a jitted `forward` may come from the cache)
        lambda p, x, r: forward.__wrapped__(p, x, r, config=config, deterministic=deterministic,
                                            output_attentions=case == "weights_requested"),
        tiny_params[TINY], inputs(TINY), jax.random.PRNGKey(0))
    assert len(calls) == (TINY.n_layer if expected == "fused" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_requesting_attention_weights_leaves_the_output_unchanged(remat, tiny_params):
    params, x = tiny_params[TINY], inputs(TINY, seed=13)
    plain = np.asarray(forward(params, x, config=TINY))
    out, weights = forward(params, x, config=TINY, remat=remat, output_attentions=True)
    # two programs (with and without the weights as outputs): a few ulp apart at most
    np.testing.assert_allclose(np.asarray(out), plain, rtol=4e-6, atol=1e-6)
    _, reference = forward(params, x, config=TINY, output_attentions=True)
    assert len(weights) == TINY.n_layer
    for a, b in zip(weights, reference):  # under remat too, the same weights in layer order
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(weights[0]) - np.asarray(weights[1])).max() > 1e-3


def test_attention_weights_with_read_positions_cover_the_read_rows_of_the_last_block(
        tiny_params):
    params, x = tiny_params[TINY], inputs(TINY, seed=14)
    read = _query_positions(TINY, seed=1)
    _, full = forward(params, x, config=TINY, output_attentions=True)
    y, state = jax.jit(lambda p: GPT2(TINY).apply({"params": p}, x, read_positions=read,
                                                 mutable=["intermediates"]))(params)
    weights = attention_weights(state)
    assert y.shape == (2, 2, TINY.n_embd)
    np.testing.assert_allclose(weights[0], full[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        weights[-1], np.take_along_axis(np.asarray(full[-1]), read[:, None, :, None], 2),
        rtol=0, atol=1e-6)


# --- bfloat16 compute ------------------------------------------------------------------

@pytest.mark.slow
@CONFIGS
def test_bfloat16_compute_stays_close_to_float32(config, tiny_params):
    # Measured on these two configs (all weights random with std 0.1, unit-normal inputs,
    # full sequence, 8 seeds each): relative Frobenius error ||y_bf16 - y_f32|| / ||y_f32||
    # = 0.0055-0.0067, about 1.5x bfloat16's unit roundoff 2**-8 = 0.0039; max abs error
    # 0.023-0.038 on outputs of max |y| ~ 4. Bounds: relative error <= 0.015 (~4 unit
    # roundoffs) and max abs error <= 0.08. A wrong cast, a bf16 softmax without the max
    # subtraction or a LayerNorm blow-up exceeds them; ordinary bf16 rounding does not.
    params = tiny_params[config]
    x = inputs(config, seed=3)
    y32 = np.asarray(forward(params, x, config=config))
    y16 = forward(params, x, config=config, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    diff = np.asarray(y16, np.float32) - y32
    rel = np.linalg.norm(diff) / np.linalg.norm(y32)
    assert rel <= 0.015, rel
    assert np.abs(diff).max() <= 0.08, np.abs(diff).max()
    assert rel > 1e-4  # it really computed in bfloat16


# --- remat ------------------------------------------------------------------------------

@pytest.mark.slow
def test_remat_gives_same_output_and_gradients(tiny_params):
    config = TINY
    params = tiny_params[config]
    x = inputs(config, seed=5)

    def loss(p, remat):
        y = GPT2(config, remat=remat).apply({"params": p}, x)
        return jnp.mean(jnp.sin(3.0 * y)), y

    (l0, y0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
    (l1, y1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0],
                            jax.tree_util.tree_leaves(g1)):
        scale = float(np.abs(np.asarray(a)).max())
        assert scale > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_remat_with_dropout_matches_non_remat_for_same_rng(tiny_params):
    params = tiny_params[TINY]
    x = inputs(TINY, seed=6)
    rng = jax.random.PRNGKey(9)
    y0 = forward(params, x, rng, config=TINY, deterministic=False)
    y1 = forward(params, x, rng, config=TINY, deterministic=False, remat=True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-6)


# --- dropout ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("which", ["embd_pdrop", "attn_pdrop", "resid_pdrop"])
def test_each_dropout_changes_output_when_not_deterministic(which, tiny_params):
    rates = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    rates[which] = 0.1
    cfg = dataclasses.replace(TINY, **rates)
    params, x = tiny_params[TINY], inputs(TINY, seed=7)
    det = np.asarray(forward(params, x, config=TINY))  # rates do not matter when deterministic
    run = lambda seed: np.asarray(forward(params, x, jax.random.PRNGKey(seed), config=cfg,
                                          deterministic=False))
    a, a_again, b = run(1), run(1), run(2)
    assert np.abs(a - det).max() > 1e-3
    np.testing.assert_array_equal(a, a_again)  # same rng, same mask
    assert np.abs(a - b).max() > 1e-3  # different rng, different mask


def test_dropout_with_zero_probabilities_equals_deterministic(tiny_params):
    cfg = dataclasses.replace(TINY, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params, x = tiny_params[TINY], inputs(TINY, seed=8)
    det = forward(params, x, config=TINY)
    sto = forward(params, x, jax.random.PRNGKey(1), config=cfg, deterministic=False)
    np.testing.assert_array_equal(np.asarray(sto), np.asarray(det))


def test_non_deterministic_apply_without_dropout_rng_raises(tiny_params):
    with pytest.raises(Exception, match="dropout"):
        GPT2(TINY).apply({"params": tiny_params[TINY]}, inputs(TINY), deterministic=False)
