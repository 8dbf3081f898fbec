"""Bad inputs and faults of `experiments.train`, table-driven: each ends in `error: ...` and
exit code 2 naming the setting or the file (and what is accepted), before the first step
where the input allows it; or in the documented recovery. No traceback.

Every case runs the real entry point in a process of its own (`tests/entry_runner.py`
forks one per case from an interpreter that has imported it once). The tools' cases
(convert, prepare_data, benchmark) are in test_bad_inputs_tools.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import jax
import pytest

from tests.entry_runner import run_all

pytestmark = pytest.mark.slow  # each case is an entry point's process

TINY = ["--config=experiments/configs/bit_xor.py", "--config.init=random",
        "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=16",
        "--config.batch_size=4", "--config.steps=4", "--config.eval_every=2",
        "--config.log_every=2", "--config.checkpoint_every=2", "--config.num_devices=1"]
LISTOPS = ["--config=experiments/configs/listops.py", "--config.init=random",
           "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=16",
           "--config.steps=2", "--config.num_devices=1", "--config.task_options.max_length=128"]
STARTED = "step 2/"  # printed after the first logged steps: the run had started training


def _listops(root: Path) -> Path:
    from fpt_jax.tasks import listops
    listops.write_listops(root, num_train=16, num_val=8, num_test=8, min_length=10,
                          max_length=100, max_depth=3, max_args=3)
    return root


def _gpt2_dir(root: Path) -> Path:
    from fpt_jax import weights
    from fpt_jax.models.gpt2 import GPT2Config, init_params
    import jax
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16)
    return weights.save_converted(root, config, init_params(config, jax.random.PRNGKey(0)))


def _cases(tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(id, arguments, substrings that stderr must hold). Arguments that start with a
    `--config=` (or `--config.`: an override before it) are the whole command line but for
    the workdir; others are added to TINY."""
    lo = _listops(tmp / "listops")
    bad_token = shutil.copytree(lo, tmp / "listops_bad_token")
    val = bad_token / "basic_val.tsv"
    rows = val.read_text().splitlines()
    rows[4] = "[POW 2 " + rows[4]  # line 5 (after the header): an operator ListOps lacks
    val.write_text("\n".join(rows) + "\n")
    no_val = shutil.copytree(lo, tmp / "listops_no_val")
    (no_val / "basic_val.tsv").unlink()
    (tmp / "a_file").write_text("not a directory")
    (tmp / "no_config_json").mkdir()
    (tmp / "no_config_json" / "model.safetensors").write_bytes(b"\0" * 64)
    old_single = shutil.copytree(Path(__file__).parent / "fixtures" / "f28d936" / "single_run",
                                 tmp / "old_single_run")
    raising = tmp / "raising_config.py"
    raising.write_text("def get_config():\n    raise RuntimeError('broken on purpose')\n")
    wrong_type = tmp / "dict_config.py"
    wrong_type.write_text("def get_config():\n    return {'task': 'bit_xor'}\n")
    return [
        # --- the config: fields, types, ranges
        ("unknown_field", ["--config.learning_rat=1"], ["--config.learning_rat: not a setting",
                                                         "--config.<field>"]),
        ("int_not_a_number", ["--config.steps=ten"], ["--config.steps=ten"]),
        ("float_not_a_number", ["--config.dropout=lots"], ["--config.dropout=lots"]),
        ("none_on_required", ["--config.batch_size=none"], ["batch_size=None"]),
        ("negative_seed", ["--config.seed=-1"], ["seed=-1; accepted: an integer >= 0"]),
        ("lr_nan", ["--config.learning_rate=nan"], ["learning_rate=nan; accepted"]),
        ("lr_negative", ["--config.learning_rate=-1"], ["learning_rate=-1.0; accepted"]),
        ("lr_zero", ["--config.learning_rate=0"], ["learning_rate=0.0; accepted"]),
        ("dropout_above_1", ["--config.dropout=1.5"], ["dropout=1.5; accepted: a number in"]),
        ("grad_clip_zero", ["--config.grad_clip=0"], ["grad_clip=0.0; accepted", "None"]),
        ("weight_decay_negative", ["--config.weight_decay=-0.1"], ["weight_decay=-0.1"]),
        ("batch_size_zero", ["--config.batch_size=0"], ["batch_size=0; accepted"]),
        ("keep_checkpoints_zero", ["--config.keep_checkpoints=0"], ["keep_checkpoints=0"]),
        ("eval_every_zero", ["--config.eval_every=0"], ["eval_every=0; accepted"]),
        ("nonfinite_skips_zero", ["--config.nonfinite_skips=0"], ["nonfinite_skips=0"]),
        ("patience_zero", ["--config.patience=0"], ["patience=0; accepted"]),
        ("converge_at_above_1", ["--config.converge_at=1.5"], ["converge_at=1.5; accepted"]),
        ("backbone_seed_negative", ["--config.backbone_seed=-2"], ["backbone_seed=-2"]),
        ("validation_fraction_1", ["--config=experiments/configs/mnist.py", *TINY[1:],
                                   "--config.task_options.validation_fraction=1.0"],
         ["validation_fraction must be in (0, 1)"]),
        ("in_layer_size_zero", ["--config.in_layer_sizes=0"], ["in_layer_sizes=(0,)"]),
        ("bool_not_a_bool", ["--config.remat=maybe"], ["--config.remat=maybe"]),
        ("unknown_task", ["--config.task=bit_parity"], ["unknown task 'bit_parity'; accepted"]),
        ("unknown_model", ["--config.model=gpt5"], ["unknown model 'gpt5'; accepted"]),
        ("unknown_init", ["--config.init=zeros"], ["init='zeros'; accepted: pretrained, random, or the workdir of a finished run"]),
        ("unknown_dtype", ["--config.dtype=float16"], ["unknown dtype 'float16'; accepted"]),
        ("unknown_schedule", ["--config.schedule=linear"], ["unknown schedule 'linear'"]),
        ("unknown_optimizer", ["--config.optimizer=sgd"], ["unknown optimizer 'sgd'"]),
        ("unknown_group", ["--config.trainable=fpt,embeddings"],
         ["unknown trainable group 'embeddings'"]),
        ("block_out_of_range", ["--config.trainable=attn[3]"],
         ["block 3 in 'attn[3]' is out of range for 1 blocks"]),
        ("selection_trains_nothing", ["--config.trainable="], ["selects nothing to train"]),
        ("option_the_task_lacks", ["--config.task_options.max_length=64"],
         ["--config.task_options.max_length: not a setting", "options of task bit_xor: n, "
          "num_patterns, patch_size"]),
        ("patch_not_dividing", ["--config.task_options.patch_size=2"], ["patch_size=2 must divide n=5"]),
        ("sizes_with_pretrained", ["--config.init=pretrained"],
         ["architecture overrides", "init='random'"]),
        ("auto_model_random", ["--config.model=auto"], ["model='auto'"]),
        # --- the config file
        ("config_file_missing", ["--config=experiments/configs/nothing.py"],
         ["--config=experiments/configs/nothing.py: no such file"]),
        ("config_file_raises", [f"--config={raising}"],
         [str(raising), "RuntimeError: broken on purpose"]),
        ("config_file_wrong_type", [f"--config={wrong_type}"], ["returned dict"]),
        ("override_before_config", ["--config.steps=3", "--config=experiments/configs/bit_xor.py"],
         ["--config.steps=3", "before a value for --config"]),
        # --- geometry and splits (before the first step)
        ("batch_not_dividing_accum", ["--config.grad_accum=3"],
         ["batch_size=4 is not divisible by devices x grad_accum"]),
        ("eval_batch_not_dividing_devices", ["--config.num_devices=4",
                                            "--config.eval_batch_size=6"],
         ["eval_batch_size=6 is not divisible by devices"]),
        ("too_many_devices", ["--config.num_devices=64"], ["num_devices=64"]),
        ("eval_split_missing", ["--config.eval_split=valid"],
         ["task bit_xor has no split 'valid'"]),
        ("eval_batches_none_generated", ["--config.eval_batches=none"],
         ["eval_batches=None: task bit_xor is generated"]),
        # --- weights
        ("weights_missing_dir", ["--config.init=pretrained", "--config.n_layer=none",
                                 "--config.n_head=none", "--config.n_embd=none",
                                 "--config.weights=/no/such/dir"],
         ["'/no/such/dir' is neither an existing directory nor a known name"]),
        ("weights_without_config_json", ["--config.init=pretrained", "--config.n_layer=none",
                                         "--config.n_head=none", "--config.n_embd=none",
                                         f"--config.weights={tmp / 'no_config_json'}"],
         [str(tmp / "no_config_json")]),
        ("weights_of_another_size", ["--config.init=pretrained", "--config.n_layer=none",
                                     "--config.n_head=none", "--config.n_embd=none",
                                     f"--config.weights={_gpt2_dir(tmp / 'w')}"],
         ["holds a GPT-2 with", "model=gpt2"]),
        # --- data files
        ("listops_without_data_dir", LISTOPS, ["data_dir is required"]),
        ("listops_empty_data_dir", [*LISTOPS, f"--config.task_options.data_dir={tmp / 'empty'}"],
         [str(tmp / "empty" / "basic_train.tsv")]),
        ("listops_bad_token_in_val", [*LISTOPS, f"--config.task_options.data_dir={bad_token}"],
         [f"{val}:5", "POW"]),  # file:line
        ("listops_missing_val_file", [*LISTOPS, f"--config.task_options.data_dir={no_val}"],
         [str(no_val / "basic_val.tsv")]),
        ("listops_bad_overlength", [*LISTOPS, f"--config.task_options.data_dir={lo}",
                                    "--config.task_options.overlength=cut"], ["overlength"]),
        ("mnist_without_prepared_data", ["--config=experiments/configs/mnist.py",
                                         *TINY[1:], f"--config.task_options.data_dir={tmp / 'empty'}"],
         ["experiments.prepare_data --dataset=mnist"]),
        ("homology_without_lmdb", ["--config=experiments/configs/remote_homology.py",
                                   *TINY[1:], f"--config.task_options.data_dir={tmp / 'empty'}"],
         [str(tmp / "empty")]),
        # --- the workdir
        ("workdir_is_a_file", [f"--workdir={tmp / 'a_file'}"], [str(tmp / "a_file")]),
        ("workdir_cannot_be_created", ["--workdir=/proc/fpt_jax_workdir"],
         ["/proc/fpt_jax_workdir"]),
        ("workdir_of_an_f28d936_single_run", [f"--workdir={old_single}"],
         [str(old_single), "f28d936", "use a new workdir"]),
        # --- init from a finished run
        ("run_without_a_workdir_init", ["--config.run=1"], ["run=1 picks a run", "init="]),
        ("run_negative", ["--config.run=-1"], ["run=-1; accepted: an integer >= 0"]),
    ]


