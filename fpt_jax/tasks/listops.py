"""ListOps (Long Range Arena "basic"): read the TSV files, tokenise properly, or generate them.

Files: `{data_dir}/{task_name}_train.tsv`, `_val.tsv`, `_test.tsv` (task_name 'basic'), a
header `Source<TAB>Target`, then one example per line, e.g.

    ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) ] )<TAB>9

Vocabulary (16 ids): 0 = padding, '0'..'9' -> 1..10, '[MIN' 11, '[MAX' 12, '[MED' 13,
'[SM' 14, ']' 15. The parentheses are dropped, as LRA does: they only mirror the generator's
binary-tree representation, and the brackets already determine the expression. Unlike the
FPT code (LRA's pipeline through `tfds.deprecated.text.Tokenizer`, which keeps alphanumeric
runs only), closing brackets ']' are kept -- without them nested lists are ambiguous -- and
sequences are not cut at 512 tokens. (Rothermel et al. 2021 found both bugs.) An unknown
token, a bad target or unbalanced brackets is an error naming the file and line.

Lengths: LRA's generator keeps expressions of 500 < tokens < 2000 (tokens counted with ']'
and without parentheses, i.e. exactly our sequence length), so the default
`max_length=2048` holds every example. GPT-2 has 1024 positions: with a 1024-position model
set `max_length=1024`; what happens to longer examples is `overlength`:
  'drop' (default): they are left out of every split, and the kept fraction is logged and
      kept in `task.stats` (as the original did for remote homology);
  'truncate': the first `max_length` tokens are kept (what the original did, at 512: the
      answer is then usually not determined by the input);
  'error': loading fails, naming the first such line.

Batches (per host batch B): x int32 [B, T] right-padded with 0, length int32 [B], y int32 [B]
in 0..9; T = max_length, or bucketed with `bucket_size` (see `TokenSequenceTask`).

`generate_listops` writes TSVs with LRA's grammar and limits (depth <= 10, 2..10 arguments,
500 < length < 2000, value leaves with probability 3/4 below the depth limit, duplicates
removed), so the task runs offline: `python -m experiments.prepare_data --dataset=listops`.
"""
from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import numpy as np
from absl import logging

from fpt_jax.tasks.base import register
from fpt_jax.tasks.sequence import SequenceTable, TokenSequenceTask

PAD_ID = 0
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_IDS = {tok: i for i, tok in enumerate(VOCAB)}
END_ID = TOKEN_IDS[END]
OPERATOR_IDS = tuple(TOKEN_IDS[op] for op in OPERATORS)
NUM_CLASSES = 10
HEADER = ["Source", "Target"]
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test"}

# Fast path: each operator becomes one character, then a 256-entry table maps bytes to ids.
_OP_CHARS = {"[MIN": "a", "[MAX": "b", "[MED": "c", "[SM": "d"}
_SKIP, _BAD = 254, 255
_LUT = np.full(256, _BAD, np.uint8)
for _c in b" ()\t":
    _LUT[_c] = _SKIP
for _d in range(10):
    _LUT[ord(str(_d))] = TOKEN_IDS[str(_d)]
for _op, _c in _OP_CHARS.items():
    _LUT[ord(_c)] = TOKEN_IDS[_op]
_LUT[ord(END)] = END_ID


class ListOpsFormatError(ValueError):
    """A malformed ListOps file; the message names the file and line."""


def _tokenize_slow(source: str, where: str) -> np.ndarray:
    ids = []
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok not in TOKEN_IDS or tok == "<pad>":
            raise ListOpsFormatError(f"{where}: unknown token {tok!r}; accepted: digits 0-9, "
                                     f"{', '.join(OPERATORS)}, {END} and parentheses")
        ids.append(TOKEN_IDS[tok])
    return np.array(ids, np.uint8)


def tokenize(source: str, where: str = "<string>") -> np.ndarray:
    """A ListOps expression -> uint8 token ids (parentheses dropped, ']' kept)."""
    s = source
    for op, c in _OP_CHARS.items():
        s = s.replace(op, c)
    try:
        raw = np.frombuffer(s.encode("ascii"), np.uint8)
    except UnicodeEncodeError:
        return _tokenize_slow(source, where)  # raises on the non-ASCII token
    ids = _LUT[raw]
    # After the replacement every valid token is one character: two adjacent non-blank
    # characters mean a glued or unknown token ('12', '[MINX', '(3').
    blank = (raw == 32) | (raw == 9)
    if (ids == _BAD).any() or (~blank[1:] & ~blank[:-1]).any():
        _tokenize_slow(source, where)  # raises with the offending token
        raise ListOpsFormatError(f"{where}: tokens must be separated by spaces")
    ids = ids[ids != _SKIP]
    if len(ids) == 0:
        raise ListOpsFormatError(f"{where}: empty expression")
    n_close = int((ids == END_ID).sum())
    n_open = int((ids >= OPERATOR_IDS[0]).sum()) - n_close
    if n_open != n_close:
        raise ListOpsFormatError(f"{where}: unbalanced brackets ({n_open} operators, "
                                 f"{n_close} ']')")
    return ids


