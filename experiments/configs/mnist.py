"""MNIST (Lu et al. 2021): 4x4 patches, 10 classes, pixels in [0, 1], no augmentation.

image_size=32 is the PAPER's setting: 28x28 digits resized bilinearly to 32x32 -> 64 tokens
of 16 features. The original CODE did not resize: --config.task_options.image_size=28 gives its 49 tokens.
Data (offline): python -m experiments.prepare_data --dataset=mnist --raw_dir=RAW
--data_dir=DIR (RAW holds the four IDX files), then --config.task_options.data_dir=DIR; TFDS's own
`mnist` in DIR (array_record) is read too.
Paper: FPT 98.0% test accuracy (~5e3 steps to converge); random-init frozen gpt2 91.7%
(~2e4 steps).
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="mnist", task_options=dict(patch_size=4, image_size=32),
        batch_size=16, steps=20_000,
        eval_every=1000, eval_batches=None, eval_batch_size=100, log_every=100,
        checkpoint_every=2000,
    ), row)
