"""The divergence guard: a non-finite loss or gradient norm stops the run (or, as the config
says, its update is skipped), and a non-finite state is never checkpointed.

The train step's metrics stay on the devices until they are logged or a checkpoint is due
(`MetricsBuffer.drain`): the guard adds no host sync to the hot path, and it reads every
step's loss and gradient norm, not only those of logged steps.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from fpt_jax import parallel

WATCHED = ("loss", "grad_norm")


class DivergenceError(ValueError):
    pass


class MetricsBuffer:
    """Train metrics of the steps since the last log, checked for finiteness as they reach
    the host. `skips=None`: the first non-finite step stops the run; `skips=N`: non-finite
    updates are skipped by the optimizer (`optax.apply_if_finite`) and N of them in a row
    stop it."""

    def __init__(self, first_step: int, skips: int | None, last_checkpoint: int | None):
        self.next_step = first_step + 1  # the step number of the oldest pending metrics
        self.skips, self.in_a_row = skips, 0
        self.last_checkpoint = last_checkpoint
        self.on_device: list[dict] = []
        self.on_host: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.on_device.append(metrics)

    def drain(self) -> None:
        """Brings pending metrics to the host; raises DivergenceError as the config says."""
        if not self.on_device:
            return
        for m in parallel.unreplicate(self.on_device):
            step, self.next_step = self.next_step, self.next_step + 1
            bad = {k: float(m[k]) for k in WATCHED if k in m and not math.isfinite(m[k])}
            self.in_a_row = self.in_a_row + 1 if bad else 0
            if bad and (self.skips is None or self.in_a_row > self.skips):
                what = ", ".join(f"train/{k} {v}" for k, v in bad.items())
                kept = (f"the last checkpoint (step {self.last_checkpoint}) is kept"
                        if self.last_checkpoint is not None else "no checkpoint was written")
                raise DivergenceError(
                    f"non-finite {what} at step {step}"
                    + (f" ({self.in_a_row} in a row)" if self.skips is not None else "")
                    + f"; the run stopped and {kept}. Lower learning_rate, set grad_clip, "
                    "or set nonfinite_skips to skip such updates")
            self.on_host.append(m)
        self.on_device = []

    def take(self) -> list[dict]:
        """The drained host metrics since the last `take`."""
        self.drain()
        out, self.on_host = self.on_host, []
        return out


def check_finite_state(step: int, tree: Any) -> None:
    """Refuses to checkpoint a state with a non-finite value (host numpy tree)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            raise DivergenceError(f"the state after step {step} holds non-finite values "
                                  f"({jax.tree_util.keystr(path)}); it is not checkpointed "
                                  "and the run stopped. Lower learning_rate or set grad_clip")
