"""The task contract that the model, the train loop and the data modules share.

A task states its input kind (real-valued token features, or token ids), its input and
output sizes, and yields numpy batches as a pure function of (split, step, seed, host):
the same arguments always give the same batch, which is what makes resume exact and lets
each host of a multi-host run read only its own shard. Host `i` of `n` gets rows
`[i * B, (i + 1) * B)` of the step's global batch of `n * B`, so the data of a run does
not depend on how many processes share it (generated tasks draw the global batch from
(seed, split, step) and keep their slice, `host_shard`).

A batch is a dict of numpy arrays with a leading per-host batch dimension:
  x       float32 [B, ...features] (input_kind 'real') or int32 [B, T] (input_kind 'tokens')
  y       the targets, in whatever form the task's loss reads
  length  optional int32 [B]: number of real tokens (token tasks padded on the right);
          the model then reads the output at position length-1
  mask    optional float32 [B]: 1 for real examples, 0 for padding of a partial eval batch
"""
from __future__ import annotations

import abc
import importlib
import inspect
import os
import pkgutil
import typing
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict, config_dict

Batch = dict[str, np.ndarray]


class Task(abc.ABC):
    name: str
    input_kind: str  # 'real' or 'tokens'
    input_dim: int  # features per token after patching, or vocabulary size for 'tokens'
    output_dim: int  # logits per output token
    # Model input for shape inference and tests: one example's x shape (without batch).
    example_shape: tuple[int, ...]
    # Splits this task can serve. Training evaluates on `eval_split` (validation) to select
    # a step; `test_splits` are read once, at the selected step.
    splits: tuple[str, ...] = ("train", "validation", "test")
    eval_split: str = "validation"
    test_splits: tuple[str, ...] = ("test",)

    @abc.abstractmethod
    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        """The `step`-th training batch of this host (deterministic)."""

    # Dataset tasks cover a split once when evaluating; generated ones draw `num_batches`.
    is_dataset: bool = False

    def prepare(self, split: str) -> None:
        """Opens `split`'s data now (files present, readable, well-formed), so that a bad
        input stops a run before its first step rather than at a batch or an evaluation."""
        self.check_split(split)

    def eval_batches(self, split: str, batch_size: int, *, seed: int, num_batches: int | None,
                     process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
        """Evaluation batches. Generated tasks draw `num_batches` fresh batches from an eval
        seed; dataset tasks override this to cover the split once (with `mask`)."""
        if num_batches is None:
            raise ValueError(f"task {self.name} is generated: eval_batches must be a number "
                             "of batches, not None")
        for i in range(num_batches):
            yield self.batch(split, i, batch_size, seed=seed + 1_000_003,
                             process_index=process_index, process_count=process_count)

    @abc.abstractmethod
    def per_example_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        """`{'loss': [B], 'accuracy': [B]}` from the model's output for this batch (jnp)."""

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {self.name} has no split {split!r}; accepted: {self.splits}")


def classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Cross-entropy and accuracy per example for `[B, C]` logits and `[B]` int labels."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss": loss, "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}


# --- the registry -----------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str):
    def wrap(factory: Callable[..., Task]):
        _REGISTRY[name] = factory
        return factory
    return wrap


def task_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """Builds a task by name; options the task does not take are an error."""
    accepted = task_settings(name)  # imports the tasks; an unknown name is an error
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name} takes no setting {', '.join(unknown)}; its settings: "
                         f"{', '.join(accepted) or 'none'}")
    return _REGISTRY[name](**options)


def task_settings(name: str) -> list[str]:
    """The keyword options that task `name` takes."""
    return list(_signature(name))


def _signature(name: str) -> dict[str, inspect.Parameter]:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; accepted: {sorted(_REGISTRY)}")
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def task_options(name: str, given: Mapping[str, Any] | None = None) -> ConfigDict:
    """Every option of task `name` as a locked ConfigDict: its own default, or `given`.
    The types come from the task's signature, so `--config.task_options.<option>=<value>`
    is parsed to the option's type, and an option the task does not take is an error."""
    params = _signature(name)
    given = dict(given or {})
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"task_options {', '.join(unknown)}: not options of task {name}; "
                         f"its options: {', '.join(params) or 'none'}")
    hints = typing.get_type_hints(_REGISTRY[name].__init__)
    options = ConfigDict()
    for key, p in params.items():
        default = None if p.default is inspect.Parameter.empty else p.default
        if default is None:  # typed placeholder: None until set, then of the option's type
            kind = _base_type(hints.get(key, str))
            options[key] = config_dict.placeholder(kind)
        else:
            options[key] = default
        if key in given:
            options[key] = given[key]
    options.lock()
    return options


def _base_type(hint: Any) -> type:
    """`int | None` -> int (the non-None member of an optional type)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _import_all() -> None:
    """Imports every module of this package: task modules register themselves on import."""
    package = __name__.rpartition(".")[0]  # fpt_jax.tasks, by name: no import of itself
    for module in pkgutil.iter_modules([os.path.dirname(__file__)]):
        importlib.import_module(f"{package}.{module.name}")


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")


def split_id(split: str) -> int:
    """A split's name as an integer, to seed its random streams apart from other splits'."""
    return int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")


def host_shard(batch: Batch, batch_size: int, process_index: int, process_count: int) -> Batch:
    """Host `process_index`'s rows `[process_index * batch_size, ...)` of a global batch."""
    check_process(process_index, process_count)
    lo = process_index * batch_size
    return {k: v[lo:lo + batch_size] for k, v in batch.items()}


def host_rng(seed: int, split: str, step: int, process_index: int) -> np.random.Generator:
    """An independent numpy generator per (seed, split, step, host)."""
    return np.random.default_rng([seed, split_id(split), step, process_index])
