r"""Measures the speed of fpt-jax's training step, against the original PyTorch recipe.

  # the paper's two shapes (Bit XOR: batch 4 x 10 tokens; CIFAR-10: batch 8 x 64 x 48):
  # frozen FPT, full fine-tuning and forward only, the PyTorch reference interleaved
  python -m experiments.benchmark --out_dir=/tmp/bench --name=shapes

  # tokens/s against sequence length (64 .. 1024), frozen vs full vs PyTorch, plus a plot
  python -m experiments.benchmark --bench.seq_lens=64,128,256,512,1024 --bench.batch_size=1 \
      --bench.modes=frozen,full --out_dir=/tmp/bench --name=scaling

  # memory and time with and without activation checkpointing, long sequences, no reference
  python -m experiments.benchmark --config.model=gpt2-large --bench.seq_lens=1024 \
      --bench.batch_size=1 --bench.modes=frozen --bench.remats=false,true \
      --bench.torch_reference=false --out_dir=/tmp/bench --name=remat

  # K = 1, 4, 16 runs in one vmapped group step, and the baselines (LSTM, FNet) beside GPT-2
  python -m experiments.benchmark --bench.shapes=bit_xor,cifar10 --bench.modes=frozen,full \
      --bench.sweeps=1,4,16 --bench.baselines=lstm,fnet --out_dir=/tmp/bench --name=sweep

  # bfloat16 compute (its loss checked against float32), another trainable selection
  python -m experiments.benchmark --bench.shapes=cifar10 --bench.dtypes=float32,bfloat16 \
      --bench.modes=frozen --bench.selections='output,attn[-2:]' --out_dir=/tmp/bench

`--config` (and `--config.<field>` overrides, as for experiments.train) is the training run
whose step is timed; each shape replaces its task and batch size, and the backbone is always
initialised at random (FLOPs and time do not depend on the weights). `--bench.<field>` are
the benchmark's settings (`fpt_jax.bench.BenchConfig`; `--helpfull` lists them): what is
timed and how. Results go to OUT_DIR/<name>.{json,md} (and .png for several sequence
lengths), with the device, library versions and this command. What is measured and how:
fpt_jax/bench/__init__.py.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads
    from experiments import prologue
    prologue.start()

import dataclasses
import os
import shlex
import sys

from absl import app, flags

from experiments import cli
from fpt_jax.bench.settings import BenchConfig

F = flags.FLAGS

flags.DEFINE_string("out_dir", None, "Required: where <name>.json/.md/.png go (nothing is "
                    "written inside the checkout by default). Created and checked to be "
                    "writable before anything is timed; files of the same --name are "
                    "replaced.")
flags.register_validator("out_dir", bool, "required: the directory for <name>.json/.md/.png, "
                         "e.g. /tmp/bench")
flags.DEFINE_string("name", "benchmark", "Base name of the output files (no '/').")
flags.DEFINE_integer("cpu_devices", None, "CPU only: split the host into N XLA devices "
                     "(sets --xla_force_host_platform_device_count before JAX starts).",
                     lower_bound=1)

SETTINGS = ("bench", BenchConfig(), "How the step of --config is timed: shapes, modes, "
            "dtypes, sweeps, baselines, steps, ... (fpt_jax.bench.BenchConfig). Tuples are "
            "comma-separated; a tuple flag given twice collects both values.")


def main(argv):
    cli.begin(argv)
    from fpt_jax import bench  # importing JAX does not start its backends
    from fpt_jax.bench.suite import env_prefix
    command = " ".join(filter(None, (  # the environment as the command was given
        env_prefix(), "python -m experiments.benchmark",
        " ".join(shlex.quote(a) for a in sys.argv[1:]))))
    if F.cpu_devices:
        # Read when JAX creates its CPU client, which no code has done yet.
        flag = f"--xla_force_host_platform_device_count={F.cpu_devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    try:
        out_dir = cli.writable_dir(F.out_dir, "--out_dir")
        bench.main(F.config, F.bench, out_dir, F.name, command=command,
                   devices_from="--cpu_devices" if F.cpu_devices else None)
    except ValueError as e:
        cli.fail(str(e))


def run() -> None:
    """The entry point: settings parsed and checked first (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.settings_parser(SETTINGS, as_run=timed_config))


def timed_config(cfg):
    """The config as its step is timed: FLOPs and time do not depend on the weights, so the
    benchmark always initialises at random."""
    return dataclasses.replace(cfg, init="random", weights=None)


if __name__ == "__main__":
    run()
