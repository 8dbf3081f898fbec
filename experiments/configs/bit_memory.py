"""Bit Memory (Lu et al. 2021): 5 random 1000-bit strings in {-1,+1}, then one of them with
each bit zeroed with probability 1/2; predict the full query string.

Patches of 50 bits: 6 x 20 = 120 tokens of 50 features; 2 logits per bit from the last 20
tokens. Everything not set here is the paper's default of `TrainConfig`.
Paper: FPT 100% test accuracy, ~1e4 steps to converge; random-init frozen gpt2 75.8%
(~4e4 steps).
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="bit_memory", task_options=dict(n=1000, num_patterns=5, patch_size=50),
        batch_size=4, steps=50_000,
        eval_every=1000, eval_batches=25, log_every=100, checkpoint_every=2000,
    ), row)
