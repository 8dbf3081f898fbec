"""The training core: frozen parameters, data parallelism, accumulation, resume, learning,
divergence. A single run is a group of one (fpt_jax.build, fpt_jax.steps, fpt_jax.loop)."""
import dataclasses
import glob
import json
import os
import sys

import flax
import jax
import numpy as np
import pytest

from fpt_jax import build, checkpoint, freeze, guard, loop, parallel, runs, steps
from fpt_jax.config import TrainConfig
from fpt_jax.models.fpt import make_model
from fpt_jax.tasks import get_task
from tests.settings import train_config

TINY = dict(task="bit_xor", init="random", n_layer=2, n_head=2, n_embd=32, batch_size=8,
            log_every=1, eval_every=1000, eval_batches=2, checkpoint_every=1000)


def _frozen_of_one(frozen: dict) -> dict:
    """A group of one's frozen tree without its run axis (the backbone has none)."""
    return {k: v if k == steps.BACKBONE else steps.unstack(v, 0) for k, v in frozen.items()}


def _params_of_one(g: build.Group) -> dict:
    """The full parameter tree of a group of one's run (host numpy, no run axis)."""
    return freeze.merge(steps.unstack(g.states.trainable, 0), _frozen_of_one(g.frozen))


def _run_steps(cfg: TrainConfig, n: int, num_devices: int):
    """Runs `n` pmapped train steps of the run (a group of one); returns (the group with its
    initial host state, final host state, final frozen parameters, losses)."""
    g = build.build_group(cfg)
    devices = parallel.local_devices(num_devices)
    step = steps.pmapped_train_step(
        steps.make_train_step(g.model, g.task, g.tx, cfg.grad_accum), devices)
    state = parallel.replicate(g.states, devices)
    frozen = parallel.replicate(g.frozen, devices)
    per_process = cfg.batch_size
    rngs = steps.run_rngs([cfg.seed])  # PRNGKey(seed + 1): PRNGKey(1) at seed 0
    losses = []
    for i in range(n):
        batch = g.task.batch("train", i, per_process, seed=cfg.seed)
        state, metrics = step(state, frozen, steps.stack_runs(
            [parallel.shard_batch(batch, len(devices), cfg.grad_accum)]), rngs)
        assert metrics["loss"].shape == (len(devices), 1)  # [devices, K]
        losses.append(float(metrics["loss"][0, 0]))
    return g, parallel.unreplicate(state), parallel.unreplicate(frozen), losses


@pytest.mark.slow
@pytest.mark.parametrize("trainable,dtype", [("fpt", "float32"),
                                             ("output,ln[-1:],attn[0]", "float32"),
                                             ("output,ln[-1:],attn[0]", "bfloat16")])
def test_frozen_params_stay_bit_identical_and_trainable_ones_change(trainable, dtype):
    cfg = train_config(**TINY, trainable=trainable, dtype=dtype)
    s, final, frozen_after, _ = _run_steps(cfg, 3, num_devices=4)
    # Frozen leaves are stored in the compute dtype (cast once at setup); trainable ones
    # stay float32 whatever the compute dtype.
    assert {x.dtype for x in jax.tree_util.tree_leaves(s.frozen)} == {np.dtype(dtype)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(final.trainable)} == {np.dtype("float32")}
    flat = lambda t: flax.traverse_util.flatten_dict(t)  # noqa: E731
    before_t, before_f = flat(s.states.trainable), flat(s.frozen)
    after_t, after_f = flat(final.trainable), flat(frozen_after)
    assert before_t.keys() == after_t.keys() and before_f.keys() == after_f.keys()
    assert before_t and before_f
    for k, v in before_t.items():
        assert not np.array_equal(v, after_t[k]), f"trainable {k} did not change"
    for k, v in before_f.items():
        assert np.array_equal(v, after_f[k]) and v.dtype == after_f[k].dtype, f"frozen {k} changed"
        assert freeze.is_trainable(k, s.selection) is False


