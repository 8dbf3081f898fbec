"""fpt_jax/trivial.py: the trivial baselines, computed from the data, equal the analytic ones;
the majority class of a known label set; t intervals; how the report shows them beside a
proxy task."""
import runpy

import numpy as np
import pytest

from fpt_jax import reproduce_report, results, trivial
from fpt_jax.tasks import get_task
from fpt_jax.tasks.base import Task


def test_bit_memory_copying_the_visible_bits_scores_three_quarters():
    found = {b.name: b for b in trivial.baselines(get_task("bit_memory"))}
    # half the query's bits are shown: right on those, chance on the hidden half
    assert found["copy the visible bits"].accuracy == pytest.approx(0.75, abs=0.005)
    assert found["majority class"].accuracy == pytest.approx(0.5, abs=0.005)
    assert found["copy the visible bits"].examples == trivial.TEST_BATCHES * trivial.BATCH_SIZE


def test_bit_xor_has_chance_only():
    found = trivial.baselines(get_task("bit_xor", n=5))
    assert [b.name for b in found] == ["majority class"]
    assert found[0].accuracy == pytest.approx(0.5, abs=0.02)  # 5,120 examples x 5 bits


class _Labels(Task):
    """A dataset task with known labels: train [0, 1, 1, 2, 1]; test [1, 1, 0, 2] and one
    padding example (mask 0) that must not count."""
    name, input_kind, input_dim, output_dim, example_shape = "labels", "real", 1, 3, (1,)
    is_dataset = True
    LABELS = {"train": [0, 1, 1, 2, 1], "test": [1, 1, 0, 2, 1]}
    MASK = {"train": [1, 1, 1, 1, 1], "test": [1, 1, 1, 1, 0]}

    def batch(self, split, step, batch_size, *, seed, process_index=0, process_count=1):
        raise AssertionError("the baselines read eval_batches only")

    def eval_batches(self, split, batch_size, *, seed, num_batches, process_index=0,
                     process_count=1):
        assert num_batches is None  # a dataset: the whole split
        y, mask = np.array(self.LABELS[split]), np.array(self.MASK[split])
        for i in range(0, len(y), 2):  # batches of 2, the last one short
            yield {"x": np.zeros((len(y[i:i + 2]), 1), np.float32), "y": y[i:i + 2],
                   "mask": mask[i:i + 2]}

    def per_example_metrics(self, logits, batch):
        raise AssertionError("not a model")


def test_the_majority_class_is_the_training_labels_and_padding_does_not_count():
    assert trivial.majority_class(_Labels()) == 1
    (found,) = trivial.baselines(_Labels())
    assert (found.accuracy, found.examples) == (0.5, 4)  # 2 of the 4 real test examples


def test_the_t_interval_and_what_counts_as_indistinguishable():
    low, high = trivial.interval(0.5, 0.1, 3)
    assert (low, high) == pytest.approx((0.5 - 0.43027, 0.5 + 0.43027), abs=1e-5)  # t(.975,2)
    assert trivial.interval(0.5, 0.0, 1) is None
    assert trivial.within(0.753, 0.004, 3, 0.75) and not trivial.within(0.80, 0.004, 3, 0.75)
    assert trivial.within(0.752, 0.0, 1, 0.75) and not trivial.within(0.76, 0.0, 1, 0.75)
    found = [trivial.Baseline("majority class", 0.5, 10, ""),
             trivial.Baseline("copy the visible bits", 0.75, 10, "")]
    assert trivial.closest(0.75, 0.01, 3, found).name == "copy the visible bits"
    assert trivial.closest(0.6, 0.2, 3, found).name == "copy the visible bits"  # both: highest
    assert trivial.closest(0.99, 0.001, 3, found) is None


