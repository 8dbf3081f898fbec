r"""A sweep: a grid over config settings x learning rates x seeds, selected on validation.

  # Bit XOR on a small frozen random GPT-2: 3 trainable selections x 4 lrs x 3 seeds
  python -m experiments.sweep --config=experiments/configs/bit_xor.py \
      --config.init=random --config.n_layer=2 --config.n_head=4 --config.n_embd=128 \
      --sweep.grid='trainable=output|output,ln|fpt' \
      --sweep.learning_rates=1e-4,1e-3,1e-2,1e-1 --sweep.seeds=0,1,2 --workdir=/tmp/fpt_sweep

`--config` (with `--config.<field>` overrides) is the base config of every cell, as for
experiments/train.py; its `learning_rate` and `seed` are not used. `--sweep` is a
`fpt_jax.sweep.SweepConfig`: `--sweep.learning_rates`, `--sweep.seeds`, `--sweep.grid`
(axes '<setting>=<v1>|<v2>; ...' over config fields and `task_options.<option>`; `--helpfull`
lists them) and `--sweep.extend_edges=N` (a cell whose selected learning rate is the top or
bottom of its grid gets up to N more beyond it, in WORKDIR/cells/<name>/extend_<lr>/; a
selection left at an edge is logged as a warning and marked in results.md). Every cell trains its learning rates x seeds as one group
(`fpt_jax.loop.train_and_evaluate`) in WORKDIR/cells/<name>/; cells run one after another.
`--process_cells=i/n` runs only every n-th cell from cell i (one process per share; then
`--results_only` once all are done). With the multi-process flags (docs/multihost.md) every
process trains every cell together, data-parallel over all their devices.

Running the same command again skips finished cells and resumes an interrupted one. After
each cell and at the end, WORKDIR/results.csv, results.md, curves.png and lr.png are written.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads
    from experiments import prologue
    prologue.start()

import jax
from absl import app, flags

from experiments import cli
from fpt_jax import loop, results, sweep
from fpt_jax.weights import WeightsError

F = flags.FLAGS

flags.DEFINE_string("workdir", None, "Where the sweep goes: cells/<name>/ per grid cell, "
                    "results.csv, results.md, curves.png, lr.png.", required=True)
flags.DEFINE_string("process_cells", None, "i/n: run only the cells whose index is i modulo "
                    "n (0 <= i < n), to share a grid among n processes. Default: all cells.")
flags.DEFINE_bool("results_only", False, "Train nothing: write results.csv, results.md and "
                  "the plots from the finished cells in --workdir.")
cli.define_distributed_flags()


def main(argv):
    cli.begin(argv)
    try:
        cli.initialize_distributed()
        process_cells = sweep.parse_process_cells(F.process_cells)
        cells = sweep.make_cells(F.config, F.sweep.grid)
        workdir = cli.writable_dir(F.workdir, "--workdir")
        if not F.results_only:
            sweep.run_sweep(cells, workdir, F.sweep.learning_rates, F.sweep.seeds,
                            process_cells, extend_edges=F.sweep.extend_edges)
        if jax.process_index() != 0:
            return  # process 0 writes and prints the results
        paths = results.write_results(workdir)
    except loop.Preempted as e:
        cli.stopped(e)
    except (ValueError, WeightsError, OSError) as e:
        cli.fail(str(e))  # bad settings, a cell that cannot train, bad files: named
    print(paths["md"].read_text(), end="", flush=True)
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)


def run() -> None:
    """The entry point: settings parsed and checked first (bad ones: `error: ...`, rc 2)."""
    app.run(main, flags_parser=cli.settings_parser(
        ("sweep", sweep.SweepConfig(), "What the sweep trains around --config: learning "
         "rates, seeds and a grid (fpt_jax.sweep.SweepConfig).")))


if __name__ == "__main__":
    run()
