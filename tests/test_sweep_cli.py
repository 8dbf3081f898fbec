"""experiments/sweep.py, fpt_jax/sweep.py and fpt_jax/results.py (issue 15, part 3): the grid parser, cell
names, skipping and resuming cells (with a fake training loop), selection and the tables on
synthetic cells with known outcomes, the plots, bad command lines (rc 2, `error:` naming the
flag), and one tiny end-to-end sweep through the real loop.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fpt_jax import results, sweep
from fpt_jax.config import TrainConfig
from tests.settings import train_config
from tests.entry_runner import run_all

PNG = b"\x89PNG\r\n\x1a\n"


# --- synthetic cells -----------------------------------------------------------------------

def _run(k, lr, seed, val, test, best_step=4, conv=None, params=100):
    return {"run": k, "learning_rate": lr, "seed": seed, "best_step": best_step,
            "best_val_accuracy": val, "best_val_loss": None if val is None else 1 - val,
            "test": {"test": {"test/accuracy": test, "test/loss": 0.5}},
            "steps_to_converge": conv, "stopped_early": False, "last_step": 8,
            "wall_s": 1.5, "trainable_params": params}


def _cell(root: Path, name: str, settings: dict, runs: list[dict] | None, index: int,
          metrics: list[str] | None = None) -> Path:
    d = root / "cells" / name
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"index": index, "name": name,
                                             "settings": settings, "config": {}}))
    if runs is not None:
        (d / "summary.json").write_text(json.dumps({"runs": runs}))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("\n".join(metrics))
    return d


def _eval_row(run, step, acc, lr, seed):
    return json.dumps({"step": step, "run": run, "learning_rate": lr, "seed": seed,
                       "eval/accuracy": acc, "eval/loss": 1 - acc})


@pytest.fixture
def synthetic(tmp_path):
    """Cell 'a': lr 1e-3 has the best MEAN validation accuracy (0.7) though the best single
    run is at 1e-2 (0.9); test at 1e-3: 0.5, 0.6, 0.7 -> 60.00 +- 5.77. Cell 'b': a tie
    between 1e-3 and 1e-2 (0.8): the smaller wins. Cell 'c': one seed (s.e. 0), its lr 1e-2
    unfinished (None) and so not eligible though higher. Cell 'd': pending."""
    a_runs = [_run(0, 1e-3, 0, 0.6, 0.5, conv=4), _run(1, 1e-3, 1, 0.7, 0.6),
              _run(2, 1e-3, 2, 0.8, 0.7, conv=2),
              _run(3, 1e-2, 0, 0.9, 0.95), _run(4, 1e-2, 1, 0.5, 0.4), _run(5, 1e-2, 2, 0.6, 0.5)]
    metrics = []
    for r in a_runs:
        for step, acc in ((2, r["best_val_accuracy"] - 0.1), (4, r["best_val_accuracy"])):
            metrics.append(_eval_row(r["run"], step, acc, r["learning_rate"], r["seed"]))
        metrics.append(json.dumps({"step": 1, "run": r["run"], "train/loss": 0.3}))
    metrics.append(_eval_row(0, 4, 0.6, 1e-3, 0))  # a resumed run repeating a step
    metrics.append('{"step": 6, "run": 0, "eval/acc')  # a torn last line
    _cell(tmp_path, "trainable=output", {"trainable": "output"}, a_runs, 0, metrics)
    b_runs = [_run(0, 1e-3, 0, 0.8, 0.8), _run(1, 1e-3, 1, 0.8, 0.8),
              _run(2, 1e-2, 0, 0.7, 0.9), _run(3, 1e-2, 1, 0.9, 0.9)]
    _cell(tmp_path, "trainable=fpt", {"trainable": "fpt"}, b_runs, 1,
          [_eval_row(r["run"], 4, r["best_val_accuracy"], r["learning_rate"], r["seed"])
           for r in b_runs])
    c_runs = [_run(0, 1e-4, 0, 0.55, 0.52), _run(1, 1e-2, 0, None, None)]
    c_runs[1]["test"] = {}
    c_runs[1]["diverged_step"] = 1
    _cell(tmp_path, "trainable=output,ln", {"trainable": "output,ln"}, c_runs, 2)
    _cell(tmp_path, "trainable=full", {"trainable": "full"}, None, 3)
    return tmp_path


def test_mean_se():
    assert results.mean_se([0.5]) == (0.5, 0.0)
    mean, se = results.mean_se([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and se == pytest.approx(0.1 / math.sqrt(3))


def test_selection_on_mean_validation_accuracy(synthetic):
    cells = {c.name: c for c in results.load_cells(synthetic)}
    assert [c.name for c in results.load_cells(synthetic)] == [
        "trainable=output", "trainable=fpt", "trainable=output,ln", "trainable=full"]
    a = results.select(cells["trainable=output"])
    assert a.learning_rate == 1e-3 and a.n_seeds == 3 and a.run_ids == [0, 1, 2]
    assert a.val_mean == pytest.approx(0.7)
    assert a.test["test"][0] == pytest.approx(0.6)
    assert a.test["test"][1] == pytest.approx(0.1 / math.sqrt(3))
    assert a.per_lr[1e-2][0] == pytest.approx(2 / 3)
    assert a.steps_to_converge == [4, None, 2] and a.trainable_params == 100
    b = results.select(cells["trainable=fpt"])
    assert b.learning_rate == 1e-3 and b.n_seeds == 2  # tie: the smaller learning rate
    c = results.select(cells["trainable=output,ln"])
    assert c.learning_rate == 1e-4 and c.n_seeds == 1 and c.test["test"] == (0.52, 0.0)
    assert c.per_lr[1e-2] == (None, None, 1)
    assert not cells["trainable=full"].finished


def test_eval_rows_dedupe_and_torn_line(synthetic):
    rows = results.read_eval_rows(synthetic / "cells/trainable=output/metrics.jsonl")
    assert len(rows) == 12 and all("eval/accuracy" in r for r in rows)
    assert [(r["run"], r["step"]) for r in rows][:2] == [(0, 2), (0, 4)]


def test_write_results(synthetic):
    paths = results.write_results(synthetic)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 + 4 + 2
    first = rows[0]
    assert first["cell"] == "trainable=output" and first["trainable"] == "output"
    assert float(first["learning_rate"]) == 1e-3 and first["seed"] == "0"
    assert float(first["best_val_accuracy"]) == 0.6 and first["best_step"] == "4"
    assert float(first["test_accuracy"]) == 0.5 and first["steps_to_converge"] == "4"
    assert first["trainable_params"] == "100" and float(first["wall_s"]) == 1.5
    assert rows[-1]["best_val_accuracy"] == "" and rows[-1]["test_accuracy"] == ""
    md = paths["md"].read_text()
    table = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()
             if line.startswith("| trainable=")}
    # the first table's rows come first: selected lr, seeds, val, test, converged, params
    # (selected lr, lr grid: every selection of a 2-point grid is at an edge, marked)
    assert ("| 0.001 (bottom edge of 0.001..0.01) | 0.001, 0.01 | 3 | 70.00 +- 5.77 | "
            "60.00 +- 5.77 | 2/3 (mean step 3) | 100 |") in md
    assert ("| trainable=fpt | fpt | 0.001 (bottom edge of 0.001..0.01) | 0.001, 0.01 | 2 | "
            "80.00 +- 0.00 | 80.00 +- 0.00 |") in md
    assert ("| trainable=output,ln | output,ln | 0.0001 (bottom edge of 0.0001..0.01) | "
            "0.0001, 0.01 | 1 | 55.00 +- 0.00 | 52.00 +- 0.00 |") in md
    assert "66.67 +- 12.02" in md and "70.00 +- 5.77*" in md  # per-lr table, selected marked
    assert "Not finished (no summary yet): trainable=full." in md
    assert "| trainable=output,ln | 55.00 +- 0.00* | - | - (1d) |" in md
    assert rows[-1]["diverged_step"] == "1" and rows[0]["diverged_step"] == ""
    assert len(table) == 3
    for key in ("curves", "lr"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_several_test_splits(tmp_path):
    """Homology's three test sets: keys test_<split>/accuracy, one column pair each."""
    runs = []
    for k, seed in enumerate((0, 1)):
        run = _run(k, 1e-4, seed, 0.5, None)
        run["test"] = {s: {f"test_{s}/accuracy": 0.1 * (i + 1) + 0.1 * seed,
                           f"test_{s}/loss": 2.0} for i, s in enumerate(("fold", "family"))}
        runs.append(run)
    _cell(tmp_path, "base", {}, runs, 0)
    paths = results.write_results(tmp_path)
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert "test_accuracy/fold" in header and "test_loss/family" in header
    sel = results.select(results.load_cells(tmp_path)[0])
    assert sel.test["fold"][0] == pytest.approx(0.15) and sel.test["family"][0] == \
        pytest.approx(0.25)
    assert "test acc (fold) | test acc (family)" in paths["md"].read_text()


