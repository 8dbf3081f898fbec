"""CIFAR-10 (Lu et al. 2021): RGB, 4x4 patches -> 64 tokens of 48 features, 10 classes.

As the original code: per-channel normalisation (mean 0.4914/0.4822/0.4465, std
0.2023/0.1994/0.2010) and training augmentation (random crop 32 with zero padding 4,
horizontal flip, rotation up to 20 degrees); --config.task_options.augment=false turns it off.
Data (offline): python -m experiments.prepare_data --dataset=cifar10 --raw_dir=RAW
--data_dir=DIR (RAW holds cifar-10-batches-py/ or cifar-10-python.tar.gz), then
--config.task_options.data_dir=DIR.
Paper: FPT 68.2% test accuracy (gpt2-large 72.1%); random-init frozen gpt2 61.7%; ~4e5
steps to converge.
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="cifar10", task_options=dict(patch_size=4, augment=True),
        batch_size=16, steps=400_000,
        eval_every=5000, eval_batches=None, eval_batch_size=100, log_every=100,
        checkpoint_every=5000,
    ), row)