def test_bad_train_inputs_exit_2_with_a_message_that_names_them(tmp_path):
    cases = _cases(tmp_path)
    (tmp_path / "empty").mkdir()
    argvs = []
    for name, extra, _ in cases:
        whole = extra[0].startswith("--config=") or name == "override_before_config"
        base = [] if whole else TINY
        workdir = [] if any(a.startswith("--workdir") for a in extra) else [
            f"--workdir={tmp_path / 'runs' / name}"]
        argvs.append([*base, *extra, *workdir])
    results = run_all("experiments.train", argvs, timeout=120)
    failures = []
    for (name, _, wanted), argv, r in zip(cases, argvs, results):
        problems = []
        if r["rc"] != 2:
            problems.append(f"rc {r['rc']}")
        if "Traceback" in r["stderr"]:
            problems.append("traceback")
        if not r["stderr"].lstrip().startswith("error: ") and "\nerror: " not in r["stderr"]:
            problems.append("no 'error:' line")
        problems += [f"missing {w!r}" for w in wanted if w not in r["stderr"]]
        if STARTED in r["stdout"]:
            problems.append("the run trained before the error")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n  argv: {argv}\n  stderr: "
                            f"{r['stderr'][-600:]}")
    assert len(cases) >= 50
    assert not failures, "\n".join(failures)


