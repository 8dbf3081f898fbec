"""The original code's LSTM (`lstm-original`, row `lstm_original`): its forward against a
PyTorch layer-normalised LSTM written from the original's equations, its trainable count on
Bit XOR, the random initial state (training and evaluation), the layer norms' init and
variance, and a short training under the loop with the recurrence frozen."""
import dataclasses
import json
import runpy
from pathlib import Path

import flax
import jax
import numpy as np
import pytest

from fpt_jax import baselines, build, freeze, loop, parallel, rows, steps
from fpt_jax.models import lstm
from fpt_jax.models.fpt import NOISE_RNG, make_model
from fpt_jax.tasks import get_task
from tests.settings import train_config

torch = pytest.importorskip("torch")

BIT_XOR = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "bit_xor.py"
TINY = dict(task="bit_xor", n=5, num_patterns=2, patch_size=1, n_layer=2, n_embd=8,
            batch_size=4, eval_batches=2, log_every=1, checkpoint_every=1000)
CAPTURE_STATE = dict(capture_intermediates=lambda module, method: method == "initial_state")


def _torch_layer_norm(x, alpha, beta, eps, unbiased):
    # The original's LayerNorm: (x - mean) / sqrt(var + eps), torch.var unbiased by default
    var = torch.var(x, 1, unbiased=unbiased, keepdim=True)
    return alpha * (x - x.mean(1, keepdim=True)) / torch.sqrt(var + eps) + beta


def _torch_ln_lstm(params, x, states, eps, unbiased=True):
    """The original's stacked LayerNormLSTM (Ba et al. 2016, eqs. 20-22), one step at a time
    in float64 torch: gates i, f, o sigmoid and g tanh from LN(i2h x) + LN(h2h h), the cell
    normalised before it is carried, each layer from its own (h_0, c_0)."""
    t = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in
         flax.traverse_util.flatten_dict(params, sep="/").items()}
    x = torch.tensor(np.asarray(x, np.float64))
    for i, (h, c) in enumerate(states):
        p = lambda name: t[f"lstm_{i}/{name}"]  # noqa: E731
        h, c = (torch.tensor(np.asarray(s, np.float64)) for s in (h, c))
        width, out = h.shape[1], []
        for step in range(x.shape[1]):
            i2h = x[:, step] @ p("i2h/kernel") + p("i2h/bias")
            h2h = h @ p("cell/h2h/kernel") + p("cell/h2h/bias")
            pre = (_torch_layer_norm(i2h, p("ln_i2h/scale"), p("ln_i2h/bias"), eps, unbiased)
                   + _torch_layer_norm(h2h, p("cell/ln_h2h/scale"), p("cell/ln_h2h/bias"),
                                       eps, unbiased))
            gates, g = pre[:, :3 * width].sigmoid(), pre[:, 3 * width:].tanh()
            gi, gf, go = gates[:, :width], gates[:, width:2 * width], gates[:, 2 * width:]
            c = _torch_layer_norm(gf * c + gi * g, p("cell/ln_cell/scale"),
                                  p("cell/ln_cell/bias"), eps, unbiased)
            h = go * c.tanh()
            out.append(h)
        x = torch.stack(out, 1)
    return x.numpy()


def _original(**overrides) -> lstm.LSTMConfig:
    return lstm.LSTMConfig.preset("lstm-original", **{"n_layer": 2, "n_embd": 8,
                                                      "dropout": 0.0, **overrides})


def _init(model, x) -> dict:
    return jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]  # one compile, not eager


@pytest.fixture(scope="module")
def tiny():
    """`lstm-original` (2 x 8) at its init, applied to 512 sequences of 6 steps: `run(params,
    key) -> (every h_t, [(h_0, c_0) per layer])`, one compile for the tests that share it."""
    model = lstm.LSTM(_original())
    x = jax.random.normal(jax.random.PRNGKey(2), (512, 6, 8))

    @jax.jit
    def run(params, key):
        out, state = model.apply({"params": params}, x, rngs={NOISE_RNG: key},
                                 **CAPTURE_STATE)
        cells = [state["intermediates"][f"lstm_{i}"]["cell"] for i in range(2)]
        return out, [c["initial_state"][0] for c in cells]
    return model, x, _init(model, x[:1]), run


def _perturbed(params):
    # weights and norms moved well away from their init, so that a swapped one shows (numpy:
    # eager JAX would compile each op)
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda a: (a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32), params)


