"""A synthetic classification task of any shape: the benchmark's stand-in for any real-valued
FPT task (the values do not change FLOPs or time, only the shapes do)."""
from __future__ import annotations

import jax
import numpy as np

from fpt_jax.tasks.base import Batch, Task, classification_metrics, host_rng, host_shard, register


@register("synthetic")
class Synthetic(Task):
    """`[seq_len, features]` standard-normal sequences with uniform labels in `[0, classes)`,
    read at the last token (one token per row: the patch size is `features`)."""
    name = "synthetic"
    input_kind = "real"

    def __init__(self, seq_len: int = 64, features: int = 48, classes: int = 10):
        for name, value, lo in (("seq_len", seq_len, 1), ("features", features, 1),
                                ("classes", classes, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"synthetic: {name}={value!r}; accepted: an integer >= {lo}")
        self.input_dim = features
        self.output_dim = classes
        self.example_shape = (seq_len, features)

    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        self.check_split(split)
        rng = host_rng(seed, split, step, 0)  # the global batch, the same on every host
        g = batch_size * process_count
        x = rng.standard_normal((g, *self.example_shape), dtype=np.float32)
        y = rng.integers(0, self.output_dim, g).astype(np.int32)
        return host_shard({"x": x, "y": y}, batch_size, process_index, process_count)

    def per_example_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        return classification_metrics(logits, batch["y"])