def read_tsv(path: str | os.PathLike) -> tuple[list[np.ndarray], list[int], list[int]]:
    """(token ids per example, targets, line numbers) of one ListOps TSV file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ListOps file {path} does not exist (generate one with: "
                                f"python -m experiments.prepare_data --dataset=listops "
                                f"--data_dir={path.parent})")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    sequences, targets, lines = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != HEADER:
                raise ListOpsFormatError(f"{path}:1: header must be 'Source<TAB>Target', got "
                                         f"{header!r}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != 2:
                    raise ListOpsFormatError(f"{where}: expected 2 tab-separated fields "
                                             f"(Source, Target), got {len(row)}")
                try:
                    target = int(row[1])
                except ValueError:
                    raise ListOpsFormatError(f"{where}: target {row[1]!r} is not an integer"
                                             ) from None
                if not 0 <= target < NUM_CLASSES:
                    raise ListOpsFormatError(f"{where}: target {target} out of range 0..9")
                sequences.append(tokenize(row[0], where))
                targets.append(target)
                lines.append(reader.line_num)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ListOpsFormatError(f"{path}:{reader.line_num}: {e}") from e
    if not sequences:
        raise ListOpsFormatError(f"{path}: no examples")
    return sequences, targets, lines


@register("listops")
class ListOps(TokenSequenceTask):
    """LRA ListOps: 10-way classification of a nested list expression."""
    name = "listops"
    input_dim = len(VOCAB)
    output_dim = NUM_CLASSES
    splits = ("train", "validation", "test")
    eval_split = "validation"  # the FPT code evaluates on LRA's val file

    def __init__(self, *, data_dir: str | None = None, task_name: str = "basic",
                 max_length: int = 2048, overlength: str = "drop", bucket_size: int = 0):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"task listops: max_length must be >= 1, got {max_length}")
        if overlength not in ("drop", "truncate", "error"):
            raise ValueError(f"task listops: overlength must be 'drop', 'truncate' or 'error', "
                             f"got {overlength!r}")
        if bucket_size < 0:
            raise ValueError(f"task listops: bucket_size must be >= 0, got {bucket_size}")
        # data_dir is needed to read (`path`), not to describe the task (shapes, counts)
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.task_name = task_name
        self.max_length, self.overlength = int(max_length), overlength
        self.bucket_size = int(bucket_size)
        self.example_shape = (self.max_length,)
        self.stats: dict[str, dict[str, int]] = {}

    def path(self, split: str) -> Path:
        if self.data_dir is None:
            raise ValueError("task listops: data_dir is required (the directory of "
                             f"{self.task_name}_train.tsv, {self.task_name}_val.tsv, "
                             f"{self.task_name}_test.tsv): set task_options.data_dir")
        return self.data_dir / f"{self.task_name}_{SPLIT_FILES[split]}.tsv"

    def _load(self, split: str) -> SequenceTable:
        path = self.path(split)
        sequences, targets, lines = read_tsv(path)
        total, over = len(sequences), sum(len(s) > self.max_length for s in sequences)
        if over and self.overlength == "error":
            first = next(i for i, s in enumerate(sequences) if len(s) > self.max_length)
            raise ListOpsFormatError(f"{path}:{lines[first]}: {len(sequences[first])} tokens "
                                     f"> max_length={self.max_length} (overlength='error')")
        if self.overlength == "drop":
            keep = [i for i, s in enumerate(sequences) if len(s) <= self.max_length]
            sequences = [sequences[i] for i in keep]
            targets = [targets[i] for i in keep]
        elif self.overlength == "truncate":
            sequences = [s[:self.max_length] for s in sequences]
        if not sequences:
            raise ValueError(f"task listops: no example of {path} has <= max_length="
                             f"{self.max_length} tokens")
        self.stats[split] = {"total": total, "overlength": over, "kept": len(sequences)}
        # Dropped or truncated examples change the task: say so where it is seen by default.
        log = logging.warning if over else logging.info
        log("listops %s (%s): %d examples, %d longer than max_length=%d (overlength=%s); "
            "kept %d (%.2f%%)", split, path, total, over, self.max_length, self.overlength,
            len(sequences), 100 * len(sequences) / total)
        return SequenceTable.from_lists(sequences, targets)


# --- the generator (LRA's grammar and limits) ------------------------------------------

VALUE_P = 0.25  # below the depth limit, a node is an operator with probability 0.25


def _apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":  # LRA: int(np.median(values)), the mean of the middle two when even
        v = sorted(values)
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) // 2
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown operator {op!r}")


def _generate(rng: random.Random, depth: int, max_depth: int, max_args: int,
              parts: list[str]) -> tuple[int, int]:
    """Appends one expression's tokens (LRA's string format) to `parts`;
    returns (value, length in tokens without parentheses)."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        value = rng.randrange(10)
        parts.append(str(value))
        return value, 1
    num_args = rng.randint(2, max_args)
    # LRA nests the operator and its arguments as a left-deep binary tree: one '(' per
    # argument plus one for the closing bracket; the operator itself is drawn last.
    parts.append("( " * (num_args + 1))
    op_at = len(parts)
    parts.append("")
    values, length = [], 2
    for i in range(num_args):
        if i:
            parts.append(" ")
        v, n = _generate(rng, depth + 1, max_depth, max_args, parts)
        values.append(v)
        length += n
        parts.append(" )")
    op = OPERATORS[rng.randrange(len(OPERATORS))]
    parts[op_at] = op + " "
    parts.append(f" {END} )")
    return _apply(op, values), length


