"""Token-sequence classification tasks (ListOps, remote homology): variable-length token
sequences stored flat, right-padded per batch, optionally to a bucketed length."""
from __future__ import annotations

import abc
import math
from typing import Iterator

import jax
import numpy as np

from fpt_jax.tasks.base import Batch, Task, classification_metrics
from fpt_jax.tasks.data_utils import eval_index_batches, train_indices


def bucket_length(lengths: np.ndarray, max_length: int, bucket_size: int) -> int:
    """Padded length for a batch: `max_length`, or with `bucket_size` > 0 the smallest
    multiple of it that holds the longest sequence (capped at `max_length`)."""
    if bucket_size <= 0:
        return max_length
    longest = int(lengths.max()) if lengths.size else 1
    return min(max_length, bucket_size * math.ceil(longest / bucket_size))


class SequenceTable:
    """Variable-length token sequences in one flat array, with labels."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
        self.tokens, self.offsets, self.labels = tokens, offsets, labels
        self.lengths = np.diff(offsets).astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_lists(cls, sequences: list[np.ndarray], labels: list[int]) -> "SequenceTable":
        lengths = np.array([len(s) for s in sequences], np.int64)
        offsets = np.zeros(len(sequences) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = (np.concatenate(sequences).astype(np.uint8) if sequences
                  else np.zeros(0, np.uint8))
        return cls(tokens, offsets, np.asarray(labels, np.int32))

    def batch(self, idx: np.ndarray, pad_to: int) -> dict[str, np.ndarray]:
        """x int32 [B, pad_to] (right-padded with 0), length int32 [B], y int32 [B]."""
        lengths = np.minimum(self.lengths[idx], pad_to)
        x = np.zeros((len(idx), pad_to), np.int32)
        for row, (i, n) in enumerate(zip(idx, lengths)):
            start = self.offsets[i]
            x[row, :n] = self.tokens[start:start + n]
        return {"x": x, "length": lengths.astype(np.int32), "y": self.labels[idx].copy()}


class TokenSequenceTask(Task):
    """A classification task over right-padded token-id sequences (ListOps, homology).

    Batches: x int32 [B, T] (pad id 0), length int32 [B] (the model reads position
    length - 1), y int32 [B]; eval batches add mask float32 [B]. T is `max_length`, or with
    `bucket_size` > 0 the smallest multiple of `bucket_size` that holds the longest sequence
    of the *global* batch (so all hosts agree on the shape; fewer wasted positions, at the
    price of one compilation per distinct T).
    """
    input_kind = "tokens"
    max_length: int
    bucket_size: int = 0

    def __init__(self) -> None:
        self._tables: dict[str, SequenceTable] = {}

    @abc.abstractmethod
    def _load(self, split: str) -> SequenceTable:
        """The split's sequences (already filtered / truncated to `max_length`)."""

    def table(self, split: str) -> SequenceTable:
        self.check_split(split)
        if split not in self._tables:
            self._tables[split] = self._load(split)
        return self._tables[split]

    is_dataset = True

    def num_examples(self, split: str) -> int:
        return len(self.table(split))

    def prepare(self, split: str) -> None:
        """Reads and tokenizes the whole split (malformed rows are errors with file:line)."""
        if not len(self.table(split)):
            raise ValueError(f"task {self.name}: split {split!r} holds no example")

    def kept_fraction(self, split: str) -> float:
        """Share of the split's examples kept under `max_length` (the rest were dropped;
        multiply an accuracy by it to count them as wrong, as the FPT paper did)."""
        self.table(split)
        stats = getattr(self, "stats", {}).get(split)
        return 1.0 if not stats else stats["kept"] / stats["total"]

    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        table = self.table(split)
        glob, idx = train_indices(len(table), step, batch_size, seed=seed, split=split,
                                  process_index=process_index, process_count=process_count)
        return table.batch(idx, bucket_length(table.lengths[glob], self.max_length,
                                              self.bucket_size))

    def eval_batches(self, split: str, batch_size: int, *, seed: int, num_batches: int | None,
                     process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
        """The host's shard of `split` once, in order. As the task contract says for dataset
        tasks, the whole split is covered: `num_batches` and `seed` are ignored."""
        del seed, num_batches
        table = self.table(split)
        for per_host, mask in eval_index_batches(len(table), batch_size,
                                                 process_index=process_index,
                                                 process_count=process_count):
            pad = bucket_length(table.lengths[np.concatenate(per_host)], self.max_length,
                                self.bucket_size)
            out = table.batch(per_host[process_index], pad)
            out["mask"] = mask
            yield out

    def per_example_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        return classification_metrics(logits, batch["y"])
