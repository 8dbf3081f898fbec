"""The baseline variants of every task config, and each baseline in the sweep."""
import glob
import os
import runpy

import numpy as np
import pytest

from fpt_jax import baselines, sweep
from fpt_jax.config import TrainConfig

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                        "configs", "*.py")))
TINY = dict(task="bit_xor", n=2, num_patterns=2, patch_size=1, batch_size=4, steps=2,
            eval_every=2, eval_batches=1, log_every=1, checkpoint_every=1000, n_layer=1,
            n_embd=16)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_task_config_offers_every_baseline(path):
    get_config = runpy.run_path(path)["get_config"]
    fpt = get_config()
    rows = {v: get_config(v) for v in baselines.VARIANTS}
    assert rows["fpt"] == fpt and fpt.init == "pretrained" and fpt.trainable == "fpt"
    assert (rows["random"].init, rows["random"].trainable) == ("random", "fpt")
    assert (rows["full"].init, rows["full"].trainable) == ("pretrained", "full")
    assert (rows["scratch"].init, rows["scratch"].trainable) == ("random", "full")
    # the paper's 3-block "Full transformer" where it used one, the preset's blocks elsewhere
    three = os.path.basename(path) in ("cifar10.py", "cifar10_lra.py", "listops.py")
    assert rows["scratch"].n_layer == (3 if three else None)
    for name in ("lstm", "lstm_matched"):
        assert (rows[name].model, rows[name].init, rows[name].trainable,
                rows[name].learning_rate) == ("lstm", "random", "full", 3e-4)
    assert rows["lstm_matched"].match_model == fpt.model
    assert (rows["fnet"].model, rows["fnet"].init, rows["fnet"].trainable) == (
        "fnet", "random", "fpt")
    for row in rows.values():  # the task and its budget are the task config's
        assert (row.task, row.steps, row.batch_size) == (fpt.task, fpt.steps, fpt.batch_size)
    with pytest.raises(ValueError, match="unknown baseline variant 'lsmt'"):
        get_config("lsmt")


@pytest.mark.parametrize("variant,extra", [
    ("lstm", {}), ("fnet", {}), ("scratch", {"n_head": 2}),
])
def test_each_baseline_runs_in_the_sweep(tmp_path, variant, extra):
    cfg = baselines.variant(TrainConfig(**TINY, **extra), variant)
    runs = sweep.train_and_evaluate_sweep(cfg, str(tmp_path), [1e-3, 3e-3], [0, 1])
    assert len(runs) == 2
    assert all(np.isfinite(r["best_val_accuracy"]) for r in runs)
    assert runs[0]["learning_rate"] == 1e-3 and runs[1]["learning_rate"] == 3e-3