def generate_example(rng: random.Random, *, max_depth: int = 10, max_args: int = 10
                     ) -> tuple[str, int, int]:
    """(source string, target, length) of one random expression, unfiltered."""
    parts: list[str] = []
    value, length = _generate(rng, 1, max_depth, max_args, parts)
    return "".join(parts), value, length


MAX_MISSES = 1_000_000  # LRA's limits accept about one draw in a few; 1e6 misses: impossible


def generate_listops(num_examples: int, *, seed: int = 0, max_depth: int = 10,
                     max_args: int = 10, min_length: int = 500, max_length: int = 2000
                     ) -> list[tuple[str, int]]:
    """Distinct expressions with min_length < length < max_length (LRA's strict limits)."""
    if max_args < 2 or max_depth < 1:
        raise ValueError(f"max_args must be >= 2 and max_depth >= 1, got {max_args}, "
                         f"{max_depth}")
    if min_length + 1 >= max_length:
        raise ValueError(f"no length lies strictly between min_length={min_length} and "
                         f"max_length={max_length}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * max_depth + 100))
    misses = 0  # draws in a row that gave nothing new: the limits may allow no more
    try:
        while len(out) < num_examples:
            source, value, length = generate_example(rng, max_depth=max_depth,
                                                     max_args=max_args)
            if min_length < length < max_length and source not in seen:
                seen.add(source)
                out.append((source, value))
                misses = 0
            elif (misses := misses + 1) >= MAX_MISSES:
                raise ValueError(
                    f"found only {len(out)} of {num_examples} distinct expressions with "
                    f"min_length={min_length} < length < max_length={max_length}, "
                    f"max_depth={max_depth}, max_args={max_args} ({MAX_MISSES:,} draws in a "
                    "row gave nothing new); accepted: wider limits or fewer examples")
    finally:
        sys.setrecursionlimit(limit)
    return out


def write_tsv(path: str | os.PathLike, rows: list[tuple[str, int]]) -> None:
    """Writes rows as LRA does (csv module, tab-delimited, header Source/Target)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(HEADER)
        writer.writerows(rows)


def write_listops(data_dir: str | os.PathLike, *, task_name: str = "basic",
                  num_train: int = 96_000, num_val: int = 2_000, num_test: int = 2_000,
                  seed: int = 0, max_depth: int = 10, max_args: int = 10,
                  min_length: int = 500, max_length: int = 2000) -> dict[str, Path]:
    """Generates the three TSV files (LRA's defaults); returns their paths by split."""
    rows = generate_listops(num_train + num_val + num_test, seed=seed, max_depth=max_depth,
                            max_args=max_args, min_length=min_length, max_length=max_length)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    chunks = {"train": rows[:num_train], "validation": rows[num_train:num_train + num_val],
              "test": rows[num_train + num_val:]}
    paths = {}
    for split, chunk in chunks.items():
        paths[split] = data_dir / f"{task_name}_{SPLIT_FILES[split]}.tsv"
        write_tsv(paths[split], chunk)
    return paths
