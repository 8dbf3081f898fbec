"""K runs in one program (fpt_jax.build, fpt_jax.steps): run k of a vmapped group is the run
trained alone (a group of one), the backbone exists once, the learning rate lives in the
optimizer state."""
import dataclasses
import re

import jax
import numpy as np
import optax
import pytest

from fpt_jax import build, freeze, optim, parallel, steps
from fpt_jax.config import TrainConfig
from tests.settings import train_config

TINY = dict(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=32, batch_size=8,
            dropout=0.1, log_every=1, eval_every=1000, eval_batches=1, checkpoint_every=1000)
LRS, SEEDS, BACKBONE_SEED = (1e-3, 3e-3, 1e-2), (3, 1, 7), 5
STEPS, DEVICES = 4, 2
# float32: the vmapped step batches the same ops over the run axis; XLA may fuse/reassociate
# them differently from the single run's program, so equality is up to a few ulp per step.
RTOL, ATOL = 1e-5, 1e-6


def _alone(cfg: TrainConfig, seed: int, lr: float, devices, eval_batch=None, programs=None):
    """The run trained alone: built as a group of one (build.build_group of the config with
    this seed and learning rate, the random backbone drawn from BACKBONE_SEED) and trained
    with the same group step, its batches drawn on their own. `programs` keeps the pmapped
    steps of the first group of one for the next (the learning rate is in the state, so
    they are the same programs; built once, traced once)."""
    cfg = dataclasses.replace(cfg, seed=seed, learning_rate=lr, backbone_seed=BACKBONE_SEED)
    g = build.build_group(cfg)
    assert g.num_runs == 1 and g.learning_rates == (lr,) and g.seeds == (seed,)
    programs = {} if programs is None else programs
    if not programs:
        programs["train"] = steps.pmapped_train_step(
            steps.make_train_step(g.model, g.task, g.tx, cfg.grad_accum), devices)
        programs["eval"] = steps.pmapped_eval_step(steps.make_eval_step(g.model, g.task),
                                                   devices)
    step, p_eval = programs["train"], programs["eval"]
    state, frozen = parallel.replicate(g.states, devices), parallel.replicate(g.frozen, devices)
    rngs, losses = steps.run_rngs([seed]), []
    for i in range(STEPS):
        batch = g.task.batch("train", i, cfg.batch_size, seed=seed)
        state, m = step(state, frozen, steps.stack_runs(
            [parallel.shard_batch(batch, len(devices), cfg.grad_accum)]), rngs)
        losses.append(np.asarray(m["loss"])[0, 0])
    sums = parallel.unreplicate(p_eval(state.trainable, frozen, eval_batch))
    return (np.array(losses), steps.unstack(parallel.unreplicate(state).trainable, 0),
            {name: v[0] for name, v in sums.items()})


@pytest.mark.slow
@pytest.mark.parametrize("trainable,grad_accum,draw", [("fpt", 1, "shared"),
                                                        ("output", 2, "shared"),
                                                        ("fpt", 1, "per_seed")])
