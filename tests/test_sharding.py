"""A (data, model) mesh with the frozen backbone sharded over the model axis (fpt_jax/sharding.py)
against data parallelism on the same 4 devices; the memory planner (fpt_jax/memory.py) against
what the compiled step and the placed arrays hold; a 2-process run on a sharded mesh against
one process."""
from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util

from fpt_jax import build, loop, memory, sharding
from tests.entry_runner import run_all
from tests.settings import replace, train_config
from tests.test_multihost import RUN_FLAGS, Cluster, _cache, _metrics

jax = pytest.importorskip("jax")
if jax.local_device_count() < 4:  # conftest.py forces 4 host devices
    pytest.skip("needs 4 devices", allow_module_level=True)

BASE = dict(task="bit_xor", init="random", n_layer=2, n_head=4, n_embd=32, dropout=0.0,
            batch_size=8, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2,
            steps=4, seed=3)
MODELS = pytest.mark.parametrize("model", ["gpt2", "smollm-135m"])
# float32 GSPMD and pmap reduce the same sums in other orders: equal up to rounding.
RTOL, ATOL = 1e-5, 1e-6


def _last_trainable(workdir) -> dict:
    loaded, params = build.load_run(str(workdir), which="last")
    return traverse_util.flatten_dict(params)


def _assert_runs_equal(got_dir, want_dir, exact: bool = False) -> None:
    got, want = _metrics(got_dir), _metrics(want_dir)
    assert sorted(got) == sorted(want)
    for step in want:
        for key, value in want[step].items():
            if isinstance(value, float):
                if exact:
                    assert got[step][key] == value, (step, key)
                else:
                    np.testing.assert_allclose(got[step][key], value, rtol=RTOL, atol=ATOL,
                                               err_msg=f"{key} at step {step}")
    a, b = _last_trainable(got_dir), _last_trainable(want_dir)
    for path in b:
        if exact:
            np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
        else:
            np.testing.assert_allclose(a[path], b[path], rtol=RTOL, atol=ATOL, err_msg=str(path))


@pytest.mark.slow
def test_a_step_on_a_2x2_mesh_equals_data_parallel_on_4_devices(tmp_path):
    # a Llama (the family a mesh is for); GPT-2 takes the same path (the 2-process test)
    cfg = train_config(**BASE, model="smollm-135m")
    loop.train_and_evaluate(cfg, str(tmp_path / "dp"))
    loop.train_and_evaluate(replace(cfg, mesh=(2, 2)), str(tmp_path / "mesh"))
    _assert_runs_equal(tmp_path / "mesh", tmp_path / "dp")


@MODELS
def test_the_frozen_backbone_takes_half_the_bytes_per_device_and_the_plan_says_so(model):
    cfg = train_config(**BASE, model=model, mesh=(2, 2))
    g = build.build_group(cfg)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(g.frozen))
    mesh = sharding.Placement(None, (2, 2), g.config)
    data_parallel = sharding.Placement(None, None)
    held = sharding.bytes_per_device(mesh.put_frozen(g.frozen))
    assert len(held) == 4 and set(held.values()) == {total // 2}
    assert set(sharding.bytes_per_device(data_parallel.put_frozen(g.frozen)).values()) == {total}
    assert memory.plan(cfg, compile_step=False).frozen == total // 2
    # a group of K runs reads one copy of the sharded backbone; each run its own state
    one, three = (memory.plan(cfg, k, compile_step=False) for k in (1, 3))
    assert three.frozen == one.frozen and three.trainable == 3 * one.trainable


@pytest.mark.slow
def test_the_plan_counts_the_bytes_the_compiled_step_reads():
    # dropout on: the keys are read (an unused argument is pruned by the compiler)
    cfg = train_config(**{**BASE, "dropout": 0.1}, mesh=(2, 2))
    found = memory.plan(cfg, num_runs=3)
    assert found.compiled_arguments == found.arguments
    assert found.temporaries > 0 and found.total > found.arguments
    assert "| frozen weights |" in found.table() and "fits: 16 GiB yes" in found.table()


@pytest.mark.slow
def test_resume_of_a_sharded_run_is_exact(tmp_path):
    cfg = train_config(**BASE, model="smollm-135m", mesh=(2, 2))
    loop.train_and_evaluate(cfg, str(tmp_path / "straight"))
    loop.train_and_evaluate(replace(cfg, steps=2), str(tmp_path / "resumed"))
    loop.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    _assert_runs_equal(tmp_path / "resumed", tmp_path / "straight", exact=True)


@pytest.mark.parametrize("mesh,message", [
    ((3, 1), "config.mesh=(3, 1): data x model = 3 devices, but the run has 4"),
    ((1, 4), "does not divide the backbone's heads (n_head) 6"),
])
def test_a_mesh_that_does_not_fit_is_an_error_before_anything_trains(tmp_path, mesh, message):
    cfg = train_config(**{**BASE, "n_head": 6, "n_embd": 48}, mesh=mesh)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loop.train_and_evaluate(cfg, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_bad_meshes_exit_2_from_the_entry_points():
    common = ["--config.task=bit_xor", "--config.init=random", "--config.n_layer=1",
              "--config.n_embd=48", "--config.n_head=6"]
    outs = run_all("experiments.plan_memory", [
        [*common, "--config.mesh=(1,4)"], [*common, "--config.mesh=(2,2,1)"],
        [*common, "--capacity_gib=16,-1"]])
    for out, message in zip(outs, ["does not divide the backbone's heads (n_head) 6",
                                   "mesh=(2, 2, 1); accepted: (data, model)",
                                   "--capacity_gib=16,-1; accepted"]):
        assert out["rc"] == 2 and "error:" in out["stderr"] and message in out["stderr"], out


@pytest.mark.slow
def test_two_processes_on_a_sharded_mesh_equal_one_process(tmp_path):
    steps = 4
    flags = [*RUN_FLAGS, f"--config.steps={steps}", "--config.mesh=(2,2)",
             f"--workdir={tmp_path / 'multi'}"]
    cluster = Cluster(tmp_path / "logs", flags, _cache(tmp_path), timeout=120,
                      module="experiments.train")
    try:
        ref = train_config(task="bit_xor", init="random", n_layer=1, n_embd=32, n_head=2,
                           dropout=0.0, batch_size=8, log_every=1, eval_every=2,
                           eval_batches=1, checkpoint_every=1000, seed=3, steps=steps,
                           mesh=(2, 2))
        loop.train_and_evaluate(ref, str(tmp_path / "ref"))
        cluster.wait(timeout=300)
    finally:
        cluster.kill()
    got, want = _metrics(tmp_path / "multi"), _metrics(tmp_path / "ref")
    assert max(got) == steps
    for step in range(1, steps + 1):
        for key, value in want[step].items():
            if isinstance(value, float):
                np.testing.assert_allclose(got[step][key], value, rtol=RTOL, atol=ATOL,
                                           err_msg=f"{key} at step {step}")
