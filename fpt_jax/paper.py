"""The published numbers as data: Lu et al. 2021 and Rothermel et al. 2021.

Transcribed from docs/paper.md (a verbatim copy of the project's PAPER.md); tests/test_paper.py
parses its tables and sentences and checks every number here against them, both ways.
Accuracies are percentages as printed (test accuracy); a cell the paper leaves empty is
absent from its row's dict. Keys are our task names (`TASKS`), model presets and trainable
selection strings (`fpt_jax.freeze`).
"""

TASKS = ("bit_memory", "bit_xor", "listops", "mnist", "cifar10", "cifar10_lra",
         "remote_homology")
# The main table's column labels, in the same (the paper's) order.
TASK_LABELS = {
    "bit_memory": "Bit Memory",
    "bit_xor": "Bit XOR",
    "listops": "ListOps",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "cifar10_lra": "C10 LRA",
    "remote_homology": "Homology",
}

CITATIONS = {
    "lu2021": ('Lu, Grover, Abbeel, Mordatch. "Pretrained Transformers as Universal '
               'Computation Engines". arXiv 2103.05247 (v2, June 2021; AAAI 2022).'),
    "rothermel2021": ('Rothermel, Li, Rocktaschel, Foerster (2021), "Don\'t Sweep your '
                      'Learning Rate under the Rug" (arXiv 2107.12460)'),
}

# Lu et al., "Reference results (test accuracy, %)": row -> task -> accuracy.
MAIN: dict[str, dict[str, float]] = {
    "fpt": {"bit_memory": 100.0, "bit_xor": 100.0, "listops": 38.4, "mnist": 98.0,
            "cifar10": 68.2, "cifar10_lra": 38.6, "remote_homology": 12.7},
    "fpt_large": {"cifar10": 72.1},
    "scratch": {"bit_memory": 100.0, "bit_xor": 100.0, "listops": 38.0, "mnist": 99.1,
                "cifar10": 70.3, "cifar10_lra": 42.0, "remote_homology": 9.0},
    "lstm": {"bit_memory": 60.9, "bit_xor": 50.1, "listops": 17.1, "mnist": 99.5,
             "cifar10": 73.6, "cifar10_lra": 11.7, "remote_homology": 12.0},
    "random": {"bit_memory": 75.8, "bit_xor": 100.0, "listops": 34.3, "mnist": 91.7,
               "cifar10": 61.7, "cifar10_lra": 36.1, "remote_homology": 9.3},
    "bit_memory_pretrained": {"bit_memory": 100.0, "bit_xor": 100.0, "listops": 35.4,
                              "mnist": 97.8, "cifar10": 62.6, "cifar10_lra": 36.7,
                              "remote_homology": 7.8},
    "vit_pretrained": {"bit_memory": 100.0, "bit_xor": 100.0, "listops": 37.4, "mnist": 97.8,
                       "cifar10": 72.5, "cifar10_lra": 43.0, "remote_homology": 7.5},
}
# Numbers of Lu et al. that docs/paper.md does not carry, each with where it was read.
# Frozen random LSTM (input, layer norms, output trained) beside the frozen random
# transformer's 61.7 on CIFAR-10; the other columns are not transcribed here.
QUOTED: dict[str, dict[str, float]] = {"lstm_frozen": {"cifar10": 34.0}}
QUOTED_SOURCE = {"lstm_frozen": "Lu et al.'s frozen random LSTM, as quoted in fpt-jax issue "
                                "#26 (not in docs/paper.md; other tasks not transcribed)"}


def published(row: str | None, task: str) -> float | None:
    """Lu et al.'s number for `row` (a MAIN or QUOTED row) on `task`, if any."""
    return {**MAIN, **QUOTED}.get(row, {}).get(task) if row else None


MAIN_LABELS = {
    "fpt": "FPT (`gpt2`, frozen)",
    "fpt_large": "FPT (`gpt2-large`)",
    "scratch": "Full transformer",
    "lstm": "Full LSTM",
    "random": "Random-init frozen `gpt2`",
    "bit_memory_pretrained": "Bit-Memory-pretrained frozen",
    "vit_pretrained": "ViT-pretrained frozen",
}

# Rothermel et al. (lr swept 1e-6..1e-2, 3 seeds, `gpt2`): row -> task -> (mean, s.e.).
ROTHERMEL: dict[str, dict[str, tuple[float, float]]] = {
    "random": {"listops": (38.9, 0.3), "mnist": (98.0, 0.0), "cifar10": (61.8, 0.2),
               "cifar10_lra": (44.2, 0.3)},
    "fpt": {"listops": (46.1, 0.3), "mnist": (98.5, 0.1), "cifar10": (66.3, 0.0),
            "cifar10_lra": (54.7, 1.4)},
    "scratch": {"listops": (57.6, 0.8), "mnist": (98.7, 0.0), "cifar10": (77.8, 0.2),
                "cifar10_lra": (62.0, 0.7)},
    "full": {"listops": (56.3, 0.9), "mnist": (99.0, 0.0), "cifar10": (77.7, 0.1),
             "cifar10_lra": (67.8, 0.3)},
}
ROTHERMEL_LABELS = {
    "random": "Frozen random",
    "fpt": "Frozen pretrained",
    "scratch": "Unfrozen random",
    "full": "Unfrozen pretrained",
}

