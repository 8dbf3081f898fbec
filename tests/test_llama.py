"""The Llama-family backbones (`fpt_jax.models.llama`, `mistral`, `qwen2`) against
`transformers`' LlamaModel, MistralModel and Qwen2Model, loaded through the project's loader
from checkpoints the test writes (random weights, every parameter randomised); presets against
the published parameter counts; FPT's position table, groups and configs.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import freeze, weights
from fpt_jax.models import backbones, llama
from fpt_jax.models.llama import Llama, LlamaConfig
from fpt_jax.models.mistral import MistralConfig
from fpt_jax.models.qwen2 import Qwen2Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=40, rms_norm_eps=1e-5, max_position_embeddings=64)
# name -> (transformers config class, model class, extra fields)
VARIANTS = {
    "llama_gqa": ("LlamaConfig", "LlamaModel", {}),
    "llama_mha": ("LlamaConfig", "LlamaModel", dict(num_key_value_heads=8, attention_bias=True,
                                                     mlp_bias=True)),
    "llama3_rope": ("LlamaConfig", "LlamaModel", dict(
        max_position_embeddings=256, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    "llama_linear_rope": ("LlamaConfig", "LlamaModel", dict(
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral_window": ("MistralConfig", "MistralModel", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(num_key_value_heads=4, rope_theta=1e6)),
}


def reference(name: str, seed: int = 0):
    config_cls, model_cls, extra = VARIANTS[name]
    hf = getattr(transformers, config_cls)(**{**BASE, **extra}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf).eval()
    with torch.no_grad():  # Hugging Face's init (zero biases, unit norms) would hide bugs
        for n, p in model.named_parameters():
            p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (transformers model, directory of its safetensors checkpoint)."""
    out = {}
    for name in VARIANTS:
        model = reference(name)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, safe_serialization=True)
        out[name] = model, directory
    return out


def ours(directory, x, **kwargs):
    config, params = weights.load_local(directory)
    params = {**params, "input_positions": {"embedding": jnp.zeros(
        (config.n_positions, config.hidden_size))}}
    return config, params, np.asarray(Llama(config).apply({"params": params}, x, **kwargs))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_transformers_at_every_position(saved, name):
    model, directory = saved[name]
    x = np.random.default_rng(1).normal(size=(3, 12, 64)).astype(np.float32)
    config, _, y = ours(directory, jnp.asarray(x))
    assert type(config).model_type == model.config.model_type
    with torch.no_grad():
        want = model(inputs_embeds=torch.from_numpy(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_right_padding_leaves_every_real_position_as_transformers_has_it(saved, name):
    model, directory = saved[name]
    x = np.random.default_rng(2).normal(size=(3, 10, 64)).astype(np.float32)
    lengths = np.array([10, 6, 3])
    mask = (np.arange(10) < lengths[:, None]).astype(np.int64)
    _, _, y = ours(directory, jnp.asarray(x), lengths=jnp.asarray(lengths))
    with torch.no_grad():
        want = model(inputs_embeds=torch.from_numpy(x),
                     attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(y[b, :n], want[b, :n], atol=1e-5, rtol=1e-5)


def test_a_sharded_checkpoint_loads_through_its_index_and_a_missing_shard_is_named(
        saved, tmp_path):
    model, directory = saved["llama3_rope"]
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((sharded / weights.SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    whole, sharded_params = weights.load_local(directory)[1], weights.load_local(sharded)[1]
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, whole, sharded_params))
    (sharded / shards[1]).unlink()
    with pytest.raises(weights.WeightsError, match=f"not in .*{shards[1]}"):
        weights.load_local(sharded)


@pytest.mark.slow
def test_the_read_positions_are_the_full_outputs_there():
    config = LlamaConfig(**BASE)
    params = llama.init_params(config, jax.random.PRNGKey(0), seq_len=9)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 64))
    apply = jax.jit(lambda p, x, read=None: Llama(config).apply({"params": p}, x,
                                                                 read_positions=read))
    full = apply(params, x)
    read = jnp.array([[8, 3], [5, 0]])
    part = apply(params, x, read)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, read[:, :, None], axis=1),
                               atol=1e-5, rtol=1e-5)


