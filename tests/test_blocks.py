"""Frozen pretrained blocks inside a trainable model (models/blocks.py): a block taken from a
GPT-2, BERT or Llama checkpoint computes inside the model what transformers' own layer
computes on the same activations, stays bit-identical through training while the bridge and
the encoder learn, and bad block settings stop the run before anything is built."""
import flax
import jax
import numpy as np
import pytest

from fpt_jax import build, freeze, loop, steps
from tests.settings import train_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# a trainable ViT encoder (random, small) on Bit XOR, every part but the blocks trained
ENCODER = dict(task="bit_xor", model="vit-tiny", init="random", n_layer=1, n_head=2,
               n_embd=32, trainable="encoder", batch_size=8, dropout=0.0, log_every=1,
               eval_every=1000, eval_batches=2, checkpoint_every=1000, blocks_model="auto")


def _params(g: build.Group) -> dict:
    """Run 0's full parameter tree of a built group."""
    frozen = {n: v if n == steps.BACKBONE else steps.unstack(v, 0) for n, v in g.frozen.items()}
    return freeze.merge(steps.unstack(g.states.trainable, 0), frozen)


def _random_weights(model):
    torch.manual_seed(0)
    with torch.no_grad():  # Hugging Face's init (zero biases, unit norms) would hide bugs
        for n, p in model.named_parameters():
            p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _causal(t: int):
    return torch.full((t, t), float("-inf")).triu(1)[None, None]


def _source(name: str):
    """(transformers model, its layer i as a function of hidden states [1, t, d])."""
    if name == "bert":
        hf = transformers.BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=96, vocab_size=50)
        model = _random_weights(transformers.BertModel(hf))
        return model, lambda i, x: _first(model.encoder.layer[i](x))
    if name == "gpt2":
        hf = transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
        model = _random_weights(transformers.GPT2Model(hf))
        return model, lambda i, x: _first(model.h[i](x, attention_mask=_causal(x.shape[1])))
    hf = transformers.LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96, vocab_size=50,
                                  attn_implementation="eager")
    model = _random_weights(transformers.LlamaModel(hf))

    def layer(i, x):
        positions = torch.arange(x.shape[1])[None]
        return _first(model.layers[i](x, attention_mask=_causal(x.shape[1]),
                                      position_ids=positions,
                                      position_embeddings=model.rotary_emb(x, positions)))
    return model, layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_a_frozen_block_inside_the_model_equals_the_transformers_layer_on_its_activations(
        name, tmp_path):
    model, layer = _source(name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = train_config(**ENCODER, blocks=(1,), blocks_weights=str(tmp_path))
    g = build.build_group(cfg)
    params = _params(g)
    x = np.asarray(g.task.batch("train", 0, 2, seed=0)["x"])
    full = g.model.clone(return_last_only=False)  # every position through the block
    _, state = full.apply({"params": params}, x, capture_intermediates=True,
                          mutable=["intermediates"])
    inner = state["intermediates"]["blocks"]
    into, out = inner["proj_in"]["__call__"][0], inner["block_0"]["__call__"][0]
    with torch.no_grad():
        want = np.stack([layer(1, torch.tensor(np.asarray(into[b:b + 1])))[0].numpy()
                         for b in range(len(x))])
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_frozen_blocks_stay_bit_identical_through_training_while_the_bridge_learns(tmp_path):
    model, _ = _source("bert")
    model.save_pretrained(tmp_path / "bert", safe_serialization=True)
    cfg = train_config(**ENCODER, blocks=(2, 0), blocks_weights=str(tmp_path / "bert"),
                       steps=3)
    g = build.build_group(cfg)
    _, counts = freeze.count_table(_params(g), g.selection)
    assert counts["blocks"]["trainable"] == 0 and counts["blocks"]["frozen"] > 0
    assert counts["bridge"]["trainable"] > 0 and counts["attn"]["trainable"] > 0
    loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    _, after = build.load_run(str(tmp_path / "run"), which="last")
    taken = build.frozen_blocks(cfg)[1]  # blocks 2 and 0 of the checkpoint, as block_0, 1
    sd = model.state_dict()
    for j, i in enumerate((2, 0)):  # the checkpoint's block i, renamed block_j, unchanged
        got = flax.traverse_util.flatten_dict(after["blocks"][f"block_{j}"])
        want = flax.traverse_util.flatten_dict(taken[f"block_{j}"])
        assert got.keys() == want.keys()
        for k in got:
            assert np.array_equal(got[k], want[k]), (j, k)
        q = sd[f"encoder.layer.{i}.attention.self.query.weight"].numpy().T
        assert any(np.array_equal(v, q) for v in got.values())
    before = flax.traverse_util.flatten_dict(steps.unstack(g.states.trainable, 0)["blocks"])
    learnt = flax.traverse_util.flatten_dict(after["blocks"])
    assert all(not np.array_equal(before[k], learnt[k]) for k in before)  # the bridge learnt


@pytest.mark.slow
def test_the_random_block_control_is_each_runs_own_draw_of_the_same_shape():
    cfg = train_config(**{**ENCODER, "blocks_model": "minilm-l6"}, blocks=(5,),
                       blocks_init="random")
    g = build.build_group(cfg, learning_rates=(1e-3, 1e-3), seeds=(0, 1))
    block = flax.traverse_util.flatten_dict(g.frozen["blocks"])
    assert all(v.shape[0] == 2 and not np.array_equal(v[0], v[1]) for k, v in block.items()
               if k[-1] == "kernel")
    assert block[("block_0", "attention", "self", "query", "kernel")].shape == (2, 384, 384)


@pytest.mark.parametrize("settings, message", [
    (dict(blocks=(6,), blocks_model="minilm-l6"), r"blocks=\(6,\): \[6\] out of range"),
    (dict(blocks=(0,), blocks_model="lstm"), "offers no blocks"),
    (dict(blocks=(0,), blocks_model="fnet"), "offers no blocks"),
    (dict(blocks=(0,), blocks_model="auto"), "blocks_model='auto'"),
    (dict(blocks_weights="/tmp"), r"blocks=\(\)"),
    (dict(blocks=(-1,)), "accepted: a tuple of integers >= 0"),
    (dict(blocks=(0,), trainable="blocks[0],nonsense"), "unknown trainable group"),
    # a range on `blocks` counts the appended blocks (2 here), not the backbone's layers
    (dict(blocks=(4, 5), trainable="encoder,blocks[2]"), "block 2 .* out of range for 2"),
])
def test_bad_block_settings_are_rejected_before_anything_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        train_config(**{**ENCODER, "blocks_model": "minilm-l6", **settings}).check()


@pytest.mark.slow
def test_a_range_on_blocks_counts_the_appended_blocks():
    cfg = train_config(**{**ENCODER, "blocks_model": "minilm-l6",  # random: no weights read
                          "trainable": "encoder,blocks[-1:]"}, blocks=(4, 5),
                       blocks_init="random")
    cfg.check()
    g = build.build_group(cfg)
    trained = flax.traverse_util.flatten_dict(g.states.trainable["blocks"])
    assert {k[0] for k in trained} == {"proj_in", "proj_out", "block_1"}
    assert set(g.frozen["blocks"]) == {"block_0"}
