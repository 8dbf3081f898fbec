"""Bit Memory and Bit XOR, generated as the paper and the original code do.

Both predict a bitstring, each bit a 2-way classification read from the last tokens:
the FPT splits every input row into `patch_size`-feature tokens and regroups the last
`n / patch_size` outputs of `2 * patch_size` logits into `[B, n, 2]`.
"""
from __future__ import annotations

import jax
import numpy as np

from fpt_jax.tasks.base import (Batch, Task, classification_metrics, host_rng, host_shard,
                                register)


class _BitTask(Task):
    input_kind = "real"

    def __init__(self, n: int, num_patterns: int, patch_size: int):
        if n < 1 or num_patterns < 1:
            raise ValueError(f"{self.name}: n and num_patterns must be >= 1, got {n}, "
                             f"{num_patterns}")
        if patch_size < 1 or n % patch_size:
            raise ValueError(f"{self.name}: patch_size={patch_size} must divide n={n}")
        self.n, self.num_patterns, self.patch_size = n, num_patterns, patch_size
        self.input_dim = patch_size
        self.output_dim = 2 * patch_size

    def per_example_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        logits = logits.reshape(logits.shape[0], self.n, 2)
        per_bit = classification_metrics(logits, batch["y"])
        return {k: v.mean(axis=-1) for k, v in per_bit.items()}


@register("bit_xor")
class BitXOR(_BitTask):
    """`num_patterns` random bitstrings of `n` bits in {0, 1}; predict their XOR."""
    name = "bit_xor"

    def __init__(self, n: int = 5, num_patterns: int = 2, patch_size: int = 1):
        super().__init__(n, num_patterns, patch_size)
        self.example_shape = (num_patterns, n)

    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        self.check_split(split)
        rng = host_rng(seed, split, step, 0)  # the global batch, the same on every host
        bits = rng.integers(0, 2, size=(batch_size * process_count, self.num_patterns, self.n))
        xor = np.bitwise_xor.reduce(bits, axis=1)
        return host_shard({"x": bits.astype(np.float32), "y": xor.astype(np.int32)},
                          batch_size, process_index, process_count)


@register("bit_memory")
class BitMemory(_BitTask):
    """`num_patterns` random strings in {-1, +1}, then one of them again with each bit zeroed
    with probability 1/2; predict the full query string."""
    name = "bit_memory"

    def __init__(self, n: int = 1000, num_patterns: int = 5, patch_size: int = 50):
        super().__init__(n, num_patterns, patch_size)
        self.example_shape = (num_patterns + 1, n)

    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        self.check_split(split)
        rng = host_rng(seed, split, step, 0)  # the global batch, the same on every host
        g = batch_size * process_count
        bits = 2 * rng.integers(0, 2, size=(g, self.num_patterns, self.n)) - 1
        query = bits[np.arange(g), rng.integers(0, self.num_patterns, g)]
        masked = query * rng.integers(0, 2, size=query.shape)
        x = np.concatenate([bits, masked[:, None]], axis=1)
        return host_shard({"x": x.astype(np.float32), "y": (query > 0).astype(np.int32)},
                          batch_size, process_index, process_count)
