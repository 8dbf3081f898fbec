r"""Measures the speed of fpt-jax's training step, against the original PyTorch recipe.

  # the issue's two shapes (Bit XOR: batch 4 x 10 tokens; CIFAR-10: batch 8 x 64 x 48),
  # frozen FPT, full fine-tuning and forward only, with the PyTorch reference interleaved
  python -m experiments.benchmark --name=shapes

  # tokens/s against sequence length (64 .. 1024), frozen vs full vs PyTorch, plus a plot
  python -m experiments.benchmark --seq_lens=64,128,256,512,1024 --batch_size=1 \
      --modes=frozen,full --name=scaling

  # memory and time with and without activation checkpointing, long sequences, no reference
  python -m experiments.benchmark --model=gpt2-large --seq_lens=1024 --batch_size=1 \
      --modes=frozen --remat=false,true --notorch_reference --name=remat

  # bfloat16 compute (with a loss check against float32), any trainable selection
  python -m experiments.benchmark --shapes=cifar10 --dtypes=float32,bfloat16 \
      --modes=frozen --trainable='output,attn[-2:]'

Every figure is measured in the run: the timed step is the pmapped, state-donating step that
`experiments.train` runs (over all local devices; on a pod, every process runs this command).
FLOPs come from XLA's cost analysis of the compiled step; on CPU the peak that utilisation is
measured against is the best of a few large matmuls timed in the same process, on GPU/TPU a
table of published peaks (override with --peak_tflops). Results go to
--out_dir/<name>.{json,md} (and <name>.png for several sequence lengths), with the device,
library versions and this command.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads (fpt_jax/hugepages.py)
    from fpt_jax import hugepages
    hugepages.reexec_with_huge_pages()

import os
import shlex
import sys

from absl import app, flags

F = flags.FLAGS

flags.DEFINE_enum("model", "gpt2", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                  "GPT-2 preset (random init: FLOPs and time do not depend on the values).")
flags.DEFINE_integer("n_layer", None, "Explicit size: number of blocks.")
flags.DEFINE_integer("n_head", None, "Explicit size: attention heads.")
flags.DEFINE_integer("n_embd", None, "Explicit size: width.")
flags.DEFINE_float("dropout", 0.1, "Dropout, as in training.")

flags.DEFINE_list("shapes", ["bit_xor", "cifar10"], "Named shapes: bit_xor (batch 4 x 10 "
                  "tokens x 1 feature, 2 classes), cifar10 (batch 8 x 64 tokens x 48 "
                  "features, 10 classes). Ignored when --seq_lens is given and --shapes is not.")
flags.DEFINE_list("seq_lens", [], "Sequence lengths of synthetic shapes (batch --batch_size x "
                  "T tokens x --features -> --classes).")
flags.DEFINE_integer("batch_size", 8, "Global batch of the --seq_lens shapes.")
flags.DEFINE_integer("features", 48, "Features per token of the --seq_lens shapes.")
flags.DEFINE_integer("classes", 10, "Classes of the --seq_lens shapes.")

flags.DEFINE_list("modes", ["frozen", "full", "forward"], "frozen (the paper's trainable "
                  "groups 'fpt'), full (fine-tune everything), forward (eval step only).")
flags.DEFINE_multi_string("trainable", [], "Further train modes as trainable selections, "
                          "as --trainable of experiments.train accepts (e.g. 'output,attn[-2:]');"
                          " repeat the flag for several.")
flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes: float32, bfloat16 (parameters stay "
                  "float32). With bfloat16 the eval loss is checked against float32.")
flags.DEFINE_list("remat", ["false"], "Activation checkpointing per block: false, true, or "
                  "false,true to measure both.")

flags.DEFINE_integer("num_devices", None, "Local devices to use; default all.")
flags.DEFINE_integer("cpu_devices", None, "CPU only: split the host into N XLA devices "
                     "(sets --xla_force_host_platform_device_count before JAX starts).")
flags.DEFINE_integer("steps", 20, "Timed steps per case.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per case after compilation.")
flags.DEFINE_integer("rounds", 5, "Interleaving rounds: each round times steps/rounds steps "
                     "of every case and of the PyTorch reference, in turn.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the synthetic batches.")
flags.DEFINE_bool("torch_reference", True, "Also time the original recipe in PyTorch (when "
                  "torch and transformers are installed).")
flags.DEFINE_integer("torch_threads", None, "PyTorch threads; default the machine's cores.")
flags.DEFINE_enum("torch_attn", None, ["eager", "sdpa"], "Attention of the PyTorch reference "
                  "(Hugging Face attn_implementation); default the installed transformers' "
                  "default. The original code ran eager attention (transformers 4.x, 2021).")
flags.DEFINE_integer("switch_steps", 1, "Untimed steps each time the interleaving turns to a "
                     "case (absorbs the previous case's threads and cache).")
flags.DEFINE_bool("compile_only", False, "Compile the steps and report FLOPs and memory "
                  "(XLA's analyses) without running them: what fits where.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for utilisation; default "
                   "measured (CPU) or published (GPU/TPU).")

flags.DEFINE_string("out_dir", "benchmarks/results", "Where <name>.json/.md/.png go.")
flags.DEFINE_string("name", "benchmark", "Base name of the output files.")
flags.DEFINE_enum("plot", "auto", ["auto", "yes", "no"], "Write the tokens/s vs sequence "
                  "length plot (auto: when several sequence lengths are measured).")


def _bools(values: list[str]) -> list[bool]:
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    out = []
    for v in values:
        if v.strip().lower() not in table:
            raise ValueError(f"--remat={','.join(values)}: {v!r} is not true/false")
        out.append(table[v.strip().lower()])
    return list(dict.fromkeys(out))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fpt_jax import bench  # importing JAX does not start its backends
    prefix = bench.env_prefix()  # the environment as the command was given
    if F.cpu_devices:
        # Read when JAX creates its CPU client, which no code has done yet.
        flag = f"--xla_force_host_platform_device_count={F.cpu_devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

    try:
        shapes = []
        if F.seq_lens and not F["shapes"].present:
            names = []
        else:
            names = F.shapes
        for name in names:
            if name not in bench.SHAPES:
                raise ValueError(f"unknown --shapes entry {name!r}; accepted: "
                                 f"{sorted(bench.SHAPES)}")
            shapes.append(bench.SHAPES[name])
        shapes += bench.scaling_shapes([int(t) for t in F.seq_lens], F.batch_size, F.features,
                                       F.classes)
        if not shapes:
            raise ValueError("no shape to measure: give --shapes or --seq_lens")
        modes = list(dict.fromkeys([*F.modes, *F.trainable]))
        bc = bench.BenchConfig(
            model=F.model, n_layer=F.n_layer, n_head=F.n_head, n_embd=F.n_embd,
            dropout=F.dropout, num_devices=F.num_devices, warmup=F.warmup, steps=F.steps,
            rounds=F.rounds, seed=F.seed, torch_reference=F.torch_reference,
            torch_threads=F.torch_threads, torch_attn=F.torch_attn,
            switch_steps=F.switch_steps, peak_tflops=F.peak_tflops,
            compile_only=F.compile_only)
        command = " ".join(filter(None, (
            prefix, "python -m experiments.benchmark",
            " ".join(shlex.quote(a) for a in sys.argv[1:]))))
        report = bench.run(bc, shapes, modes, dtypes=F.dtypes, remats=_bools(F.remat),
                           command=command)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    import jax
    if jax.process_index() == 0:
        plot = {"auto": None, "yes": True, "no": False}[F.plot]
        paths = bench.write(report, F.out_dir, F.name, plot=plot)
        print(bench.markdown(report))
        print("wrote " + ", ".join(paths.values()), flush=True)


if __name__ == "__main__":
    app.run(main)