def test_run_k_of_a_group_equals_the_run_trained_alone(trainable, grad_accum, draw):
    """Loss curve, final trainable parameters and evaluation of each of K=3 runs (different
    learning rates and seeds, dropout on) equal those of the run built and trained as a
    group of one; with trainable='output' the frozen input layer is per run (from its
    seed), the backbone shared."""
    cfg = train_config(**TINY, trainable=trainable, grad_accum=grad_accum, backbone_draw=draw)
    devices = parallel.local_devices(DEVICES)
    sw = build.build_group(dataclasses.replace(cfg, backbone_seed=BACKBONE_SEED), LRS, SEEDS)
    assert ("input" in sw.frozen) == (trainable == "output")
    step = steps.pmapped_train_step(
        steps.make_train_step(sw.model, sw.task, sw.tx, grad_accum), devices)
    states, frozen = parallel.replicate(sw.states, devices), parallel.replicate(sw.frozen, devices)
    rngs, losses = steps.run_rngs(SEEDS), []
    for i in range(STEPS):
        states, m = step(states, frozen, steps.group_batches(
            sw.task, i, cfg.batch_size, SEEDS, DEVICES, grad_accum), rngs)
        assert m["loss"].shape == (DEVICES, len(SEEDS))
        losses.append(np.asarray(m["loss"])[0])
    losses = np.stack(losses, axis=1)  # [K, steps]
    eval_batch = parallel.shard_batch(sw.task.batch("validation", 0, 16, seed=99), DEVICES)
    p_eval = steps.pmapped_eval_step(steps.make_eval_step(sw.model, sw.task), devices)
    sums = parallel.unreplicate(p_eval(states.trainable, frozen, eval_batch))  # [K] each
    final = parallel.unreplicate(states)
    np.testing.assert_array_equal(final.step, STEPS)
    np.testing.assert_array_equal(optim.learning_rate(final.opt_state), np.float32(LRS))
    programs = {}
    for k, (seed, lr) in enumerate(zip(SEEDS, LRS)):
        alone_losses, alone_trainable, alone_sums = _alone(cfg, seed, lr, devices, eval_batch,
                                                           programs)
        np.testing.assert_allclose(losses[k], alone_losses, rtol=RTOL, atol=ATOL)
        for name, v in alone_sums.items():
            np.testing.assert_allclose(sums[name][k], v, rtol=RTOL, atol=ATOL, err_msg=name)
        got = steps.unstack(final.trainable, k)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(alone_trainable)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(alone_trainable)):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # the runs really differ (seeds, learning rates, data): not K copies of one run
    assert len({round(float(x), 6) for x in losses[:, -1]}) == len(SEEDS)


@pytest.mark.slow
def test_the_backbone_exists_once_whatever_the_number_of_runs():
    """The compiled step's argument bytes (per device) are the backbone once plus K x (one
    run's state, its frozen non-backbone parts, its batch and key): K=4 - K=1 < backbone."""
    cfg = train_config(**{**TINY, "n_layer": 2, "n_embd": 64}, trainable="output")
    devices = parallel.local_devices(DEVICES)
    nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    args, backbone = {}, None
    for k in (1, 4):
        sw = build.build_group(cfg, [1e-3] * k, range(k))
        step = steps.pmapped_train_step(steps.make_train_step(sw.model, sw.task, sw.tx), devices)
        batches = steps.group_batches(sw.task, 0, cfg.batch_size, sw.seeds, DEVICES)
        rngs = steps.run_rngs(sw.seeds)
        compiled = step.lower(parallel.replicate(sw.states, devices),
                              parallel.replicate(sw.frozen, devices), batches, rngs).compile()
        args[k] = compiled.memory_analysis().argument_size_in_bytes
        backbone = nbytes(sw.frozen["transformer"])
        per_run = (nbytes(sw.states) + nbytes({n: v for n, v in sw.frozen.items()
                                               if n != "transformer"})
                   + nbytes(batches) // DEVICES + rngs.nbytes) // k
        assert args[k] == backbone + k * per_run, (k, args[k], backbone, per_run)
    assert args[4] - args[1] == 3 * per_run < backbone


@pytest.mark.slow
def test_learning_rate_is_in_the_optimizer_state_not_the_program():
    """Two different learning-rate sets run on one compiled program (traced once), and the
    first Adam update scales with each run's learning rate."""
    cfg = train_config(**TINY)
    devices = parallel.local_devices(DEVICES)
    sw = build.build_group(dataclasses.replace(cfg, backbone_seed=BACKBONE_SEED), LRS, SEEDS)
    traces = []
    inner = steps.make_train_step(sw.model, sw.task, sw.tx)

    def counted(*a):
        traces.append(1)
        return inner(*a)
    step = steps.pmapped_train_step(counted, devices)
    frozen = parallel.replicate(sw.frozen, devices)
    batches = steps.group_batches(sw.task, 0, cfg.batch_size, SEEDS, DEVICES)
    rngs = steps.run_rngs(SEEDS)
    deltas = {}
    for lrs in (LRS, tuple(10 * x for x in LRS)):
        states = dataclasses.replace(
            sw.states, opt_state=optim.with_learning_rate(sw.states.opt_state, lrs))
        out, _ = step(parallel.replicate(states, devices), frozen, batches, rngs)
        out = parallel.unreplicate(out)
        np.testing.assert_array_equal(optim.learning_rate(out.opt_state), np.float32(lrs))
        deltas[lrs] = jax.tree_util.tree_map(np.subtract, out.trainable, sw.states.trainable)
    assert len(traces) == 1, "a new learning rate recompiled the step"
    # Adam's first step is -lr * g / (|g| + eps): 10x the learning rate, 10x the update
    small, large = deltas.values()
    for a, b in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(large)):
        big = np.abs(a) > 1e-2 * np.max(np.abs(a))
        assert big.any()
        np.testing.assert_allclose(b[big], 10 * a[big], rtol=1e-4)


