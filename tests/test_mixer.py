"""The MLP-Mixer reservoir: the token mixing against a numpy reference, padding kept out of
real positions, its parameter groups (the mixing is `attn`), its config, remat, and a run
through the pipeline with its frozen part bit-identical."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import build, freeze, loop, parallel, steps
from fpt_jax.models import backbones, mixer
from tests.settings import train_config

SMALL = mixer.MixerConfig(n_layer=2, n_embd=32, n_positions=64, embd_pdrop=0.0,
                          resid_pdrop=0.0)


def _gelu(z: np.ndarray) -> np.ndarray:  # the tanh approximation (gelu_new)
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def _reference(x, w1, b1, w2, b2):
    """numpy float64: the token MLP over the first T rows of w1 / columns of w2."""
    t = x.shape[1]
    hidden = _gelu(np.einsum("btd,tk->bkd", x, w1[:t]) + b1[:, None])
    return np.einsum("bkd,kt->btd", hidden, w2[:, :t]) + b2[:t, None]


def test_token_mixing_is_the_mlp_over_the_first_t_rows_and_columns():
    rng = np.random.RandomState(0)
    p, dt = 16, 5
    w1, w2 = rng.randn(p, dt) / 2, rng.randn(dt, p) / 2
    b1, b2 = rng.randn(dt), rng.randn(p)
    x = rng.randn(2, 7, 3)
    want = _reference(x, w1, b1, w2, b2)
    args = [jnp.asarray(a, jnp.float32) for a in (x, w1, b1, w2, b2)]
    np.testing.assert_allclose(mixer.token_mix(*args), want, rtol=1e-5, atol=1e-5)
    rows = np.array([[6, 0], [3, 3]])  # the read rows only: those rows of the full mixing
    np.testing.assert_allclose(mixer.token_mix(*args, rows=jnp.asarray(rows)),
                               np.take_along_axis(want, rows[:, :, None], 1), atol=1e-5)
    low = np.asarray(mixer.token_mix(*args, dtype=jnp.bfloat16))
    assert np.abs(low - want).max() < 3e-2 * np.abs(want).max()


@pytest.mark.slow
def test_a_real_position_does_not_depend_on_the_padding_after_it():
    params = {"params": mixer.init_params(SMALL, jax.random.PRNGKey(0))}
    rng = np.random.RandomState(1)
    forward = jax.jit(lambda v, n, read=None: mixer.Mixer(SMALL).apply(
        params, v, read_positions=read, lengths=n))
    lengths = np.array([12, 5, 1])
    x = rng.randn(3, 12, 32).astype(np.float32)
    real = np.arange(12) < lengths[:, None]
    # The same real tokens padded to 12 with 9s and to 20 with noise.
    short = np.where(real[:, :, None], x, 9.0)
    long = np.where((np.arange(20) < lengths[:, None])[:, :, None],
                    np.pad(x, ((0, 0), (0, 8), (0, 0))), rng.randn(3, 20, 32) * 3)
    masked = [np.asarray(forward(v, lengths)) for v in (short, long)]
    np.testing.assert_allclose(masked[0][real], masked[1][:, :12][real], atol=1e-5)
    # The negative: unmasked (every length the full one) the mixing is bidirectional, and
    # padding reaches the real rows.
    full = [np.asarray(forward(v, np.full(3, v.shape[1]))) for v in (short, long)]
    assert np.abs(full[0][real] - full[1][:, :12][real]).max() > 1e-2
    # The last block trimmed to the read rows gives the full model's values there.
    read = np.array([[11, 3], [4, 0], [0, 0]])
    np.testing.assert_allclose(forward(long, lengths, read),
                               np.take_along_axis(masked[1], read[:, :, None], 1), atol=1e-5)


def _block_counts(config: mixer.MixerConfig) -> tuple[int, int]:
    """Analytic (token mixing, channel MLP) parameters of one block."""
    p, dt, d, m = config.n_positions, config.token_mlp_width, config.n_embd, config.mlp_width
    return p * dt + dt + dt * p + p, d * m + m + m * d + d


def test_fpt_freezes_exactly_the_token_mixing_and_the_channel_mlps():
    shapes = {"transformer": mixer.param_shapes(SMALL)}
    _, counts = freeze.count_table(shapes, freeze.parse_selection("fpt", SMALL.n_layer))
    mix, mlp = _block_counts(SMALL)
    assert counts["attn"] == {"trainable": 0, "frozen": SMALL.n_layer * mix}
    assert counts["mlp"] == {"trainable": 0, "frozen": SMALL.n_layer * mlp}
    assert counts["total"]["frozen"] == SMALL.n_layer * (mix + mlp)
    assert counts["pos"]["trainable"] == SMALL.n_positions * SMALL.n_embd
    # `attn[-1:]` is the last block's mixing, nothing else.
    _, last = freeze.count_table(shapes, freeze.parse_selection("attn[-1:]", SMALL.n_layer))
    assert last["total"]["trainable"] == last["attn"]["trainable"] == mix
    # Every path is the family's own, in one group, and no other family claims it otherwise.
    groups = set()
    for path in flax.traverse_util.flatten_dict(shapes["transformer"]):
        group = mixer.param_group(path)
        assert group is not None and backbones.param_group(path) == group, path
        assert all(f.param_group(path) in (None, group) for f in backbones.families()), path
        groups.add(group[0])
    assert groups == {"pos", "ln", "attn", "mlp"}
    assert mixer.param_group(("h_0", "attn", "token_mix", "w1")) == ("attn", 0)
    assert mixer.param_group(("h_0", "attn", "c_attn", "kernel")) is None  # GPT-2's, not its own
    assert mixer.attention_weights({"intermediates": {}}) == ()


def test_config_defaults_refusals_and_its_config_json():
    config = mixer.MixerConfig.preset("mixer")
    assert (config.n_layer, config.n_embd, config.n_positions) == (12, 768, 1024)
    assert (config.token_mlp_width, config.mlp_width, config.n_head) == (384, 3072, 1)
    assert mixer.MixerConfig.preset("mixer", n_embd=64).token_mlp_width == 32
    assert mixer.MixerConfig.preset("mixer", n_token_inner=7).token_mlp_width == 7
    with pytest.raises(ValueError, match="n_token_inner must be >= 1"):
        mixer.MixerConfig(n_token_inner=0)
    with pytest.raises(ValueError, match="MLP-Mixer has no attention heads"):
        mixer.MixerConfig.preset("mixer", n_head=4)
    assert mixer.MixerConfig.from_hf(config.to_hf()) == config
    assert backbones.family_of_preset("mixer").module_cls is mixer.Mixer
    cfg = train_config(task="bit_xor", model="mixer", init="pretrained")
    with pytest.raises(ValueError, match="model=mixer is a baseline with no pretrained weights"):
        cfg.check()


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    config = SMALL.with_dropout(0.1)  # remat must also redraw the same dropout masks
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, SMALL.n_embd))
    lengths, read = jnp.array([10, 6]), jnp.array([[9], [5]])
    params = mixer.init_params(config, jax.random.PRNGKey(1))

    def loss(params, use_remat):
        y = mixer.Mixer(config, remat=use_remat).apply(
            {"params": params}, x, deterministic=False, read_positions=read, lengths=lengths,
            rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.sum(y ** 2)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r)
                          for r in (False, True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mixing = g0["h_0"]["attn"]["token_mix"]
    assert np.abs(mixing["w1"]).max() > 0 and np.abs(mixing["w2"]).max() > 0


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32_at_real_positions():
    params = {"params": mixer.init_params(SMALL, jax.random.PRNGKey(0))}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, SMALL.n_embd))
    lengths = jnp.array([9, 4])
    full, low = (jax.jit(lambda p, v, m=mixer.Mixer(SMALL, dtype): m.apply(p, v, lengths=lengths))(
        params, x) for dtype in (jnp.float32, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    real = np.arange(9) < np.asarray(lengths)[:, None]
    assert np.abs(np.asarray(low, np.float32) - np.asarray(full))[real].max() < 0.1


@pytest.mark.slow
def test_mixer_trains_in_the_pipeline_with_its_frozen_part_bit_identical(tmp_path):
    cfg = train_config(task="bit_xor", n=3, num_patterns=2, patch_size=1, model="mixer",
                      init="random", n_layer=2, n_embd=32, steps=6, eval_every=3,
                      eval_batches=1, checkpoint_every=3, batch_size=4, num_devices=1)
    (run,) = loop.train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(run["final"]["eval/accuracy"])

    # The same run's first steps, by hand: the frozen tree (mixing, MLPs) comes back unchanged.
    g = build.build_group(cfg)
    frozen_one = {k: v if k == steps.BACKBONE else steps.unstack(v, 0)
                  for k, v in g.frozen.items()}
    _, counts = freeze.count_table(freeze.merge(steps.unstack(g.states.trainable, 0),
                                                frozen_one), g.selection)
    mix, mlp = _block_counts(g.config)
    assert counts["attn"] == {"trainable": 0, "frozen": 2 * mix}
    assert counts["mlp"] == {"trainable": 0, "frozen": 2 * mlp}
    assert counts["total"]["frozen"] == 2 * (mix + mlp)
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
