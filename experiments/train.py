r"""Trains a Frozen Pretrained Transformer on one task. The only place that reads flags.

  # the paper's Bit XOR setting on a small random-init GPT-2 (runs on a CPU in minutes)
  python -m experiments.train --flagfile=experiments/configs/bit_xor.cfg \
      --init=random --n_layer=2 --n_embd=128 --n_head=4 --workdir=/tmp/fpt_bit_xor

  # the paper's setting: pretrained gpt2 (hub name, local HF directory or converted checkpoint)
  python -m experiments.train --flagfile=experiments/configs/bit_xor.cfg \
      --init=pretrained --weights=gpt2 --workdir=/tmp/fpt_bit_xor_pretrained

Running the same command again resumes from the latest checkpoint in --workdir; a larger
--steps continues the run.

Several processes (TPU pod slices, multi-node GPU clusters) run the same command on every
host: on a TPU pod slice or under SLURM / Open MPI it needs no extra flag (the cluster is
detected); elsewhere pass --coordinator_address, --num_processes and --process_id
(docs/multihost.md). --batch_size stays the global batch; --workdir must be on storage
that every process sees.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads (fpt_jax/hugepages.py)
    from fpt_jax import hugepages
    hugepages.reexec_with_huge_pages()

import sys

import jax
from absl import app, flags, logging

from fpt_jax import freeze, parallel, train
from fpt_jax.weights import WeightsError
from fpt_jax.models.gpt2 import GPT2_PRESETS
from fpt_jax.tasks import task_names

F = flags.FLAGS

flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go.",
                    required=True)
flags.DEFINE_string("task", "bit_xor", f"Task; one of {task_names()}.")
# task options: only the ones set are passed, so each task keeps its own defaults
flags.DEFINE_integer("n", None, "Bit tasks: bits per string.")
flags.DEFINE_integer("num_patterns", None, "Bit tasks: number of strings.")
flags.DEFINE_integer("patch_size", None, "Features per token (bit tasks) / pixels per side "
                     "(image tasks).")
flags.DEFINE_string("data_dir", None, "Dataset tasks: the tensorflow-datasets data_dir or the "
                    "directory of the task's files.")
flags.DEFINE_multi_string(
    "task_option", [], "Further task options as key=value[,key=value...] (ints, floats and "
    "true/false are parsed), e.g. --task_option=image_size=28. Repeatable: the values of a "
    "flagfile and of the command line add up, and a later key wins.")

flags.DEFINE_enum("model", "gpt2", [*sorted(GPT2_PRESETS), "auto"], "GPT-2 preset; 'auto' takes "
                  "the architecture from --weights (e.g. a custom or distilled GPT-2).")
flags.DEFINE_enum("init", "pretrained", ["pretrained", "random"],
                  "Backbone initialisation: pretrained weights or random (the paper's "
                  "random-init ablation).")
flags.DEFINE_string("weights", None, "Pretrained weights: hub name, local Hugging Face "
                    "directory or a checkpoint from experiments.convert. Default: --model.")
flags.DEFINE_integer("n_layer", None, "Random init only: number of blocks.")
flags.DEFINE_integer("n_head", None, "Random init only: attention heads.")
flags.DEFINE_integer("n_embd", None, "Random init only: width.")

flags.DEFINE_string("trainable", "fpt", "Trainable parameter groups, e.g. 'fpt' "
                    "(= input,pos,ln,output), 'full', 'output,ln', 'fpt,attn[-2:]'. Groups: "
                    f"{freeze.GROUPS}; ranges of blocks in Python slice syntax.")
flags.DEFINE_float("dropout", 0.1, "Dropout in the input/output layers and the backbone.")
flags.DEFINE_float("orth_gain", 1.41, "Orthogonal-init gain of the input layer; <= 0 for "
                   "PyTorch's default init.")
flags.DEFINE_list("in_layer_sizes", [], "Hidden sizes of the input MLP.")
flags.DEFINE_list("out_layer_sizes", [], "Hidden sizes of the output MLP.")

flags.DEFINE_enum("optimizer", "adam", list(train.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_enum("schedule", "constant", list(train.SCHEDULES), "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps (warmup, cosine).")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip; <= 0 disables.")
flags.DEFINE_integer("batch_size", 4, "Global batch size (all devices, all processes).")
flags.DEFINE_integer("grad_accum", 1, "Gradient accumulation steps per update.")
flags.DEFINE_integer("steps", 1000, "Total optimizer steps.")

flags.DEFINE_integer("eval_every", 100, "Evaluate every N steps.")
flags.DEFINE_integer("eval_batches", 10, "Generated tasks: batches per evaluation; <= 0 for "
                     "a whole split (dataset tasks always cover their split).")
flags.DEFINE_integer("eval_batch_size", None, "Evaluation batch size; default --batch_size.")
flags.DEFINE_string("eval_split", None, "Split to evaluate on; default the task's.")
flags.DEFINE_integer("log_every", 10, "Log train metrics every N steps.")
flags.DEFINE_integer("checkpoint_every", 500, "Checkpoint every N steps.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints to keep.")

flags.DEFINE_integer("seed", 0, "Seed of the initialisation, data and dropout.")
flags.DEFINE_enum("dtype", "float32", list(train.DTYPES), "Compute dtype (parameters stay "
                  "float32).")
flags.DEFINE_bool("remat", False, "Activation checkpointing per block (long sequences).")
flags.DEFINE_integer("num_devices", None, "Local devices to use; default all.")

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


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def task_options() -> dict:
    options = {k: getattr(F, k) for k in ("n", "num_patterns", "patch_size", "data_dir")
               if getattr(F, k) is not None}
    items = [i.strip() for value in F.task_option for i in value.split(",") if i.strip()]
    for item in items:
        if "=" not in item:
            raise ValueError(f"--task_option={item!r} is not key=value")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value.strip())
    return options


def config_from_flags() -> train.TrainConfig:
    return train.TrainConfig(
        task=F.task, task_options=task_options(), model=F.model, init=F.init, weights=F.weights,
        n_layer=F.n_layer, n_head=F.n_head, n_embd=F.n_embd, dropout=F.dropout,
        orth_gain=F.orth_gain if F.orth_gain > 0 else None,
        in_layer_sizes=tuple(int(s) for s in F.in_layer_sizes),
        out_layer_sizes=tuple(int(s) for s in F.out_layer_sizes), trainable=F.trainable,
        optimizer=F.optimizer, learning_rate=F.learning_rate, schedule=F.schedule,
        warmup_steps=F.warmup_steps, weight_decay=F.weight_decay,
        grad_clip=F.grad_clip if F.grad_clip > 0 else None, batch_size=F.batch_size,
        grad_accum=F.grad_accum, steps=F.steps, eval_every=F.eval_every,
        eval_batches=F.eval_batches if F.eval_batches > 0 else None,
        eval_batch_size=F.eval_batch_size, eval_split=F.eval_split, log_every=F.log_every,
        checkpoint_every=F.checkpoint_every, keep_checkpoints=F.keep_checkpoints, seed=F.seed,
        dtype=F.dtype, remat=F.remat, num_devices=F.num_devices)


def initialize_distributed() -> bool:
    """Joins a multi-process run as the flags say; before anything touches a device."""
    ids = [int(i) for i in F.local_device_ids] if F.local_device_ids is not None else None
    return parallel.initialize_distributed(
        F.distributed, coordinator_address=F.coordinator_address,
        num_processes=F.num_processes, process_id=F.process_id, local_device_ids=ids,
        cluster_detection_method=F.cluster_detection_method,
        timeout_seconds=F.distributed_timeout, init_timeout_seconds=F.distributed_init_timeout)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not F["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if initialize_distributed() and jax.process_index() != 0 and not F["verbosity"].present:
            logging.set_verbosity(logging.ERROR)  # process 0 logs; the others only errors
        cfg = config_from_flags()
        logging.info("config: %s", cfg)
        final = train.train_and_evaluate(cfg, F.workdir)
    except (ValueError, WeightsError) as e:
        # Bad flags and bad inputs: the message names what was wrong and what is accepted.
        prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        print(f"error: {prefix}{e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if jax.process_index() == 0:
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())),
              flush=True)


if __name__ == "__main__":
    app.run(main)