def _plain_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer with `cfg.learning_rate` in the program rather than the state: the
    one-pass clip (when grad_clip) then optax's adam or adamw on the schedule."""
    schedule = optim.learning_rate_schedule(cfg)
    opt = (optax.adam(schedule) if cfg.optimizer == "adam"
           else optax.adamw(schedule, weight_decay=cfg.weight_decay))
    clip = [optim.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip is not None else []
    return optax.chain(*clip, opt)


@pytest.mark.parametrize("schedule,optimizer,nonfinite_skips",
                         [("constant", "adam", None), ("warmup", "adamw", None),
                          ("cosine", "adam", 3)])
def test_injected_optimizer_matches_the_plain_optimizer(schedule, optimizer, nonfinite_skips):
    """optim.make_optimizer (the only builder; its learning rate injected in the state) with
    the learning rate set in its state updates as the plain optax optimizer with that
    learning rate in the program: bit-identical for the constant schedule, within float32
    rounding of the schedule (peak x unit schedule) otherwise. nonfinite_skips no longer
    wraps the optimizer (the step refuses non-finite updates): the same either way."""
    cfg = train_config(**TINY, schedule=schedule, optimizer=optimizer, warmup_steps=3,
                      steps=8, weight_decay=0.01, nonfinite_skips=nonfinite_skips)
    lr = 3e-3
    ref = _plain_optimizer(dataclasses.replace(cfg, learning_rate=lr))
    tx = optim.make_optimizer(cfg)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
    s_ref, s = ref.init(params), optim.with_learning_rate(tx.init(params), lr)
    p_ref, p = params, params
    update_ref, update = jax.jit(ref.update), jax.jit(tx.update)
    for i in range(8):
        g = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 3,
                                   params)
        u_ref, s_ref = update_ref(g, s_ref, p_ref)
        u, s = update(g, s, p)
        p_ref, p = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p, u)
        for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(u_ref)):
            if schedule == "constant":
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert float(optim.learning_rate(s)) == np.float32(lr)


@pytest.mark.slow
def test_build_group_shares_the_backbone_and_rejects_mismatched_axes():
    cfg = train_config(**TINY)
    group = lambda lrs, seeds, b: build.build_group(  # noqa: E731
        dataclasses.replace(cfg, backbone_seed=b), lrs, seeds)
    a = group(LRS, SEEDS, 0)
    b = group(LRS[:1], SEEDS[:1], 0)
    c = group(LRS[:1], SEEDS[:1], 1)
    same = lambda x, y: all(np.array_equal(p, q) for p, q in zip(  # noqa: E731
        jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))
    assert same(a.frozen["transformer"], b.frozen["transformer"])  # seeds don't change it
    assert not same(a.frozen["transformer"], c.frozen["transformer"])  # backbone_seed does
    assert not same(steps.unstack(a.states.trainable, 0)["output"],
                    steps.unstack(a.states.trainable, 1)["output"])  # seeds set the rest
    assert same(steps.unstack(a.states, 0), steps.unstack(b.states, 0))  # run = its seed
    with pytest.raises(ValueError, match="one learning rate per seed"):
        build.build_group(cfg, LRS, SEEDS[:2])
    with pytest.raises(ValueError, match="learning rates must be finite"):
        build.build_group(cfg, (1e-3, -1.0, 1e-3), SEEDS)