# --- faults: the documented recoveries --------------------------------------------------

def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


RUN = [*TINY[:-4], "--config.steps=6", "--config.eval_every=2", "--config.log_every=1",
       "--config.checkpoint_every=2", "--config.num_devices=1"]


def test_faults_are_survived_or_stop_cleanly(tmp_path):
    straight, torn, damaged, gone = (tmp_path / n for n in ("straight", "torn", "damaged",
                                                             "all_damaged"))
    (first,) = run_all("experiments.train", [[*RUN, f"--workdir={straight}"]])
    assert first["rc"] == 0, first["stderr"][-800:]
    for workdir in (torn, damaged, gone):  # the same finished run, damaged below
        shutil.copytree(straight, workdir)

    # a torn last line of metrics.jsonl (a kill during a write): dropped with a warning
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')
    # a damaged latest checkpoint: the run falls back to the one before and catches up
    shutil.rmtree(damaged / "checkpoints" / "6" / "state")
    # every checkpoint damaged: an error naming them, nothing overwritten
    for step in ("2", "4", "6"):
        (gone / "checkpoints" / step / "_CHECKPOINT_METADATA").write_text("garbage")
        shutil.rmtree(gone / "checkpoints" / step / "state")
    metrics_bad = tmp_path / "metrics_bad"
    shutil.copytree(straight, metrics_bad)
    lines = (metrics_bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = "not json"
    (metrics_bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    different = tmp_path / "different"
    shutil.copytree(straight, different)
    diverge = tmp_path / "diverge"
    skip = tmp_path / "skip"

    again = run_all("experiments.train", [
        [*RUN, "--config.steps=8", f"--workdir={straight}"],
        [*RUN, "--config.steps=8", f"--workdir={torn}"],
        [*RUN, "--config.steps=8", f"--workdir={damaged}"],
        [*RUN, "--config.steps=8", f"--workdir={gone}"],
        [*RUN, "--config.steps=8", f"--workdir={metrics_bad}"],
        [*RUN, "--config.steps=8", "--config.trainable=full", f"--workdir={different}"],
        [*RUN, "--config.learning_rate=1e30", "--config.grad_clip=none",
         "--config.steps=20", f"--workdir={diverge}"],
        [*RUN, "--config.learning_rate=1e30", "--config.grad_clip=none",
         "--config.nonfinite_skips=3", "--config.steps=20", f"--workdir={skip}"],
    ])
    ok, torn_r, damaged_r, gone_r, bad_r, different_r, diverge_r, skip_r = again
    assert ok["rc"] == torn_r["rc"] == damaged_r["rc"] == 0, [ok, torn_r, damaged_r]
    assert "torn last line" in torn_r["stderr"]
    assert _records(torn) == _records(straight)
    assert "resuming from step 4 instead" in damaged_r["stderr"]
    assert (damaged / "checkpoints" / "6.damaged").exists()
    assert _records(damaged) == _records(straight)  # from step 4: identical metrics

    for r, wanted in ((gone_r, "can be read"), (bad_r, f"{metrics_bad / 'metrics.jsonl'}:3"),
                      (different_r, "holds a checkpoint of a different run"),
                      (diverge_r, "non-finite train/"), (skip_r, "(4 in a row)")):
        assert r["rc"] == 2 and wanted in r["stderr"] and "Traceback" not in r["stderr"], r
    # the diverged runs wrote no non-finite checkpoint (the skipping one wrote finite ones)
    import numpy as np
    import orbax.checkpoint as ocp
    written = 0
    for workdir in (diverge, skip):
        for step_dir in (workdir / "checkpoints").glob("[0-9]*"):
            state = ocp.PyTreeCheckpointer().restore(step_dir / "state")
            leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
            assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f"), step_dir
            written += 1
    assert written >= 1


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_stale_lock_is_not(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "lock").write_text("pid 1 on a-dead-host since yesterday\n")  # stale: unlocked
    with open(workdir / "lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.write(f"pid {os.getpid()} on this-test\n")
        held.flush()
        busy, = run_all("experiments.train", [[*RUN, f"--workdir={workdir}"]])
    free, = run_all("experiments.train", [[*RUN, f"--workdir={workdir}"]])
    assert busy["rc"] == 2 and "is in use by another run" in busy["stderr"]
    assert f"pid {os.getpid()} on this-test" in busy["stderr"]
    assert not (workdir / "metrics.jsonl").exists() or free["rc"] == 0
    assert free["rc"] == 0, free["stderr"][-800:]
