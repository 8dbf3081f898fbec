"""One process of a multi-process test run (launched by tests/test_multihost.py).

Runs the real entry point, `experiments.train` with its flags (multi-process flags
included), and then, with --restored_to=PATH, restores the run's latest checkpoint the way a
resumed run does and writes what this process got to PATH with `{process}` replaced by its
index: the step and every restored trainable parameter and optimizer leaf (.npz).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags

from experiments import cli
from experiments import train as train_cli  # defines the command-line flags
from fpt_jax import build
from fpt_jax.checkpoint import Checkpoints
from fpt_jax.steps import unstack

flags.DEFINE_string("restored_to", None, "Test only: write this process's restore of the latest "
                    "checkpoint here ({process} is replaced by the process index).")
F = flags.FLAGS


def _named_leaves(prefix: str, tree) -> dict[str, np.ndarray]:
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(argv):
    train_cli.main(argv)
    if not F.restored_to:
        return
    g = build.build_group(F.config)
    ckpts = Checkpoints(os.path.join(F.workdir, "checkpoints"))
    step = ckpts.latest_step()
    initial = g.states.trainable
    both, opt_state = ckpts.restore(step, {"now": initial, "best": initial},
                                    g.states.opt_state)
    ckpts.close()
    trainable, initial = unstack(both["now"], 0), unstack(initial, 0)
    # What a resumed process gets: the run's last step, the trainable tree it trains (not the
    # frozen one), trained (not the initial values), finite.
    assert step == F.config.steps, (step, F.config.steps)
    assert (jax.tree_util.tree_structure(trainable)
            == jax.tree_util.tree_structure(initial))
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(initial)))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(trainable))
    arrays = {**_named_leaves("params/", trainable), **_named_leaves("opt_state/", opt_state)}
    path = F.restored_to.format(process=jax.process_index())
    np.savez(path, step=np.int64(step), **arrays)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
