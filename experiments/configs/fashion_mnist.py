"""Fashion-MNIST (not in the paper): MNIST's format, settings and defaults.

image_size=32 as for MNIST (64 tokens of 16 features); --config.task_options.image_size=28 gives 49.
Real offline data: apt-get install dataset-fashion-mnist, then
  python -m experiments.prepare_data --dataset=fashion_mnist \
      --raw_dir=/usr/share/datasets/fashion-mnist --data_dir=DIR
and --config.task_options.data_dir=DIR.
Paper: no number (MNIST: FPT 98.0%). Measured here on a CPU: a random-init frozen 4-layer
width-128 GPT-2 reached 79% test accuracy after 3,000 steps of batch 32 at lr 3e-3.
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="fashion_mnist", task_options=dict(patch_size=4, image_size=32),
        batch_size=16, steps=20_000,
        eval_every=1000, eval_batches=None, eval_batch_size=100, log_every=100,
        checkpoint_every=2000,
    ), row)
