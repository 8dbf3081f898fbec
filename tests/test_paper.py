"""fpt_jax/paper.py holds exactly the numbers of docs/paper.md, which is PAPER.md verbatim."""
import itertools
import os
import re

import pytest

from fpt_jax import paper

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_PAPER = os.path.join(REPO_ROOT, "docs", "paper.md")
SHARED_PAPER = os.path.join(REPO_ROOT, "..", "shared", "PAPER.md")

# How the paper's sentences name tasks and presets.
SHORT_TASK_NAMES = {"Memory": "bit_memory", "XOR": "bit_xor", "ListOps": "listops",
                    "MNIST": "mnist", "CIFAR-10": "cifar10", "C10-LRA": "cifar10_lra",
                    "homology": "remote_homology"}
PRESET_NAMES = {"`gpt2`": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large"}
NUMBER = r"\d+(?:\.\d+)?(?:e\d+)?"


@pytest.fixture(scope="module")
def text() -> str:
    with open(DOCS_PAPER, encoding="utf-8") as f:
        return f.read()


def number(cell: str) -> float | tuple[float, float] | None:
    """A table cell: empty -> None, "a +- b" -> (a, b), else a float."""
    if not cell:
        return None
    if "+-" in cell:
        mean, se = cell.split("+-")
        return float(mean), float(se)
    return float(cell)


def table_after(text: str, marker: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table after `marker`: (header cells, rows of cells)."""
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    for line in block:
        assert line.endswith("|"), line
    header, separator, *rows = [[c.strip() for c in line[1:-1].split("|")] for line in block]
    assert set("".join(separator)) == {"-"}, separator
    for row in rows:
        assert len(row) == len(header), row
    return header, rows


def sentence_after(text: str, marker: str) -> str:
    """From the end of `marker` to the first full stop, whitespace normalised."""
    paragraph = " ".join(text[text.index(marker):].split("\n\n")[0].split())
    return paragraph[len(marker):].split(". ")[0].strip().rstrip(".")


def task_of(label: str) -> str:
    """A task from any of the paper's spellings of its label ("C10 LRA", "C10-LRA")."""
    tasks = {l.lower().replace("-", " "): t for t, l in paper.TASK_LABELS.items()}
    return tasks[label.lower().replace("-", " ")]


def by_label(labels: dict[str, str]) -> dict[str, str]:
    return {label: key for key, label in labels.items()}


def test_docs_paper_is_shared_paper_byte_for_byte():
    if not os.path.exists(SHARED_PAPER):
        pytest.skip(f"{SHARED_PAPER} does not exist (a clean clone carries docs/paper.md only)")
    with open(DOCS_PAPER, "rb") as ours, open(SHARED_PAPER, "rb") as shared:
        assert ours.read() == shared.read()


def test_tasks_are_the_main_tables_columns_in_order(text):
    header, _ = table_after(text, "## Reference results (test accuracy, %)")
    assert tuple(paper.TASK_LABELS) == paper.TASKS
    assert header[1:] == [paper.TASK_LABELS[t] for t in paper.TASKS]


def test_main_equals_markdown_cell_by_cell(text):
    header, rows = table_after(text, "## Reference results (test accuracy, %)")
    assert [row[0] for row in rows] == list(paper.MAIN_LABELS.values())
    rows_by_label = by_label(paper.MAIN_LABELS)
    parsed = {rows_by_label[row[0]]: {task_of(label): number(cell)
                                      for label, cell in zip(header[1:], row[1:]) if cell}
              for row in rows}
    assert parsed == paper.MAIN
    assert paper.MAIN_LABELS.keys() == paper.MAIN.keys()


def test_rothermel_equals_markdown_cell_by_cell(text):
    header, rows = table_after(text, "Mean +- s.e.")
    assert [row[0] for row in rows] == list(paper.ROTHERMEL_LABELS.values())
    rows_by_label = by_label(paper.ROTHERMEL_LABELS)
    parsed = {rows_by_label[row[0]]: {task_of(label): number(cell)
                                      for label, cell in zip(header[1:], row[1:]) if cell}
              for row in rows}
    assert parsed == paper.ROTHERMEL
    for row in paper.ROTHERMEL.values():
        assert all(isinstance(v, tuple) and len(v) == 2 for v in row.values())


def test_ablation_equals_markdown_cell_by_cell(text):
    header, rows = table_after(text, "Which parameters to train")
    assert header[1:] == list(paper.ABLATION_LABELS.values())
    columns = by_label(paper.ABLATION_LABELS)
    parsed = {task_of(row[0]): {columns[label]: number(cell)
                                for label, cell in zip(header[1:], row[1:]) if cell}
              for row in rows}
    assert parsed == paper.ABLATION
    assert tuple(paper.ABLATION) == paper.TASKS


def test_ablation_random_equals_the_random_frozen_sentence(text):
    sentence = sentence_after(text, "Same on a random frozen model:")
    parsed = {}
    for part in sentence.split(";"):
        name, *values = re.fullmatch(rf"(\S+) ({NUMBER})/({NUMBER})/({NUMBER})/({NUMBER})",
                                     part.strip()).groups()
        parsed[SHORT_TASK_NAMES[name]] = dict(zip(paper.ABLATION_LABELS, map(float, values)))
    assert parsed == paper.ABLATION_RANDOM
    assert list(parsed) == ["bit_xor", "listops", "mnist", "cifar10", "cifar10_lra"]


def test_convergence_equals_the_gradient_steps_sentence(text):
    sentence = sentence_after(text, "Gradient steps to converge, FPT vs random frozen [P]:")
    parsed = {}
    for part in sentence.split(";"):
        name, fpt, random = re.fullmatch(rf"(\S+) ({NUMBER}) vs ({NUMBER})", part.strip()).groups()
        parsed[SHORT_TASK_NAMES[name]] = (float(fpt), float(random))
    assert parsed == paper.CONVERGENCE
    assert tuple(parsed) == paper.TASKS


def test_model_size_equals_the_model_size_sentence(text):
    sentence = sentence_after(text, "Model size, CIFAR-10 [P]:")
    parsed = {}
    for part in sentence.split(";"):
        name, pretrained, random = re.fullmatch(
            rf"(\S+) ({NUMBER}) \((?:random )?({NUMBER})\)", part.strip()).groups()
        parsed[PRESET_NAMES[name]] = (float(pretrained), float(random))
    assert parsed == paper.MODEL_SIZE


def test_model_size_agrees_with_the_main_table():
    assert paper.MODEL_SIZE["gpt2"] == (paper.MAIN["fpt"]["cifar10"],
                                        paper.MAIN["random"]["cifar10"])
    assert paper.MODEL_SIZE["gpt2-large"][0] == paper.MAIN["fpt_large"]["cifar10"]


def test_every_number_is_a_float():
    tables = [paper.MAIN, paper.ROTHERMEL, paper.ABLATION, paper.ABLATION_RANDOM,
              {"_": paper.CONVERGENCE}, {"_": paper.MODEL_SIZE}]
    for table in tables:
        for row in table.values():
            for value in row.values():
                for v in value if isinstance(value, tuple) else (value,):
                    assert type(v) is float, (row, value)


def test_citations_are_named_as_the_paper_names_them(text):
    flat = " ".join(text.split())
    for citation in paper.CITATIONS.values():
        assert citation in flat
    assert "arXiv 2103.05247" in paper.CITATIONS["lu2021"]
    assert "arXiv 2107.12460" in paper.CITATIONS["rothermel2021"]
    assert set(paper.TABLE_CITATION.values()) == set(paper.CITATIONS)


def test_notes_state_the_facts_of_the_markdown(text):
    flat = " ".join(text.split())
    facts = {"full_quoted": ["Tay et al. 2020", "Rao et al. 2019", "ListOps", "C10-LRA",
                             "homology"],
             "full_layers": ["3 layers", "CIFAR-10", "ListOps", "C10-LRA"],
             "homology_scale": ["multiplied by 0.9739"],
             "provenance": ["[P]", "public research notes", "not checked against the PDF"],
             "rothermel_protocol": ["1e-6..1e-2", "3 seeds", "batch 8"]}
    for key, phrases in facts.items():
        for phrase in phrases:
            assert phrase in paper.NOTES[key], (key, phrase)
            assert phrase in flat, phrase
    assert f"multiplied by {paper.HOMOLOGY_FACTOR}" in flat


@pytest.mark.parametrize("table, row, task, expected", [
    ("main", "fpt", "cifar10", 68.2),
    ("main", "fpt_large", "mnist", None),
    ("rothermel", "full", "cifar10_lra", (67.8, 0.3)),
    ("rothermel", "fpt", "bit_xor", None),
    ("convergence", "random", "bit_xor", 2e4),
    ("ablation", "output,ln", "remote_homology", 9.0),
    ("ablation_random", "fpt", "bit_memory", None),
    ("model_size", "gpt2-medium", "cifar10", (69.8, 64.0)),
    ("model_size", "gpt2-medium", "mnist", None),
])
def test_paper_value_returns_the_cell_or_none(table, row, task, expected):
    assert paper.paper_value(table, row, task) == expected


@pytest.mark.parametrize("table, row, task, message", [
    ("mainn", "fpt", "mnist", "table='mainn'"),
    ("main", "full", "mnist", "row='full' of table 'main'"),
    ("rothermel", "fpt", "cifar100", "task='cifar100'"),
])
def test_paper_value_rejects_unknown_names(table, row, task, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        paper.paper_value(table, row, task)
