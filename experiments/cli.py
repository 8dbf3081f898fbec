"""What the entry points share: the `--config` flag and flag parsing with clear errors.

`--config` is a `fpt_jax.config.TrainConfig`: by default the library's defaults, or
`--config=experiments/configs/<task>.py` (a python file whose `get_config()` returns one;
`--config=file.py:arg` passes `arg` to it, as big_vision does: the task configs take a
comparison row of fpt_jax/rows.py). Any field is overridden with `--config.<field>=<value>`
and a task option with `--config.task_options.<option>=<value>`, after `--config`; `none`
sets an optional field to None. A row that computes a setting from the others (the
parameter-matched LSTM's width) computes it again after the overrides, unless
`--config.n_embd` is given.
"""
from __future__ import annotations

import dataclasses
import os
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import jax
from absl import flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path, tuple_parser

from fpt_jax import parallel, rows
from fpt_jax.config import TrainConfig, describe, describe_fields


class _NoneOr(flags.ArgumentParser):
    """A field parser that also reads `none` (any case) as None, for optional fields
    (`TrainConfig.validate` refuses None where a field has no 'not set' value)."""

    def __init__(self, inner: flags.ArgumentParser):
        self.inner = inner

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip().lower() == "none":
            return None
        return self.inner.parse(argument)

    def flag_type(self) -> str:
        return self.inner.flag_type()


def load_config_file(spec: str) -> TrainConfig:
    """`path.py` or `path.py:arg` -> the `TrainConfig` its `get_config([arg])` returns."""
    path, *arg = spec.split(":", 1)
    # Errors here reach the user prefixed with "flag --config=<spec>: " by absl.
    if not os.path.isfile(path):
        raise ValueError("no such file; accepted: a python file whose get_config() returns a "
                         "TrainConfig, e.g. experiments/configs/bit_xor.py")
    try:
        module = runpy.run_path(path)
        if "get_config" not in module:
            raise ValueError(f"{path} defines no get_config()")
        config = module["get_config"](*arg)
    except (ValueError, TypeError):
        raise
    except Exception as e:  # the user's own code: its error, named, without our traceback
        raise ValueError(f"{path} raised {type(e).__name__}: {e}") from e
    if not isinstance(config, TrainConfig):
        raise ValueError(f"get_config() returned {type(config).__name__}, not a "
                         "fpt_jax.config.TrainConfig")
    return config


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None) -> flags.FlagHolder:
    """Defines `--config` (and, from the command line, its `--config.<field>` overrides)."""
    # Optional fields accept `none` (process-wide: these parsers serve every config flag).
    for kind, parser in ((float, flags.FloatParser()), (int, flags.IntegerParser()),
                         (bool, flags.BooleanParser()), (str, flags.ArgumentParser()),
                         (tuple, tuple_parser.TupleParser())):
        config_flags.register_flag_parser_for_type(kind, _NoneOr(parser))
    help_text = ("The run's settings: a python file whose get_config() returns a "
                 "fpt_jax.config.TrainConfig (experiments/configs/<task>.py[:<row>], rows: "
                 f"{', '.join(rows.ROWS)}), or by default "
                 "the library's defaults. Override any field after it with "
                 "--config.<field>=<value> ('none' for None). The fields:\n" + describe_fields())
    return config_flags.DEFINE_config_dataclass(
        "config", TrainConfig(), help_text, flag_values=flag_values,
        sys_argv=list(sys_argv) if sys_argv is not None else None, parse_fn=load_config_file)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """`app.run`'s flags parser of an entry point whose settings are `--config` alone."""
    return settings_parser()(argv, flag_values)


