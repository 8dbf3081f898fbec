"""The flax ViT backbone: equal to transformers' ViT encoder, Hugging Face conversion, config,
the read_positions trim, bfloat16, remat, dropout, attention weights and parameter groups."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fpt_jax.models.vit import (HUB_REPOS, VIT_PRESETS, ViT, ViTConfig, attention_weights,
                                fresh_paths, init_params, needs_transpose, num_params,
                                param_group, param_shapes, torch_name_to_path)

TINY = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, n_positions=16)
# Non-4x MLP width and another layer-norm epsilon.
ODD = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, layer_norm_eps=1e-6, n_positions=12)
WIDE = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, n_positions=24)
HF_CASES = pytest.mark.parametrize("config,seq", [(TINY, 10), (ODD, 7), (WIDE, 24)],
                                   ids=["2x32h4", "2x64h4inner96", "2x64h4"])
POS = ("embeddings", "position_embeddings")


def random_params(config: ViTConfig, seed: int) -> dict:
    """Every leaf random (init gives zero biases and unit LayerNorm scales, which hide bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: ((1.0 if path[-1].key == "scale" else 0.0)
                            + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32),
        param_shapes(config))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "remat", "deterministic",
                                             "output_attentions"))
def forward(params, x, rng=None, read_positions=None, *, config, dtype=jnp.float32,
            remat=False, deterministic=True, output_attentions=False):
    """`ViT(...).apply` under jit; with `output_attentions`, also the attention weights."""
    model, rngs = ViT(config, dtype=dtype, remat=remat), {} if rng is None else {"dropout": rng}
    kwargs = dict(deterministic=deterministic, read_positions=read_positions, rngs=rngs)
    if not output_attentions:
        return model.apply({"params": params}, x, **kwargs)
    out, state = model.apply({"params": params}, x, mutable=["intermediates"], **kwargs)
    return out, attention_weights(state)


def inputs(config: ViTConfig, seed: int = 0, seq: int | None = None) -> np.ndarray:
    seq = config.n_positions if seq is None else seq
    return np.random.default_rng(seed).standard_normal((2, seq, config.n_embd), np.float32)


def read_positions(seq: int, seed: int = 0) -> jnp.ndarray:
    """Two positions per row, in no particular order, the first and last included."""
    rng = np.random.default_rng(seed)
    return jnp.array([[seq - 1, rng.integers(1, seq - 1)], [rng.integers(1, seq - 1), 0]])


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TINY, 0)


# --- equality with transformers ---------------------------------------------------------

def hf_model(config: ViTConfig, seed: int, classifier: bool = False):
    """A transformers ViT with every parameter random (std 0.1; layer-norm scales 1 + that)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.ViTConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, layer_norm_eps=config.layer_norm_eps,
        image_size=8, patch_size=4, num_channels=3, num_labels=3, attn_implementation="eager")
    model = (transformers.ViTForImageClassification if classifier else
             transformers.ViTModel)(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(unit + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def hf_encoder_output(model, hidden_states: np.ndarray) -> np.ndarray:
    """transformers' encoder and final layer norm on `hidden_states` (no patch embedding)."""
    import torch
    with torch.no_grad():
        h = torch.from_numpy(hidden_states)
        if hasattr(model, "encoder"):  # transformers < 5
            h = model.encoder(h).last_hidden_state
        else:
            for layer in model.layers:
                h = layer(h)
        return model.layernorm(h).numpy()


def saved_state_dict(model, directory) -> dict[str, np.ndarray]:
    """The tensors as `save_pretrained` writes them (the checkpoint files' names)."""
    from safetensors.numpy import load_file
    model.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors"))


