r"""Trains a Frozen Pretrained Transformer on one task. The only place that reads flags.

  # the paper's Bit XOR setting on a small random-init GPT-2 (runs on a CPU in seconds)
  python -m experiments.train --config=experiments/configs/bit_xor.py \
      --config.init=random --config.n_layer=2 --config.n_head=4 --config.n_embd=128 \
      --workdir=/tmp/fpt_bit_xor

  # the paper's setting: pretrained gpt2 (hub name, local HF directory or converted checkpoint)
  python -m experiments.train --config=experiments/configs/bit_xor.py \
      --config.weights=/data/gpt2 --workdir=/tmp/fpt_bit_xor_pretrained

`--config` is a python file of experiments/configs/ (one per task, with the paper's
settings) and `--config.<field>=<value>` overrides any field of `fpt_jax.config.TrainConfig`
(`--helpfull` lists them). Running the same command again resumes from the latest checkpoint
in --workdir; a larger `--config.steps` continues the run. SIGTERM or Ctrl-C writes a
checkpoint after the current step and exits (128 + the signal's number); a second one stops
at once.

Several processes (TPU pod slices, multi-node GPU clusters) run the same command on every
host: on a TPU pod slice or under SLURM / Open MPI it needs no extra flag (the cluster is
detected); elsewhere pass --coordinator_address, --num_processes and --process_id
(docs/multihost.md). `batch_size` stays the global batch; --workdir must be on storage
that every process sees.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads
    from experiments import prologue
    prologue.start()

import jax
from absl import app, flags, logging

from experiments import cli
from fpt_jax import loop
from fpt_jax.weights import WeightsError

F = flags.FLAGS

flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go.",
                    required=True)
cli.define_distributed_flags()


def main(argv):
    cli.begin(argv)
    try:
        cli.initialize_distributed()
        cfg = F.config
        logging.info("config: %s", cfg)
        (result,) = loop.train_and_evaluate(cfg, F.workdir)
    except loop.Preempted as e:
        cli.stopped(e)
    except (ValueError, WeightsError, OSError) as e:
        # Bad settings, bad or missing files, a diverged run: the message names what was
        # wrong (the setting or the file) and what is accepted. A traceback is for bugs.
        prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        cli.fail(f"{prefix}{e}")
    final = {**result["final"], **{k: v for t in result["test"].values() for k, v in t.items()}}
    if jax.process_index() == 0 and final:
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())),
              flush=True)


def run() -> None:
    """The entry point: flags parsed by `cli.parse_flags` (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
