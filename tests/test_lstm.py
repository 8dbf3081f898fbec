"""The LSTM baseline: its LN-LSTM cell against a plain numpy reference, mixed precision,
learning, the parameter-matched width and the errors of its settings."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import rows, baselines, build, loop, steps
from fpt_jax.models.fpt import make_model
from fpt_jax.config import TrainConfig
from fpt_jax.models import lstm
from fpt_jax.tasks import get_task
from tests.settings import train_config


def _layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference(params, x, eps):
    """Ba et al.'s LN-LSTM as the original code runs it, one step at a time in float64."""
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    for i in range(len(params)):
        p = params[f"lstm_{i}"]
        b, t, _ = x.shape
        width = p["cell"]["ln_cell"]["scale"].shape[0]
        h, c, out = np.zeros((b, width)), np.zeros((b, width)), []
        for step in range(t):
            a = (_layer_norm(x[:, step] @ p["i2h"]["kernel"] + p["i2h"]["bias"], p["ln_i2h"], eps)
                 + _layer_norm(h @ p["cell"]["h2h"]["kernel"] + p["cell"]["h2h"]["bias"],
                               p["cell"]["ln_h2h"], eps))
            gi, gf, go, gg = np.split(a, 4, axis=-1)
            c = _layer_norm(_sigmoid(gf) * c + _sigmoid(gi) * np.tanh(gg), p["cell"]["ln_cell"],
                            eps)
            h = _sigmoid(go) * np.tanh(c)
            out.append(h)
        x = np.stack(out, 1)
    return x


def _random_params(cfg, x):
    params = lstm.LSTM(cfg).init(jax.random.PRNGKey(0), x)["params"]
    # layer-norm scales and biases away from 1 and 0, so that a swapped one shows
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape)
                                               for l, k in zip(leaves, keys)])


@pytest.mark.slow
def test_ln_lstm_layers_equal_a_numpy_reference():
    cfg = lstm.LSTMConfig(n_layer=2, n_embd=6, dropout=0.0)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 6))
    params = _random_params(cfg, x)
    ours = lstm.LSTM(cfg).apply({"params": params}, x)
    np.testing.assert_allclose(ours, _reference(params, np.asarray(x, np.float64),
                                                cfg.layer_norm_epsilon), atol=1e-5, rtol=1e-5)
    read = jnp.array([[6], [2], [4]])
    at = lstm.LSTM(cfg).apply({"params": params}, x, read_positions=read)
    np.testing.assert_array_equal(at[:, 0], ours[jnp.arange(3), read[:, 0]])


@pytest.mark.slow
def test_bfloat16_keeps_the_state_in_float32_and_stays_near_float32():
    cfg = lstm.LSTMConfig(n_layer=2, n_embd=16, dropout=0.0)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 16))
    params = _random_params(cfg, x)
    f32 = lstm.LSTM(cfg).apply({"params": params}, x)
    bf16 = lstm.LSTM(cfg, jnp.bfloat16).apply({"params": params}, x)
    assert bf16.dtype == jnp.bfloat16
    # 32 recurrent steps: an error that grew with every step would exceed this
    assert float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - f32))) < 0.05


@pytest.mark.slow
def test_the_lstm_learns_a_tiny_task(tmp_path):
    # two one-bit strings: the XOR of the first with the second needs the first kept
    cfg = rows.apply(train_config(
        task="bit_xor", n=1, num_patterns=2, patch_size=1, n_layer=1, n_embd=32,
        batch_size=16, steps=300, eval_every=300, eval_batches=4, log_every=100,
        checkpoint_every=1000, dropout=0.0), "lstm")
    cfg = dataclasses.replace(cfg, learning_rate=3e-3)
    (run,) = loop.train_and_evaluate(cfg, str(tmp_path))
    assert run["test"]["test"]["test/accuracy"] == 1.0, run