def convert(state_dict, config: ViTConfig, table: np.ndarray) -> dict:
    """A state dict nested into our tree with torch_name_to_path + needs_transpose, plus the
    fresh position table."""
    flat = {}
    for name, value in state_dict.items():
        path = torch_name_to_path(name)
        if path is None:
            continue
        assert path[0] != "<unexpected>", name
        value = np.asarray(value, np.float32)
        flat[path] = value.T if needs_transpose(path) else value
    assert fresh_paths(config) == {POS} and POS not in flat
    flat[POS] = table
    return traverse_util.unflatten_dict(flat)


def assert_fits(params, config: ViTConfig):
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(param_shapes(config)).items()}
    assert {k: v.shape for k, v in traverse_util.flatten_dict(params).items()} == shapes


def assert_trees_equal(a, b):
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


@pytest.mark.slow
@HF_CASES
def test_equals_transformers_vit_encoder_within_1e5(config, seq, tmp_path):
    model = hf_model(config, seed=seq)
    table = 0.1 * np.random.default_rng(1).standard_normal(
        (config.n_positions, config.n_embd)).astype(np.float32)
    params = convert(saved_state_dict(model, tmp_path), config, table)
    assert_fits(params, config)
    # A live model's state dict (transformers >= 5 names its modules differently from its
    # files) converts to the same tree.
    live = {k: v.numpy() for k, v in model.state_dict().items()}
    assert_trees_equal(convert(live, config, table), params)
    x = inputs(config, seed=2, seq=seq)
    ours = np.asarray(forward(params, x, config=config))
    # HF adds its own table inside its embeddings; ours is added before the encoder.
    # Measured max |difference|: 7e-7 (2x32h4), 7e-7 (2x64h4inner96), 1.8e-6 (2x64h4, t=24).
    reference = hf_encoder_output(model, x + table[:seq])
    assert np.abs(reference).max() > 0.5  # not trivially equal
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    # The explicit-softmax path (weights requested) too.
    explicit, _ = forward(params, x, config=config, output_attentions=True)
    np.testing.assert_allclose(np.asarray(explicit), reference, rtol=0, atol=1e-5)


def test_classifier_checkpoint_with_vit_prefix_converts_to_the_same_tree(tmp_path):
    model = hf_model(TINY, seed=3)
    classifier = hf_model(TINY, seed=4, classifier=True)
    classifier.vit.load_state_dict(model.state_dict(), strict=False)  # it has no pooler
    table = np.zeros((TINY.n_positions, TINY.n_embd), np.float32)
    state = saved_state_dict(classifier, tmp_path)
    assert {"classifier.weight", "vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
            "vit.embeddings.patch_embeddings.projection.weight"} <= set(state)
    assert all(k.startswith(("vit.", "classifier.")) for k in state)
    expected = convert(saved_state_dict(model, tmp_path / "model"), TINY, table)
    assert_trees_equal(convert(state, TINY, table), expected)
    live = {k: v.numpy() for k, v in classifier.state_dict().items()}
    assert_trees_equal(convert(live, TINY, table), expected)


@pytest.mark.parametrize("name,path", [
    ("encoder.layer.3.attention.attention.query.weight",
     ("encoder", "layer_3", "attention", "attention", "query", "kernel")),
    ("vit.encoder.layer.0.attention.attention.value.bias",
     ("encoder", "layer_0", "attention", "attention", "value", "bias")),
    ("encoder.layer.11.attention.output.dense.weight",
     ("encoder", "layer_11", "attention", "output", "dense", "kernel")),
    ("encoder.layer.2.intermediate.dense.bias", ("encoder", "layer_2", "intermediate", "dense",
                                                 "bias")),
    ("vit.encoder.layer.2.output.dense.weight", ("encoder", "layer_2", "output", "dense",
                                                 "kernel")),
    ("encoder.layer.1.layernorm_before.weight", ("encoder", "layer_1", "layernorm_before",
                                                 "scale")),
    ("encoder.layer.1.layernorm_after.bias", ("encoder", "layer_1", "layernorm_after", "bias")),
    ("vit.layernorm.weight", ("layernorm", "scale")),
    ("layernorm.bias", ("layernorm", "bias")),
    ("layers.4.attention.k_proj.weight", ("encoder", "layer_4", "attention", "attention", "key",
                                          "kernel")),
    ("layers.4.mlp.fc2.bias", ("encoder", "layer_4", "output", "dense", "bias")),
    *[(k, None) for k in (
        "embeddings.cls_token", "vit.embeddings.position_embeddings", "embeddings.mask_token",
        "vit.embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias", "pooler.dense.weight",
        "classifier.weight", "classifier.bias")],
    *[(k, ("<unexpected>", k)) for k in (
        "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.LayerNorm.weight",
        "h.0.attn.c_attn.weight", "encoder.layer.x.output.dense.weight", "layernorm.gamma")],
])
def test_torch_name_to_path(name, path):
    assert torch_name_to_path(name) == path
    if path is not None and path[0] != "<unexpected>":
        assert needs_transpose(path) == (path[-1] == "kernel")


