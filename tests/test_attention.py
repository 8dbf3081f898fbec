"""Attention maps of finished runs (issue 19): a tiny GPT-2 trained through the real pipeline,
its maps (causal distributions, one per layer and head), the PNG grid (one panel per layer and
head), best vs last parameters, a sweep cell's run, the LSTM refused, and the CLI's errors."""
from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from fpt_jax import attention_maps, build, checkpoint, loop
from fpt_jax.config import TrainConfig
from tests.settings import train_config
from tests.entry_runner import run_all

TINY = dict(task="bit_xor", n=3, num_patterns=2, patch_size=1, init="random", n_layer=2,
            n_head=2, n_embd=16, steps=4, eval_every=2, eval_batches=1, checkpoint_every=2,
            log_every=2, batch_size=4, num_devices=1, dropout=0.0)
TOKENS = 6  # 2 strings of 3 bits, one bit per token


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(train_config(**TINY), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def loaded(run_dir):
    return build.load_run(str(run_dir))


@pytest.mark.slow
def test_a_tiny_gpt2_has_causal_attention_distributions_per_layer_and_head(loaded):
    r, params = loaded
    x, length, labels = attention_maps.example(r.task, "test", 0, seed=r.cfg.seed)
    maps = attention_maps.attention(r.model, params, x, length)
    assert len(maps) == TINY["n_layer"]
    for m in maps:
        assert m.shape == (TINY["n_head"], TOKENS, TOKENS)
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)  # each query's distribution
        assert np.all(np.triu(m, k=1) == 0)  # GPT-2 is causal: no key after the query
    # Bit XOR with patch 1: one label per token, the bit values of string 1 then string 2
    assert length is None and labels == [str(int(b)) for b in x.reshape(-1)]


@pytest.mark.slow
def test_the_attention_map_of_a_tiny_trained_model_has_one_panel_per_layer_and_head(
        loaded, run_dir, tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt
    r, params = loaded
    x, length, labels = attention_maps.example(r.task)
    fig = attention_maps.figure(attention_maps.attention(r.model, params, x, length), "t",
                                labels)
    panels = [ax for ax in fig.axes if ax.images]
    plt.close(fig)
    assert len(panels) == TINY["n_layer"] * TINY["n_head"]
    assert all([t.get_text() for t in ax.get_xticklabels()] == labels for ax in panels)

    path = attention_maps.render(str(run_dir), tmp_path / "attention.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    name = attention_maps.title(r)
    assert all(s in name for s in ("gpt2", "bit_xor", f"step {r.step}", "test accuracy"))


@pytest.mark.slow
def test_best_loads_the_selected_step_and_last_the_newest_checkpoint(loaded, run_dir):
    best, best_params = loaded
    last, last_params = build.load_run(str(run_dir), which="last")
    summary = best.summary
    assert (best.run, best.num_runs) == (0, 1)
    # a single run is run 0 of its group of one: the same reader, the same parameters
    again, again_params = build.load_run(str(run_dir), run=0)
    assert (again.run, again.step) == (0, best.step)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again_params, best_params)
    assert (best.step, last.step) == (summary["best_step"], summary["last_step"])
    assert best.step != last.step, "the tiny run must select an earlier step than its last"
    # the trainable parts are the best step's, which travel in every checkpoint (run 0 of
    # `best` in the newest one, read here without a template); the frozen ones the same
    manager = ocp.CheckpointManager(str(run_dir / "checkpoints"))
    assert manager.latest_step() == last.step
    saved = manager.restore(last.step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["trainable"]
    manager.close()
    loaded_flat = traverse_util.flatten_dict(best_params)
    last_flat = traverse_util.flatten_dict(last_params)
    for path, value in traverse_util.flatten_dict(saved["best"]).items():
        np.testing.assert_array_equal(loaded_flat[path], value[0])
    for path, value in traverse_util.flatten_dict(saved["now"]).items():
        np.testing.assert_array_equal(last_flat[path], value[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal,  # frozen under trainable='fpt'
                           best_params["transformer"]["h_0"]["attn"],
                           last_params["transformer"]["h_0"]["attn"])
    assert not np.array_equal(best_params["output"]["proj"]["kernel"],
                              last_params["output"]["proj"]["kernel"])


@pytest.mark.slow
def test_a_sweep_cell_renders_a_chosen_run_and_refuses_one_out_of_range(tmp_path):
    cell = tmp_path / "cell"
    cfg = train_config(**{**TINY, "n_layer": 1, "steps": 2})
    runs = loop.train_and_evaluate(cfg, str(cell), [1e-3, 1e-2], [0, 1])
    r, params = build.load_run(str(cell), run=1)
    assert (r.run, r.cfg.seed, r.step) == (1, 1, runs[1]["best_step"])
    x, length, labels = attention_maps.example(r.task, seed=r.cfg.seed)
    maps = attention_maps.attention(r.model, params, x, length)
    attention_maps.plot(maps, tmp_path / "run1.png", attention_maps.title(r), labels)
    assert (tmp_path / "run1.png").read_bytes().startswith(b"\x89PNG")
    assert "run 1 of cell (lr 0.01, seed 1)" in attention_maps.title(r)
    for bad in (5, None):
        with pytest.raises(ValueError, match=r"group of 2 runs.*0 \(lr 0.001, seed 0\), "
                                             r"1 \(lr 0.01, seed 1\)"):
            build.load_run(str(cell), run=bad)


@pytest.mark.slow
def test_an_lstm_run_is_refused_as_having_no_attention(tmp_path):
    cfg = train_config(**{**TINY, "model": "lstm", "trainable": "full", "n_layer": 1,
                         "n_head": None, "n_embd": 8})
    # A finished run as the loop saves one: its checkpoint (identity + trainable tree); the
    # refusal is the family's, so the LSTM need not be trained.
    g = build.build_group(cfg)
    ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints")
    ckpts.save(1, {"now": g.states.trainable, "best": g.states.trainable}, g.states.opt_state,
               {"identity": g.identity()}, force=True)
    ckpts.wait()
    ckpts.close()
    with pytest.raises(ValueError, match=r"model=lstm has no attention maps \(family lstm"):
        attention_maps.render(str(tmp_path), tmp_path / "a.png", which="last")


@pytest.mark.slow
def test_the_cli_refuses_bad_flags_and_names_its_default_png_by_step(tmp_path, run_dir):
    *bad, good = run_all("experiments.attention", [
        [f"--workdir={tmp_path / 'missing'}"], [f"--workdir={tmp_path}"],
        [f"--workdir={run_dir}", f"--out={tmp_path / 'maps.jpg'}"],
        [f"--workdir={run_dir}", "--which=last"]], timeout=120)
    for result in bad:
        assert result["rc"] == 2 and "Traceback" not in result["stderr"]
        assert result["stderr"].startswith("error: --")
    assert bad[0]["stderr"].startswith("error: --workdir=")
    assert "no checkpoints/" in bad[1]["stderr"]
    assert "accepted: a path ending in .png" in bad[2]["stderr"]
    assert not (tmp_path / "maps.jpg").exists()
    assert good["rc"] == 0, good["stderr"][-1000:]
    assert (run_dir / "attention_last.png").read_bytes().startswith(b"\x89PNG")


def test_an_example_index_beyond_a_generated_tasks_bound_is_refused_at_once():
    from fpt_jax.tasks import get_task
    task = get_task("bit_xor", n=3, num_patterns=2, patch_size=1)
    with pytest.raises(ValueError, match="is generated"):
        attention_maps.example(task, index=10 ** 8)
