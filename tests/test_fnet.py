"""The FNet baseline: the Fourier mixing against numpy's FFT, per-length transforms,
GPT-2's parameters minus attention, remat, its config, and a run through the pipeline."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import build, freeze, loop, parallel, steps
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones, fnet, gpt2
from tests.settings import train_config

SMALL = fnet.FNetConfig(n_layer=2, n_embd=32, n_positions=64)


def _rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_mixing_is_the_real_part_of_the_2d_fft():
    x = np.random.RandomState(0).randn(2, 7, 12).astype(np.float32)
    want = np.fft.fft2(x.astype(np.float64)).real  # over the last two axes: sequence, hidden
    assert _rel_err(fnet.fourier_mix(jnp.asarray(x)), want) < 1e-5
    assert _rel_err(fnet.fourier_mix(jnp.asarray(x), jnp.bfloat16), want) < 2e-2
    # The in-graph matrices (lengths, read rows) at full length are the same transform.
    full = fnet.fourier_mix(jnp.asarray(x), lengths=jnp.array([7, 7]))
    assert _rel_err(full, want) < 1e-5


@pytest.mark.slow
def test_with_lengths_each_example_is_transformed_over_its_own_length_only():
    x = np.random.RandomState(1).randn(3, 9, 8).astype(np.float32)
    lengths = np.array([9, 4, 1])
    y = np.asarray(fnet.fourier_mix(jnp.asarray(x), lengths=jnp.asarray(lengths)))
    for b, n in enumerate(lengths):
        want = np.fft.fft2(x[b, :n].astype(np.float64)).real
        assert _rel_err(y[b, :n], want) < 1e-5, b
        assert not y[b, n:].any(), b  # padded rows are not mixed at all
    rows = np.array([[8, 0], [3, 5], [0, 0]])  # the read rows only: those rows of the full
    y_rows = fnet.fourier_mix(jnp.asarray(x), lengths=jnp.asarray(lengths), rows=jnp.asarray(rows))
    np.testing.assert_allclose(y_rows, np.take_along_axis(y, rows[:, :, None], 1), atol=1e-5)


def test_parameters_are_gpt2s_minus_attention_in_groups_pos_ln_mlp():
    shape = dict(n_layer=SMALL.n_layer, n_embd=SMALL.n_embd, n_positions=SMALL.n_positions)
    gpt2_flat = flax.traverse_util.flatten_dict(
        gpt2.param_shapes(gpt2.GPT2Config(n_head=4, **shape)))
    flat = flax.traverse_util.flatten_dict(fnet.param_shapes(SMALL))
    assert set(flat) == {k for k in gpt2_flat if "attn" not in k}
    assert {("wpe", "embedding"), ("h_1", "mlp", "c_fc", "kernel"), ("ln_f", "scale")} <= set(flat)
    assert {backbones.param_group(k)[0] for k in flat} == {"pos", "ln", "mlp"}
    assert fnet.param_group(("h_0", "attn", "c_attn", "kernel")) is None  # not its own
    attn = sum(v.size for k, v in gpt2_flat.items() if "attn" in k)
    assert fnet.num_params(SMALL) == sum(v.size for v in gpt2_flat.values()) - attn
    assert fnet.attention_weights({"intermediates": {}}) == ()
    assert fnet.torch_name_to_path("h.0.mlp.c_fc.weight")[0] == "<unexpected>"


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    config = SMALL.with_dropout(0.1)  # remat must also redraw the same dropout masks
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, SMALL.n_embd))
    lengths, read = jnp.array([10, 6]), jnp.array([[9], [5]])
    params = fnet.init_params(config, jax.random.PRNGKey(1))

    def loss(params, use_remat):
        y = fnet.FNet(config, remat=use_remat).apply(
            {"params": params}, x, deterministic=False, read_positions=read, lengths=lengths,
            rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.sum(y ** 2)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r)
                          for r in (False, True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(g0))


def test_config_refuses_heads_and_round_trips_through_its_config_json():
    with pytest.raises(ValueError, match="n_head=4"):
        fnet.FNetConfig.preset("fnet", n_head=4)
    config = fnet.FNetConfig.preset("fnet-medium", n_head=1, n_layer=3)
    assert (config.n_layer, config.n_embd, config.n_head, config.mlp_width) == (3, 1024, 1, 4096)
    assert fnet.FNetConfig.from_hf(config.to_hf()) == config
    with pytest.raises(ValueError, match="google/fnet"):  # Hugging Face's FNet: another model
        fnet.FNetConfig.from_hf({"model_type": "fnet", "hidden_size": 768})
    assert backbones.family_of_preset("fnet").module_cls is fnet.FNet


@pytest.mark.slow
def test_fnet_trains_in_the_pipeline_with_its_frozen_mlp_bit_identical(tmp_path):
    cfg = train_config(task="bit_xor", n=3, num_patterns=2, patch_size=1, model="fnet",
                      init="random", n_layer=2, n_embd=32, steps=6, eval_every=3,
                      eval_batches=1, checkpoint_every=3, batch_size=4, num_devices=1)
    (run,) = loop.train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(run["final"]["eval/accuracy"])

    # The same run's first steps, by hand: the frozen tree (the MLPs) comes back unchanged.
    g = build.build_group(cfg)
    frozen_one = {k: v if k == steps.BACKBONE else steps.unstack(v, 0)
                  for k, v in g.frozen.items()}
    _, counts = freeze.count_table(freeze.merge(steps.unstack(g.states.trainable, 0),
                                                frozen_one), g.selection)
    assert counts["mlp"]["frozen"] > 0 and counts["mlp"]["trainable"] == 0
    assert counts["attn"]["frozen"] + counts["attn"]["trainable"] == 0
    devices = parallel.local_devices(1)
    step = steps.pmapped_train_step(steps.make_train_step(g.model, g.task, g.tx), devices)
    state, frozen = parallel.replicate(g.states, devices), parallel.replicate(g.frozen, devices)
    rngs = steps.run_rngs(g.seeds)
    for i in range(2):
        batch = g.task.batch("train", i, cfg.batch_size, seed=0)
        state, _ = step(state, frozen, steps.stack_runs([parallel.shard_batch(batch, 1)]), rngs)
    after_f = flax.traverse_util.flatten_dict(parallel.unreplicate(frozen))
    for k, v in flax.traverse_util.flatten_dict(g.frozen).items():
        assert np.array_equal(v, after_f[k]), k
    after_t = flax.traverse_util.flatten_dict(parallel.unreplicate(state).trainable)
    assert any(not np.array_equal(v, after_t[k])
               for k, v in flax.traverse_util.flatten_dict(g.states.trainable).items())


@pytest.mark.slow
@pytest.mark.parametrize("normalized", [False, True])
def test_a_block_adds_the_mixing_of_its_layer_norm_orthonormal_when_asked(normalized):
    cfg = fnet.FNetConfig(n_layer=1, n_embd=12, normalized=normalized, resid_pdrop=0.0)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 7, 12)), np.float64)
    lengths = np.array([7, 4])
    params = fnet.Block(cfg).init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
    params = jax.tree_util.tree_map(np.asarray, params)
    for leaf in ("kernel", "bias"):  # no MLP: the block is x + mixing
        params["params"]["mlp"]["c_proj"][leaf] = np.zeros_like(
            params["params"]["mlp"]["c_proj"][leaf])
    got = fnet.Block(cfg).apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(lengths))
    for b, n in enumerate(lengths):
        h = x[b, :n]
        normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
        mix = np.fft.fft2(normed).real / (np.sqrt(n * 12) if normalized else 1.0)
        np.testing.assert_allclose(got[b, :n], h + mix, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[b, n:], x[b, n:], atol=1e-6)  # padding: untouched