def test_write_results_empty(tmp_path):
    paths = results.write_results(tmp_path)
    assert paths["csv"].read_text().startswith("cell,learning_rate,seed")
    assert "# Sweep results" in paths["md"].read_text()
    assert paths["lr"].read_bytes().startswith(PNG)


# --- the grid ------------------------------------------------------------------------------

IMAGES = train_config(task="fashion_mnist")


def test_parse_grid_types_and_separator():
    axes = dict(sweep.parse_grid(
        "trainable=output|output,ln|fpt,attn[-2:]; n_embd=16|32; dropout=0|0.1; "
        "in_layer_sizes=|64,64; task_options.augment=true|none|False; grad_clip=none|1; "
        "init= pretrained | random ;task_options.patch_size=2|4", IMAGES))
    assert axes["trainable"] == ["output", "output,ln", "fpt,attn[-2:]"]
    assert axes["n_embd"] == [16, 32] and all(type(v) is int for v in axes["n_embd"])
    assert axes["dropout"] == [0.0, 0.1] and all(type(v) is float for v in axes["dropout"])
    assert axes["in_layer_sizes"] == [(), (64, 64)]
    assert axes["task_options.augment"] == [True, None, False]
    assert axes["task_options.patch_size"] == [2, 4]
    assert axes["grad_clip"] == [None, 1.0]
    assert axes["init"] == ["pretrained", "random"]
    assert sweep.parse_grid("", IMAGES) == [] == sweep.parse_grid(" ", IMAGES)


