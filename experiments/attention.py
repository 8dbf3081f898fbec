r"""Attention maps of a finished run: every layer's and head's weights on one input of its
task, as a PNG grid (one row per layer, one column per head).

  # the paper's Bit XOR figure: FPT (pretrained gpt2, frozen; the paper converges in ~500
  # steps), then its best step's maps on a test example (tokens 0-4: the first string, 5-9:
  # the second, which attend to the matching bits of the first)
  python -m experiments.train --config=experiments/configs/bit_xor.py \
      --config.steps=2000 --workdir=/tmp/fpt_bit_xor_pretrained
  python -m experiments.attention --workdir=/tmp/fpt_bit_xor_pretrained
  # -> /tmp/fpt_bit_xor_pretrained/attention.png (12 layers x 12 heads)
  # (default names: attention[_run<k>][_last].png, so runs and steps do not overwrite)

  # run 1 of a sweep cell (its index in the cell's summary.json), at its newest checkpoint
  python -m experiments.attention --workdir=/tmp/fpt_sweep/cells/trainable=fpt --run=1 \
      --which=last --out=/tmp/attention_run1.png

`--workdir` is a run's (experiments.train) or a sweep cell's (WORKDIR/cells/<name> of
experiments.sweep, with `--run`). The model is rebuilt from the identity its checkpoint
records (fpt_jax/attention_maps.py). Runs of the LSTM and FNet baselines have no attention
and are refused.
"""
from __future__ import annotations

import os
import re

from absl import app, flags

from experiments import cli

F = flags.FLAGS

flags.DEFINE_string("workdir", None, "A finished run's workdir (experiments.train), or a sweep "
                    "cell's (WORKDIR/cells/<name>; then --run).", required=True)
flags.DEFINE_integer("run", None, "A sweep cell's run: its index in the cell's summary.json "
                     "runs. Required for a cell of several runs; a single run is run 0.")
flags.DEFINE_enum("which", "best", ["best", "last"], "best: the parameters of the run's "
                  "selected step (best validation accuracy); last: its newest checkpoint's.")
flags.DEFINE_string("split", "test", "The split the example comes from.")
flags.DEFINE_integer("index", 0, "The example's index in the split's evaluation stream.",
                     lower_bound=0)
flags.DEFINE_string("out", None, "The PNG to write (a .png path). Default: WORKDIR/"
                    "attention[_run<k>][_last].png, one file per run and step.")


def main(argv):
    cli.begin(argv)
    try:
        if not os.path.isdir(F.workdir):
            raise ValueError(f"--workdir={F.workdir}: no such directory; accepted: a finished "
                             "run's workdir or a sweep cell's (WORKDIR/cells/<name>)")
        from fpt_jax import attention_maps  # here: flag errors need no model code
        out = F.out or os.path.join(F.workdir, default_name(F.run, F.which))
        if not out.lower().endswith(".png"):
            raise ValueError(f"--out={out}: the maps are written as PNG; accepted: a path "
                             "ending in .png")
        # Before the run is loaded: an unwritable --out would lose that work.
        cli.writable_dir(os.path.dirname(os.path.abspath(out)), "--out's directory")
        if os.path.isdir(out):
            raise ValueError(f"--out={out} is a directory; accepted: a .png file path")
        path = attention_maps.render(F.workdir, out, run=F.run, which=F.which, split=F.split,
                                     index=F.index)
    except (ValueError, OSError) as e:
        # The library names its arguments (`workdir=...`, `run=...`): here they are flags.
        cli.fail(re.sub(r"(?<![-\w.])(workdir|run|which|split|index)=", r"--\1=", str(e)))
    print(f"wrote {path}", flush=True)


def default_name(run: int | None, which: str) -> str:
    """attention.png for a run's best step; a sweep cell's runs and last steps apart."""
    return ("attention" + ("" if run is None else f"_run{run}")
            + ("" if which == "best" else f"_{which}") + ".png")


def run() -> None:
    """The entry point: flags parsed by `cli.parse_plain_flags` (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.parse_plain_flags)


if __name__ == "__main__":
    run()
