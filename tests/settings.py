"""Test configs written flat: `train_config(task="bit_xor", n=3, steps=2)` puts the task's
options (`n`) into `task_options` and the rest into `TrainConfig`'s fields."""
import dataclasses
from typing import Any

from fpt_jax.config import TrainConfig
from fpt_jax.tasks import task_settings

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def split(task: str, settings: dict[str, Any]) -> tuple[dict, dict]:
    """(TrainConfig fields, task options) of flat `settings` for `task`."""
    options = {k: v for k, v in settings.items() if k not in _FIELDS and k in task_settings(task)}
    return {k: v for k, v in settings.items() if k not in options}, options


def train_config(**settings: Any) -> TrainConfig:
    task = settings.get("task", "bit_xor")
    fields, options = split(task, settings)
    given = dict(fields.pop("task_options", None) or {})
    return TrainConfig(**fields, task_options={**given, **options})


def replace(cfg: TrainConfig, **settings: Any) -> TrainConfig:
    """`dataclasses.replace` taking task options flat as well."""
    fields, options = split(settings.get("task", cfg.task), settings)
    return dataclasses.replace(cfg, **fields, task_options={
        **cfg.task_options.to_dict(), **options})
