"""The divergence guard of a run group: every step's loss and gradient norm reach the host
with the metrics (no extra sync on the hot path), and a run whose non-finite steps in a row
exceed `nonfinite_skips` (None: the first) is diverged. The step itself never applies a
non-finite update (`steps.make_train_step`), so no state is ever non-finite; a group of
one stops with an error naming the step, a group records the run (`diverged_step`) and
the others go on.
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
    """The train metrics (`{name: [K]}` per step) since the last log, checked as they reach
    the host. `diverged[i]` is run i's first step beyond its skips (None: finite so far)."""

    def __init__(self, first_step: int, skips: int | None, diverged: list,
                 last_checkpoint: int | None):
        self.next_step = first_step + 1  # the step number of the oldest pending metrics
        self.limit, self.skips = skips or 0, skips
        self.diverged = diverged
        self.last_checkpoint = last_checkpoint
        self.on_device: list[dict] = []
        self.on_host: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.on_device.append(metrics)

    def drain(self) -> None:
        """Brings pending metrics to the host; records diverged runs; in a group of one a
        divergence is a DivergenceError."""
        if not self.on_device:
            return
        for m in parallel.unreplicate(self.on_device):
            step, self.next_step = self.next_step, self.next_step + 1
            for i, count in enumerate(np.asarray(m["nonfinite"]).reshape(-1)):
                if count > self.limit and self.diverged[i] is None:
                    self.diverged[i] = step
                    if len(self.diverged) == 1:
                        self.on_device = []
                        raise DivergenceError(self._message(m, step, int(count)))
            self.on_host.append(m)
        self.on_device = []

    def _message(self, m: dict, step: int, in_a_row: int) -> str:
        bad = {k: float(np.asarray(m[k]).reshape(-1)[0]) for k in WATCHED if k in m}
        what = ", ".join(f"train/{k} {v}" for k, v in bad.items() if not math.isfinite(v))
        kept = (f"the last checkpoint (step {self.last_checkpoint}) is kept"
                if self.last_checkpoint is not None else "no checkpoint was written")
        return (f"non-finite {what or 'update'} at step {step}"
                + (f" ({in_a_row} in a row)" if self.skips is not None else "")
                + f"; the run stopped and {kept}. Lower learning_rate, set grad_clip, "
                "or set nonfinite_skips to skip such updates")

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