# Lu et al., gradient steps to converge: task -> (FPT, random frozen `gpt2`).
CONVERGENCE: dict[str, tuple[float, float]] = {
    "bit_memory": (1e4, 4e4),
    "bit_xor": (5e2, 2e4),
    "listops": (2e3, 6e3),
    "mnist": (5e3, 2e4),
    "cifar10": (4e5, 4e5),
    "cifar10_lra": (3e5, 6e5),
    "remote_homology": (1e5, 1e5),
}

# Lu et al., which parameters to train (groups added one at a time): task -> selection ->
# accuracy. Selections are our trainable strings; "fpt" = input,pos,ln,output.
ABLATION_LABELS = {
    "output": "output only",
    "output,ln": "+ layer norm",
    "output,ln,input": "+ input",
    "fpt": "+ positions",
}
ABLATION: dict[str, dict[str, float]] = {
    "bit_memory": {"output": 76.0, "output,ln": 94.0, "output,ln,input": 100.0, "fpt": 100.0},
    "bit_xor": {"output": 56.0, "output,ln": 98.0, "output,ln,input": 98.0, "fpt": 100.0},
    "listops": {"output": 15.0, "output,ln": 36.0, "output,ln,input": 36.0, "fpt": 38.0},
    "mnist": {"output": 23.0, "output,ln": 96.0, "output,ln,input": 98.0, "fpt": 98.0},
    "cifar10": {"output": 25.0, "output,ln": 54.0, "output,ln,input": 60.0, "fpt": 68.0},
    "cifar10_lra": {"output": 17.0, "output,ln": 39.0, "output,ln,input": 39.0, "fpt": 39.0},
    "remote_homology": {"output": 2.0, "output,ln": 9.0, "output,ln,input": 10.0, "fpt": 13.0},
}
# The same on a random frozen `gpt2` (the paper gives no Bit Memory or homology row).
ABLATION_RANDOM: dict[str, dict[str, float]] = {
    "bit_xor": {"output": 50.0, "output,ln": 100.0, "output,ln,input": 100.0, "fpt": 100.0},
    "listops": {"output": 17.0, "output,ln": 35.0, "output,ln,input": 36.0, "fpt": 37.0},
    "mnist": {"output": 25.0, "output,ln": 83.0, "output,ln,input": 92.0, "fpt": 92.0},
    "cifar10": {"output": 20.0, "output,ln": 46.0, "output,ln,input": 56.0, "fpt": 62.0},
    "cifar10_lra": {"output": 11.0, "output,ln": 34.0, "output,ln,input": 36.0, "fpt": 36.0},
}

# Lu et al., model size on CIFAR-10: preset -> (pretrained frozen, random frozen).
MODEL_SIZE: dict[str, tuple[float, float]] = {
    "gpt2": (68.2, 61.7),
    "gpt2-medium": (69.8, 64.0),
    "gpt2-large": (72.1, 65.7),
}

# Lu et al. report remote-homology accuracies multiplied by this share of kept sequences.
HOMOLOGY_FACTOR = 0.9739

NOTES = {
    "provenance": ("Lu et al.'s and Rothermel et al.'s numbers are [P] in docs/paper.md: "
                   "transcribed from public research notes, not checked against the PDF."),
    "full_quoted": ('The "Full" numbers for ListOps, C10-LRA and homology are quoted from '
                    "Tay et al. 2020 and Rao et al. 2019, not trained by Lu et al."),
    "full_layers": "Lu et al.'s full transformer has 3 layers for CIFAR-10, ListOps and C10-LRA.",
    "homology_scale": ("Lu et al.'s homology accuracies are multiplied by 0.9739 (sequences "
                       "longer than 1,024 dropped, keeping 97.39%)."),
    "quoted": QUOTED_SOURCE["lstm_frozen"] + ".",
    "rothermel_protocol": ("Rothermel et al.: learning rate swept 1e-6..1e-2 (log), 3 seeds, "
                           "validation-based early stopping, batch 8, `gpt2`; mean +- s.e."),
}

# Which citation each table comes from.
TABLE_CITATION = {
    "main": "lu2021",
    "convergence": "lu2021",
    "ablation": "lu2021",
    "ablation_random": "lu2021",
    "model_size": "lu2021",
    "rothermel": "rothermel2021",
}
CONVERGENCE_ROWS = ("fpt", "random")


def paper_value(table: str, row: str, task: str) -> float | tuple[float, float] | None:
    """One published cell, or None where the paper gives none.

    `table` is a key of TABLE_CITATION. Rows: main and rothermel their row keys;
    convergence "fpt" or "random"; ablation and ablation_random a selection of
    ABLATION_LABELS; model_size a preset (its task is "cifar10"; the value is
    (pretrained, random)).
    """
    if table not in TABLE_CITATION:
        raise ValueError(f"table={table!r}: expected one of {sorted(TABLE_CITATION)}")
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {list(TASKS)}")
    rows = {"main": tuple(MAIN), "rothermel": tuple(ROTHERMEL),
            "convergence": CONVERGENCE_ROWS, "ablation": tuple(ABLATION_LABELS),
            "ablation_random": tuple(ABLATION_LABELS), "model_size": tuple(MODEL_SIZE)}[table]
    if row not in rows:
        raise ValueError(f"row={row!r} of table {table!r}: expected one of {list(rows)}")
    if table == "main":
        return MAIN[row].get(task)
    if table == "rothermel":
        return ROTHERMEL[row].get(task)
    if table == "convergence":
        return CONVERGENCE[task][CONVERGENCE_ROWS.index(row)]
    if table == "model_size":
        return MODEL_SIZE[row] if task == "cifar10" else None
    ablation = ABLATION if table == "ablation" else ABLATION_RANDOM
    return ablation.get(task, {}).get(row)