# --- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layers,heads,width,inner", [
    ("vit-base", 12, 12, 768, 3072), ("vit-small", 12, 6, 384, 1536),
    ("vit-tiny", 12, 3, 192, 768)])
def test_presets(name, layers, heads, width, inner):
    cfg = ViTConfig.preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.intermediate_size) == (
        layers, heads, width, inner)
    assert (cfg.n_positions, cfg.layer_norm_eps, cfg.hidden_act) == (1024, 1e-12, "gelu")
    assert sorted(VIT_PRESETS) == ["vit-base", "vit-small", "vit-tiny"]
    assert HUB_REPOS == {"vit-base": "google/vit-base-patch16-224"}


def test_preset_overrides_by_generic_names():
    cfg = ViTConfig.preset("vit-base", n_layer=2, n_head=4, n_embd=64)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size,
            cfg.intermediate_size) == (2, 4, 64, 256)
    cfg = ViTConfig.preset("vit-small", n_embd=48, intermediate_size=80, n_positions=32,
                           hidden_dropout_prob=0.1)
    assert (cfg.n_embd, cfg.intermediate_size, cfg.n_positions, cfg.n_head,
            cfg.hidden_dropout_prob) == (48, 80, 32, 6, 0.1)
    assert ViTConfig.preset("vit-base").n_layer == 12  # the shared preset is not mutated
    with pytest.raises(ValueError, match="vit-huge.*vit-small"):
        ViTConfig.preset("vit-huge")
    with pytest.raises(AttributeError):
        cfg.n_layer = 3  # read-only


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_size=50.*num_attention_heads=3"):
        ViTConfig(hidden_size=50, num_attention_heads=3)
    with pytest.raises(ValueError, match="num_hidden_layers must be >= 1"):
        ViTConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="hidden_act='relu'.*gelu"):
        ViTConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="qkv_bias=False.*True"):
        ViTConfig(qkv_bias=False)


def test_with_dropout_sets_both_probabilities():
    cfg = TINY.with_dropout(0.25)
    assert (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == (0.25, 0.25)
    assert dataclasses.replace(cfg, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0) == TINY


@pytest.mark.parametrize("hf_kwargs,expected", [
    ({}, ViTConfig.preset("vit-base")),  # transformers' default ViTConfig is vit-base
    (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
          layer_norm_eps=1e-6, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2,
          image_size=32, patch_size=8, num_channels=1),
     dataclasses.replace(ODD, n_positions=1024, hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.2)),
], ids=["default", "2x64h4inner96"])
def test_from_hf_of_reference_config_json(tmp_path, hf_kwargs, expected):
    transformers = pytest.importorskip("transformers")
    transformers.ViTConfig(**hf_kwargs).save_pretrained(tmp_path)
    cfg = ViTConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == expected
    assert ViTConfig.from_hf(cfg.to_hf()) == cfg  # our own config.json round-trips
    assert ViTConfig.from_hf(ODD.to_hf()) == ODD


