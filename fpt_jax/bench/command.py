"""The benchmark's command (`python -m experiments.benchmark`) once its flags are read: every
setting checked before anything is timed (ValueError naming the flag), then the run, the
report printed and written.

The entry point keeps what belongs to its process: reading the flags, the CPU device count
(which must be set before JAX starts its backends), `--out_dir` made and probed for
writing, and turning a ValueError into `error: ...` and exit code 2.
"""
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from fpt_jax import parallel
from fpt_jax.bench import report as report_lib
from fpt_jax.bench import suite
from fpt_jax.bench.core import SHAPES, Bench, Shape, ShapeError
from fpt_jax.bench.settings import BenchConfig
from fpt_jax.config import TrainConfig

OUTPUTS = ("json", "md", "png")  # <name>.<ext> in out_dir (report.write)


def _print(text: str) -> None:
    print(text, flush=True)


def main(config: TrainConfig, settings: BenchConfig, out_dir: str | os.PathLike, name: str,
         command: str = "", devices_from: str | None = None,
         log: Callable[[str], None] = _print) -> dict[str, str] | None:
    """Times the step of `config` as `settings` say and writes `out_dir/<name>.{json,md}`
    (and `.png`): the outputs' names, the settings against the model and the shapes against
    the devices are checked first. `devices_from` names where the device count comes from,
    for messages (default: --config.num_devices or this machine's devices). Returns the
    paths written (None on processes other than 0, which write nothing)."""
    check_outputs(out_dir, name)
    bench = Bench(config, settings)
    check_devices(bench, devices_from)  # starts JAX's backends
    log("init: random (FLOPs and time do not depend on the weights' values)")
    report = suite.run(bench, command=command, log=log)
    if jax.process_index() != 0:
        return None
    log(report_lib.markdown(report))  # first: the results survive a failed write
    try:
        paths = report_lib.write(report, os.fspath(out_dir), name,
                                 plot=bench.settings.plot_choice())
    except OSError as e:
        raise ValueError(f"--out_dir={out_dir}: cannot write the results (printed above): "
                         f"{e}") from e
    log("wrote " + ", ".join(paths.values()))
    return paths


def check_outputs(out_dir: str | os.PathLike, name: str) -> None:
    """`name` is a file name and no directory stands where an output goes."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"--name={name!r}; accepted: a file name without '/' (the outputs "
                         "are <name>.json, <name>.md, <name>.png in --out_dir)")
    for ext in OUTPUTS:
        if (Path(out_dir) / f"{name}.{ext}").is_dir():
            raise ValueError(f"--out_dir={out_dir}: {Path(out_dir) / f'{name}.{ext}'} is a "
                             "directory; choose another --name or --out_dir")


def check_devices(bench: Bench, devices_from: str | None = None) -> Sequence[Any]:
    """The local devices the step runs on, and every shape against them and the model
    (ValueError naming the setting each comes from)."""
    try:
        devices = parallel.local_devices(bench.base.num_devices)
    except ValueError as e:  # its message starts with the field: num_devices=...
        raise ValueError(f"--config.{e}" if str(e).startswith("num_devices") else str(e)
                         ) from None
    try:
        bench.check_shapes(len(devices) * jax.process_count())
    except ShapeError as e:
        more = ""
        if e.kind == "batch":
            devs = devices_from or ("--config.num_devices" if bench.base.num_devices
                                    else "this machine's devices")
            more = (f" (devices: {len(devices)} per process, from {devs}; grad_accum from "
                    "--config.grad_accum)")
        where = shape_setting(e.shape, bench.settings, e.kind)
        raise ValueError(f"{where + ': ' if where else ''}{e}{more}") from None
    return devices


def shape_setting(shape: Shape, settings: BenchConfig, kind: str) -> str | None:
    """The setting a shape comes from, for messages (`kind`: what is wrong with it); None
    for a shape of the caller's own."""
    if SHAPES.get(shape.name) == shape:
        return f"--bench.shapes={shape.name} (batch {shape.batch_size} x {shape.seq_len} tokens)"
    if shape not in settings.make_shapes():
        return None
    if kind == "positions":
        return f"--bench.seq_lens={shape.seq_len}"
    return f"--bench.batch_size={shape.batch_size} (of the --bench.seq_lens shapes)"