@pytest.mark.slow
def test_the_matched_width_counts_within_one_percent_and_the_table_prints_both():
    base = dict(task="bit_xor", n=5, num_patterns=2, patch_size=1, model="lstm",
                init="random", trainable="full")
    task = get_task("bit_xor", n=5, num_patterns=2, patch_size=1)
    total = baselines.match(train_config(**base), task, "gpt2", "total")
    assert abs(total.difference) < 0.01 and 1800 < total.width < 2000
    cfg = rows.apply(train_config(**{**base, "model": "gpt2"}), "lstm_matched")
    s = build.build_group(cfg)
    matched = baselines.match(s.cfg, task, "gpt2", "trainable")
    assert matched == rows.get("lstm_matched").matched(cfg)
    assert s.config.n_embd == matched.width and s.config.n_layer == 3
    assert abs(matched.difference) < 0.01
    # the count is the built model's, the target gpt2's trainable part as FPT on this task
    built = sum(x.size for x in jax.tree_util.tree_leaves(steps.unstack(s.states.trainable, 0)))
    assert built == matched.count
    d, blocks, positions = 768, 12, 1024  # gpt2 as FPT on 1-feature tokens, 2 classes
    fpt_trainable = (1 * d + d) + positions * d + (2 * blocks + 1) * 2 * d + (d * 2 + 2)
    assert matched.target == fpt_trainable
    assert f"{matched.target:,}" in matched.lines() and f"{matched.count:,}" in matched.lines()
    one = baselines.match(train_config(**base, n_layer=1), task, "gpt2")  # its own layers
    model = make_model(s.cfg, task, lstm.LSTMConfig(n_layer=1, n_embd=one.width))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 10, 1)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == one.count
    assert abs(one.difference) < 0.01 and one.width > matched.width
    for width in (matched.width - 1, matched.width + 1):  # the nearest integer width
        model = make_model(s.cfg, task, dataclasses.replace(s.config, n_embd=width))
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 10, 1)))
        count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
        assert abs(count - matched.target) >= abs(matched.count - matched.target)


@pytest.mark.parametrize("change,message", [
    (dict(model="lstm"), "no pretrained weights"),  # init defaults to 'pretrained'
    (dict(model="lstm", init="random", n_head=4), "no attention heads"),
    (dict(model="lstm", init="random", remat=True), "remat is not supported"),
])
def test_bad_lstm_settings_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        cfg = train_config(task="bit_xor", n=2, num_patterns=2, patch_size=1, **change)
        s = build.build_group(cfg)
        s.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 1)))


@pytest.mark.parametrize("model,match,message", [
    ("gpt2", ("gpt2", "trainable"), "width is an LSTM's"),
    ("lstm", ("lstm", "trainable"), "a transformer preset"),
    ("lstm", ("gpt2", "all"), "match count 'all'"),
])
def test_bad_matches_are_clear_errors(model, match, message):
    task = get_task("bit_xor", n=2, num_patterns=2, patch_size=1)
    with pytest.raises(ValueError, match=message):
        baselines.match(train_config(task="bit_xor", model=model, init="random"), task, *match)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_the_recurrences_gradient_equals_autodiff_of_the_scan(dtype, tol):
    # The custom VJP (W_h's gradient as one product after the loop) against JAX's own
    # transpose of the same scan, for every input: W_h, b_h, the layer norms and a_x.
    t, b, h = 7, 3, 8
    rng = np.random.default_rng(0)
    kernel, bias = (jnp.asarray(rng.uniform(-.5, .5, s), jnp.float32) for s in ((h, 4 * h),
                                                                                 (4 * h,)))
    norms = tuple(jnp.asarray(rng.normal(m, .2, n), jnp.float32)
                  for m, n in ((1, 4 * h), (0, 4 * h), (1, h), (0, h)))
    a_x = jnp.asarray(rng.normal(size=(t, b, 4 * h)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)  # a loss over every h_t

    def loss(fn):
        return lambda *args: (fn(*args) * weights).sum()
    args = (kernel, bias, norms, a_x)
    ours = jax.grad(loss(functools.partial(lstm.recurrence, dtype, 1e-6)),
                    argnums=(0, 1, 2, 3))(*args)
    autodiff = jax.grad(loss(lambda *a: lstm._scan(dtype, 1e-6, *a)[0]),
                        argnums=(0, 1, 2, 3))(*args)
    for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(autodiff)):
        scale = float(jnp.abs(want).max())
        assert scale > 1e-3
        assert float(jnp.abs(got - want).max()) <= tol * scale
