"""The evaluation protocol: select on validation, test once at the selected step.

During training the run evaluates on the task's validation split; `BestStep` keeps the step
with the best validation accuracy (the loop keeps its trainable parameters beside the
current ones, in every checkpoint), counts evaluations without improvement for early
stopping (`patience`), and notes the first evaluation step at which validation accuracy
reached `converge_at` (the paper's "steps to converge"). At the end, each test split is
evaluated once, with the selected step's parameters, and WORKDIR/summary.json records it.
The tracker's state travels in every checkpoint's metadata (one per run of a group), so a
resumed run selects exactly as an uninterrupted one; the selected step's parameters travel
in the same checkpoint (`fpt_jax.runs`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class BestStep:
    best_step: int | None = None
    best_accuracy: float = -math.inf
    best_loss: float | None = None
    evals_since_best: int = 0
    converged_step: int | None = None
    stopped_early: bool = False

    def update(self, step: int, accuracy: float, loss: float,
               converge_at: float | None) -> bool:
        """Records an evaluation; True when it is the new best (ties keep the earlier)."""
        if converge_at is not None and self.converged_step is None and accuracy >= converge_at:
            self.converged_step = step
        if accuracy > self.best_accuracy:
            self.best_step, self.best_accuracy, self.best_loss = step, accuracy, loss
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False

    def patience_ran_out(self, patience: int | None) -> bool:
        return patience is not None and self.evals_since_best >= patience

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["best_accuracy"] = None if self.best_step is None else self.best_accuracy
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "BestStep":
        if not data:
            return cls()
        data = dict(data)
        if data.get("best_accuracy") is None:
            data["best_accuracy"] = -math.inf
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
