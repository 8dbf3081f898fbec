"""experiments/reproduce.py: the smoke budget end to end, the report's sections, rows, plots
and published numbers, reuse of finished cells, and what is skipped."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags import config_path

from fpt_jax import paper, reproduce, reproduce_report, rows
from fpt_jax.sweep import SweepConfig
from tests.entry_runner import run_all

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "budgets" / "smoke.py"


def _budget(path: Path = SMOKE) -> ConfigDict:
    import runpy
    return runpy.run_path(str(path))["get_config"]()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    report_dir = tmp_path_factory.mktemp("report")
    budget = _budget()
    plan = reproduce.plan(budget, report_dir)
    reproduce.run(plan, report_dir, log=lambda m: None)
    path = reproduce_report.write(report_dir, budget, plan.cells, plan.skipped, command="test")
    return report_dir, budget, plan, path.read_text()


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table after `heading`."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_the_smoke_report_has_every_section_and_every_row(smoke):
    report_dir, budget, plan, text = smoke
    for section in ("## Main table", "## Adding parameter groups one at a time",
                    "## Steps to converge", "## Parameter counts", "## Skipped", "## Plots",
                    "## Sources", "## Budget"):
        assert section in text, section
    table = _table(text, "### bit_xor")
    trivial_rows = [row for row in table if row[0].startswith("trivial: ")]
    assert [row[0] for row in trivial_rows] == ["trivial: majority class"]  # Bit XOR: chance
    assert abs(float(trivial_rows[0][1]) - 50) < 2.5  # computed from the data, not typed in
    shown = {row[0] for row in table if row not in trivial_rows}
    skipped = {row for task, row, _ in plan.skipped}
    for row in budget.rows:
        label = rows.get(row).label
        assert (label in shown) != (row in skipped), row  # run, or listed as skipped
        if row in skipped:
            assert re.search(rf"- bit_xor / {row}: \S", text)
    # every row trained as a sweep cell (each baseline in the sweep): mean +- s.e. of 2 seeds
    for row in (row for row in table if row not in trivial_rows):
        assert re.fullmatch(r"\d+\.\d \+- \d+\.\d \(n=2\)", row[1]), row
        low, high = map(float, re.fullmatch(r"\[(-?[\d.]+), (-?[\d.]+)\]", row[2]).groups())
        mean, se = map(float, re.findall(r"[\d.]+", row[1])[:2])
        assert low <= mean <= high  # t(0.975, 1) = 12.7, the interval clipped to [0, 100]
        assert high - low >= min(2 * 12.7 * se - 0.2, min(mean + 12.7 * se, 100)
                                 - max(mean - 12.7 * se, 0) - 0.2)
        assert re.fullmatch(r"(above|below) majority class|\*\*not above majority class\*\*",
                            row[4]), row
        assert re.match(r"[\d.e-]+ of 0\.001\.\.0\.003 \(2\)", row[3]), row
    assert (report_dir / "results.csv").read_text().count("\n") > len(plan.cells)
    counts = _table(text, "## Parameter counts")
    assert len(counts) == len(shown)
    for _, _, trainable, total in counts:
        assert 0 < int(trainable.replace(",", "")) <= int(total.replace(",", ""))


@pytest.mark.slow
def test_the_plots_decode_and_are_not_blank(smoke):
    from matplotlib import image
    report_dir, _, _, text = smoke
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert {"main.png", "curves_bit_xor.png", "lr_bit_xor.png", "attention_bit_xor.png"} <= set(
        names)
    for name in names:
        pixels = image.imread(report_dir / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and float(np.std(pixels)) > 0.01


@pytest.mark.slow
def test_the_published_numbers_in_the_report_are_the_papers(smoke):
    _, _, _, text = smoke
    for row in _table(text, "### bit_xor"):
        if row[0].startswith("trivial: "):
            assert row[5] == row[6] == "-"
            continue
        key = next(k for k, v in rows.ROWS.items() if v.label == row[0])
        lu = paper.published(rows.get(key).paper_row, "bit_xor")
        assert row[5] == ("-" if lu is None else f"{lu:g}")
        assert row[6] == "-"  # Rothermel et al. have no bit tasks
    ablation = _table(text, "## Adding parameter groups one at a time")
    random_row = next(r for r in ablation if r[1] == rows.get("random").label)
    published = [float(re.search(r"\(paper ([\d.]+)\)", c).group(1)) for c in random_row[2:]]
    assert published == [paper.ABLATION_RANDOM["bit_xor"][s] for s in
                         ("output", "fpt")]  # the smoke budget's selections
    assert all(text.count(c) for c in paper.CITATIONS.values())


@pytest.mark.slow
def test_a_second_reproduction_reuses_equal_cells_and_plans_new_ones_for_changes(smoke):
    report_dir, budget, plan, _ = smoke
    again = reproduce.plan(budget, report_dir)
    assert [c.name for c in again.cells] == [c.name for c in plan.cells]
    statuses = reproduce.run(again, report_dir, log=lambda m: None)
    assert set(statuses.values()) == {"finished"}  # nothing trained again
    # Training only some rows again rewrites the report with every finished cell.
    before = _table(smoke[3], "### bit_xor")
    done = subprocess.run([sys.executable, "-m", "experiments.reproduce", f"--budget={SMOKE}",
                           f"--report_dir={report_dir}", "--rows=random"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _table((report_dir / "report.md").read_text(), "### bit_xor") == before
    bigger = _budget()
    bigger.tasks.bit_xor.overrides.steps = 6
    grown = reproduce.plan(bigger, report_dir)
    assert not {c.name for c in grown.cells} & {c.name for c in plan.cells}


def test_tasks_without_data_and_unknown_rows(tmp_path):
    budget = _budget()
    with budget.unlocked():
        budget.tasks.mnist = ConfigDict(dict(overrides={}, sweep=SweepConfig((1e-3,), (0,))))
    p = reproduce.plan(budget, tmp_path, rows=["random"], reachable=lambda cfg: None)
    assert [(t, r) for t, r, _ in p.skipped] == [("mnist", "*")]
    assert "no data" in p.skipped[0][2]
    assert {c.task for c in p.cells} == {"bit_xor"}
    with pytest.raises(ValueError, match="'lstn' is not in the budget"):
        reproduce.plan(budget, tmp_path, rows=["lstn"])


def _leaves(config, prefix=""):
    """(path, value) of every scalar or tuple setting of a budget, SweepConfigs included."""
    items = (config.items() if isinstance(config, ConfigDict)
             else ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)))
    for key, value in items:
        if isinstance(value, ConfigDict) or dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _other(value):
    """A command-line text for another value of `value`'s type, and that value."""
    if isinstance(value, bool):
        return str(not value).lower(), not value
    if isinstance(value, int):
        return str(value + 1), value + 1
    if isinstance(value, float):
        return repr(value * 2), value * 2
    if isinstance(value, tuple):
        new = (*value, value[-1] * 2 if value and not isinstance(value[-1], str) else "fpt")
        return repr(new), new
    return value + "x", value + "x"