def test_the_original_lstm_equals_a_pytorch_layer_norm_lstm_from_the_same_state(tiny):
    model, x, params, run = tiny
    params = _perturbed(params)
    ours, states = jax.tree_util.tree_map(np.asarray, run(params, jax.random.PRNGKey(3)))
    assert all(np.abs(s).min() > 0 for h_c in states for s in h_c)  # not zeros
    eps, x = model.config.layer_norm_epsilon, x[:16]  # 16 sequences are enough for torch
    states = [(h[:16], c[:16]) for h, c in states]
    np.testing.assert_allclose(ours[:16], _torch_ln_lstm(params, x, states, eps), atol=1e-5,
                               rtol=0)
    # the comparison sees the variance: the biased one is far off
    biased = _torch_ln_lstm(params, x, states, eps, unbiased=False)
    assert np.abs(ours[:16] - biased).max() > 1e-3


def test_it_trains_44546_of_14218754_parameters_on_bit_xor_as_the_original():
    cfg = runpy.run_path(str(BIT_XOR))["get_config"]("lstm_original")
    task, config = cfg.make_task(), build.backbone(cfg)[0]
    assert (config.n_layer, config.n_embd, task.input_dim, task.output_dim) == (3, 768, 1, 2)
    # The original's FPT(model_name='lstm') with freeze_trans=True keeps requires_grad only
    # where the name holds 'ln' (its LayerNorms' alpha and beta), plus in_net and out_net:
    # per layer ln_i2h, ln_h2h (2 x 3,072 each) and ln_cell (2 x 768) = 13,824, x 3 layers =
    # 41,472; input 1 x 768 + 768 = 1,536; head 768 x 2 + 2 = 1,538. Total 44,546. Its frozen
    # i2h and h2h are 2 x (768 x 3,072 + 3,072) per layer, x 3 = 14,174,208; 14,218,754 in
    # all: our tree has exactly the original's parameters, with the same shapes.
    assert baselines.count(cfg, task, config, cfg.trainable) == 44_546
    assert baselines.count(cfg, task, config, "full") == 14_218_754
    assert baselines.count(cfg, task, config, "ln") == 41_472