def test_from_hf_rejects_other_models_and_activations():
    with pytest.raises(ValueError, match=r"^config.json .*model_type='bert'.*'vit'"):
        ViTConfig.from_hf({"model_type": "bert", "hidden_size": 384})
    with pytest.raises(ValueError, match=r"^config.json .*model_type=None"):
        ViTConfig.from_hf({"hidden_size": 384})
    with pytest.raises(ValueError, match=r"^config.json hidden_act='relu'.*\('gelu',\)"):
        ViTConfig.from_hf({"model_type": "vit", "hidden_act": "relu"})


def test_num_params_and_param_tree():
    assert num_params(ViTConfig.preset("vit-base")) == 85_842_432
    params = param_shapes(TINY)
    assert set(params) == {"embeddings", "encoder", "layernorm"}
    assert set(params["encoder"]) == {"layer_0", "layer_1"}
    assert params["embeddings"]["position_embeddings"].shape == (16, 32)
    assert params["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"].shape == (32, 128)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    init = init_params(TINY, jax.random.PRNGKey(0))
    table = np.asarray(init["embeddings"]["position_embeddings"])
    assert 0.015 < table.std() < 0.025  # normal(0.02)
    assert not np.asarray(init["encoder"]["layer_0"]["output"]["dense"]["bias"]).any()


def test_num_params_equals_transformers_minus_input_side_plus_new_table():
    model = hf_model(ODD, seed=0)
    total = sum(p.numel() for p in model.parameters())
    unused = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith(("embeddings.", "pooler.")))
    assert num_params(ODD) == total - unused + ODD.n_positions * ODD.n_embd


def test_bad_inputs_raise_naming_the_expected_shape(tiny_params):
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds .*n_positions=16"):
        ViT(TINY).apply({"params": tiny_params}, inputs(TINY, seq=17))
    with pytest.raises(ValueError, match=r"\[batch, seq, 32\].*\(2, 5, 48\)"):
        ViT(TINY).apply({"params": tiny_params}, jnp.zeros((2, 5, 48)))


# --- read_positions, attention weights ----------------------------------------------------