def _parse_budget(*overrides: str):
    argv = ["x", f"--budget={SMOKE}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("budget", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.budget


def test_every_budget_setting_is_overridable_and_reaches_the_plan(tmp_path):
    # issue 25: every field of a budget (its tasks' overrides and SweepConfigs, its rows'
    # overrides, the ablation) is a --budget.<path> flag, and the plan is built from it
    leaves = dict(_leaves(_budget()))
    assert "tasks.bit_xor.sweep.seeds" in leaves and "rows.random.n_embd" in leaves
    for path, value in leaves.items():
        text, new = _other(value)
        budget = _parse_budget(f"--budget.{path}={text}")
        assert config_path.get_value(path, budget) == new, path
    budget = _parse_budget("--budget.tasks.bit_xor.sweep.seeds=3,4",
                           "--budget.tasks.bit_xor.overrides.steps=5",
                           "--budget.rows.random.n_embd=32",
                           "--budget.tasks.bit_xor.overrides.task_options.n=3")
    p = reproduce.plan(budget, tmp_path, rows=["random"], reachable=lambda cfg: None)
    cell = next(c for c in p.cells if c.row == "random" and c.selection is None)
    assert (cell.seeds, cell.cfg.steps, cell.cfg.n_embd, cell.cfg.task_options.n) == (
        [3, 4], 5, 32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    ([f"--report_dir=/tmp/x"], "--budget is required"),
    ([f"--budget={SMOKE}"], "--report_dir is required"),
    ([f"--budget={SMOKE}", "--report_dir=/proc/nope"], "--report_dir=/proc/nope"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x", "--rows=lstn"], "not in the budget"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x", "--budget.rows.lstm.n_head=2"],
     "a field the budget does not have"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x", "--budget.rows.random.n_head=3"],
     "row random: GPT2Config.n_embd=16 must be divisible by n_head=3"),  # before any cell
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x", "--budget.ablation.rows=('lstm',)",
      "--budget.ablation.selections=('output,attn',)"],  # tuples: overridable
     "row lstm, ablation output,attn: trainable='output,attn': this model has no attn"),
    ([f"--budget={REPO / 'experiments/configs/bit_xor.py'}", "--report_dir=/tmp/x"],
     "returned TrainConfig"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x", "--budget.tasks.bit_xor.sweep.seeds=0,-1"],
     "--budget.tasks.bit_xor.sweep.seeds=(0, -1): accepted: one or more integers >= 0"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x",
      "--budget.tasks.bit_xor.sweep.learning_rates=0"], "sweep.learning_rates=(0,): accepted: one or more finite numbers > 0"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x",
      "--budget.tasks.bit_xor.overrides.task_options.n=0"], "n and num_patterns must be >= 1"),
    ([f"--budget={SMOKE}", "--report_dir=/tmp/x",
      "--budget.tasks.bit_xor.overrides.task_options.n=abc"], "task_options.n=abc"),
])
def test_bad_flags_exit_2_with_an_error(args, message):
    # the entry point's own process, forked from a server that imported it once
    out, = run_all("experiments.reproduce", [[*args, "--plan_only"]])
    assert out["rc"] == 2, out["stderr"][-2000:]
    assert "error:" in out["stderr"] and message in out["stderr"]


