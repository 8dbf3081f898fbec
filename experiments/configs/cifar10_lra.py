"""CIFAR-10 LRA (Lu et al. 2021): grayscale, one pixel per token -> 1024 tokens of 1 feature
(gpt2's full 1024 positions), normalised to [-1, 1]; the same training augmentation as
cifar10 (as the original code).

Data: the cifar10 dataset (python -m experiments.prepare_data --dataset=cifar10 ...), then
--config.data_dir=DIR. Long sequences: consider --config.remat=true on small accelerators.
Paper: FPT 38.6% test accuracy; random-init frozen gpt2 36.1%; ~3e5 steps to converge.
"""
from fpt_jax import baselines
from fpt_jax.config import TrainConfig


def get_config(variant: str = "fpt") -> TrainConfig:
    """`variant`: a baseline of fpt_jax/baselines.py (`--config=<this file>:lstm`)."""
    return baselines.variant(TrainConfig(
        task="cifar10_lra", patch_size=1, augment=True,
        batch_size=16, steps=300_000,
        eval_every=5000, eval_batches=None, eval_batch_size=100, log_every=100,
        checkpoint_every=5000,
    ), variant, scratch_layers=3)
