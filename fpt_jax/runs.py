"""A run group's records on disk, written and read by this module only: its identity, its
checkpoints' layout, its summary.

A workdir holds one group of K >= 1 runs (a single run is a group of one):
  checkpoints/<step>/  orbax: `state = {trainable: {now: [K, ...], best: [K, ...]},
                       opt_state: [K, ...]}` and `meta` (JSON): the identity, the
                       selection of every run (`protocol`), `diverged_step`, `nonfinite`,
                       `wall_s`. A run's best-step parameters travel in every checkpoint,
                       so the checkpoint and the selection it records are one atomic write.
  summary.json         `{"runs": [one entry per run], "backbone_seed": ...}`
  metrics.jsonl        rows tagged with `run`, `learning_rate`, `seed`
The identity is a serialised subset of `TrainConfig` (what defines the model and its
initial parameters: `IDENTITY_FIELDS`) plus the runs' learning rates and seeds and the
backbone's resolved architecture: what must not change between a group and its
resumption, and what rebuilds run k (`config_of`). Older identities are read (`_upgrade`):
format 2 (task options as top-level fields, before they were `task_options`) and a sweep
cell of f28d936 and older; a single run of f28d936's layout (a bare trainable tree and
best/) is refused with what to do.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from fpt_jax import tasks
from fpt_jax.config import TrainConfig

CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
FORMAT = 3
# Identity fields added since format 3 was first written, with the value runs recorded
# before them had: an older group resumes rather than "differs".
ADDED_FIELDS = {"blocks": [], "blocks_model": "minilm-l6", "blocks_init": "pretrained",
                "blocks_weights": None, "align_steps": 0, "align_distance": "mmd",
                "align_corpus": None, "align_learning_rate": 1e-3, "align_batch_size": 64}
_ALIGN_FIELDS = tuple(f for f in ADDED_FIELDS if f.startswith("align_") and f != "align_steps")
_BLOCKS_FIELDS = tuple(f for f in ADDED_FIELDS if f.startswith("blocks_"))


def active(config: dict) -> dict:
    """`config` (TrainConfig.to_dict's) with the settings of a stage that does not run at
    their defaults (the alignment's with align_steps=0, the blocks' with blocks=()): they
    change nothing, so they neither name another cell nor refuse a resume."""
    out = dict(config)
    for off, fields in ((not out.get("align_steps"), _ALIGN_FIELDS),
                        (not out.get("blocks"), _BLOCKS_FIELDS)):
        if off:
            out.update({f: ADDED_FIELDS[f] for f in fields if f in out})
    return out


# What defines a run's model and its initial parameters (the data's location does not).
IDENTITY_FIELDS = ("task", "task_options", "model", "init", "weights", "n_layer", "n_head",
                   "n_embd", "orth_gain", "in_layer_sizes", "out_layer_sizes", "trainable",
                   "backbone_seed", "backbone_draw", *ADDED_FIELDS)
# Format 2 kept the task's options as top-level fields, and the matched LSTM's settings.
_FORMAT2_TASK_FIELDS = ("n", "num_patterns", "patch_size", "data_dir", "image_size", "augment",
                        "source", "validation_fraction", "task_name", "max_length",
                        "overlength", "bucket_size", "num_classes")
_FORMAT2_DROPPED = ("match_model", "match_count")  # the width is in the backbone's record
# Backbone config fields added after runs were recorded, per family, with the value those
# runs had (the default): an older group resumes rather than "differs".
_ADDED_BACKBONE_FIELDS = {"lstm": {"initial_state": "zero", "norm_init": "ones",
                                   "unbiased_variance": False, "mask_carried_state": False}}
_LEGACY_KEYS = ("task", "task_options", "model", "init", "weights", "family", "backbone",
                "trainable", "backbone_seed", "in_layer_sizes", "out_layer_sizes",
                "learning_rates", "seeds")


class OldLayoutError(ValueError):
    pass


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def identity(cfg: TrainConfig, learning_rates: Sequence[float], seeds: Sequence[int],
             family: str, backbone: Any) -> dict:
    """The group's identity: `cfg`'s IDENTITY_FIELDS, the runs, the backbone's family and
    architecture (a dataclass)."""
    config = active(cfg.to_dict())
    return _json({"format": FORMAT,
                  "config": {f: config[f] for f in IDENTITY_FIELDS} | {
                      "task_options": _options(cfg.task, config["task_options"])},
                  "learning_rates": [float(x) for x in learning_rates],
                  "seeds": [int(s) for s in seeds],
                  "family": family, "backbone": dataclasses.asdict(backbone)})


def is_legacy_single_run(saved: dict) -> bool:
    return "format" not in saved and "learning_rates" not in saved


def _old_single_run(workdir: str) -> OldLayoutError:
    return OldLayoutError(
        f"{workdir} holds a single run written by fpt-jax f28d936 or older (checkpoints of "
        "one run and a best/ directory); this version keeps every workdir as a run group. "
        "Its summary.json stays as it is. To continue or read it, use that version (git "
        "checkout f28d936); to train again, use a new workdir")


def _options(task: str, given: dict) -> dict:
    """A task's full option set (its defaults filled in), without the data's location."""
    full = tasks.task_options(task, {k: v for k, v in given.items() if v is not None})
    return {k: v for k, v in full.to_dict().items() if k != "data_dir"}


def nested_task_options(config: dict) -> dict:
    """A recorded config (cell.json's) with the task's options nested as today: those of
    format 2 were top-level fields, with the matched LSTM's settings beside them."""
    if "task_options" in config or "task" not in config:
        return config
    out = {k: v for k, v in config.items()
           if k not in _FORMAT2_TASK_FIELDS + _FORMAT2_DROPPED}
    given = {k: v for k, v in config.items() if k in _FORMAT2_TASK_FIELDS and v is not None}
    out["task_options"] = tasks.task_options(config["task"], given).to_dict()
    return out


def _upgrade(saved: dict, workdir: str) -> dict:
    """An identity of any version as FORMAT (a sweep cell of f28d936 or older: its fields)."""
    if saved.get("format") == FORMAT:
        return saved
    if is_legacy_single_run(saved):
        raise _old_single_run(workdir)
    if saved.get("format") == 2:
        config = {k: v for k, v in saved["config"].items()
                  if k not in _FORMAT2_TASK_FIELDS + _FORMAT2_DROPPED}
        config["task_options"] = _options(config["task"], {
            k: v for k, v in saved["config"].items() if k in _FORMAT2_TASK_FIELDS})
        return {**saved, "format": FORMAT, "config": config}
    try:
        options = _options(saved["task"], saved["task_options"])
        config = {"task": saved["task"], "task_options": options,
                  **{k: saved[k] for k in ("model", "init", "weights", "trainable",
                                           "backbone_seed", "in_layer_sizes",
                                           "out_layer_sizes")}}
        if saved["init"] == "random":  # the architecture the preset was resized to
            config.update({a: saved["backbone"][a] for a in ("n_layer", "n_head", "n_embd")})
        return {"format": FORMAT, "config": config, "legacy": True,
                **{k: saved[k] for k in ("learning_rates", "seeds", "backbone")},
                "family": saved.get("family", "gpt2")}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{workdir}: its checkpoint's identity lacks {e}; it was written by "
                         "an unknown version; use a new workdir") from None


def check_identity(saved: dict, current: dict, workdir: str) -> None:
    """Raises ValueError naming the settings in which the group recorded in `workdir`
    differs from `current` (a legacy sweep cell is compared on what it recorded)."""
    if is_legacy_single_run(saved):
        raise _old_single_run(workdir)
    saved = _json(saved)
    if saved.get("format") == 2:
        saved = _upgrade(saved, workdir)
    if saved.get("format") == FORMAT:  # settings added since: what those runs had
        saved["config"].setdefault("backbone_draw", "shared")
        for name, default in ADDED_FIELDS.items():
            saved["config"].setdefault(name, default)
        for name, default in _ADDED_BACKBONE_FIELDS.get(saved.get("family"), {}).items():
            saved.get("backbone", {}).setdefault(name, default)
    if saved.get("format") != FORMAT:  # a sweep cell of f28d936: compare its own fields
        cfg = current["config"]
        now = {**{k: cfg.get(k) for k in _LEGACY_KEYS}, **{k: current[k] for k in (
            "family", "backbone", "learning_rates", "seeds")}}
        saved = {"family": "gpt2", **saved}
        saved["task_options"] = _options(saved["task"], saved.get("task_options", {}))
        diff = {k: (saved.get(k), now[k]) for k in _LEGACY_KEYS if saved.get(k) != now[k]}
        if cfg.get("backbone_draw", "shared") != "shared":  # those drew one backbone
            diff["backbone_draw"] = ("shared", cfg["backbone_draw"])
    else:
        flat = lambda i: {**i["config"], **{k: v for k, v in i.items()  # noqa: E731
                                            if k not in ("config", "format")}}
        s, c = flat(saved), flat(current)
        diff = {k: (s.get(k), c.get(k)) for k in sorted(set(s) | set(c)) if s.get(k) != c.get(k)}
    if diff:
        raise ValueError(
            f"{workdir} holds a checkpoint of a different run; differing settings "
            f"(checkpoint, now): {diff}. Use a new workdir, or the run's own settings")


def num_runs(saved: dict) -> int:
    return len(saved["learning_rates"])


def config_of(saved: dict, run: int, workdir: str) -> TrainConfig:
    """The settings that rebuild run `run` of a recorded group (float32, no dropout)."""
    ident = _upgrade(saved, workdir)
    try:
        return TrainConfig(**ident["config"], seed=int(ident["seeds"][run]),
                           learning_rate=float(ident["learning_rates"][run]),
                           dtype="float32", dropout=0.0)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{workdir}: its checkpoint's identity does not rebuild a run ({e})"
                         ) from None


def describe_runs(saved: dict) -> str:
    return ", ".join(f"{k} (lr {lr:g}, seed {s})" for k, (lr, s) in
                     enumerate(zip(saved["learning_rates"], saved["seeds"])))


# --- summary.json --------------------------------------------------------------------------

def write_summary(workdir: str, summary: dict[str, Any]) -> str:
    """WORKDIR/summary.json, written atomically."""
    path = os.path.join(workdir, SUMMARY)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_summary(workdir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(workdir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary_runs(workdir: str) -> list[dict[str, Any]]:
    """summary.json's runs ([] before the group ended, or for a legacy single run)."""
    summary = read_summary(workdir)
    runs = summary.get("runs") if isinstance(summary, dict) else None
    return runs if isinstance(runs, list) else []
