"""Step time, FLOPs, utilisation and memory of the training step, against the PyTorch recipe.

What is timed is the step training runs, built from a `TrainConfig` (`Bench.base`: the
`--config` of `python -m experiments.benchmark`) by `build.build_group`: pmapped over the
local devices, the state donated, the frozen parameters read in place. Per case: compile
time, median and p10-p90 of the step time after warm-up, tokens/s; FLOPs and bytes accessed
from XLA's cost analysis of the compiled step; utilisation against the device's peak for the
case's dtype (bfloat16: bfloat16 operands accumulating in float32, as the step's matmuls);
bytes accessed against the minimum a step must touch (`core.minimum_step_bytes`); memory
from XLA's memory analysis; dot and all-reduce counts in the optimised HLO.

How it is timed is a `BenchConfig` (`--bench.<field>=<value>`: shapes, modes, dtypes,
sweeps, baselines, steps, rounds, the reference, ...); `Bench(config, settings)` joins the
two and checks one against the other.

  # the training config's step, at the Bit XOR shape, frozen FPT only, no PyTorch reference
  python -m experiments.benchmark --config.model=gpt2 --config.init=random \
      --bench.shapes=bit_xor --bench.modes=frozen --bench.torch_reference=false \
      --out_dir=/tmp/bench --name=try

  from fpt_jax import bench  # the same from Python
  b = bench.Bench(TrainConfig(init="random"), bench.BenchConfig(shapes=("bit_xor",)))
  bench.write(bench.run(b), "/tmp/bench", "try")

Sweeps (`BenchConfig.sweeps`, `--bench.sweeps=1,4,16`): every training case is also timed
as K runs trained by one vmapped group step (`build.build_group`, `steps.make_train_step` inside
`steps.pmapped_train_step`, states donated, the backbone shared), reported per run (step
time / K), against K=1 and against the PyTorch recipe's one run, with the compiled step's
argument bytes (backbone once + K x the run's state). K=1 is a single run's training step:
the same program with a group of one, as training runs it.

Baselines (`BenchConfig.baselines`, `--bench.baselines=lstm,fnet`): baseline backbones timed
in the same run as the config's model, for every shape, dtype and K, each as its family's
comparison row in `fpt_jax.rows` trains it (the LSTM fully, FNet frozen as FPT), with
no PyTorch reference (the reference is GPT-2's recipe). For LSTM rows the report gives the
sequential recurrent steps of a step (layers x T x 2 for a training step) and the time per
sequential step: the `lax.scan` is latency-bound.

  settings   `BenchConfig` (the flag-facing settings), shapes, modes, baseline presets
  core       cases, `Bench` (a TrainConfig and its settings, joined), what runners share
  jax_step   the timed JAX step and what XLA says of it; the bfloat16 loss check
  torch_ref  the original PyTorch recipe on the same shapes
  peaks      measured / published peaks; XLA vs PyTorch matmuls
  suite      `run`: every case, interleaved with the reference, into a report dict
  report     `write`: the report as JSON, markdown and a tokens/s plot
  command    `main`: the command's checks, run, printed and written report

Only plain arguments here: `experiments/benchmark.py` reads the flags.
"""
from fpt_jax.bench.command import main
from fpt_jax.bench.core import Bench, Case
from fpt_jax.bench.report import markdown, write
from fpt_jax.bench.settings import MODES, SHAPES, BenchConfig, Shape, scaling_shapes
from fpt_jax.bench.suite import run

__all__ = ["MODES", "SHAPES", "Bench", "BenchConfig", "Case", "Shape", "scaling_shapes",
           "main", "markdown", "write", "run"]
