"""The `paper` budget: the paper's model sizes and step counts, for GPU/TPU pods.

Every task at the settings of its experiments/configs/<task>.py (the paper's), every row at
its own size (GPT-2 `gpt2`; the LSTM 3 x 768; the "Full transformer" 3 blocks where the
paper used 3), a learning-rate grid around the paper's values and 3 seeds, selection on
validation. Tasks without their data in --data_dir are skipped and listed. Far beyond a
CPU: a frozen `gpt2` step at the CIFAR-10 shape takes ~0.5 s on a 2-core CPU, and CIFAR-10
asks for 4e5 of them per run.
"""
from ml_collections import ConfigDict

from fpt_jax.sweep import SweepConfig

TASKS = ("bit_memory", "bit_xor", "listops", "mnist", "cifar10", "cifar10_lra",
         "remote_homology")


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "paper"
    c.description = "the paper's model sizes and step counts (GPU/TPU pods)"
    c.converge_at = 0.99
    c.tasks = ConfigDict({t: dict(overrides={}, sweep=SweepConfig(
        learning_rates=(1e-4, 3e-4, 1e-3), seeds=(0, 1, 2))) for t in TASKS})
    # ListOps from the generator when the LRA files are not in --data_dir: LRA's sizes
    c.tasks.listops.generate = dict(num_train=96_000, num_val=2_000, num_test=2_000,
                                    min_length=500, max_length=2000)
    # random-init rows draw a fresh backbone per seed, as the paper's runs did
    per_seed = dict(backbone_draw="per_seed")
    c.rows = ConfigDict({"fpt": {}, "full": {}, "minilm": {}, **{
        row: dict(per_seed) for row in ("random", "scratch", "lstm", "lstm_original",
                                        "lstm_matched", "lstm_frozen", "fnet", "mixer",
                                        "minilm_random")}})
    c.ablation = ConfigDict(dict(rows=("fpt", "random"),
                                 selections=("output", "output,ln", "output,ln,input", "fpt")))
    c.attention_map = True
    return c