def assert_gradients_close(actual, expected):
    """Leaf by leaf within 1e-5 of the largest gradient. The key bias's gradient is zero in
    exact arithmetic (softmax ignores a shift shared by all keys): rounding noise on both
    sides, so it is held to the global scale, not its own; every other leaf is non-zero."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    scale = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree_util.tree_leaves(expected))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                            jax.tree_util.tree_leaves(actual)):
        name = jax.tree_util.keystr(path)
        assert "['key']['bias']" in name or np.abs(np.asarray(a)).max() > 1e-4 * scale, name
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale,
                                   err_msg=name)


@pytest.mark.slow
def test_read_positions_equal_the_full_output_there_with_the_same_gradients(tiny_params):
    x, rp = inputs(TINY, seed=4), read_positions(TINY.n_positions)
    w = np.random.default_rng(5).standard_normal((2, 2, TINY.n_embd)).astype(np.float32)

    def loss(params, x, trim):
        if trim:
            y = forward(params, x, read_positions=rp, config=TINY)
        else:
            y = jnp.take_along_axis(forward(params, x, config=TINY), rp[:, :, None], axis=1)
        return jnp.sum(jnp.sin(3.0 * y) * w), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (l0, y0), (gp0, gx0) = grad(tiny_params, x, False)
    (l1, y1), (gp1, gx1) = grad(tiny_params, x, True)
    assert y1.shape == (2, 2, TINY.n_embd)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=0, atol=1e-5)
    scale = float(np.abs(np.asarray(gx0)).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), rtol=0, atol=1e-5 * scale)
    assert_gradients_close(gp1, gp0)


@pytest.mark.slow
def test_attention_weights_are_bidirectional_normalised_in_layer_order(tiny_params):
    x, t = inputs(TINY, seed=6), TINY.n_positions
    fused = np.asarray(forward(tiny_params, x, config=TINY))
    out, weights = forward(tiny_params, x, config=TINY, output_attentions=True)
    np.testing.assert_allclose(np.asarray(out), fused, rtol=0, atol=1e-6)
    assert len(weights) == TINY.n_layer
    for a in weights:
        a = np.asarray(a)
        assert a.shape == (2, TINY.n_head, t, t) and a.dtype == np.float32
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        assert a[..., np.triu_indices(t, k=1)[0], np.triu_indices(t, k=1)[1]].min() > 0
    assert np.abs(np.asarray(weights[0]) - np.asarray(weights[1])).max() > 1e-3
    # Layer 0's weights under the remat lift are the same, in the same order.
    _, rematted = forward(tiny_params, x, config=TINY, remat=True, output_attentions=True)
    for a, b in zip(weights, rematted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # With read_positions, the last layer's weights are the read rows of the full ones.
    rp = read_positions(t, seed=1)
    _, trimmed = forward(tiny_params, x, read_positions=rp, config=TINY, output_attentions=True)
    np.testing.assert_allclose(trimmed[0], weights[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        trimmed[-1], np.take_along_axis(np.asarray(weights[-1]), rp[:, None, :, None], 2),
        rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,fused_calls", [
    ("deterministic", 2), ("hidden_dropout_only", 2), ("attention_dropout", 0),
    ("weights_requested", 0)])
def test_attention_takes_the_fused_path_unless_weights_or_attention_dropout(
        case, fused_calls, tiny_params, monkeypatch):
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    config = dataclasses.replace(TINY.with_dropout(0.1), attention_probs_dropout_prob=0.0
                                 if case == "hidden_dropout_only" else 0.1)
    deterministic = case in ("deterministic", "weights_requested")
    jax.eval_shape(  # traces the model (a jitted `forward` may come from the cache)
        lambda p, x, r: forward.__wrapped__(p, x, r, config=config, deterministic=deterministic,
                                            output_attentions=case == "weights_requested"),
        tiny_params, inputs(TINY), jax.random.PRNGKey(0))
    assert len(calls) == fused_calls


# --- bfloat16, remat, dropout ---------------------------------------------------------------

@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32(tiny_params):
    # Measured (std-0.1 random weights, unit-normal inputs, 4 seeds): relative Frobenius error
    # 0.0043-0.0047 (~1.2 bfloat16 unit roundoffs 2**-8), max abs error 0.017-0.023 on
    # outputs of max |y| ~ 3.5. Bounds as test_gpt2.py's: <= 0.015 and <= 0.08.
    x = inputs(TINY, seed=3)
    y32 = np.asarray(forward(tiny_params, x, config=TINY))
    y16 = forward(tiny_params, x, config=TINY, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    diff = np.asarray(y16, np.float32) - y32
    rel = np.linalg.norm(diff) / np.linalg.norm(y32)
    assert 1e-4 < rel <= 0.015, rel  # and it really computed in bfloat16
    assert np.abs(diff).max() <= 0.08, np.abs(diff).max()


@pytest.mark.slow
def test_remat_gives_same_output_and_gradients(tiny_params):
    x = inputs(TINY, seed=5)

    def loss(p, remat):
        y = ViT(TINY, remat=remat).apply({"params": p}, x)
        return jnp.mean(jnp.sin(3.0 * y)), y

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l0, y0), g0 = grad(tiny_params, False)
    (l1, y1), g1 = grad(tiny_params, True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    assert_gradients_close(g1, g0)
    # With dropout (both kinds), the same rng gives the same masks with and without remat.
    cfg, rng = TINY.with_dropout(0.1), jax.random.PRNGKey(9)
    y0 = forward(tiny_params, x, rng, config=cfg, deterministic=False)
    y1 = forward(tiny_params, x, rng, config=cfg, deterministic=False, remat=True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hidden_dropout_prob", "attention_probs_dropout_prob"])
def test_each_dropout_changes_output_when_not_deterministic(which, tiny_params):
    cfg = dataclasses.replace(TINY, **{which: 0.1})
    x = inputs(TINY, seed=7)
    det = np.asarray(forward(tiny_params, x, config=TINY))
    run = lambda seed: np.asarray(forward(tiny_params, x, jax.random.PRNGKey(seed),  # noqa: E731
                                          config=cfg, deterministic=False))
    a, b = run(1), run(2)
    assert np.abs(a - det).max() > 1e-3
    np.testing.assert_array_equal(a, run(1))  # same rng, same mask
    assert np.abs(a - b).max() > 1e-3
    # No dropout rates: the non-deterministic apply is the deterministic one.
    same = forward(tiny_params, x, jax.random.PRNGKey(1), config=TINY, deterministic=False)
    np.testing.assert_array_equal(np.asarray(same), det)


# --- parameter groups -----------------------------------------------------------------------

def test_param_group_covers_every_parameter_with_the_expected_counts():
    config = dataclasses.replace(TINY, num_hidden_layers=3)
    leaves, sizes = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
        group = param_group(path)  # jax key paths are accepted as well as strings
        assert group is not None, jax.tree_util.keystr(path)
        assert group == param_group(tuple(k.key for k in path))
        name, layer = group
        if layer is not None:
            assert path[1].key == f"layer_{layer}"
        leaves[group] = leaves.get(group, 0) + 1
        sizes[name] = sizes.get(name, 0) + leaf.size
    assert leaves == {("pos", None): 1, ("ln", None): 2,
                      **{(g, i): n for i in range(3) for g, n in
                         (("ln", 4), ("attn", 8), ("mlp", 4))}}
    d, inner = config.n_embd, config.intermediate_size
    assert sizes == {"pos": 16 * d, "ln": 2 * d * (2 * 3 + 1), "attn": 3 * 4 * (d * d + d),
                     "mlp": 3 * (2 * d * inner + inner + d)}
    assert sum(sizes.values()) == num_params(config)


@pytest.mark.parametrize("path,group", [
    # GPT-2's names
    (("wpe", "embedding"), None), (("h_0", "attn", "c_attn", "kernel"), None),
    (("h_0", "ln_1", "scale"), None), (("ln_f", "scale"), None),
    # BERT's own names
    (("encoder", "layer_0", "attention", "self", "query", "kernel"), None),
    (("encoder", "layer_0", "output", "LayerNorm", "scale"), None),
    (("encoder", "layer_0", "attention", "output", "LayerNorm", "bias"), None),
    (("embeddings", "token_type_embeddings", "embedding"), None),
    (("embeddings", "LayerNorm", "scale"), None),
    (("embeddings", "position_embeddings", "embedding"), None),
    (("embeddings", "word_embeddings", "embedding"), None),
    # ... and those BERT shares with ViT
    (("encoder", "layer_0", "intermediate", "dense", "kernel"), ("mlp", 0)),
    (("encoder", "layer_5", "output", "dense", "bias"), ("mlp", 5)),
    (("encoder", "layer_2", "attention", "output", "dense", "kernel"), ("attn", 2)),
    # ViT's own
    (("embeddings", "position_embeddings"), ("pos", None)),
    (("layernorm", "scale"), ("ln", None)),
    (("encoder", "layer_1", "layernorm_after", "bias"), ("ln", 1)),
    (("encoder", "layer_1", "attention", "attention", "value", "bias"), ("attn", 1)),
    (("encoder", "layer_1", "attention", "attention", "value"), None),
    (("encoder", "layer_x", "layernorm_after", "bias"), None),
    (("encoder",), None), (("layernorm",), None),
])
def test_param_group_of_other_families_paths(path, group):
    assert param_group(path) == group