def test_bucketed_token_batches_of_the_runs_are_padded_to_one_shape(tmp_path):
    from fpt_jax.tasks import get_task, listops
    listops.write_listops(tmp_path, num_train=64, num_val=8, num_test=8, max_depth=4,
                          max_args=4, min_length=10, max_length=120)
    task = get_task("listops", data_dir=str(tmp_path), max_length=128, bucket_size=8)
    seeds = [0, 1, 2, 3, 4, 5]
    alone = [task.batch("train", 0, 4, seed=s) for s in seeds]
    assert len({b["x"].shape for b in alone}) > 1  # the runs' buckets differ
    stacked = steps.group_batches(task, 0, 4, seeds, num_devices=1)
    for k, b in enumerate(alone):
        x = stacked["x"][0, k]
        np.testing.assert_array_equal(x[:, :b["x"].shape[1]], b["x"])
        assert not x[:, b["x"].shape[1]:].any()  # the extra columns are padding (id 0)
        np.testing.assert_array_equal(stacked["length"][0, k], b["length"])


def test_per_seed_draws_give_each_seed_its_own_backbone_and_runs_of_a_seed_share_it():
    cfg = train_config(**TINY, trainable="fpt", backbone_draw="per_seed",
                       backbone_seed=BACKBONE_SEED)
    g = build.build_group(cfg, (1e-3, 3e-3, 1e-3), (3, 3, 7))
    assert steps.BACKBONE not in g.frozen  # no shared copy: one per run, stacked
    per_run = g.frozen[steps.BACKBONE + freeze.PER_RUN]
    attn = per_run["h_0"]["attn"]["c_attn"]["kernel"]
    assert attn.shape[0] == 3
    np.testing.assert_array_equal(attn[0], attn[1])  # seed 3 twice: one draw
    assert not np.array_equal(attn[0], attn[2])  # seed 7: its own
    # the trainable backbone parts (layer norms, positions) start from the run's own draw
    wpe = g.states.trainable[steps.BACKBONE]["wpe"]["embedding"]
    np.testing.assert_array_equal(wpe[0], wpe[1]) and not np.array_equal(wpe[0], wpe[2])
    # run 2 rebuilt alone (a finished run's reader does this) draws the same backbone
    alone = build.build_group(dataclasses.replace(cfg, seed=7))
    np.testing.assert_array_equal(
        alone.frozen[steps.BACKBONE + freeze.PER_RUN]["h_0"]["attn"]["c_attn"]["kernel"][0],
        attn[2])
    shared = build.build_group(dataclasses.replace(cfg, backbone_draw="shared"), (1e-3, 1e-3),
                               (3, 7))
    assert shared.frozen[steps.BACKBONE]["h_0"]["attn"]["c_attn"]["kernel"].ndim == 2


@pytest.mark.parametrize("settings,message", [
    (dict(backbone_draw="fresh"), "unknown backbone_draw 'fresh'; accepted: ['shared', 'per_seed']"),
    (dict(init="pretrained", backbone_draw="per_seed"), "draws random backbones"),
])
def test_bad_backbone_draws_are_named(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_config(**{**TINY, **settings}).check()


def test_a_group_traces_its_initialiser_once_and_each_seed_still_draws_its_own():
    cfg = train_config(**TINY, trainable="fpt", backbone_draw="per_seed")
    build._jitted_init_cached.cache_clear()
    g = build.build_group(cfg, LRS, SEEDS)
    info = build._jitted_init_cached.cache_info()
    # two programs (the whole init: each seed's backbone; all but the backbone: its run),
    # each traced once, called for every seed (the backbone's shapes read once more each)
    assert info.misses == 2 and info.hits == 3 * len(SEEDS) - 2, info
    pos = g.states.trainable["transformer"]["wpe"]["embedding"]
    assert all(not np.array_equal(pos[0], pos[k]) for k in range(1, len(SEEDS)))
    again = build.build_group(cfg, LRS, SEEDS)  # an equal model: the same program, same draws
    assert build._jitted_init_cached.cache_info().misses == 2
    for a, b in zip(jax.tree_util.tree_leaves(g.states), jax.tree_util.tree_leaves(again.states)):
        np.testing.assert_array_equal(a, b)
