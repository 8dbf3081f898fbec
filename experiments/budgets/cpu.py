"""The `cpu` budget: the paper's comparisons on a 2-core CPU, aimed at 90 minutes.

Not yet re-run at these settings (3 seeds, 3-point grids, one edge extension, per-seed
backbones, the LSTM and reservoir rows of issue #26): from the cell times of the 2026-11-25
run (2 seeds, 2-3 rates: 73.6 min of training) it is estimated at well over 90 minutes;
the run that commits its report trims rows or steps to fit and says so here.

What is cut, and stated in the report cell by cell: random-init GPT-2-shaped backbones are
6 blocks of width 384 (6 heads: the shape of the one language-pretrained transformer this
machine has offline, MiniLM) instead of `gpt2`'s 12 x 768; the transformer from scratch is
3 of those blocks; the paper's LSTM is 3 x 384 (its 3 x 768 trains 14M parameters per run
with Adam: memory-bound on 2 cores); the parameter-matched LSTM matches `gpt2` as FPT.
The ablation (groups added one at a time) runs on Bit XOR only. Steps
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
PER_SEED = dict(backbone_draw="per_seed")  # random backbones: one draw per seed, as the paper
SEEDS = (0, 1, 2)


def bracketed() -> SweepConfig:
    """3 learning rates x 3 seeds per cell, one more rate beyond an edge selection (a new
    object per task: `--budget.tasks.<task>.sweep.*` changes that task's only)."""
    return SweepConfig(learning_rates=(3e-4, 1e-3, 3e-3), seeds=SEEDS, extend_edges=1)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "cpu"
    c.description = ("a 2-core CPU, aimed at 90 minutes (not yet re-run at 3 seeds): 6 x 384 "
                     "random-init transformers, hundreds of steps, reduced Bit Memory, generated short ListOps, "
                     "Fashion-MNIST for MNIST")
    c.converge_at = 0.99
    c.tasks = ConfigDict({
        "bit_xor": dict(overrides=dict(steps=600, eval_every=100, eval_batches=8,
                                       eval_batch_size=32, **EVAL),
                        sweep=bracketed()),
        "bit_memory": dict(overrides=dict(task_options=dict(n=100, patch_size=10), steps=400,
                                          eval_every=100,
                                          eval_batches=8, eval_batch_size=16, **EVAL),
                           sweep=bracketed()),
        "listops": dict(overrides=dict(task_options=dict(max_length=128, bucket_size=32), batch_size=8,
                                       steps=300, eval_every=100, eval_batch_size=64, **EVAL),
                        sweep=bracketed(),
                        generate=dict(num_train=4000, num_val=500, num_test=500, max_depth=5,
                                      max_args=5, min_length=30, max_length=200)),
        "fashion_mnist": dict(overrides=dict(task_options=dict(image_size=28, patch_size=7), steps=400,
                                             eval_every=100, eval_batch_size=250, **EVAL),
                              sweep=bracketed()),
        "mnist": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-3,), seeds=SEEDS)),
        "cifar10": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-3,), seeds=SEEDS)),
        "cifar10_lra": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-3,), seeds=SEEDS)),
        "remote_homology": dict(overrides={}, sweep=SweepConfig(learning_rates=(1e-4,), seeds=SEEDS)),
    })
    c.rows = ConfigDict({
        "fpt": {}, "full": {}, "random": dict(SMALL, **PER_SEED),
        "scratch": dict(SMALL, n_layer=3, **PER_SEED), "lstm": dict(n_embd=384, **PER_SEED),
        "lstm_original": dict(n_embd=384, **PER_SEED),
        "lstm_frozen": dict(n_embd=384, **PER_SEED), "lstm_matched": dict(PER_SEED),
        "fnet": dict(n_layer=6, n_embd=384, **PER_SEED),
        "mixer": dict(n_layer=6, n_embd=384, **PER_SEED), "minilm": {},
        "minilm_random": dict(PER_SEED),
    })
    c.ablation = ConfigDict(dict(rows=("fpt", "minilm", "random"),
                                 selections=("output", "output,ln", "output,ln,input", "fpt"),
                                 tasks=("bit_xor",)))
    c.attention_map = True
    return c
