"""CIFAR-10 LRA (Lu et al. 2021): grayscale, one pixel per token -> 1024 tokens of 1 feature
(gpt2's full 1024 positions), normalised to [-1, 1]; the same training augmentation as
cifar10 (as the original code).

Data: the cifar10 dataset (python -m experiments.prepare_data --dataset=cifar10 ...), then
--config.task_options.data_dir=DIR. Long sequences: consider --config.remat=true on small accelerators.
Paper: FPT 38.6% test accuracy; random-init frozen gpt2 36.1%; ~3e5 steps to converge.
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="cifar10_lra", task_options=dict(patch_size=1, augment=True),
        batch_size=16, steps=300_000,
        eval_every=5000, eval_batches=None, eval_batch_size=100, log_every=100,
        checkpoint_every=5000,
    ), row)