def settings_parser(*configs: tuple[str, Any, str],
                    as_run: Callable[[TrainConfig], TrainConfig] = lambda cfg: cfg
                    ) -> Callable[..., list[str]]:
    """`app.run`'s flags parser: `--config` (a TrainConfig) and the entry point's own configs,
    each `(name, default dataclass instance with validate(), help)`, e.g. the sweep's
    `--sweep`; every field `--<name>.<field>=<value>`. Everything is checked before the entry
    point runs: a bad flag, an unknown or badly typed field, a bad value, a missing config
    file are `error: ...` naming it and what is accepted, exit code 2. `as_run`: the config
    as the entry point runs it (the benchmark's always at random init), which is judged."""
    def parse(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
        try:
            define_config_flag(flag_values, argv)
            for name, default, help_text in configs:
                config_flags.DEFINE_config_dataclass(
                    name, default, f"{help_text} The fields:\n{describe(type(default), name)}",
                    flag_values=flag_values, sys_argv=list(argv))
            rest = flag_values(argv)
            config = resolve_row(flag_values["config"], argv)
            if config.model != "auto" or as_run(config) is config:
                as_run(config).check()  # 'auto' with random init: the benchmark says why
            for name, _, _ in configs:
                try:
                    flag_values[name].value.validate()
                except ValueError as e:
                    raise ValueError(f"--{name}.{e}") from None
            return rest
        except (KeyError, AttributeError, flags.Error, ValueError, TypeError) as e:
            # config_flags: a field the config has not (under several exception types)
            kinds = {"config": TrainConfig, **{n: type(d) for n, d, _ in configs}}
            fail(unknown_field(argv, flag_values, kinds) or str(e))
        return []
    return parse


def unknown_field(argv: Sequence[str], flag_values: flags.FlagValues,
                  kinds: dict[str, type]) -> str | None:
    """The message for the first `--<config>.<name>` naming a field or task option that does
    not exist (which argument, what that config accepts); None when every one exists."""
    for arg in argv[1:]:
        name, dot, path = arg.lstrip("-").partition("=")[0].partition(".")
        if not dot or name not in kinds:
            continue
        config = flag_values[name].value if name in flag_values else None
        if not isinstance(config, kinds[name]):  # not defined or parsed: its own default
            config = kinds[name]()
        try:
            config_path.get_value(path, config)
            continue
        except (KeyError, AttributeError, IndexError, ValueError):
            pass
        accepted = f"--{name}.<field> for the fields " + ", ".join(
            f.name for f in dataclasses.fields(kinds[name]))
        if isinstance(config, TrainConfig) and config.task_options is not None:
            accepted += (f"; --config.task_options.<option> for the options of task "
                         f"{config.task}: {', '.join(config.task_options.keys())}")
        return f"--{name}.{path}: not a setting; accepted: {accepted}"
    return None


def resolve_row(flag: flags.Flag, argv: Sequence[str]) -> TrainConfig:
    """The config, with what its row (`--config=file.py:<row>`) computes from the other
    settings computed again after the command line's overrides (unless n_embd is given)."""
    config = flag.value
    spec = getattr(flag, "config_filename", None)
    _, _, row = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if row in rows.ROWS and not any(a.startswith("--config.n_embd") for a in argv):
        resolved = rows.get(row).resolve(config)
        for f in dataclasses.fields(config):  # in place: the flag's value is this object
            setattr(config, f.name, getattr(resolved, f.name))
        if rows.get(row).match is not None:
            print(rows.get(row).matched(config).lines(), flush=True)
    return config


def parse_plain_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS
                      ) -> list[str]:
    """`app.run`'s flags parser for entry points without `--config` (convert, prepare_data):
    an unknown, badly typed or missing flag is `error: ...` and exit code 2 (absl's default
    is a 'FATAL Flags parsing error' and exit code 1)."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        fail(f"{'; '.join(str(e).splitlines())}; see --helpshort")
    return []


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` created if need be and probed with a temporary file, before any work whose
    output would be lost to it; errors name the flag (`--out_dir`, ...) and why."""
    given, path = os.fspath(path), Path(path).absolute()
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{flag}={given}: {blocker} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag}={given}: cannot create or write in it: "
                         f"{e.strerror or e}") from e
    return path


def begin(argv: list[str]) -> None:
    """What every entry point's `main` does first: stray positional arguments are an error
    (`error: ...`, exit 2), and absl logs at WARNING unless --verbosity is given (orbax logs
    every checkpoint save at INFO)."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; accepted: flags only (see --helpshort)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def fail(message: str) -> NoReturn:
    """The one way an entry point refuses its input: `error: <message>` and exit code 2."""
    message = message.replace("Error whilst parsing config file:\n\n", "")
    print(f"error: {message.strip()}", file=sys.stderr, flush=True)
    sys.exit(2)


def stopped(e: BaseException) -> NoReturn:
    """A group stopped by a signal or a preemption notice after writing its checkpoint
    (`loop.Preempted`): what happened on stderr, exit code 128 + the signal's number."""
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(getattr(e, "exit_code", 1))


# --- several processes ----------------------------------------------------------------------

def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The multi-process flags of the entry points that train on pods: train and sweep
    (reproduce runs its cells in one process; a pod runs the sweep of a cell)."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_enum(
        "distributed", "auto", list(parallel.DISTRIBUTED_MODES),
        "Multi-process run over jax.distributed. auto: when --coordinator_address, "
        "--num_processes or --process_id (or JAX_COORDINATOR_ADDRESS) is set, or a cluster "
        "of several processes is detected (TPU pod slice, SLURM job with several tasks, Open "
        "MPI); otherwise one process. on: always (unset values auto-detected). off: never.", **f)
    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process "
                        "0's coordinator, the same on every process. Default: auto-detected.",
                        **f)
    flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes. "
                         "Default: auto-detected.", **f)
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's id in "
                         "[0, --num_processes). Default: auto-detected.", **f)
    flags.DEFINE_list("local_device_ids", None, "Multi-process: restrict this process to "
                      "these local device ids. Default: all (JAX's default on SLURM/Open MPI "
                      "GPUs: one device per process).", **f)
    flags.DEFINE_string("cluster_detection_method", None, "Multi-process: force one of JAX's "
                        "cluster detectors, e.g. mpi4py (opt-in only), slurm, ompi.", **f)
    flags.DEFINE_integer("distributed_timeout", 100, "Multi-process: seconds after which a "
                         "process that died or stopped responding makes every other process "
                         "exit with an error (JAX's heartbeat timeout); also the longest a "
                         "failing process waits for the others at exit.", **f)
    flags.DEFINE_integer("distributed_init_timeout", 300, "Multi-process: seconds to wait at "
                         "start for every process to connect.", **f)


def initialize_distributed(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """Joins a multi-process run as the flags of `define_distributed_flags` say, before
    anything touches a device; the processes other than 0 then log errors only."""
    F = flag_values
    ids = [int(i) for i in F.local_device_ids] if F.local_device_ids is not None else None
    joined = parallel.initialize_distributed(
        F.distributed, coordinator_address=F.coordinator_address,
        num_processes=F.num_processes, process_id=F.process_id, local_device_ids=ids,
        cluster_detection_method=F.cluster_detection_method,
        timeout_seconds=F.distributed_timeout, init_timeout_seconds=F.distributed_init_timeout)
    if joined and jax.process_index() != 0 and not F["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # process 0 logs; the others only errors
    return joined
