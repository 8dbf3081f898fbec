"""The comparison rows (fpt_jax/rows.py) on every task config: one definition each."""
import glob
import os
import runpy

import pytest

from fpt_jax import baselines, paper, reproduce, rows

def _config(task: str):
    return reproduce.load_task_config(task)


CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                        "configs", "*.py")))


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_task_config_offers_every_row(path):
    get_config = runpy.run_path(path)["get_config"]
    fpt = get_config()
    found = {name: get_config(name) for name in rows.ROWS}
    assert found["fpt"] == fpt and fpt.init == "pretrained" and fpt.trainable == "fpt"
    assert (found["random"].init, found["random"].trainable) == ("random", "fpt")
    assert (found["full"].init, found["full"].trainable) == ("pretrained", "full")
    assert (found["scratch"].init, found["scratch"].trainable) == ("random", "full")
    # the paper's 3-block "Full transformer" where it used one, the preset's blocks elsewhere
    three = os.path.basename(path) in ("cifar10.py", "cifar10_lra.py", "listops.py")
    assert found["scratch"].n_layer == (3 if three else None)
    for name in ("lstm", "lstm_matched"):
        assert (found[name].model, found[name].init, found[name].trainable,
                found[name].learning_rate) == ("lstm", "random", "full", 3e-4)
    task = fpt.make_task() if "data_dir" not in fpt.task_options else None
    if task is not None:  # the matched width is the one baselines.match computes
        assert found["lstm_matched"].n_embd == baselines.match(found["lstm"], task,
                                                               "gpt2").width
    assert (found["fnet"].model, found["fnet"].init, found["fnet"].trainable) == (
        "fnet", "random", "fpt")
    for row in found.values():  # the task and its budget are the task config's
        assert (row.task, row.steps, row.batch_size) == (fpt.task, fpt.steps, fpt.batch_size)
        assert row.task_options == fpt.task_options
    with pytest.raises(ValueError, match="unknown row 'lsmt'"):
        get_config("lsmt")


def test_rows_name_published_rows_that_exist():
    for row in rows.ROWS.values():
        assert row.paper_row is None or row.paper_row in {**paper.MAIN, **paper.QUOTED}, row.name
        assert row.rothermel_row is None or row.rothermel_row in paper.ROTHERMEL, row.name
        assert row.label and row.name in rows.ROWS


def test_reproduce_and_task_configs_share_the_rows_per_task_settings(tmp_path):
    # issue 26: the report's "paper's setting" of the transformer from scratch on ListOps is
    # the paper's 3 blocks, as the task config's :scratch row says (one definition)
    paper_cfg = reproduce.load_task_config("listops")
    reference = reproduce.row_config(paper_cfg, "scratch", {}, lambda cfg: None)
    assert reference.n_layer == 3 == reproduce.load_task_config("listops", "scratch").n_layer
    # a budget's override of a per-task change wins (the cpu budget's 3 x 384)
    assert rows.apply(paper_cfg, "scratch", {"n_layer": 2, "n_embd": 64}).n_layer == 2


@pytest.mark.slow
def test_a_budget_override_of_n_embd_wins_over_the_matched_width():
    cfg = reproduce.load_task_config("bit_xor")
    matched = rows.apply(cfg, "lstm_matched")
    assert matched.n_embd > 100  # gpt2's FPT count on bit_xor needs a wide LSTM
    assert rows.apply(cfg, "lstm_matched", {"n_embd": 16}).n_embd == 16
    smaller = rows.apply(cfg, "lstm_matched", {"n_layer": 1})
    assert smaller.n_embd > matched.n_embd  # one layer: wider for the same count


# Each baseline in the sweep: tests/test_reproduce.py runs every row (lstm, lstm_matched,
# fnet, scratch, ...) as a sweep cell of the smoke budget.


def test_the_effective_count_reads_only_the_position_rows_the_task_uses():
    cfg = rows.apply(_config("bit_xor"), "lstm_matched_effective")
    m = rows.get("lstm_matched_effective").matched(cfg)
    d, blocks = 768, 12
    # input (1 feature -> d), the 10 positions Bit XOR reads, 2 layer norms per block and the
    # final one (scale and bias), output (d -> 2 logits)
    assert m.kind == "effective"
    assert m.target == (d + d) + 10 * d + (2 * blocks + 1) * 2 * d + (2 * d + 2) == 49_154
    assert abs(m.difference) < 0.05 and cfg.n_embd == m.width  # width 44: a 4.5% step


def test_a_frozen_lstm_trains_its_input_layer_norms_and_output_and_can_match_gpt2s_frozen_part():
    from fpt_jax import build
    cfg = rows.apply(_config("bit_xor"), "lstm_frozen")
    task = cfg.make_task()
    config = build.backbone(cfg, task)[0]
    # 3 x 768: input 1,536 + 3 layers' norms (LN_x, LN_h: 4H each; LN_c: H; scale and bias)
    # + output 1,538: the original code's default trainable set
    assert baselines.count(cfg, task, config, cfg.trainable) == 44_546
    matched = rows.apply(_config("bit_xor"), "lstm_frozen_matched")
    m = rows.get("lstm_frozen_matched").matched(matched)
    attn, mlp = 768 * 2304 + 2304 + 768 * 768 + 768, 2 * 768 * 3072 + 3072 + 768
    assert m.target == 12 * (attn + mlp) == 85_017_600  # GPT-2's frozen attention and MLPs
    assert abs(m.difference) < 0.001 and matched.n_embd == m.width
    assert matched.trainable == cfg.trainable == baselines.FROZEN_LSTM_TRAINABLE
