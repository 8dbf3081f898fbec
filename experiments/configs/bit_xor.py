"""Bit XOR (Lu et al. 2021): 2 random 5-bit strings, predict their XOR bit by bit.

10 tokens of 1 feature; 2 logits per bit read from the last 5 tokens. Everything not set
here is the paper's default of `TrainConfig` (pretrained gpt2, trainable 'fpt', Adam, lr
1e-3, gradient clip 1.0, dropout 0.1, orthogonal input init with gain 1.41).
Paper: FPT (pretrained gpt2, frozen) 100% test accuracy, ~5e2 steps to converge; random-init
frozen gpt2 100% in ~2e4 steps.
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="bit_xor", task_options=dict(n=5, num_patterns=2, patch_size=1),
        batch_size=4, steps=20_000,
        eval_every=500, eval_batches=25, log_every=50, checkpoint_every=1000,
    ), row)