def test_a_budgets_extend_edges_reaches_every_planned_cell(tmp_path, monkeypatch):
    budget = _budget()
    budget.tasks.bit_xor.sweep.extend_edges = 2
    plan = reproduce.plan(budget, tmp_path, reachable=lambda cfg: "offline", dry=True)
    assert plan.cells and {c.extend_edges for c in plan.cells} == {2}
    ran = []
    monkeypatch.setattr(reproduce.sweep, "run_sweep",
                        lambda cells, *a, **kw: ran.append(kw["extend_edges"]) or {})
    reproduce.run(reproduce.Plan(plan.cells[:1], []), tmp_path, log=lambda m: None)
    assert ran == [2]


def test_a_tasks_own_rows_restrict_its_cells_and_its_ablation(tmp_path):
    budget = _budget()
    assert {"random", "lstm"} <= set(budget.rows) and "random" in budget.ablation.rows
    everything = reproduce.plan(budget, tmp_path, reachable=lambda cfg: None, dry=True)
    with budget.unlocked():
        budget.tasks.bit_xor.rows = ("lstm",)
    p = reproduce.plan(budget, tmp_path, reachable=lambda cfg: None, dry=True)
    assert {(c.row, c.selection) for c in p.cells} == {("lstm", None)}
    assert len(everything.cells) > len(p.cells)
    budget.tasks.bit_xor.rows = ("lstm", "lstn")
    with pytest.raises(ValueError, match=r"--budget.tasks.bit_xor.rows: \['lstn'\] not in"):
        reproduce.check_budget(budget)


def test_a_cell_name_leaves_out_fields_added_later_at_their_default(tmp_path):
    # cells trained before `mesh` (or blocks, alignment) existed are found again; a mesh
    # names another cell
    plan = reproduce.plan(_budget(), tmp_path, reachable=lambda cfg: None, dry=True)
    cell = plan.cells[0]
    before = {k: v for k, v in cell.cfg.to_dict().items()
              if k not in reproduce.NAMED_WITHOUT_DEFAULT}
    import hashlib
    import json
    exact = json.dumps([before, cell.learning_rates, cell.seeds], sort_keys=True, default=str)
    assert cell.name.endswith("~" + hashlib.sha1(exact.encode()).hexdigest()[:8])
    meshed = dataclasses.replace(cell, cfg=dataclasses.replace(cell.cfg, mesh=(1, 1)))
    assert meshed.name != cell.name
    aligned = dataclasses.replace(cell, cfg=dataclasses.replace(cell.cfg, align_steps=5))
    with_block = dataclasses.replace(cell, cfg=dataclasses.replace(cell.cfg, blocks=(5,)))
    assert len({cell.name, aligned.name, with_block.name}) == 3


def test_a_budget_without_an_ablation_gets_no_empty_ablation_section(tmp_path):
    budget = _budget(REPO / "experiments" / "budgets" / "beyond.py")
    assert reproduce_report.ablation_table([], budget)[2:] == []  # nothing to tabulate
    text = reproduce_report.write(tmp_path, budget, [], [], command="test").read_text()
    assert "## Adding parameter groups" not in text
    assert "## Main table" in text and "## Steps to converge" in text