@pytest.mark.parametrize("spec, words", [
    ("nofield=1|2", ["'nofield=1|2'", "unknown setting 'nofield'", "trainable",
                     "task_options.<option>", "patch_size"]),
    ("task_options.n=1|2", ["unknown setting 'task_options.n'", "image_size"]),
    ("task_options=1", ["unknown setting 'task_options'"]),
    ("learning_rate=1e-3|1e-2", ["learning_rates"]),
    ("seed=0|1", ["seeds"]),
    ("task_options.patch_size=x", ["an integer"]),
    ("n_embd=16|abc", ["n_embd='abc'", "an integer"]),
    ("n_embd=16.5", ["an integer"]),
    ("dropout=x", ["a finite number"]),
    ("dropout=inf", ["a finite number"]),
    ("remat=maybe", ["true or false"]),
    ("steps=none", ["steps has no 'not set' value"]),
    ("trainable=fpt|fpt", ["repeated value", "fpt"]),
    ("trainable=", ["empty value"]),
    ("trainable", ["expected <setting>=<v1>|<v2>"]),
    ("in_layer_sizes=6,x", ["comma-separated ints"]),
])
def test_parse_grid_errors(spec, words):
    with pytest.raises(ValueError) as e:
        sweep.parse_grid(spec, IMAGES)
    assert "grid axis" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_parse_grid_repeated_field():
    with pytest.raises(ValueError, match="already an axis"):
        sweep.parse_grid("n_embd=16; n_embd=32", IMAGES)


def test_cell_names():
    assert sweep.cell_name({}) == "base"
    assert sweep.cell_name({"trainable": "output,ln", "init": "random"}) == \
        "trainable=output,ln__init=random"
    assert sweep.cell_name({"dropout": 0.1, "in_layer_sizes": (64, 64),
                                "augment": None}) == \
        "dropout=0.1__in_layer_sizes=64,64__augment=none"
    odd = sweep.cell_name({"trainable": "fpt,attn[-2:]"})
    assert odd.startswith("trainable=fpt,attn_-2__~") and "/" not in odd
    assert odd == sweep.cell_name({"trainable": "fpt,attn[-2:]"})  # stable
    assert odd != sweep.cell_name({"trainable": "fpt,attn[-2_]"})


def test_make_cells_checks_every_cell():
    base = train_config(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16)
    cells = sweep.make_cells(base, "trainable=output|fpt; backbone_seed=0|1")
    assert [c.name for c in cells] == [
        "trainable=output__backbone_seed=0", "trainable=output__backbone_seed=1",
        "trainable=fpt__backbone_seed=0", "trainable=fpt__backbone_seed=1"]
    assert cells[3].cfg.trainable == "fpt" and cells[3].cfg.backbone_seed == 1
    assert cells[0].cfg.n_embd == 16 and base.trainable == "fpt"
    for grid, words in (("trainable=output|bogus", "grid cell trainable=bogus: unknown "
                                                   "trainable group 'bogus'"),
                        ("n_embd=16|15", "grid cell n_embd=15"),
                        ("task_options.patch_size=1|2; task=bit_xor|mnist", "grid cell"),
                        ("task_options.patch_size=1|2", "patch_size=2 must divide n=5"),
                        ("dropout=0|1.5", "dropout=1.5")):
        with pytest.raises(ValueError, match=None) as e:
            sweep.make_cells(base, grid)
        assert words in str(e.value), str(e.value)


