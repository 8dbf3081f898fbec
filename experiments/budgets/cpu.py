"""The `cpu` budget: the paper's comparisons on a 2-core CPU in at most 90 minutes.

What is cut, and stated in the report cell by cell: random-init GPT-2-shaped backbones are
6 blocks of width 384 (6 heads: the shape of the one language-pretrained transformer this
machine has offline, MiniLM) instead of `gpt2`'s 12 x 768; the transformer from scratch is
3 of those blocks; the paper's LSTM is 3 x 384 (its 3 x 768 trains 14M parameters per run
with Adam: memory-bound on 2 cores); the parameter-matched LSTM matches `gpt2` as FPT.
The ablation (groups added one at a time) runs on Bit XOR and Fashion-MNIST only. Steps
are hundreds, not the paper's 1e4-4e5; Bit Memory has 100-bit strings in 10-bit patches (60 tokens; the paper 1000 bits,
120 tokens); ListOps is generated, short (30-200 characters, depth <= 5); Fashion-MNIST
(Debian's dataset-fashion-mnist, prepared with experiments.prepare_data) stands in for
MNIST, at 28 x 28 in 7 x 7 patches (16 tokens). Tasks whose data is not in --data_dir
(MNIST, CIFAR-10, CIFAR-10 LRA, homology) are skipped and listed.
"""
from ml_collections import ConfigDict

from fpt_jax.sweep import SweepConfig

SMALL = dict(n_layer=6, n_head=6, n_embd=384)
EVAL = dict(log_every=100, checkpoint_every=250)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "cpu"
    c.description = ("a 2-core CPU in at most 90 minutes: 6 x 384 random-init transformers, "
                     "hundreds of steps, reduced Bit Memory, generated short ListOps, "
                     "Fashion-MNIST for MNIST")
    c.converge_at = 0.99
    c.tasks = ConfigDict({
        "bit_xor": dict(overrides=dict(steps=600, eval_every=100, eval_batches=8,
                                       eval_batch_size=32, **EVAL),
                        sweep=SweepConfig(learning_rates=(3e-4, 1e-3, 3e-3), seeds=(0, 1))),
        "bit_memory": dict(overrides=dict(task_options=dict(n=100, patch_size=10), steps=400,
                                          eval_every=100,
                                          eval_batches=8, eval_batch_size=16, **EVAL),
                           sweep=SweepConfig(learning_rates=(3e-4, 1e-3), seeds=(0, 1))),
        "listops": dict(overrides=dict(task_options=dict(max_length=128, bucket_size=32), batch_size=8,
                                       steps=300, eval_every=100, eval_batch_size=64, **EVAL),
                        sweep=SweepConfig(learning_rates=(3e-4, 1e-3), seeds=(0, 1)),
                        generate=dict(num_train=4000, num_val=500, num_test=500, max_depth=5,
                                      max_args=5, min_length=30, max_length=200)),
        "fashion_mnist": dict(overrides=dict(task_options=dict(image_size=28, patch_size=7), steps=400,
                                             eval_every=100, eval_batch_size=250, **EVAL),
                              sweep=SweepConfig(learning_rates=(3e-4, 1e-3), seeds=(0, 1))),
        "mnist": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-3,), seeds=(0,))),
        "cifar10": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-3,), seeds=(0,))),
        "cifar10_lra": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-3,), seeds=(0,))),
        "remote_homology": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-4,), seeds=(0,))),
    })
    c.rows = ConfigDict({
        "fpt": {}, "full": {}, "random": dict(SMALL), "scratch": dict(SMALL, n_layer=3),
        "lstm": dict(n_embd=384), "lstm_matched": {}, "fnet": dict(n_layer=6, n_embd=384),
        "fnet_orthonormal": dict(n_layer=6, n_embd=384), "minilm": {},
        "minilm_random": {},
    })
    c.ablation = ConfigDict(dict(rows=("fpt", "minilm", "random"),
                                 selections=("output", "output,ln", "output,ln,input", "fpt"),
                                 tasks=("bit_xor", "fashion_mnist")))
    c.attention_map = True
    return c
