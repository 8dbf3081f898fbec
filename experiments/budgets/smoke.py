"""The `smoke` budget: every part of the report on tiny models in about a minute (CI).

Not a measurement: 1-2 block models of width 16-32 and a few steps, so that the whole
pipeline (cells, selection, tables, plots, attention map) runs end to end.
"""
from ml_collections import ConfigDict

from fpt_jax.sweep import SweepConfig

TINY = dict(n_layer=1, n_head=2, n_embd=16)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "smoke"
    c.description = ("CI-sized: tiny models and a few steps; checks the pipeline, measures "
                     "nothing")
    c.converge_at = 0.99
    c.tasks = ConfigDict({
        "bit_xor": dict(overrides=dict(task_options=dict(n=2), steps=4, eval_every=2, eval_batches=1,
                                       eval_batch_size=8, log_every=2, checkpoint_every=100),
                        sweep=SweepConfig(learning_rates=(1e-3, 3e-3), seeds=(0, 1))),
    })
    # rows: the comparisons of fpt_jax/rows.py, each with its TrainConfig overrides;
    # frozen pretrained MiniLM (22M parameters) is left to the cpu budget; the other
    # baselines (lstm_matched, fnet, mixer, ...) build and train in their own tests
    c.rows = ConfigDict({
        "fpt": {}, "full": {}, "random": dict(TINY), "scratch": dict(TINY),
        "lstm": dict(n_layer=1, n_embd=16), "minilm_random": dict(TINY),
    })
    c.ablation = ConfigDict(dict(rows=("fpt", "random"),
                                 selections=("output", "fpt")))
    c.attention_map = True
    return c
