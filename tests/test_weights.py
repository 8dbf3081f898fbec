"""Weight conversion: Hugging Face GPT-2 files -> our flax tree, checked against torch.

The reference is `transformers.GPT2Model` with random weights (no hub here): every
parameter, including LayerNorm scales and all biases, is drawn at random so that a swapped,
transposed or dropped tensor changes the output.
"""
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import serialization  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from fpt_jax.models.gpt2 import (GPT2, GPT2Config, attention_weights, num_params,  # noqa: E402
                                 param_shapes)
from fpt_jax.weights import WeightsError, load_gpt2  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

HF_CONFIGS = {
    "2x64h4": dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100),
    "3x48h3inner80": dict(n_layer=3, n_embd=48, n_head=3, n_inner=80, n_positions=24,
                          vocab_size=90, layer_norm_epsilon=1e-6),
}


@dataclasses.dataclass
class Reference:
    name: str
    hf_config: Any = None  # transformers.GPT2Config
    model: Any = None  # transformers.GPT2Model
    state: dict = None  # torch key -> float32 numpy
    x: np.ndarray = None  # inputs_embeds
    hidden: np.ndarray = None  # reference last_hidden_state
    attentions: tuple = ()
    safetensors_dir: Path = None
    bin_dir: Path = None
    config: GPT2Config = None  # what from_hf must give


def _random_reference(name: str, seed: int) -> "transformers.GPT2Model":
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**HF_CONFIGS[name], bos_token_id=0, eos_token_id=0,
                                        attn_implementation="eager")
    model = transformers.GPT2Model(hf_config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_ln_scale = ".ln_" in f".{pname}" and pname.endswith("weight")
            p.copy_((1.0 if is_ln_scale else 0.0) + 0.1 * torch.randn_like(p))
    return model


def _write_config(directory: Path, hf_config, **overrides) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = hf_config.to_dict()
    cfg.update(overrides)
    (directory / "config.json").write_text(json.dumps(cfg))


def _write_safetensors(directory: Path, hf_config, state: dict, **config_overrides) -> Path:
    _write_config(directory, hf_config, **config_overrides)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              str(directory / "model.safetensors"))
    return directory


def _hf_flax_tree(state: dict, n_layer: int) -> dict:
    """Hugging Face's (transformers 4.x) FlaxGPT2Model layout, built from the torch weights."""
    def dense(prefix):  # FlaxConv1D keeps the torch Linear layout: kernel [out, in]
        return {"kernel": state[f"{prefix}.weight"].T.copy(), "bias": state[f"{prefix}.bias"]}

    def ln(prefix):
        return {"scale": state[f"{prefix}.weight"], "bias": state[f"{prefix}.bias"]}

    return {
        "wte": {"embedding": state["wte.weight"]},
        "wpe": {"embedding": state["wpe.weight"]},
        "h": {str(i): {"ln_1": ln(f"h.{i}.ln_1"),
                       "attn": {"c_attn": dense(f"h.{i}.attn.c_attn"),
                                "c_proj": dense(f"h.{i}.attn.c_proj")},
                       "ln_2": ln(f"h.{i}.ln_2"),
                       "mlp": {"c_fc": dense(f"h.{i}.mlp.c_fc"),
                               "c_proj": dense(f"h.{i}.mlp.c_proj")}}
              for i in range(n_layer)},
        "ln_f": ln("ln_f"),
    }


_BUILT: dict[str, Reference] = {}


def _reference(name: str, tmp_path_factory) -> Reference:
    """Built once per configuration for the whole module."""
    if name not in _BUILT:
        _BUILT[name] = _build_reference(name, tmp_path_factory)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(HF_CONFIGS), ids=list(HF_CONFIGS))
