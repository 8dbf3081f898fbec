"""Remote homology (TAPE): amino-acid token ids (TAPE's 30-token IUPAC vocabulary incl.
<pad> = 0, <cls>, <sep>), 1,195 fold classes, evaluated on TAPE's 'valid' split as the
original code (other splits: test_fold_holdout (= test), test_superfamily_holdout,
test_family_holdout).

Sequences longer than max_length=1024 tokens (incl. <cls>/<sep>; gpt2's positions) are
dropped from each split, as the original did (paper: 97.39% kept, reported accuracies
multiplied by 0.9739); the kept fraction is logged per split. bucket_size=128 pads each
batch to a multiple of 128 instead of 1024 (one compilation per distinct length).
Data: TAPE's remote_homology LMDB files: --config.task_options.data_dir=DIR where
DIR/remote_homology/remote_homology_{train,valid,test_*}.lmdb exist.
Paper: FPT 12.7% test accuracy (random-init frozen gpt2 9.3%) at lr 1e-4, ~1e5 steps.
"""
from fpt_jax import rows
from fpt_jax.config import TrainConfig


def get_config(row: str = "fpt") -> TrainConfig:
    """`row`: a comparison of fpt_jax/rows.py (`--config=<this file>:lstm`)."""
    return rows.apply(TrainConfig(
        task="remote_homology", task_options=dict(max_length=1024, bucket_size=128),
        learning_rate=1e-4,  # the paper's learning rate for homology
        batch_size=4, steps=100_000,
        eval_every=5000, eval_batches=None, eval_batch_size=32, log_every=100,
        checkpoint_every=5000,
    ), row)
