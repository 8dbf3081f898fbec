"""Deterministic shuffling and per-host sharding shared by the dataset tasks.

Training reads an endless stream: epoch e is a permutation of the split drawn from
(seed, split, e), and the stream is the concatenation of the epochs. The global batch of
step s is the stream's positions [s * G, (s + 1) * G) with G = batch_size * process_count
(batch_size is per host); host i takes the contiguous slice [i * B, (i + 1) * B) of it. So a
batch is a pure function of (split, step, seed, host), hosts see disjoint data, every
example is seen once per epoch, and resuming at step s is exact. When G does not divide the
split, a batch may straddle two epochs.

Evaluation covers a split once: host i reads the contiguous shard
[i * S, min((i + 1) * S, n)) with S = ceil(n / process_count), in order, in ceil(S / B)
batches on every host (the same count everywhere, so collective steps stay in lockstep).
Rows past the end of a shard repeat a real example and have `mask` 0.
"""
from __future__ import annotations

import abc
import functools
import math
from typing import Iterator

import jax
import numpy as np

from fpt_jax.tasks.base import Batch, Task, classification_metrics


def split_id(split: str) -> int:
    return int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")


@functools.lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, split: str, epoch: int) -> np.ndarray:
    """The order of the split's `n` examples in `epoch` (read-only)."""
    perm = np.random.default_rng([seed, split_id(split), epoch, 0x5EED]).permutation(n)
    perm.flags.writeable = False
    return perm


def global_positions(step: int, batch_size: int, process_count: int) -> np.ndarray:
    """Stream positions of the global batch of `step`: int64 [batch_size * process_count]."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = batch_size * process_count
    return np.arange(step * g, (step + 1) * g, dtype=np.int64)


def stream_indices(positions: np.ndarray, n: int, seed: int, split: str,
                   shuffle: bool = True) -> np.ndarray:
    """Example indices (into the split) at the given stream positions."""
    if n < 1:
        raise ValueError(f"split {split!r} is empty")
    epochs, offsets = np.divmod(positions, n)
    if not shuffle:
        return offsets
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(n, seed, split, int(e))[offsets[sel]]
    return out


def train_indices(n: int, step: int, batch_size: int, *, seed: int, split: str,
                  process_index: int = 0, process_count: int = 1,
                  shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(global batch indices [G], this host's indices [B]) for training step `step`."""
    check_process(process_index, process_count)
    glob = stream_indices(global_positions(step, batch_size, process_count), n, seed, split,
                          shuffle)
    return glob, glob[process_index * batch_size:(process_index + 1) * batch_size]


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")


def eval_shard(n: int, process_index: int, process_count: int) -> tuple[int, int, int]:
    """(lo, hi, shard_size) of host `process_index`'s contiguous eval shard."""
    check_process(process_index, process_count)
    size = max(1, math.ceil(n / process_count))
    lo = min(process_index * size, n)
    return lo, min(lo + size, n), size


def eval_index_batches(n: int, batch_size: int, *, process_index: int = 0,
                       process_count: int = 1, num_batches: int | None = None
                       ) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Per eval batch: (indices of every host's batch [P][B], this host's mask [B]).

    All hosts' indices are returned so that a task can choose a padded length that is the
    same on every host. Padding rows repeat index `lo` (or 0 for an empty shard).
    `num_batches` (if given) stops after that many batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError("cannot evaluate on an empty split")
    check_process(process_index, process_count)
    shards = [eval_shard(n, p, process_count) for p in range(process_count)]
    count = math.ceil(shards[0][2] / batch_size)
    if num_batches is not None:
        count = min(count, num_batches)
    for b in range(count):
        per_host, mask = [], None
        for p, (lo, hi, _) in enumerate(shards):
            pos = np.arange(lo + b * batch_size, lo + (b + 1) * batch_size, dtype=np.int64)
            real = pos < hi
            idx = np.where(real, pos, lo if lo < n else 0)
            per_host.append(idx)
            if p == process_index:
                mask = real.astype(np.float32)
        yield per_host, mask


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

    def num_examples(self, split: str) -> int:
        return len(self.table(split))

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
