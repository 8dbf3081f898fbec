"""The `beyond` budget: the successors of FPT (issue 28) on a 2-core CPU.

* Align, then refine (ORCA, Shen et al. 2023): frozen pretrained MiniLM with FPT's trainable
  groups, with (`minilm_aligned`) and without (`minilm`) the alignment stage: 300 steps of
  the input layer alone (Adam 1e-3, batch 64) against MiniLM's word embeddings of Debian's
  fortunes (15,028 documents of 43 files), by MMD. On Bit Memory, ListOps and Fashion-MNIST.
* Frozen blocks as a layer (Pang et al. 2024): a small ViT (4 layers of vit-tiny's 192
  width, 3 heads) trained from scratch on Fashion-MNIST (`vit_small`), with MiniLM's last
  block appended frozen between two trained linear maps (`vit_minilm_block`), and with a
  frozen random block of the same shape instead (`vit_random_block`, each seed its own).

Every cell: 3 seeds x 3 learning rates (3e-4, 1e-3, 3e-3), selected on validation, one rate
(two on Fashion-MNIST, where the ViTs trained from scratch select the lowest) added beyond
an edge selection; the report flags a selection still at its edge. The settings are those of the
`cpu` budget's same tasks (Bit Memory 50-bit strings in 10-bit patches, Fashion-MNIST at
28 x 28 in 7 x 7 patches validated on a 5% hold-out, hundreds of steps), so its `minilm`
cells are the same cells. ListOps is generated here at LRA's grammar but 32-128 tokens
(4,000 training, 500 validation and 500 test examples), kept whole (max_length 128), not
LRA's 500-2,000: a much easier, shorter task than the paper's.

The alignment stage needs Debian's `fortunes` (apt-get install fortunes), or another corpus
through `--budget.rows.minilm_aligned.align_corpus=DIR`.
"""
from ml_collections import ConfigDict

from fpt_jax.sweep import SweepConfig

EVAL = dict(log_every=100, checkpoint_every=250)
SEEDS = (0, 1, 2)
SMALL_VIT = dict(n_layer=4, backbone_draw="per_seed")  # vit-tiny's width and heads


def bracketed(extend_edges: int = 1) -> SweepConfig:
    """3 learning rates x 3 seeds, `extend_edges` more rates beyond an edge selection (a new
    object per task: `--budget.tasks.<task>.sweep.*` changes that task's only)."""
    return SweepConfig(learning_rates=(3e-4, 1e-3, 3e-3), seeds=SEEDS,
                       extend_edges=extend_edges)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "beyond"
    c.description = ("the successors of FPT on a 2-core CPU: frozen MiniLM with and without "
                     "ORCA's input alignment (Bit Memory, ListOps, Fashion-MNIST); a small "
                     "ViT with a frozen MiniLM block, a frozen random one, or none "
                     "(Fashion-MNIST)")
    c.converge_at = 0.99  # as the cpu budget: the same minilm cells
    c.tasks = ConfigDict({
        "bit_memory": dict(overrides=dict(task_options=dict(n=50, patch_size=10), steps=400,
                                          eval_every=100, eval_batches=8, eval_batch_size=16,
                                          **EVAL),
                           sweep=bracketed(), rows=("minilm", "minilm_aligned")),
        "listops": dict(overrides=dict(task_options=dict(max_length=128, overlength="drop",
                                                         bucket_size=32),
                                       steps=400, batch_size=8, eval_every=100,
                                       eval_batch_size=100, **EVAL),
                        generate=dict(num_train=4_000, num_val=500, num_test=500,
                                      min_length=32, max_length=128),
                        sweep=bracketed(), rows=("minilm", "minilm_aligned")),
        "fashion_mnist": dict(overrides=dict(task_options=dict(image_size=28, patch_size=7,
                                                               validation_fraction=0.05),
                                             steps=400, eval_every=200, eval_batch_size=250,
                                             **EVAL),
                              # the ViTs trained from scratch want rates below 3e-4
                              sweep=bracketed(extend_edges=2),
                              rows=("minilm", "minilm_aligned", "vit_small",
                                    "vit_minilm_block", "vit_random_block")),
    })
    c.rows = ConfigDict({
        "minilm": {}, "minilm_aligned": {}, "vit_small": dict(SMALL_VIT),
        "vit_minilm_block": dict(SMALL_VIT), "vit_random_block": dict(SMALL_VIT),
    })
    c.ablation = ConfigDict(dict(rows=(), selections=(), tasks=()))
    c.attention_map = False
    return c
