"""Tasks: data plus a loss. `get_task(name, **options)` builds one by name."""
from fpt_jax.tasks.base import Task, get_task, register, task_names, task_settings

__all__ = ["Task", "get_task", "register", "task_names", "task_settings"]
