r"""Will it fit? A run's bytes per device from shapes alone, before a pod is booked.

  # frozen Llama 3.1 8B as FPT on CIFAR-10, bfloat16, remat, on a (data 2 x model 4) mesh
  python -m experiments.plan_memory --config=experiments/configs/cifar10.py \
      --config.model=llama-3.1-8b --config.dtype=bfloat16 --config.remat=True \
      --config.mesh="(2,4)" --config.batch_size=8 --host_devices=8

Prints the frozen weights, trainable weights, optimizer state, batch and the compiled
step's temporaries per device, and whether the total fits 16, 32, 80 and 141 GiB
(`--capacity_gib`). No weights are read (a preset's architecture, or `config.json` alone for
`--config.model=auto`), nothing is allocated: the step is compiled for abstract inputs
(fpt_jax/memory.py). Run it on the accelerator host for that compiler's temporaries; on a
machine without one, `--host_devices=N` lays the mesh over N simulated CPU devices (XLA:CPU's
temporaries, an estimate; the weight and state bytes are exact).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # first, before JAX loads: the simulated devices
    from experiments import prologue
    prologue.start()
    for arg in sys.argv[1:]:
        if arg.startswith("--host_devices=") and arg.split("=", 1)[1].isdigit():
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                       f"platform_device_count={arg.split('=', 1)[1]}")

from absl import app, flags

from experiments import cli
from fpt_jax import memory
from fpt_jax.weights import WeightsError

F = flags.FLAGS
flags.DEFINE_integer("runs", 1, "Runs in the group (a sweep cell's learning rates x seeds), "
                     "each with its own trainable parameters and optimizer state.", lower_bound=1)
flags.DEFINE_list("capacity_gib", [str(c) for c in memory.CAPACITIES_GIB],
                  "Accelerator memories (GiB) to judge the total against.")
flags.DEFINE_integer("host_devices", None, "CPU only: simulate this many devices "
                     "(XLA_FLAGS=--xla_force_host_platform_device_count), for a mesh "
                     "larger than the machine.", lower_bound=1)


def main(argv):
    cli.begin(argv)
    try:
        capacities = [float(c) for c in F.capacity_gib]
        if any(c <= 0 for c in capacities):
            raise ValueError("must be > 0")
    except ValueError:
        cli.fail(f"--capacity_gib={','.join(F.capacity_gib)}; accepted: numbers > 0 (GiB)")
    try:
        found = memory.plan(F.config, F.runs)
    except (ValueError, WeightsError, OSError) as e:
        cli.fail(str(e))
    print(found.table(capacities), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