def test_sweep_config_and_process_cells():
    cfg = sweep.SweepConfig(learning_rates=(1e-3, 1e-2), seeds=(0, 2)).validate()
    assert cfg.runs() == ([1e-3, 1e-3, 1e-2, 1e-2], [0, 2, 0, 2])
    assert sweep.parse_process_cells("1/3") == (1, 3)
    assert sweep.parse_process_cells(None) == (0, 1)
    for bad in (dict(learning_rates=(0,)), dict(learning_rates=("x",)),
                dict(learning_rates=(1e-3, 0.001)), dict(learning_rates=()),
                dict(seeds=(-1,)), dict(seeds=(1, 1)), dict(seeds=(1.5,)), dict(grid=3)):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}="):
            sweep.SweepConfig(**bad).validate()
    for bad in ("2/2", "a/b"):
        with pytest.raises(ValueError, match="--process_cells"):
            sweep.parse_process_cells(bad)


# --- the loop over cells, with a fake training loop -----------------------------------------

class FakeTrain:
    """loop.train_and_evaluate's contract (a group of K runs): summary.json with K runs and metrics.jsonl rows;
    a known validation accuracy per (trainable, lr, seed)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def accuracy(cfg, lr, seed):
        return round(0.5 + 0.1 * ("fpt" in cfg.trainable) + 0.1 * (lr == 1e-2) + 0.01 * seed, 4)

    def __call__(self, cfg, workdir, learning_rates, seeds):
        self.calls.append((Path(workdir).name, list(learning_rates), list(seeds)))
        runs, rows = [], []
        for k, (lr, seed) in enumerate(zip(learning_rates, seeds)):
            acc = self.accuracy(cfg, lr, seed)
            for step in (2, 4):
                rows.append({"step": step, "run": k, "learning_rate": lr, "seed": seed,
                             "eval/accuracy": acc - (0.1 if step == 2 else 0), "eval/loss": 0.1})
            runs.append(_run(k, lr, seed, acc, acc - 0.05))
        Path(workdir, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        Path(workdir, "summary.json").write_text(json.dumps({"runs": runs}))
        return runs


def _cells(grid=("trainable=output|fpt",), **overrides):
    base = train_config(**{"task": "bit_xor", "init": "random", "n_layer": 1, "n_head": 2,
                          "n_embd": 16, "steps": 4, **overrides})
    return sweep.make_cells(base, "; ".join(grid))


def test_run_sweep_skips_finished_cells(tmp_path):
    fake, log = FakeTrain(), []
    status = sweep.run_sweep(_cells(), tmp_path, [1e-3, 1e-2], [0, 1], train_fn=fake,
                                 log=log.append)
    assert status == {"trainable=output": "trained", "trainable=fpt": "trained"}
    assert fake.calls == [("trainable=output", [1e-3, 1e-3, 1e-2, 1e-2], [0, 1, 0, 1]),
                          ("trainable=fpt", [1e-3, 1e-3, 1e-2, 1e-2], [0, 1, 0, 1])]
    meta = json.loads((tmp_path / "cells/trainable=fpt/cell.json").read_text())
    assert meta["settings"] == {"trainable": "fpt"} and meta["config"]["n_embd"] == 16
    md = (tmp_path / "results.md").read_text()
    assert ("| trainable=fpt | fpt | 0.01 (top edge of 0.001..0.01) | 0.001, 0.01 | 2 | "
            "70.50 +- 0.50 | 65.50 +- 0.50 |") in md
    # again: nothing trains
    status = sweep.run_sweep(_cells(), tmp_path, [1e-3, 1e-2], [0, 1], train_fn=fake,
                                 log=log.append)
    assert len(fake.calls) == 2 and set(status.values()) == {"finished"}
    assert any("finished, skipped" in line for line in log)
    # more steps: a finished cell continues (the loop resumes it)
    status = sweep.run_sweep(_cells(steps=8), tmp_path, [1e-3, 1e-2], [0, 1],
                                 train_fn=fake, log=log.append)
    assert len(fake.calls) == 4 and set(status.values()) == {"trained"}


def test_run_sweep_interrupted_cell_resumes(tmp_path):
    fake = FakeTrain()
    cells = _cells()
    d = tmp_path / "cells" / cells[0].name
    d.mkdir(parents=True)
    (d / "checkpoints").mkdir()  # an interrupted cell: a checkpoint, no summary
    assert sweep.cell_status(cells[0], tmp_path, [1e-3], [0]) == "resume"
    assert sweep.cell_status(cells[1], tmp_path, [1e-3], [0]) == "new"
    sweep.run_sweep(cells, tmp_path, [1e-3], [0], train_fn=fake, log=lambda s: None)
    assert [c[0] for c in fake.calls] == ["trainable=output", "trainable=fpt"]


def test_run_sweep_refuses_other_runs_or_config(tmp_path):
    fake = FakeTrain()
    sweep.run_sweep(_cells(), tmp_path, [1e-3], [0, 1], train_fn=fake, log=lambda s: None)
    with pytest.raises(ValueError, match="the same learning rates and seeds"):
        sweep.run_sweep(_cells(), tmp_path, [1e-3, 1e-2], [0, 1], train_fn=fake,
                            log=lambda s: None)
    with pytest.raises(ValueError, match="another config .*dropout: 0.1 -> 0.0"):
        sweep.run_sweep(_cells(dropout=0.0), tmp_path, [1e-3], [0, 1], train_fn=fake,
                            log=lambda s: None)
    assert len(fake.calls) == 2  # nothing trained by the refused sweeps


def test_run_sweep_process_cells(tmp_path):
    fake = FakeTrain()
    grid = ("trainable=output|fpt|output,ln",)
    sweep.run_sweep(_cells(grid), tmp_path, [1e-3], [0], process_cells=(1, 2),
                        train_fn=fake, log=lambda s: None)
    assert [c[0] for c in fake.calls] == ["trainable=fpt"]
    md = (tmp_path / "results.md").read_text()
    assert "Not finished (no summary yet): trainable=output, trainable=output,ln." in md
    sweep.run_sweep(_cells(grid), tmp_path, [1e-3], [0], process_cells=(0, 2),
                        train_fn=fake, log=lambda s: None)
    assert [c[0] for c in fake.calls] == ["trainable=fpt", "trainable=output",
                                          "trainable=output,ln"]
    assert "Not finished" not in (tmp_path / "results.md").read_text()


# --- the command line ----------------------------------------------------------------------

TINY = ["--config=experiments/configs/bit_xor.py", "--config.init=random",
        "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=16",
        "--config.batch_size=4", "--config.steps=4", "--config.eval_every=2",
        "--config.log_every=2", "--config.checkpoint_every=2", "--config.num_devices=1"]


@pytest.mark.slow
def test_bad_command_lines(tmp_path):
    (tmp_path / "a_file").write_text("x")
    wd = f"--workdir={tmp_path / 'wd'}"
    cases = [
        ([wd, "--sweep.grid=nofield=1|2"], ["'nofield=1|2'", "unknown setting"]),
        ([wd, "--sweep.grid=n_embd=16|abc"], ["n_embd=16|abc", "an integer"]),
        ([wd, "--sweep.grid=learning_rate=1e-3|1e-2"], ["grid axis", "learning_rates"]),
        ([wd, "--sweep.grid=trainable=output|bogus"], ["grid cell trainable=bogus"]),
        ([wd, "--sweep.grid=n_embd=16;n_embd=32"], ["grid axis", "already an axis"]),
        ([wd, "--sweep.learning_rates=1e-3,0"], ["--sweep.learning_rates", "not 0"]),
        ([wd, "--sweep.learning_rates=abc"], ["--sweep.learning_rates", "abc"]),
        ([wd, "--sweep.seeds=0,-1"], ["--sweep.seeds", "not -1"]),
        ([wd, "--sweep.seeds=0,0"], ["--sweep.seeds", "repeated"]),
        ([wd, "--sweep.extend_edges=-1"], ["--sweep.extend_edges=-1", "an integer >= 0"]),
        ([wd, "--sweep.extend_edges=abc"], ["--sweep.extend_edges", "abc"]),
        ([wd, "--sweep.extend_edges=1.5"], ["--sweep.extend_edges", "1.5"]),
        ([wd, "--sweep.extend_edges=2", "--sweep.learning_rates=1e-3"],
         ["--sweep.extend_edges=2", "needs >= 2 learning_rates"]),
        ([wd, "--sweep.nope=1"], ["--sweep.nope: not a setting", "learning_rates, seeds, grid"]),
        ([wd, "--grid=trainable=output"], ["grid"]),
        ([wd, "--process_cells=2/2"], ["--process_cells=2/2"]),
        ([f"--workdir={tmp_path / 'a_file' / 'x'}"], ["--workdir", "not a directory"]),
        ([wd, "--config.n_embd=abc"], ["--config.n_embd"]),
        ([], ["--workdir"]),
    ]
    done = tmp_path / "done"  # --results_only: tables from finished cells, nothing trained
    _cell(done, "trainable=fpt", {"trainable": "fpt"}, [_run(0, 1e-3, 0, 0.8, 0.7)], 0)
    out = run_all("experiments.sweep", [[*TINY, *args] for args, _ in cases]
                  + [[*TINY, "--results_only", f"--workdir={done}"]], timeout=120)
    good = out.pop()
    assert good["rc"] == 0, good
    assert ("| trainable=fpt | fpt | 0.001 (single lr) | 0.001 | 1 | 80.00 +- 0.00 | "
            "70.00 +- 0.00 |") in good["stdout"]
    assert (done / "results.csv").exists() and (done / "lr.png").exists()
    for (args, words), result in zip(cases, out):
        assert result["rc"] == 2, (args, result)
        assert result["stderr"].strip().splitlines()[-1].startswith("error:"), (args, result)
        assert "Traceback" not in result["stderr"], (args, result)
        for w in words:
            assert w in result["stderr"], (args, w, result["stderr"])
    assert not (tmp_path / "wd" / "cells").exists()  # nothing started


@pytest.mark.slow
def test_end_to_end_tiny_sweep(tmp_path):
    wd = tmp_path / "sweep"
    args = [*TINY, "--config.dropout=0", "--sweep.grid=trainable=output|fpt",
            "--sweep.learning_rates=1e-3,1e-2", "--sweep.seeds=0,1", f"--workdir={wd}"]
    first, = run_all("experiments.sweep", [args], timeout=600)
    assert first["rc"] == 0, first["stderr"][-3000:]
    for name in ("trainable=output", "trainable=fpt"):
        summary = json.loads((wd / "cells" / name / "summary.json").read_text())
        assert len(summary["runs"]) == 4
    with open(wd / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["trainable"] for r in rows} == {"output", "fpt"}
    assert {(float(r["learning_rate"]), int(r["seed"])) for r in rows} == {
        (1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)}
    md = (wd / "results.md").read_text()
    assert "| trainable=output | output |" in md and "| trainable=fpt | fpt |" in md
    assert (wd / "curves.png").read_bytes().startswith(PNG)
    assert (wd / "lr.png").read_bytes().startswith(PNG)
    mtimes = {p: p.stat().st_mtime_ns for p in (wd / "cells").glob("*/summary.json")}
    second, = run_all("experiments.sweep", [args], timeout=600)
    assert second["rc"] == 0, second["stderr"][-3000:]
    assert second["stdout"].count("finished, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_every_sweep_setting_is_a_flag_that_reaches_the_sweep():
    # issue 25: --sweep.<field> for every SweepConfig field, parsed as the entry point does
    import dataclasses
    from absl import flags
    from experiments import cli
    given = {"learning_rates": ("--sweep.learning_rates=3e-4,3e-3", (3e-4, 3e-3)),
             "seeds": ("--sweep.seeds=4,5", (4, 5)),
             "grid": ("--sweep.grid=trainable=output,ln|fpt; n_embd=16|32",
                      "trainable=output,ln|fpt; n_embd=16|32"),
             "extend_edges": ("--sweep.extend_edges=2", 2)}
    assert set(given) == {f.name for f in dataclasses.fields(sweep.SweepConfig)}
    argv = ["x", *TINY, *(arg for arg, _ in given.values())]
    fv = flags.FlagValues()
    cli.settings_parser(("sweep", sweep.SweepConfig(), ""))(argv, fv)
    for name, (_, value) in given.items():
        assert getattr(fv.sweep, name) == value, name
    cells = sweep.make_cells(fv.config, fv.sweep.grid)
    assert [c.name for c in cells] == ["trainable=output,ln__n_embd=16",
                                       "trainable=output,ln__n_embd=32",
                                       "trainable=fpt__n_embd=16", "trainable=fpt__n_embd=32"]
    assert fv.sweep.runs() == ([3e-4, 3e-4, 3e-3, 3e-3], [4, 5, 4, 5])
