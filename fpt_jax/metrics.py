"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files and the terminal.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
from absl import logging


class MetricWriter:
    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool | None = None,
                 filename: str = "metrics.jsonl", tb_dir: str = "tensorboard"):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, filename)
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter  # protobuf-only, no TensorFlow needed
        self._tb = SummaryWriter(os.path.join(workdir, tb_dir))

    def write(self, step: int, metrics: Mapping[str, float],
              tags: Mapping[str, Any] | None = None, tb_prefix: str = "") -> None:
        """One record: `step`, the `tags` as they are (a sweep's run, learning rate, seed)
        and the metrics as floats; TensorBoard scalars under `tb_prefix` + name."""
        if not self.enabled:
            return
        record = {"step": int(step), **(tags or {}),
                  **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(tb_prefix + k, float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drops records after `step`: a run killed after its last checkpoint wrote metrics that
    the resumed run writes again, and the file must read as one uninterrupted run. A torn
    last line (a kill during a write) is dropped with a warning; a bad line before it is an
    error naming the file and line."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines) and not line.endswith("\n"):
                logging.warning("%s:%d: dropping a torn last line (%r)", path, number,
                                line[:80])
                continue
            raise ValueError(f"{path}:{number}: not a metrics record ({e}); repair or "
                             "remove the line to resume") from None
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class Progress:
    """One terminal line per log: step, loss, accuracy, steps/s and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start = total_steps, start_step
        self.t0 = self.last_t = time.perf_counter()
        self.last_step = start_step

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_step = now, step
        eta = (self.total - step) / max(rate, 1e-9)
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                  for k, v in metrics.items()]
        parts += [f"{rate:.2f} steps/s", f"ETA {_hms(eta)}"]
        text = " | ".join(parts)
        if jax.process_index() == 0:
            logging.info(text)
        return text


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
