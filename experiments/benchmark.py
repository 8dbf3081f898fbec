r"""Measures the speed of fpt-jax's training step, against the original PyTorch recipe.

  # the paper's two shapes (Bit XOR: batch 4 x 10 tokens; CIFAR-10: batch 8 x 64 x 48),
  # frozen FPT, full fine-tuning and forward only, with the PyTorch reference interleaved
  python -m experiments.benchmark --name=shapes

  # tokens/s against sequence length (64 .. 1024), frozen vs full vs PyTorch, plus a plot
  python -m experiments.benchmark --seq_lens=64,128,256,512,1024 --batch_size=1 \
      --modes=frozen,full --name=scaling

  # memory and time with and without activation checkpointing, long sequences, no reference
  python -m experiments.benchmark --config.model=gpt2-large --seq_lens=1024 --batch_size=1 \
      --modes=frozen --remats=false,true --notorch_reference --name=remat

  # K = 1, 4, 16 runs trained by one vmapped group step (fpt_jax.steps): per-run time
  # against one run and against the PyTorch recipe's one run, utilisation vs the matmul peak
  python -m experiments.benchmark --config.model=gpt2 --shapes=bit_xor --modes=frozen \
      --sweeps=1,4,16 --name=sweep

  # the baselines in the same run: the LSTM (3 layers x 768, every parameter trained; a
  # lax.scan of T dependent steps per layer, forward and backward: latency-bound, the report
  # gives its sequential steps per step and the time per step) and FNet (frozen), next to
  # frozen FPT and full fine-tuning of GPT-2 at the Bit XOR and CIFAR-10 shapes
  python -m experiments.benchmark --config.model=gpt2 --shapes=bit_xor,cifar10 \
      --modes=frozen,full --baselines=lstm,fnet --name=baselines

  # bfloat16 compute (with a loss check against float32), another trainable selection
  python -m experiments.benchmark --shapes=cifar10 --dtypes=float32,bfloat16 \
      --modes=frozen --selections='output,attn[-2:]'

The step timed is the one a training run with the same `--config` runs: `--config` and
`--config.<field>` overrides are those of experiments.train (model and sizes, dropout,
trainable, optimizer, grad_accum, seed, dtype, remat, num_devices, ...). The benchmark
replaces the config's task and batch size with each shape's (a synthetic task) and always
initialises at random: FLOPs and time do not depend on the weights' values. The mode
`frozen` trains the config's `trainable` selection (the paper's `fpt` by default);
`--dtypes` and `--remats` sweep the config's dtype and remat (default: the config's own).
`--baselines` adds baseline backbones (lstm, fnet) for every shape, dtype and K, each trained
as the paper's comparisons train it (`fpt_jax.baselines.variant`: lstm 'full', fnet the
config's FPT selection), at random init, at the config's n_layer/n_embd when set (the preset's
sizes otherwise), without remat and without a PyTorch reference (GPT-2's recipe only).

Every figure is measured in the run: the pmapped, state-donating step over all local devices
(on a pod, every process runs this command). FLOPs come from XLA's cost analysis of the
compiled step; on CPU the peak that utilisation is measured against is the best of a few
large matmuls timed in the same process, on GPU/TPU a table of published peaks (override with
--peak_tflops). Results go to --out_dir/<name>.{json,md} (and <name>.png for several sequence
lengths), with the device, library versions and this command.
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
from fpt_jax.bench.core import MODES, BenchConfig

F = flags.FLAGS


def _default(name: str):
    """The default of a BenchConfig field: defined there once, not again here."""
    return next(f.default for f in dataclasses.fields(BenchConfig) if f.name == name)


flags.DEFINE_list("shapes", ["bit_xor", "cifar10"], "Named shapes: bit_xor (batch 4 x 10 "
                  "tokens x 1 feature, 2 classes), cifar10 (batch 8 x 64 tokens x 48 "
                  "features, 10 classes). Ignored when --seq_lens is given and --shapes is not.")
flags.DEFINE_list("seq_lens", [], "Sequence lengths of synthetic shapes (batch --batch_size x "
                  "T tokens x --features -> --classes).")
flags.DEFINE_integer("batch_size", 8, "Global batch of the --seq_lens shapes (the shapes set "
                     "the batch size; --config.batch_size is not read).")
flags.DEFINE_integer("features", 48, "Features per token of the --seq_lens shapes.")
flags.DEFINE_integer("classes", 10, "Classes of the --seq_lens shapes.")

flags.DEFINE_list("modes", list(MODES), "frozen (train the config's "
                  "trainable selection, the paper's 'fpt' by default), full (fine-tune "
                  "everything), forward (eval step only).")
flags.DEFINE_multi_string("selections", [], "Further train modes as trainable selections, as "
                          "--config.trainable accepts (e.g. 'output,attn[-2:]'); repeat the "
                          "flag for several.")
flags.DEFINE_list("dtypes", None, "Compute dtypes to sweep: float32, bfloat16 (trainable "
                  "parameters stay float32, frozen ones are stored in the compute dtype). Default: --config.dtype. With bfloat16 the eval loss is "
                  "checked against float32.")
flags.DEFINE_list("sweeps", ["1"], "K values: every training case is timed with K runs "
                  "trained by one vmapped sweep step (fpt_jax.steps, as a run group trains: the backbone shared, "
                  "states donated), reported per run (step time / K) and against K=1. K=1 is "
                  "the single-run training step. Integers >= 1.")
flags.DEFINE_list("baselines", [], "Baseline backbones timed next to the config's model "
                  "for every shape, dtype and K: lstm (3 layer-normalised LSTM layers x 768, "
                  "every parameter trained), fnet (GPT-2's block with fixed Fourier mixing, "
                  "frozen as FPT), or another preset of those families. They take "
                  "--config.n_layer/n_embd when set.")
flags.DEFINE_list("remats", None, "Activation checkpointing per block to sweep: false, true, "
                  "or false,true for both. Default: --config.remat.")

flags.DEFINE_integer("cpu_devices", None, "CPU only: split the host into N XLA devices "
                     "(sets --xla_force_host_platform_device_count before JAX starts).")
flags.DEFINE_integer("steps", _default("steps"), "Timed steps per case (--config.steps is not read).")
flags.DEFINE_integer("warmup", _default("warmup"), "Untimed steps per case after compilation.")
flags.DEFINE_integer("rounds", _default("rounds"), "Interleaving rounds: each round times steps/rounds steps "
                     "of every case and of the PyTorch reference, in turn.")
flags.DEFINE_bool("torch_reference", _default("torch_reference"), "Also time the original recipe in PyTorch (when "
                  "torch and transformers are installed).")
flags.DEFINE_integer("torch_threads", None, "PyTorch threads; default the machine's cores.")
flags.DEFINE_enum("torch_attn", None, ["eager", "sdpa"], "Attention of the PyTorch reference "
                  "(Hugging Face attn_implementation); default the installed transformers' "
                  "default. The original code ran eager attention (transformers 4.x, 2021).")
flags.DEFINE_integer("switch_steps", _default("switch_steps"), "Untimed steps each time the interleaving turns to a "
                     "case (absorbs the previous case's threads and cache).")
flags.DEFINE_bool("compile_only", False, "Compile the steps and report FLOPs and memory "
                  "(XLA's analyses) without running them: what fits where.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for utilisation; default "
                   "measured (CPU) or published (GPU/TPU).")

flags.DEFINE_string("out_dir", "benchmarks/results", "Where <name>.json/.md/.png go (created; "
                    "checked to be writable before anything is timed; files of the same "
                    "--name are replaced).")
flags.DEFINE_string("name", "benchmark", "Base name of the output files (no '/').")
flags.DEFINE_enum("plot", "auto", ["auto", "yes", "no"], "Write the tokens/s vs sequence "
                  "length plot (auto: when several sequence lengths are measured).")

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _at_least(name: str, low: int) -> None:
    value = F[name].value
    if value is not None and value < low:
        raise ValueError(f"--{name}={value}; accepted: an integer >= {low}")


def check_flags() -> None:
    """The flags that bench.BenchConfig does not see, in range (ValueError naming the flag)."""
    _at_least("cpu_devices", 1)
    if F.seq_lens:
        _at_least("batch_size", 1)
        _at_least("features", 1)
        _at_least("classes", 2)
    sweeps()
    name = F.name
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"--name={name!r}; accepted: a file name without '/' (the outputs "
                         "are <name>.json, <name>.md, <name>.png in --out_dir)")


def sweeps() -> list[int]:
    """--sweeps as integers >= 1 (ValueError naming the flag)."""
    try:
        ks = [int(v) for v in F.sweeps]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--sweeps={','.join(F.sweeps)}; accepted: integers >= 1 (the runs K "
                         "of a vmapped sweep step, e.g. 1,4,16)")
    return ks


def check_out_dir(out_dir: str, name: str) -> None:
    """--out_dir exists (created here) and takes the outputs: checked before anything is timed,
    so that no measurement is lost to an unwritable directory at the end."""
    path = cli.writable_dir(out_dir, "--out_dir")
    for ext in ("json", "md", "png"):
        if (path / f"{name}.{ext}").is_dir():
            raise ValueError(f"--out_dir={out_dir}: {path / f'{name}.{ext}'} is a directory; "
                             "choose another --name or --out_dir")


def shape_flag(shape, kind: str) -> str:
    """The flags a shape comes from, for messages (`kind`: what is wrong with it)."""
    from fpt_jax import bench
    if bench.SHAPES.get(shape.name) == shape:
        return f"--shapes={shape.name} (batch {shape.batch_size} x {shape.seq_len} tokens)"
    if kind == "positions":
        return f"--seq_lens={shape.seq_len}"
    return f"--batch_size={shape.batch_size} (of the --seq_lens shapes)"


def check_shapes(bc) -> None:
    """Every shape against the model and the devices, before anything is timed."""
    import jax
    from fpt_jax import parallel
    from fpt_jax.bench.core import ShapeError
    try:
        devices = parallel.local_devices(bc.base.num_devices)
    except ValueError as e:  # its message starts with the field: num_devices=...
        raise ValueError(f"--config.{e}" if str(e).startswith("num_devices") else str(e)
                         ) from None
    try:
        bc.check_shapes(len(devices) * jax.process_count())
    except ShapeError as e:
        more = ""
        if e.kind == "batch":
            where = ("--cpu_devices" if F.cpu_devices else "--config.num_devices"
                     if bc.base.num_devices else "this machine's devices")
            more = (f" (devices: {len(devices)} per process, from {where}; grad_accum from "
                    "--config.grad_accum)")
        raise ValueError(f"{shape_flag(e.shape, e.kind)}: {e}{more}") from None


def bench_config():
    """The `BenchConfig` the flags describe (ValueError naming the flag when one is wrong)."""
    from fpt_jax import bench
    names = [] if F.seq_lens and not F["shapes"].present else F.shapes
    unknown = [n for n in names if n not in bench.SHAPES]
    if unknown:
        raise ValueError(f"unknown --shapes entry {unknown[0]!r}; accepted: "
                         f"{sorted(bench.SHAPES)}")
    try:
        seq_lens = [int(t) for t in F.seq_lens]
    except ValueError:
        raise ValueError(f"--seq_lens={','.join(F.seq_lens)}: accepted: integers") from None
    if any(t < 1 for t in seq_lens):
        raise ValueError(f"--seq_lens={','.join(F.seq_lens)}: accepted: integers >= 1")
    shapes = [bench.SHAPES[n] for n in names] + bench.scaling_shapes(
        seq_lens, F.batch_size, F.features, F.classes)
    if not shapes:
        raise ValueError("no shape to measure: give --shapes or --seq_lens")
    bad = [v for v in F.remats or () if v.strip().lower() not in _BOOLS]
    if bad:
        raise ValueError(f"--remats={','.join(F.remats)}: {bad[0]!r} is not true/false")
    return bench.BenchConfig(
        base=F.config, shapes=shapes, modes=[*F.modes, *F.selections], dtypes=F.dtypes,
        remats=F.remats and [_BOOLS[v.strip().lower()] for v in F.remats], sweeps=sweeps(),
        baselines=F.baselines,
        steps=F.steps, warmup=F.warmup, rounds=F.rounds, switch_steps=F.switch_steps,
        torch_reference=F.torch_reference, torch_threads=F.torch_threads,
        torch_attn=F.torch_attn, peak_tflops=F.peak_tflops, compile_only=F.compile_only)


def main(argv):
    cli.begin(argv)
    from fpt_jax import bench  # importing JAX does not start its backends
    from fpt_jax.bench.suite import env_prefix
    prefix = env_prefix()  # the environment as the command was given
    try:
        check_flags()
    except ValueError as e:
        cli.fail(str(e))
    if F.cpu_devices:
        # Read when JAX creates its CPU client, which no code has done yet.
        flag = f"--xla_force_host_platform_device_count={F.cpu_devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax
    try:
        bc = bench_config()
        check_shapes(bc)  # starts JAX's backends, with the device count set above
        if jax.process_index() == 0:
            check_out_dir(F.out_dir, F.name)
        command = " ".join(filter(None, (
            prefix, "python -m experiments.benchmark",
            " ".join(shlex.quote(a) for a in sys.argv[1:]))))
        print("init: random (FLOPs and time do not depend on the weights' values)", flush=True)
        report = bench.run(bc, command=command)
    except ValueError as e:
        cli.fail(str(e))
    if jax.process_index() == 0:
        plot = {"auto": None, "yes": True, "no": False}[F.plot]
        print(bench.markdown(report), flush=True)  # first: the results survive a failed write
        try:
            paths = bench.write(report, F.out_dir, F.name, plot=plot)
        except OSError as e:
            cli.fail(f"--out_dir={F.out_dir}: cannot write the results (printed above): {e}")
        print("wrote " + ", ".join(paths.values()), flush=True)


def run() -> None:
    """The entry point: flags parsed by `cli.parse_flags` (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
