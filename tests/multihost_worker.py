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

from experiments import train as cli  # defines the command-line flags
from fpt_jax import train
from fpt_jax.checkpoint import Checkpoints, _flat

flags.DEFINE_string("restored_to", None, "Test only: write this process's restore of the latest "
                    "checkpoint here ({process} is replaced by the process index).")
F = flags.FLAGS


def main(argv):
    cli.main(argv)
    if not F.restored_to:
        return
    s = train.setup(cli.config_from_flags())
    ckpts = Checkpoints(os.path.join(F.workdir, "checkpoints"))
    step = ckpts.latest_step()
    params, opt_state = ckpts.restore(step, s.state.params, s.state.opt_state,
                                      s.trainable_mask)[:2]
    ckpts.close()
    mask = _flat(s.trainable_mask)
    arrays = {f"params/{k}": np.asarray(v) for k, v in _flat(params).items() if mask[k]}
    arrays.update({f"opt_state/{k}": np.asarray(v) for k, v in _flat(opt_state).items()})
    path = F.restored_to.format(process=jax.process_index())
    np.savez(path, step=np.int64(step), **arrays)


if __name__ == "__main__":
    app.run(main)
