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

import functools
import math
from typing import Iterator

import numpy as np

from fpt_jax.tasks.base import check_process, split_id


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