def ref(request, tmp_path_factory) -> Reference:
    return _reference(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Reference:
    """The configuration with n_inner set and non-square MLP weights; for error cases."""
    return _reference("3x48h3inner80", tmp_path_factory)


def _build_reference(name: str, tmp_path_factory) -> Reference:
    model = _random_reference(name, seed=len(name))
    hf = model.config
    root = tmp_path_factory.mktemp(f"ref_{name}")
    model.save_pretrained(root / "safetensors")
    (root / "bin").mkdir()
    hf.save_pretrained(root / "bin")
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    x = np.random.default_rng(0).standard_normal((2, hf.n_positions, hf.n_embd),
                                                 dtype=np.float32)
    with torch.no_grad():
        out = model(inputs_embeds=torch.from_numpy(x), output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == hf.n_layer
    return Reference(
        name=name, hf_config=hf, model=model,
        state={k: v.numpy().copy() for k, v in model.state_dict().items()},
        x=x, hidden=out.last_hidden_state.numpy(),
        attentions=tuple(a.numpy() for a in out.attentions),
        safetensors_dir=root / "safetensors", bin_dir=root / "bin",
        config=GPT2Config(n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd,
                          n_positions=hf.n_positions, vocab_size=hf.vocab_size,
                          n_inner=hf.n_inner, layer_norm_epsilon=hf.layer_norm_epsilon))


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, x, *, config):
    """The hidden states of both attention paths (fused; explicit, with the weights)."""
    fused = GPT2(config).apply({"params": params}, x, deterministic=True)
    hidden, state = GPT2(config).apply({"params": params}, x, deterministic=True,
                                       mutable=["intermediates"])
    return fused, hidden, attention_weights(state)


def assert_matches_reference(ref: Reference, config: GPT2Config, params) -> None:
    fused, hidden, attentions = _forward(params, jnp.asarray(ref.x), config=config)
    for path, h in (("fused", fused), ("explicit", hidden)):
        assert h.dtype == jnp.float32
        err = np.abs(np.asarray(h) - ref.hidden).max()
        assert err <= 1e-5, f"last_hidden_state ({path}) differs from the reference by {err}"
    assert len(attentions) == len(ref.attentions)
    for i, (a, b) in enumerate(zip(attentions, ref.attentions)):
        assert a.shape == b.shape
        err = np.abs(np.asarray(a) - b).max()
        assert err <= 1e-5, f"attention weights of layer {i} differ by {err}"


def assert_same_params(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# --- numerical equivalence, one test per file format ------------------------------------

def test_safetensors_checkpoint_matches_reference_hidden_states_and_attentions(ref):
    assert (ref.safetensors_dir / "model.safetensors").is_file()
    config, params = load_gpt2(ref.safetensors_dir)
    assert config == ref.config
    assert_matches_reference(ref, config, params)


def test_pytorch_bin_checkpoint_matches_reference_hidden_states_and_attentions(ref):
    assert not list(ref.bin_dir.glob("*.safetensors"))
    config, params = load_gpt2(str(ref.bin_dir))  # a str path works as well as a Path
    assert config == ref.config
    assert_matches_reference(ref, config, params)
    assert_same_params(params, load_gpt2(ref.safetensors_dir)[1])


@pytest.mark.parametrize("wrap", [False, True], ids=["GPT2Model", "GPT2LMHeadModel"])
def test_hf_flax_msgpack_checkpoint_matches_reference(ref, wrap, tmp_path):
    tree = _hf_flax_tree(ref.state, ref.config.n_layer)
    if wrap:  # FlaxGPT2LMHeadModel nests the backbone under 'transformer'
        tree = {"transformer": tree}
    _write_config(tmp_path, ref.hf_config)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    config, params = load_gpt2(tmp_path)
    assert config == ref.config
    assert_matches_reference(ref, config, params)
    assert_same_params(params, load_gpt2(ref.safetensors_dir)[1])


def test_loaded_params_are_float32_numpy_without_token_embedding(ref):
    _, params = load_gpt2(ref.safetensors_dir)
    assert "wte" not in params
    assert set(params) == {"wpe", "ln_f", *(f"h_{i}" for i in range(ref.config.n_layer))}
    # Conv1D weights are [in, out], the flax Dense layout: no transpose.
    np.testing.assert_array_equal(params["h_0"]["mlp"]["c_fc"]["kernel"],
                                  ref.state["h.0.mlp.c_fc.weight"])
    np.testing.assert_array_equal(params["h_0"]["ln_1"]["scale"], ref.state["h.0.ln_1.weight"])
    for leaf in jax.tree_util.tree_leaves(params):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == num_params(ref.config)


# --- real-world checkpoint variants -----------------------------------------------------

def test_lm_head_checkpoint_with_transformer_prefix_loads(ref, tmp_path):
    lm = transformers.GPT2LMHeadModel(ref.hf_config)
    lm.transformer.load_state_dict(ref.model.state_dict())
    state = lm.state_dict()
    assert "lm_head.weight" in state and "transformer.h.0.attn.c_attn.weight" in state
    # As the hub serves it: a .bin with every key, lm_head.weight included ...
    lm.config.save_pretrained(tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    # ... and as transformers' save_pretrained writes it (safetensors, prefixed keys).
    lm.save_pretrained(tmp_path / "st")
    expected = load_gpt2(ref.safetensors_dir)[1]
    for d in ("bin", "st"):
        config, params = load_gpt2(tmp_path / d)
        assert config == ref.config
        assert_same_params(params, expected)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_old_style_causal_mask_buffers_are_ignored(ref, fmt, tmp_path):
    n_pos = ref.config.n_positions
    state = {k: torch.from_numpy(v) for k, v in ref.state.items()}
    for i in range(ref.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(
            torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if fmt == "bin":
        _write_config(tmp_path, ref.hf_config)
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        _write_safetensors(tmp_path, ref.hf_config, {k: v.numpy() for k, v in state.items()})
    config, params = load_gpt2(tmp_path)
    assert_same_params(params, load_gpt2(ref.safetensors_dir)[1])
    assert_matches_reference(ref, config, params)


# --- experiments.convert: the orbax checkpoint ------------------------------------------

@pytest.fixture(scope="module")
def converted(small, tmp_path_factory):
    """One run of the CLI (a subprocess costs seconds), on the config with n_inner set."""
    out = tmp_path_factory.mktemp("converted") / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.convert", f"--source={small.safetensors_dir}",
         f"--output={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_convert_cli_writes_orbax_checkpoint_that_restores_bit_identical(small, converted):
    assert (converted / "params").is_dir()
    assert (converted / "params" / "_CHECKPOINT_METADATA").is_file()  # written by orbax
    config, params = load_gpt2(converted)
    src_config, src_params = load_gpt2(small.safetensors_dir)
    assert config == src_config == small.config
    assert_same_params(params, src_params)  # np.array_equal and float32 on every leaf
    assert_matches_reference(small, config, params)


@pytest.mark.slow
def test_converted_checkpoint_with_mismatched_config_raises_naming_parameter(
        small, converted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_inner"] = 2 * small.config.mlp_width
    (bad / "config.json").write_text(json.dumps(cfg))
    # Checked from orbax metadata before any array is read; the first misfit is c_fc's.
    with pytest.raises(WeightsError, match=r"parameter h_0/mlp/c_fc/(kernel|bias) has shape"
                       ) as info:
        load_gpt2(bad)
    assert str(bad) in str(info.value)
    assert f"{small.config.mlp_width},)" in str(info.value)
    assert f"{2 * small.config.mlp_width},)" in str(info.value)


# --- errors -----------------------------------------------------------------------------

def test_wrong_tensor_shape_raises_naming_path_and_both_shapes(small, tmp_path):
    state = dict(small.state)
    state["h.1.mlp.c_fc.weight"] = state["h.1.mlp.c_fc.weight"].T  # [80, 48] instead of [48, 80]
    _write_safetensors(tmp_path, small.hf_config, state)
    with pytest.raises(WeightsError, match=r"h_1/mlp/c_fc/kernel \(h.1.mlp.c_fc.weight in the "
                       r"file\) has shape \(80, 48\) but the config expects \(48, 80\)"):
        load_gpt2(tmp_path)


def test_flax_msgpack_kernel_in_torch_layout_raises_naming_path_and_both_shapes(small, tmp_path):
    tree = _hf_flax_tree(small.state, small.config.n_layer)
    tree["h"]["2"]["attn"]["c_attn"]["kernel"] = small.state["h.2.attn.c_attn.weight"]
    _write_config(tmp_path, small.hf_config)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    # The msgpack kernel is transposed on load, so a torch-layout [48, 144] reads as [144, 48].
    with pytest.raises(WeightsError, match=r"h_2/attn/c_attn/kernel \(h/2/attn/c_attn/kernel in "
                       r"the file\) has shape \(144, 48\) but the config expects \(48, 144\)"):
        load_gpt2(tmp_path)


def test_config_that_does_not_fit_the_weights_raises_naming_path_and_both_shapes(small, tmp_path):
    _write_safetensors(tmp_path, small.hf_config, small.state, n_embd=96, n_head=3)
    with pytest.raises(WeightsError) as info:
        load_gpt2(tmp_path)
    found = re.search(r"parameter (\S+) \((\S+) in the file\) has shape (\(.*?\)) but the "
                      r"config expects (\(.*?\))", str(info.value))
    assert found, str(info.value)
    path, key, got, want = found.groups()
    assert got == str(small.state[key].shape)  # the shape really in the file ...
    wide = GPT2Config(**{**dataclasses.asdict(small.config), "n_embd": 96})
    node = param_shapes(wide)
    for k in path.split("/"):
        node = node[k]
    assert want == str(node.shape) and got != want  # ... and what n_embd=96 needs


def test_missing_key_raises_naming_it(small, tmp_path):
    state = {k: v for k, v in small.state.items() if k != "h.1.mlp.c_fc.bias"}
    _write_safetensors(tmp_path, small.hf_config, state)
    with pytest.raises(WeightsError, match=r"missing.*h_1/mlp/c_fc/bias"):
        load_gpt2(tmp_path)


def test_missing_layer_raises_naming_its_parameters(small, tmp_path):
    state = {k: v for k, v in small.state.items() if not k.startswith("h.2.")}
    _write_safetensors(tmp_path, small.hf_config, state)
    with pytest.raises(WeightsError, match=r"missing.*h_2/"):
        load_gpt2(tmp_path)


@pytest.mark.parametrize("extra", ["h.0.attn.q_proj.weight", "score.weight", "h.3.ln_1.weight"])
def test_unexpected_key_raises_naming_it(small, tmp_path, extra):
    state = dict(small.state)
    state[extra] = np.zeros((4,), np.float32)
    _write_safetensors(tmp_path, small.hf_config, state)
    with pytest.raises(WeightsError, match="unexpected") as info:
        load_gpt2(tmp_path)
    assert extra in str(info.value)  # the key as written in the file


def test_unexpected_key_in_pytorch_bin_raises_naming_it(small, tmp_path):
    state = {k: torch.from_numpy(v) for k, v in small.state.items()}
    state["h.0.crossattention.c_attn.weight"] = torch.zeros(2)
    _write_config(tmp_path, small.hf_config)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"unexpected.*crossattention"):
        load_gpt2(tmp_path)


def test_path_that_does_not_exist_raises_naming_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(WeightsError, match="neither an existing directory") as info:
        load_gpt2(missing)
    assert str(missing) in str(info.value)


def test_file_instead_of_directory_raises(small):
    file = small.safetensors_dir / "model.safetensors"
    with pytest.raises(WeightsError, match="is a file; pass the directory"):
        load_gpt2(file)


@pytest.mark.parametrize("name,repo", [("gpt2", "openai-community/gpt2"),
                                       ("gpt2-xl", "openai-community/gpt2-xl"),
                                       ("someone/my-gpt2", "someone/my-gpt2")])
def test_unreachable_hub_fails_fast_telling_to_pass_a_local_directory(monkeypatch, name, repo):
    # Simulated, so that the test means the same on a machine with internet access.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def offline(repo_id, *args, **kwargs):
        calls.append(repo_id)
        raise ConnectionError(f"Failed to resolve 'huggingface.co' for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsError, match="local path") as info:
        load_gpt2(name)
    assert calls == [repo]
    assert repr(repo) in str(info.value) and "ConnectionError" in str(info.value)


def test_directory_without_config_json_raises(small, tmp_path):
    save_file({k: np.ascontiguousarray(v) for k, v in small.state.items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="no config.json"):
        load_gpt2(tmp_path)


def test_directory_with_config_but_no_weights_raises(small, tmp_path):
    _write_config(tmp_path, small.hf_config)
    with pytest.raises(WeightsError, match="config.json but no weights") as info:
        load_gpt2(tmp_path)
    assert "model.safetensors" in str(info.value) and "pytorch_model.bin" in str(info.value)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_unsupported_activation_function_raises_naming_it(small, tmp_path, act):
    _write_safetensors(tmp_path, small.hf_config, small.state, activation_function=act)
    with pytest.raises(ValueError, match=f"activation_function='{act}' is not supported"):
        load_gpt2(tmp_path)


def test_gelu_pytorch_tanh_is_accepted_as_gelu_new(small, tmp_path):
    _write_safetensors(tmp_path, small.hf_config, small.state,
                       activation_function="gelu_pytorch_tanh")
    config, params = load_gpt2(tmp_path)
    assert_matches_reference(small, config, params)


@pytest.mark.parametrize("option,value", [("scale_attn_weights", False),
                                          ("scale_attn_by_inverse_layer_idx", True),
                                          ("reorder_and_upcast_attn", True)])
def test_unsupported_attention_option_raises_naming_it(small, tmp_path, option, value):
    _write_safetensors(tmp_path, small.hf_config, small.state, **{option: value})
    with pytest.raises(ValueError, match=option):
        load_gpt2(tmp_path)


@pytest.mark.slow
def test_bfloat16_safetensors_load_as_float32(tmp_path):
    import ml_dtypes
    from safetensors.flax import save_file as save_flax  # numpy cannot write bfloat16
    from fpt_jax.models.gpt2 import init_params
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=4, vocab_size=3)
    params = init_params(cfg, jax.random.PRNGKey(0))
    state = {"wpe.weight": params["wpe"]["embedding"], "ln_f.weight": params["ln_f"]["scale"],
             "ln_f.bias": params["ln_f"]["bias"]}
    h = params["h_0"]
    for mod in ("ln_1", "ln_2"):
        state[f"h.0.{mod}.weight"], state[f"h.0.{mod}.bias"] = h[mod]["scale"], h[mod]["bias"]
    for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        leaf = h[mod.split(".")[0]][mod.split(".")[1]]
        state[f"h.0.{mod}.weight"], state[f"h.0.{mod}.bias"] = leaf["kernel"], leaf["bias"]
    save_flax({k: jnp.asarray(v, jnp.bfloat16) for k, v in state.items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    _, loaded = load_gpt2(tmp_path)
    kernel = loaded["h_0"]["attn"]["c_attn"]["kernel"]
    assert kernel.dtype == np.float32
    expected = np.asarray(h["attn"]["c_attn"]["kernel"]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(kernel, expected.astype(np.float32))


def test_config_of_another_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(ValueError, match="model_type='t5' is not a backbone family this "
                                         "project reads; accepted: gpt2, bert, vit, llama, "
                                         "mistral, qwen2"):
        load_gpt2(tmp_path)
