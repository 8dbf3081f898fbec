"""Tasks: data plus a loss. `get_task(name, **options)` builds one by name; `task_options(name)`
gives its options (with their defaults and types) as a config."""
from fpt_jax.tasks.base import Task, get_task, register, task_names, task_options, task_settings

__all__ = ["Task", "get_task", "register", "task_names", "task_options", "task_settings"]
