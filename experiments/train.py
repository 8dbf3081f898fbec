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
in --workdir; a larger `--config.steps` continues the run.

Several processes (TPU pod slices, multi-node GPU clusters) run the same command on every
host: on a TPU pod slice or under SLURM / Open MPI it needs no extra flag (the cluster is
detected); elsewhere pass --coordinator_address, --num_processes and --process_id
(docs/multihost.md). `batch_size` stays the global batch; --workdir must be on storage
that every process sees.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads (fpt_jax/hugepages.py)
    from fpt_jax import hugepages
    hugepages.reexec_with_huge_pages()

import jax
from absl import app, flags, logging

from experiments import cli
from fpt_jax import parallel, train
from fpt_jax.weights import WeightsError

F = flags.FLAGS

flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go.",
                    required=True)
flags.DEFINE_enum("distributed", "auto", list(parallel.DISTRIBUTED_MODES),
                  "Multi-process run over jax.distributed. auto: when --coordinator_address, "
                  "--num_processes or --process_id (or JAX_COORDINATOR_ADDRESS) is set, or a "
                  "cluster of several processes is detected (TPU pod slice, SLURM job with "
                  "several tasks, Open MPI); otherwise one process. on: always (unset values "
                  "auto-detected). off: never.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0's "
                    "coordinator, the same on every process. Default: auto-detected.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes. Default: "
                     "auto-detected.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id in "
                     "[0, --num_processes). Default: auto-detected.")
flags.DEFINE_list("local_device_ids", None, "Multi-process: restrict this process to these "
                  "local device ids. Default: all (JAX's default on SLURM/Open MPI GPUs: one "
                  "device per process).")
flags.DEFINE_string("cluster_detection_method", None, "Multi-process: force one of JAX's "
                    "cluster detectors, e.g. mpi4py (opt-in only), slurm, ompi.")
flags.DEFINE_integer("distributed_timeout", 100, "Multi-process: seconds after which a "
                     "process that died or stopped responding makes every other process exit "
                     "with an error (JAX's heartbeat timeout); also the longest a failing "
                     "process waits for the others at exit.")
flags.DEFINE_integer("distributed_init_timeout", 300, "Multi-process: seconds to wait at "
                     "start for every process to connect.")


def initialize_distributed() -> bool:
    """Joins a multi-process run as the flags say; before anything touches a device."""
    ids = [int(i) for i in F.local_device_ids] if F.local_device_ids is not None else None
    return parallel.initialize_distributed(
        F.distributed, coordinator_address=F.coordinator_address,
        num_processes=F.num_processes, process_id=F.process_id, local_device_ids=ids,
        cluster_detection_method=F.cluster_detection_method,
        timeout_seconds=F.distributed_timeout, init_timeout_seconds=F.distributed_init_timeout)


def main(argv):
    cli.begin(argv)
    try:
        if initialize_distributed() and jax.process_index() != 0 and not F["verbosity"].present:
            logging.set_verbosity(logging.ERROR)  # process 0 logs; the others only errors
        cfg = F.config
        logging.info("config: %s", cfg)
        final = train.train_and_evaluate(cfg, F.workdir)
    except (ValueError, WeightsError, OSError) as e:
        # Bad settings, bad or missing files, a diverged run: the message names what was
        # wrong (the setting or the file) and what is accepted. A traceback is for bugs.
        prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        cli.fail(f"{prefix}{e}")
    if jax.process_index() == 0 and final:
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())),
              flush=True)


def run() -> None:
    """The entry point: flags parsed by `cli.parse_flags` (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