def test_the_initial_state_is_drawn_from_the_noise_rng_at_every_forward_pass(tiny):
    model, x, params, run = tiny
    (one, states), (again, _), (other, _) = (
        jax.tree_util.tree_map(np.asarray, run(params, jax.random.PRNGKey(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(one, again)
    assert np.abs(one - other).max() > 1e-3
    # the original's Xavier-normal draw, std sqrt(2 / (H + H)), a different one per layer
    (h0, c0), (h1, _) = states
    assert abs(np.std([h0, c0]) * 8 ** 0.5 - 1) < 0.02
    assert abs(np.mean(h0)) < 0.01 and not np.array_equal(h0, h1)
    with pytest.raises(ValueError, match="initial_state='random' draws"):
        model.apply({"params": params}, x)  # no silent zeros where noise was asked for


def test_evaluation_draws_the_initial_state_too_and_deterministically():
    task = get_task("bit_xor", n=5, num_patterns=2, patch_size=1)
    model = make_model(train_config(dropout=0.0), task, _original())  # FPT
    batch = task.batch("test", 0, 8, seed=0)
    params = _init(model, batch["x"])
    # the loop's eval step (one run, every parameter in the trainable tree)
    evaluate = jax.jit(lambda b: steps.make_eval_step(model, task, axis_name=None)(
        jax.tree_util.tree_map(lambda a: a[None], params), {}, b)["loss_sum"][0])
    loss = float(evaluate(batch))
    assert loss == float(evaluate(batch))  # one draw per batch, the same every time
    # a zero state would make the summed loss blind to the order of the examples; the draw
    # is a function of the batch's inputs, so the reversed batch gets another one
    reversed_ = {k: v[::-1] for k, v in batch.items()}
    assert abs(loss - float(evaluate(reversed_))) > 1e-6


def test_layer_norms_start_uniform_within_one_over_sqrt_n_and_divide_by_n_minus_1(tiny):
    cfg = lstm.LSTMConfig.preset("lstm-original")
    assert cfg.norm_init == "uniform" and cfg.unbiased_variance and cfg.n_embd == 768
    norms = {k: v for k, v in flax.traverse_util.flatten_dict(tiny[2]).items()
             if k[-2].startswith("ln_")}
    assert len(norms) == 2 * 3 * 2  # scale and bias of 3 norms in each of 2 layers
    for path, v in norms.items():
        bound, v = v.shape[0] ** -0.5, np.asarray(v)  # n = 4H for ln_i2h, ln_h2h; H, ln_cell
        assert np.abs(v).max() <= bound, path
        assert np.abs(v).max() > 0.5 * bound and np.std(v) > 0.3 * bound, path
    # the variance divides by n - 1 (torch.var's default, as the original's LayerNorm): one
    # step from zero input and cell, where the gates are LN_h(z) alone
    z = np.random.default_rng(4).standard_normal((2, 4 * 8)).astype(np.float32)
    ones = (np.ones(4 * 8), np.zeros(4 * 8), np.ones(8), np.zeros(8))
    h, c = jax.jit(lstm.cell_step, static_argnums=(4, 5))(
        ones, z, np.zeros((2, 8)), np.zeros((2, 4 * 8)), 1e-6, True)

    def norm(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, ddof=1, keepdims=True) + 1e-6)
    i, _, o, g = np.split(norm(z.astype(np.float64)), 4, axis=-1)
    cell = norm(1 / (1 + np.exp(-i)) * np.tanh(g))
    np.testing.assert_allclose(c, cell, atol=1e-5)
    np.testing.assert_allclose(h, 1 / (1 + np.exp(-o)) * np.tanh(cell), atol=1e-5)


@pytest.mark.slow
def test_a_short_training_under_the_loop_keeps_the_recurrence_bit_identical(tmp_path):
    cfg = rows.apply(train_config(**TINY, steps=3, eval_every=3), "lstm_original")
    (run,) = loop.train_and_evaluate(cfg, str(tmp_path))
    assert run["best_step"] == 3 and np.isfinite(run["test"]["test"]["test/loss"])
    g = build.build_group(cfg)
    _, counts = freeze.count_table(freeze.merge(steps.unstack(g.states.trainable, 0),
                                                g.frozen), g.selection)
    assert counts["lstm"]["trainable"] == 0 and counts["lstm"]["frozen"] > 0
    assert run["trainable_params"] == counts["total"]["trainable"]
    # the same steps by hand: the frozen recurrence bit-identical, the layer norms trained
    devices = parallel.local_devices(1)
    step = steps.pmapped_train_step(steps.make_train_step(g.model, g.task, g.tx), devices)
    state, frozen = parallel.replicate(g.states, devices), parallel.replicate(g.frozen, devices)
    for i in range(3):
        batch = g.task.batch("train", i, cfg.batch_size, seed=0)
        state, metrics = step(state, frozen, steps.stack_runs([parallel.shard_batch(batch, 1)]),
                              steps.run_rngs(g.seeds))
        assert np.isfinite(float(metrics["loss"][0, 0]))
    after = flax.traverse_util.flatten_dict(parallel.unreplicate(frozen))
    for k, v in flax.traverse_util.flatten_dict(g.frozen).items():
        assert np.array_equal(v, after[k]), k
    trained = flax.traverse_util.flatten_dict(parallel.unreplicate(state).trainable)
    for k, v in flax.traverse_util.flatten_dict(g.states.trainable).items():
        assert not np.array_equal(v, trained[k]), k  # every trainable leaf moved


def test_a_group_recorded_before_the_original_options_existed_resumes_and_a_changed_one_differs():
    from fpt_jax import runs
    from fpt_jax.config import TrainConfig
    cfg = TrainConfig(task="bit_xor", model="lstm", init="random", trainable="full")
    current = runs.identity(cfg, [1e-3], [0], "lstm", lstm.LSTMConfig())
    old = json.loads(json.dumps(current))
    for name in ("initial_state", "norm_init", "unbiased_variance", "mask_carried_state"):
        del old["backbone"][name]  # as written before these fields existed
    del old["config"]["backbone_draw"]
    runs.check_identity(old, current, "W")  # resumes: those runs had the defaults
    changed = runs.identity(cfg, [1e-3], [0], "lstm",
                            lstm.LSTMConfig(initial_state="random"))
    with pytest.raises(ValueError, match="differing settings"):
        runs.check_identity(old, changed, "W")
    per_seed = runs.identity(dataclasses.replace(cfg, backbone_draw="per_seed"), [1e-3], [0],
                             "lstm", lstm.LSTMConfig())
    with pytest.raises(ValueError, match="backbone_draw"):
        runs.check_identity(old, per_seed, "W")
