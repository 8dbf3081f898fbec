"""The cheapest path through each module whose other tests are slow, so that the fast tier
(`python -m pytest -m "not slow" tests`) still runs every module of fpt_jax/ and
experiments/: each entry point on one command line, the reproduction report of a planned
budget, every budget file, an attention map of an untrained model, the benchmark's
command-line and environment helpers.

The entry points run as their own processes (their absl flags are global and clash in one
process), forked by tests/entry_runner.py's server: about 4 s for the server, then a fraction
of a second a case.
"""
from __future__ import annotations

import runpy
from pathlib import Path

import jax
import numpy as np
import pytest

from fpt_jax import attention_maps, build, freeze, reproduce, reproduce_report, steps
from fpt_jax.bench import command, suite, torch_ref
from tests.entry_runner import run_all
from tests.settings import train_config

REPO = Path(__file__).resolve().parents[1]
BUDGETS = sorted((REPO / "experiments" / "budgets").glob("[!_]*.py"))


def test_every_entry_point_runs_as_its_own_process(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    bit_xor = "--config=experiments/configs/bit_xor.py"
    # (module, argv, rc, a line of stdout or stderr)
    cases = [
        ("experiments.train", [bit_xor, f"--workdir={tmp_path / 'a_file'}"], 2,
         f"error: workdir '{tmp_path / 'a_file'}' cannot be created"),
        ("experiments.sweep", [bit_xor, f"--workdir={tmp_path / 'sweep'}",
                               "--sweep.grid=nofield=1|2"], 2, "unknown setting"),
        ("experiments.convert", ["--source=/no/such/dir", f"--output={tmp_path / 'c'}"],
         2, "error: --source=/no/such/dir: '/no/such/dir' is neither"),
        ("experiments.prepare_data", ["--dataset=listops", f"--data_dir={tmp_path / 'lo'}",
                                      "--num_train=16", "--num_val=8", "--num_test=8",
                                      "--min_length=10", "--max_length=100", "--max_depth=3",
                                      "--max_args=3"], 0,
         f"wrote {tmp_path / 'lo' / 'basic_test.tsv'} (test)"),
        ("experiments.benchmark", ["--config.init=random"], 2,
         "error: flag --out_dir=None: required"),
        ("experiments.attention", [f"--workdir={tmp_path / 'empty'}"], 2,
         "has no checkpoints/"),
        ("experiments.plan_memory", ["--config.init=random", "--config.n_layer=1",
                                     "--config.n_embd=32", "--config.n_head=2",
                                     "--config.num_devices=1"], 0, "| frozen weights |"),
        ("experiments.reproduce", [f"--budget={REPO / 'experiments/budgets/smoke.py'}",
                                   f"--report_dir={tmp_path / 'report'}", "--plan_only"],
         0, "bit_xor__random"),
    ]
    for module, argv, rc, line in cases:
        result, = run_all(module, [argv], timeout=120)  # as `python -m module`
        assert result["rc"] == rc, (module, result["stderr"][-2000:])
        assert line in result["stdout"] + result["stderr"], (module, result)
        assert "Traceback" not in result["stderr"], (module, result["stderr"][-2000:])
    assert (tmp_path / "lo" / "basic_train.tsv").read_text().count("\n") == 17  # + header
    assert not (tmp_path / "report" / "cells").exists()  # a plan trains nothing


@pytest.mark.parametrize("path", BUDGETS, ids=lambda p: p.stem)
def test_every_budget_file_is_a_budget(path):
    budget = runpy.run_path(str(path))["get_config"]()
    reproduce.check_budget(budget)
    assert budget.rows and budget.tasks


def test_the_report_of_a_planned_budget_lists_every_cell_before_any_finished(tmp_path):
    budget = runpy.run_path(str(REPO / "experiments/budgets/smoke.py"))["get_config"]()
    plan = reproduce.plan(budget, tmp_path, dry=True)
    text = reproduce_report.write(tmp_path, budget, plan.cells, plan.skipped,
                                  command="test").read_text()
    assert text.startswith("# Reproduction report: budget `smoke`")
    for section in ("## Main table", "## Parameter counts", "## Skipped", "## Budget"):
        assert section in text, section
    assert "Command: `test`" in text


def test_an_untrained_models_attention_map_is_a_png(tmp_path):
    cfg = train_config(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16,
                       batch_size=4, eval_batches=1)
    g = build.build_group(cfg)
    frozen = {k: v if k == steps.BACKBONE else steps.unstack(v, 0) for k, v in g.frozen.items()}
    params = freeze.merge(steps.unstack(g.states.trainable, 0), frozen)
    x, length, labels = attention_maps.example(g.task)
    maps = attention_maps.attention(g.model, params, x, length)
    assert len(maps) == 1 and maps[0].shape[0] == 2  # a layer, its two heads
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, rtol=1e-5)  # rows are distributions
    path = attention_maps.plot(maps, tmp_path / "map.png", "untrained", labels)
    assert Path(path).read_bytes().startswith(b"\x89PNG")


def test_the_benchmark_helpers_name_the_machine_and_refuse_an_output_in_the_way(tmp_path):
    env = suite.environment(jax.local_devices())
    assert env["backend"] == "cpu" and env["local_devices"] == jax.local_device_count()
    assert suite.comparisons([]) == []
    assert torch_ref.torch_device_for("cpu") == ("cpu" if torch_ref.torch_available() else None)
    command.check_outputs(tmp_path, "fresh")  # nothing there: fine
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(ValueError, match="taken.json is a directory"):
        command.check_outputs(tmp_path, "taken")