def test_optimizer_state_holds_moments_for_trainable_params_only():
    cfg = train_config(**TINY)
    s = build.build_group(cfg)  # a group of one: every leaf has the run axis [1, ...]
    trainable = sum(x.size for x in jax.tree_util.tree_leaves(s.states.trainable))
    _, counts = freeze.count_table(_params_of_one(s), s.selection)
    assert trainable == counts["total"]["trainable"] > 0
    opt_elements = sum(np.size(x) for x in jax.tree_util.tree_leaves(s.states.opt_state))
    # Adam keeps mu and nu per trainable element; Adam and inject_hyperparams count steps,
    # and the injected learning rate is one element (per run).
    assert opt_elements == 2 * trainable + 3


@pytest.mark.slow
def test_same_global_batch_gives_same_losses_on_1_and_4_devices():
    # Dropout off: its keys are per device, so masks differ between device counts by design.
    cfg = train_config(**{**TINY, "batch_size": 16}, dropout=0.0)
    _, final1, _, losses1 = _run_steps(cfg, 5, num_devices=1)
    _, final4, _, losses4 = _run_steps(cfg, 5, num_devices=4)
    # Tolerance: float32 reassociation of the mean over 4 partial batches.
    np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(final1.trainable),
                    jax.tree_util.tree_leaves(final4.trainable)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
    cfg = train_config(**{**TINY, "batch_size": 16}, dropout=0.0)
    _, big, _, losses_big = _run_steps(cfg, 4, num_devices=2)
    _, acc, _, losses_acc = _run_steps(dataclasses.replace(cfg, grad_accum=4), 4, num_devices=2)
    np.testing.assert_allclose(losses_big, losses_acc, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(big.trainable), jax.tree_util.tree_leaves(acc.trainable)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = train_config(**{**TINY, "eval_every": 4, "checkpoint_every": 4}, steps=12,
                      dropout=0.1)
    straight = tmp_path / "straight"
    loop.train_and_evaluate(cfg, str(straight))
    resumed = tmp_path / "resumed"
    loop.train_and_evaluate(dataclasses.replace(cfg, steps=8), str(resumed))
    assert sorted(os.listdir(resumed / "checkpoints")) == ["4", "8"]
    # A run killed after step 8's checkpoint has already logged later steps; resuming must
    # drop them and produce exactly the uninterrupted metrics (dropout keys included).
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "train/loss": -1.0}) + "\n")
    loop.train_and_evaluate(cfg, str(resumed))
    assert _records(straight) == _records(resumed)
    keys = {k for r in _records(straight) for k in r}
    assert {"step", "train/loss", "train/accuracy", "eval/loss", "eval/accuracy"} <= keys
    assert glob.glob(str(straight / "tensorboard" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_with_different_trainable_groups_is_refused(tmp_path):
    cfg = train_config(**TINY, steps=2)
    loop.train_and_evaluate(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="holds a checkpoint of a different run.*trainable"):
        loop.train_and_evaluate(dataclasses.replace(cfg, steps=4, trainable="full"),
                                str(tmp_path))


@pytest.mark.slow
def test_small_random_frozen_backbone_learns_bit_xor(tmp_path):
    cfg = train_config(task="bit_xor", init="random", n_layer=2, n_head=4, n_embd=128,
                      trainable="fpt", batch_size=16, learning_rate=3e-3, dropout=0.0,
                      steps=900, log_every=100, eval_every=900, eval_batches=8,
                      eval_batch_size=64, checkpoint_every=900, num_devices=1)
    (run,) = loop.train_and_evaluate(cfg, str(tmp_path))
    assert run["final"]["eval/accuracy"] >= 0.99, run


@pytest.mark.parametrize("overrides, message", [
    (dict(task="bit_parity"), "unknown task 'bit_parity'; accepted: .*bit_xor"),
    (dict(model="gpt5"), "unknown model 'gpt5'; accepted"),
    (dict(trainable="input,embeddings"), "unknown trainable group 'embeddings'"),
    (dict(batch_size=6), "batch_size=6 is not divisible by devices x grad_accum = 4 x 1"),
    (dict(n=5, patch_size=2), "patch_size=2 must divide n=5"),
    (dict(task_options={"max_length": 64}), "task_options max_length: not options of task "
                                            "bit_xor; its options: n, num_patterns, patch_size"),
    (dict(learning_rate=float("nan")), "learning_rate=nan; accepted"),
    (dict(dropout=1.5), "dropout=1.5; accepted"),
    (dict(schedule="linear"), "unknown schedule 'linear'; accepted"),
    (dict(init="pretrained", n_layer=2), "apply to init='random' only"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg = train_config(**{**TINY, **overrides})  # field checks raise here, others below
        loop.train_and_evaluate(cfg, str(tmp_path))


@pytest.mark.slow
def test_pretrained_weights_of_another_preset_are_refused(tmp_path):
    from fpt_jax import weights
    from fpt_jax.models.gpt2 import GPT2Config, init_params
    small = GPT2Config(n_layer=2, n_head=2, n_embd=32)
    weights.save_converted(tmp_path / "w", small, init_params(small, jax.random.PRNGKey(0)))
    cfg = train_config(**{**TINY, "init": "pretrained", "n_layer": None, "n_head": None,
                         "n_embd": None}, weights=str(tmp_path / "w"), model="gpt2")
    with pytest.raises(ValueError, match="holds a GPT-2 with .*'n_layer': 2.*but model=gpt2 "
                                         "is .*'n_layer': 12"):
        build.build_group(cfg)


@pytest.mark.slow
def test_pretrained_backbone_is_loaded_into_the_fpt(tmp_path):
    from fpt_jax import weights
    from fpt_jax.models.gpt2 import GPT2Config, init_params
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32)
    backbone = init_params(config, jax.random.PRNGKey(7))
    weights.save_converted(tmp_path / "w", config, backbone)
    hook = sys.unraisablehook
    s = build.build_group(train_config(task="bit_xor", init="pretrained",
                                      weights=str(tmp_path / "w"), model="auto", batch_size=4))
    assert sys.unraisablehook is hook  # a load that worked leaves the process's hook alone
    assert s.config.n_layer == 2
    params = _params_of_one(s)
    for a, b in zip(jax.tree_util.tree_leaves(params["transformer"]),
                    jax.tree_util.tree_leaves(backbone)):
        assert np.array_equal(a, b)
    # The new layers are those of a random init with the same seed, although the random
    # backbone was never computed.
    random_init = build.init_params(s.model, s.task, jax.random.PRNGKey(s.cfg.seed))
    for part in ("input", "output"):
        for a, b in zip(jax.tree_util.tree_leaves(params[part]),
                        jax.tree_util.tree_leaves(random_init[part])):
            assert np.array_equal(a, b)


def test_pretrained_weights_of_the_wrong_shape_are_refused(tmp_path):
    from fpt_jax.models.gpt2 import GPT2Config
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32)
    s = build.build_group(train_config(**{**TINY, "n_layer": 1, "n_embd": 32}))
    wrong = jax.tree_util.tree_map(lambda x: np.zeros((*x.shape[:-1], x.shape[-1] + 1), x.dtype),
                                   _params_of_one(s)["transformer"])
    with pytest.raises(ValueError, match="do not match the model's architecture"):
        build.init_params(make_model(s.cfg, s.task, config), s.task,
                          jax.random.PRNGKey(0), wrong)


@pytest.mark.slow
def test_seeds_share_the_random_backbone_that_backbone_seed_draws():
    def parts(**kw):
        params = _params_of_one(build.build_group(train_config(**{**TINY, **kw})))
        return params["transformer"], params["input"]
    backbone_a, input_a = parts(seed=1)
    backbone_b, input_b = parts(seed=2)
    backbone_c, _ = parts(seed=1, backbone_seed=3)
    same = lambda x, y: all(np.array_equal(a, b) for a, b in zip(  # noqa: E731
        jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))
    assert same(backbone_a, backbone_b) and not same(input_a, input_b)
    assert not same(backbone_a, backbone_c)


# --- divergence ---------------------------------------------------------------------------

class PoisonedTask:
    """Bit XOR whose training batch of step index `at` is all NaN: the loss of step `at + 1`
    is non-finite, every other step is the real task's."""

    def __init__(self, at: int):
        self.inner, self.at = get_task("bit_xor"), at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batch(self, split, step, *args, **kwargs):
        batch = self.inner.batch(split, step, *args, **kwargs)
        if split == "train" and step == self.at:
            batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
        return batch


def _floats_finite(tree) -> bool:
    return all(np.isfinite(x).all() for x in map(np.asarray, jax.tree_util.tree_leaves(tree))
               if np.issubdtype(x.dtype, np.floating))


def _checkpoints(workdir, cfg: TrainConfig, learning_rates=None, seeds=None) -> dict:
    """{step: (trainable {'now', 'best'}, opt_state, meta)} of every checkpoint in `workdir`,
    restored whole (host numpy, `[K, ...]`)."""
    g = build.build_group(cfg, learning_rates, seeds)
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, runs.CHECKPOINTS), read_only=True)
    try:
        out = {}
        for step in ckpts.manager.all_steps():
            trainable, opt_state = ckpts.restore(
                step, {"now": g.states.trainable, "best": g.states.trainable}, g.states.opt_state)
            out[step] = (trainable, opt_state, ckpts.meta(step))
        return out
    finally:
        ckpts.close()


@pytest.mark.slow
def test_a_nonfinite_loss_stops_a_single_run_and_keeps_its_last_good_checkpoint(tmp_path):
    cfg = train_config(**{**TINY, "checkpoint_every": 2}, steps=8, num_devices=1)
    with pytest.raises(guard.DivergenceError,
                       match=r"non-finite train/loss nan.* at step 5; the run stopped and the "
                             r"last checkpoint \(step 4\) is kept"):
        loop.train_and_evaluate(cfg, str(tmp_path), task=PoisonedTask(at=4))
    saved = _checkpoints(tmp_path, cfg)
    assert sorted(saved) == [2, 4]  # nothing written at or after the non-finite step
    for step, (trainable, opt_state, meta) in saved.items():
        assert _floats_finite((trainable, opt_state)), step
        assert meta["diverged_step"] == [None], step
    # the last good checkpoint is whole: the run it holds reads back at its step
    loaded, params = build.load_run(str(tmp_path), which="last")
    assert loaded.step == 4 and _floats_finite(params)
    assert runs.read_summary(str(tmp_path)) is None  # no summary of a run that failed


@pytest.mark.slow
def test_a_diverged_run_of_a_group_is_recorded_and_the_others_train_to_the_end(tmp_path):
    # Adam's first step moves every parameter by ~lr: at 1e30 (no clip) the next forward
    # pass of the full model overflows.
    cfg = train_config(**{**TINY, "n_layer": 1, "eval_every": 3, "checkpoint_every": 3},
                      steps=6, trainable="full", grad_clip=None, num_devices=1)
    lrs, seeds = (1e-3, 1e30), (0, 1)
    good, bad = loop.train_and_evaluate(cfg, str(tmp_path), lrs, seeds)
    rows = _records(tmp_path)
    losses = {k: {r["step"]: r["train/loss"] for r in rows if r["run"] == k and "train/loss" in r}
              for k in (0, 1)}
    # run 1 really diverged: a non-finite loss at its diverged step, finite before it
    diverged = bad["diverged_step"]
    assert diverged is not None and not np.isfinite(losses[1][diverged])
    assert all(np.isfinite(v) for s, v in losses[1].items() if s < diverged)
    # run 0 trained to the end, unaffected: every step logged and finite, selected and tested
    assert good["diverged_step"] is None and good["last_step"] == cfg.steps
    assert sorted(losses[0]) == list(range(1, cfg.steps + 1))
    assert all(np.isfinite(v) for v in losses[0].values())
    assert good["best_step"] is not None and "test/accuracy" in good["test"]["test"]
    # the diverged run's parameters stay finite (its non-finite updates were refused)
    loaded, params = build.load_run(str(tmp_path), run=1, which="last")
    assert loaded.summary["diverged_step"] == diverged and _floats_finite(params)
    # every checkpoint of the group holds finite values only; after the divergence the
    # diverged run never updates again
    saved = _checkpoints(tmp_path, cfg, lrs, seeds)
    assert sorted(saved) == [3, 6]
    for step, (trainable, opt_state, meta) in saved.items():
        assert _floats_finite((trainable, opt_state)), step
        assert meta["diverged_step"] == [None, diverged], step
    frozen_since = [steps.unstack(saved[s][0]["now"], 1) for s in (3, 6)]
    for a, b in zip(*map(jax.tree_util.tree_leaves, frozen_since)):
        np.testing.assert_array_equal(a, b)
