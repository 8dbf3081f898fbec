"""The baseline variants of every task config."""
import glob
import os
import runpy

import pytest

from fpt_jax import baselines

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                        "configs", "*.py")))


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


# Each baseline in the sweep: tests/test_reproduce.py runs every row (lstm, lstm_matched,
# fnet, scratch, ...) as a sweep cell of the smoke budget.
