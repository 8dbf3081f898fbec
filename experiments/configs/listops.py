"""ListOps (LRA "basic"): token ids (16: pad, digits, [MIN [MAX [MED [SM, and ']'), 10
classes, evaluated on the validation file as the original code. Unlike the original,
closing brackets are kept and nothing is cut at 512 tokens.

LRA's examples have 501-1999 tokens, but gpt2 has 1024 positions, so this config sets
max_length=1024 with overlength='drop': examples longer than 1024 tokens are LEFT OUT of
every split (about half of LRA-distributed data; the kept fraction is logged per split) and
accuracies are on the kept, shorter half -- not comparable to LRA's numbers. Alternatives:
overlength='truncate' keeps the first 1024 tokens (the original's approach, at 512); a model
with >= 2048 positions can use max_length=2048 (the task default) and keep everything.
bucket_size=128 pads each batch to a multiple of 128 instead of 1024 (fewer wasted
positions; one compilation per distinct length).
Data: the LRA TSVs (basic_train/val/test.tsv) in DIR, or generate them offline with
  python -m experiments.prepare_data --dataset=listops --data_dir=DIR
then --config.task_options.data_dir=DIR.
Paper (truncated at 512, brackets dropped): FPT 38.4% test accuracy, random-init frozen
34.3%, ~2e3 steps to converge; Rothermel et al. (lr swept): 46.1% / 38.9%.
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="listops", task_options=dict(max_length=1024, overlength="drop", bucket_size=128),
        batch_size=4, steps=20_000,
        eval_every=1000, eval_batches=None, eval_batch_size=32, log_every=100,
        checkpoint_every=2000,
    ), row)