# The counts the model cards and Hugging Face's `num_parameters()` give.
PUBLISHED = {"smollm-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
             "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248,
             "mistral-7b": 7_241_732_096}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_presets_have_the_published_parameter_counts(preset):
    config = backbones.family_of_preset(preset).config_cls.preset(preset)
    assert llama.published_count(config) == PUBLISHED[preset]


def test_the_position_table_starts_at_zero_and_the_fpt_selection_trains_it_and_the_norms():
    config = dataclasses.replace(LlamaConfig(**BASE), n_positions=16)
    params = {"transformer": llama.init_params(config, jax.random.PRNGKey(0))}
    assert not np.any(params["transformer"]["input_positions"]["embedding"])
    groups = {p: backbones.param_group(tuple(k.key for k in p[1:]))
              for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert None not in groups.values()
    assert {g for g, _ in groups.values()} == {"pos", "ln", "attn", "mlp"}
    trainable, frozen = freeze.partition(params, freeze.parse_selection("pos,ln", 2))
    names = {"/".join(k.key for k in p) for p, _ in
             jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert names == {"transformer/input_positions/embedding", "transformer/norm/scale",
                     *(f"transformer/layers_{i}/{n}/scale" for i in range(2)
                       for n in ("input_layernorm", "post_attention_layernorm"))}


def test_configs_read_both_rope_layouts_and_refuse_what_is_not_implemented():
    hub = {"model_type": "llama", **BASE, "rope_theta": 5e5, "rope_scaling": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)}
    new = transformers.LlamaConfig(**{k: v for k, v in hub.items() if k != "model_type"}
                                   ).to_dict()  # rope_parameters, transformers 5's layout
    assert LlamaConfig.from_hf(hub) == LlamaConfig.from_hf(new)
    assert LlamaConfig.from_hf(LlamaConfig.from_hf(hub).to_hf()) == LlamaConfig.from_hf(hub)
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported; accepted"):
        LlamaConfig.from_hf({**hub, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_attention_heads=8 must be divisible by "
                                         "num_key_value_heads=3"):
        LlamaConfig(**{**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
        Qwen2Config.from_hf({"model_type": "qwen2", **BASE, "use_sliding_window": True})
    assert MistralConfig.from_hf({"model_type": "mistral", **BASE}).window == 4096


def test_the_pytorch_reference_trains_what_fpt_trains_on_a_llama():
    from fpt_jax import bench, build
    from fpt_jax.bench import torch_ref
    from tests.settings import train_config
    cfg = train_config(model="smollm-135m", init="random", n_layer=2, n_head=3, n_embd=48,
                       num_devices=1)
    bc = bench.Bench(cfg, bench.BenchConfig(torch_reference=True))
    shape = bench.SHAPES["bit_xor"]
    case = bench.Case(shape, "fpt", "float32", False)
    g = build.build_group(bc.train_config(case))
    ours = sum(int(np.prod(x.shape[1:])) for x in jax.tree_util.tree_leaves(g.states.trainable))
    batch = shape.task().batch("train", 0, shape.batch_size, seed=0)
    runner = torch_ref.TorchRunner(bc, case, [batch])
    assert runner.trainable_params == ours
    runner.run_step()  # one training step of the reference runs


@pytest.mark.slow
def test_remat_and_bfloat16_compute_what_float32_computes():
    config = LlamaConfig(**BASE)
    params = llama.init_params(config, jax.random.PRNGKey(0), seq_len=7)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 64))

    def loss(p, remat=False, dtype=jnp.float32):
        return jnp.sum(Llama(config, dtype, remat).apply({"params": p}, x).astype(jnp.float32) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(p, remat=True)))(params)
    assert value == value_r
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: np.allclose(a, b, rtol=1e-6, atol=1e-7), grads, grads_r))
    value_bf16 = jax.jit(lambda p: loss(p, dtype=jnp.bfloat16))(params)
    assert value_bf16 != value and abs(value_bf16 - value) / value < 2e-2
