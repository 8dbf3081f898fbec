"""Parameter groups, trainable selections, and the trainable/frozen partition."""
import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from fpt_jax import freeze
from fpt_jax.models.fpt import FPT
from fpt_jax.models.gpt2 import GPT2Config
from tests.settings import train_config

N_LAYER = 4


@pytest.fixture(scope="module")
def params():
    config = GPT2Config(n_layer=N_LAYER, n_head=2, n_embd=16, n_positions=32)
    model = FPT(config, input_dim=3, output_dim=5)
    # jitted: one compile instead of one per operation
    return jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 4, 3), np.float32))["params"]


@pytest.mark.parametrize("path, expected", [
    (("input", "proj", "kernel"), ("input", None)),
    (("output", "proj", "bias"), ("output", None)),
    (("transformer", "wpe", "embedding"), ("pos", None)),
    (("transformer", "ln_f", "scale"), ("ln", None)),
    (("transformer", "h_3", "ln_1", "bias"), ("ln", 3)),
    (("transformer", "h_11", "ln_2", "scale"), ("ln", 11)),
    (("transformer", "h_0", "attn", "c_attn", "kernel"), ("attn", 0)),
    (("transformer", "h_2", "attn", "c_proj", "bias"), ("attn", 2)),
    (("transformer", "h_7", "mlp", "c_fc", "kernel"), ("mlp", 7)),
])
def test_param_group_maps_paths_to_group_and_layer(path, expected):
    assert freeze.param_group(path) == expected


def test_param_group_rejects_unknown_path():
    with pytest.raises(ValueError, match="transformer/wte/embedding belongs to no group"):
        freeze.param_group(("transformer", "wte", "embedding"))


@pytest.mark.slow
def test_every_parameter_of_the_model_has_a_group(params):
    groups = {freeze.param_group(p)[0]
              for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    # a GPT-2 FPT: every group but the LSTM's and those of frozen blocks of another model
    assert groups == set(freeze.GROUPS) - {"lstm", "bridge", "blocks"}


def _trainable_paths(params, spec):
    trainable, _ = freeze.partition(params, freeze.parse_selection(spec, N_LAYER))
    return {"/".join(k) for k in traverse_util.flatten_dict(trainable)}


def test_fpt_preset_trains_input_pos_ln_output_only(params):
    paths = _trainable_paths(params, "fpt")
    assert paths and all(freeze.param_group(p.split("/"))[0] in ("input", "pos", "ln", "output")
                         for p in paths)
    assert "transformer/ln_f/scale" in paths and "transformer/wpe/embedding" in paths
    assert not any("/attn/" in p or "/mlp/" in p for p in paths)


def test_full_selects_every_parameter(params):
    assert len(_trainable_paths(params, "full")) == len(jax.tree_util.tree_leaves(params))


def test_layer_range_selects_only_those_blocks(params):
    paths = _trainable_paths(params, "output,attn[-2:]")
    attn_layers = {p.split("/")[1] for p in paths if "/attn/" in p}
    assert attn_layers == {"h_2", "h_3"}
    assert {p.split("/")[0] for p in paths} == {"output", "transformer"}
    assert not any("ln_" in p or "mlp" in p for p in paths)


def test_ln_range_excludes_final_layer_norm(params):
    paths = _trainable_paths(params, "ln[0:1]")
    assert paths == {"transformer/h_0/ln_1/scale", "transformer/h_0/ln_1/bias",
                     "transformer/h_0/ln_2/scale", "transformer/h_0/ln_2/bias"}


def test_single_block_index_and_union_of_ranges(params):
    paths = _trainable_paths(params, "mlp[1],mlp[-1]")
    assert {p.split("/")[1] for p in paths} == {"h_1", "h_3"}


@pytest.mark.parametrize("spec, message", [
    ("input,conv", "unknown trainable group 'conv'"),
    ("output[0:2]", "group 'output' has no blocks"),
    ("attn[7]", "block 7 in 'attn\\[7\\]' is out of range for 4 blocks"),
    ("attn[5:]", "selects no block"),
])
def test_bad_selection_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        freeze.parse_selection(spec, N_LAYER)


def test_partition_splits_the_tree_and_merge_restores_it_exactly(params):
    sel = freeze.parse_selection("fpt,mlp[-1]", N_LAYER)
    trainable, frozen = freeze.partition(params, sel)
    flat_t, flat_f = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
    assert not flat_t.keys() & flat_f.keys()
    assert all(freeze.is_trainable(k, sel) for k in flat_t)
    assert not any(freeze.is_trainable(k, sel) for k in flat_f)
    merged = freeze.merge(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        assert a is b  # the same arrays: merging copies nothing


def test_preset_names_combine_with_groups_in_a_list(params):
    assert _trainable_paths(params, "fpt,mlp") == (_trainable_paths(params, "fpt")
                                                   | _trainable_paths(params, "mlp"))
    last_attn = {p.split("/")[1] for p in _trainable_paths(params, "fpt,attn[-2:]")
                 if "/attn/" in p}
    assert last_attn == {"h_2", "h_3"}


def test_count_table_sums_to_the_parameter_count(params):
    sel = freeze.parse_selection("fpt", N_LAYER)
    text, counts = freeze.count_table(params, sel)
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert counts["total"]["trainable"] + counts["total"]["frozen"] == total
    assert counts["attn"]["trainable"] == 0 and counts["attn"]["frozen"] > 0
    assert counts["output"]["frozen"] == 0
    assert "attn" in text and f"{counts['total']['trainable']:,}" in text


@pytest.mark.parametrize("model, spec, missing", [
    ("lstm", "output,attn", "attn"), ("lstm", "pos", "pos"), ("fnet", "ln,attn[-1:]", "attn"),
])
def test_a_named_group_the_model_lacks_is_refused_before_training(model, spec, missing):
    import dataclasses

    from fpt_jax import build
    from fpt_jax.config import TrainConfig
    cfg = train_config(task="bit_xor", n=2, num_patterns=2, patch_size=1, model=model,
                      init="random", n_layer=1, n_embd=16, batch_size=2,
                      n_head=None, trainable=spec)
    with pytest.raises(ValueError, match=rf"trainable='{re.escape(spec)}': this model has no "
                                         rf"{missing} parameters; its groups: input, "):
        cfg.check()
    with pytest.raises(ValueError, match=rf"this model has no {missing} parameters"):
        build.build_group(cfg)
    # Presets name no group themselves: 'full' and 'fpt' train what the model has.
    for preset in ("full", "fpt"):
        dataclasses.replace(cfg, trainable=preset).check()