def _row(task: str, row: str, accuracies: list[float]) -> reproduce_report.Row:
    cfg = runpy.run_path(f"experiments/configs/{task}.py")["get_config"](row)
    runs = [{"run": k, "seed": k, "learning_rate": 1e-3, "best_val_accuracy": a,
             "test": {"test": {"test/accuracy": a}}} for k, a in enumerate(accuracies)]
    cell = results.Cell(f"{task}__{row}", {}, runs, path=None)
    return reproduce_report.Row(task, row, None, cfg, cfg, cell, results.select(cell))


def test_a_proxy_tasks_table_has_no_paper_numbers_in_the_papers_columns():
    found = {"fashion_mnist": [trivial.Baseline("majority class", 0.1, 10_000, "always 0")]}
    lines = reproduce_report.main_table([_row("fashion_mnist", "fpt", [0.85, 0.86, 0.87]),
                                         _row("fashion_mnist", "random", [0.1, 0.1, 0.1])],
                                        found)
    text = "\n".join(lines)
    assert "a proxy: the paper has no fashion_mnist" in text
    table = [l.strip("|").split("|") for l in lines if l.startswith("| ")][1:]
    (trivial_row, fpt, random_row) = [[c.strip() for c in row] for row in table]
    assert trivial_row[:2] == ["trivial: majority class", "10.0"]
    assert fpt[5] == fpt[6] == random_row[5] == "-"  # never in a paper column
    assert fpt[4] == "above majority class"
    assert random_row[4] == "**not above majority class**"
    assert "The paper's mnist numbers, another dataset" in text and "98" in text


def test_a_sweeps_results_name_each_tasks_trivial_baselines_and_draw_them(tmp_path):
    configs = [{"task": "bit_memory", "task_options": {"n": 20, "patch_size": 5}},
               {"task": "bit_memory", "task_options": {"n": 20, "patch_size": 5}},  # once
               {"task": "bit_xor", "task_options": {"n": 5}}, {}]  # {}: a cell with no record
    found = trivial.for_configs(configs)
    assert [label for label, _ in found] == ["bit_memory (n=20, patch_size=5)",
                                            "bit_xor (n=5)"]
    text = "\n".join(trivial.markdown(found))
    assert "## Trivial baselines" in text and "copy the visible bits 7" in text
    assert trivial.for_configs([{"task": "listops", "task_options": {}}])[0][1].startswith(
        "not computed: task listops: data_dir is required")
    cell = results.Cell("c", {}, [{"run": 0, "seed": 0, "learning_rate": 1e-3,
                                   "best_val_accuracy": 0.9}], tmp_path)
    results.plot_learning_rates([results.select(cell)], tmp_path / "lr.png", found[0][1])
    from matplotlib import image
    assert image.imread(tmp_path / "lr.png").std() > 0.01


def test_a_cell_within_noise_of_chance_is_named_in_the_sweeps_results():
    config = {"task": "bit_xor", "task_options": {"n": 5}}
    found = trivial.for_configs([config])

    def selection(name, accuracies):
        runs = [{"run": k, "seed": k, "learning_rate": 1e-3, "best_val_accuracy": a,
                 "test": {"test": {"test/accuracy": a}}} for k, a in enumerate(accuracies)]
        return results.select(results.Cell(name, {}, runs, None, config=config))

    flagged = trivial.not_above([selection("chance", [0.49, 0.51, 0.52]),
                                 selection("learned", [0.97, 0.98, 0.99])], found)
    assert flagged == [("chance", "majority class")]
    assert "**chance** (majority class)" in "\n".join(trivial.markdown(found, flagged))


def test_a_task_whose_data_is_absent_has_no_trivial_rows_and_the_report_still_writes(tmp_path):
    row = _row("bit_xor", "random", [0.6, 0.7, 0.8])
    absent = reproduce_report.Row("listops", "random", None, row.cfg.__class__(
        task="listops", task_options={"data_dir": str(tmp_path / "missing")}), row.cfg, None,
        None)
    found = reproduce_report.trivial_baselines([row, absent])
    assert found["listops"] == [] and found["bit_xor"]
    lines = reproduce_report.main_table([absent], found)
    assert not any(line.startswith("| trivial:") for line in lines)
