"""Bad inputs and faults of the tools, table-driven: `experiments.convert`,
`experiments.prepare_data`, `experiments.benchmark`, and the data files that training reads
through this project's readers (TAPE's LMDB, prepared array_record datasets). Each case ends
in `error: ...` and exit code 2 with a message naming the flag or the file, no traceback;
the benchmark's before anything is timed, training's before the first step.

Every case runs the real entry point in a process of its own (`tests/entry_runner.py` forks
one per case from an interpreter that has imported it once): one `run_all` per entry point.
The training settings' own cases are in test_bad_inputs.py.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.entry_runner import run_all
from tests.test_homology import make_records, write_lmdb
from tests.test_prepare_data import write_cifar_raw, write_mnist_raw

pytestmark = pytest.mark.slow  # each case is an entry point's process

# (id, arguments, substrings that stderr must hold, optional check of the case's aftermath)
Case = tuple[str, list[str], list[str], Callable[[], str | None] | None]

STARTED = "step 2/"  # training printed its first logged steps


def _problems(case: Case, result: dict, not_in_stdout: str | None) -> list[str]:
    name, _, wanted, check = case
    problems = []
    if result["rc"] != 2:
        problems.append(f"rc {result['rc']}")
    if "Traceback" in result["stderr"]:
        problems.append("traceback")
    if not result["stderr"].lstrip().startswith("error: ") and \
            "\nerror: " not in result["stderr"]:
        problems.append("no 'error:' line")
    problems += [f"missing {w!r}" for w in wanted if w not in result["stderr"]]
    if not_in_stdout and not_in_stdout in result["stdout"]:
        problems.append(f"got as far as {not_in_stdout!r}")
    if check and (why := check()):
        problems.append(why)
    return problems


def _run_table(module: str, cases: list[Case], base: list[str] = (),
               not_in_stdout: str | None = None, good: list[list[str]] = ()) -> list[dict]:
    """Runs the cases (and, in the same call, the `good` command lines, whose results it
    returns) and asserts each case's outcome."""
    argvs = [[*base, *args] for _, args, _, _ in cases]
    results = run_all(module, [*argvs, *good], timeout=120)
    results, good_results = results[:len(argvs)], results[len(argvs):]
    failures = []
    for case, argv, result in zip(cases, argvs, results):
        problems = _problems(case, result, not_in_stdout)
        if problems:
            failures.append(f"{case[0]}: {', '.join(problems)}\n  argv: {argv}\n  stderr: "
                            f"{result['stderr'][-700:]}")
    ids = [c[0] for c in cases]
    assert len(set(ids)) == len(ids), "case ids must be distinct"
    assert not failures, "\n".join(failures)
    return good_results


# --- convert ------------------------------------------------------------------------------

def _hf_gpt2(root: Path, **config) -> Path:
    """A random-weight Hugging Face GPT-2 directory (config.json + model.safetensors) and,
    beside it, its state dict as the hub's pytorch_model.bin."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=8, **config))
    model.save_pretrained(root)
    torch.save(model.state_dict(), root.parent / f"{root.name}.bin")
    return root


def _variant(good: Path, dest: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(good, dest)
    change(dest)
    return dest


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def _with_bin(good: Path, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(change((good.parent / f"{good.name}.bin")
                                                     .read_bytes()))
    return apply


def _edit_config(**fields) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(fields)
        (d / "config.json").write_text(json.dumps(config))
    return apply


def _converted(root: Path, n_positions: int = 32) -> Path:
    """A checkpoint as experiments.convert writes it, of the tiny model."""
    import jax
    from fpt_jax import weights
    from fpt_jax.models.gpt2 import GPT2Config, init_params
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=n_positions, vocab_size=8)
    return weights.save_converted(root, config, init_params(config, jax.random.PRNGKey(0)))


def _garble_largest(directory: Path) -> None:
    """Overwrites the largest file under `directory` (the arrays' data) with noise."""
    file = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    file.write_bytes(np.random.default_rng(0).bytes(file.stat().st_size))


def _no_leftovers(parent: Path, name: str) -> Callable[[], str | None]:
    """After a failed conversion: --output not created and no staging directory left."""
    def check() -> str | None:
        left = [p.name for p in parent.iterdir() if p.name == name or ".converting-" in p.name]
        return f"left behind {left}" if left else None
    return check


def _convert_cases(tmp: Path) -> list[Case]:
    good = _hf_gpt2(tmp / "gpt2")
    out = tmp / "out"
    out.mkdir()

    def v(name, change):
        return _variant(good, tmp / name, change)

    conv = _converted(tmp / "converted")
    damaged_conv = shutil.copytree(conv, tmp / "converted_damaged")
    _garble_largest(damaged_conv / "params")
    no_params = shutil.copytree(conv, tmp / "converted_no_params")
    shutil.rmtree(no_params / "params")
    (tmp / "a_file").write_text("not a directory")
    others = tmp / "others"
    others.mkdir()
    (others / "notes.txt").write_text("mine")
    earlier = _converted(tmp / "earlier", n_positions=24)  # 24: not the source's 32
    shutil.copytree(earlier, tmp / "earlier_to_replace")
    wide = v("wide_config", _edit_config(n_embd=32))
    bad_json = v("bad_json", lambda d: (d / "config.json").write_text('{"model_type": "gpt2",'))
    bert = v("bert", _edit_config(model_type="bert"))  # a BERT config.json over GPT-2 weights
    t5 = v("t5", _edit_config(model_type="t5"))
    str_size = v("str_size", _edit_config(n_layer="1"))
    st_trunc = v("st_truncated", lambda d: _truncate(d / "model.safetensors"))
    st_noise = v("st_noise", lambda d: (d / "model.safetensors").write_bytes(
        np.random.default_rng(1).bytes(4000)))
    st_empty = v("st_empty", lambda d: (d / "model.safetensors").write_bytes(b""))
    bin_trunc = v("bin_truncated", _with_bin(good, lambda b: b[:len(b) // 2]))
    bin_noise = v("bin_noise", _with_bin(good, lambda b: np.random.default_rng(2).bytes(3000)))
    msgpack = v("msgpack_noise", lambda d: ((d / "model.safetensors").unlink(), (
        d / "flax_model.msgpack").write_bytes(np.random.default_rng(3).bytes(3000))))
    no_config = v("no_config", lambda d: (d / "config.json").unlink())

    def to(name: str) -> str:
        return f"--output={out / name}"

    def src(path: Path, name: str, wanted: list[str]) -> Case:
        return (name, [f"--source={path}", to(name)], ["--source", *wanted],
                _no_leftovers(out, name))

    return [
        ("convert_no_source_flag", [to("x")], ["--source"], None),
        ("convert_no_output_flag", [f"--source={good}"], ["--output"], None),
        ("convert_unknown_flag", [f"--source={good}", to("y"), "--outptu=z"], ["outptu"], None),
        ("convert_positional_argument", [f"--source={good}", to("z"), "gpt2"], ["'gpt2'"],
         None),
        src(tmp / "nothing_here", "convert_source_missing", [str(tmp / "nothing_here")]),
        src(tmp / "a_file", "convert_source_is_a_file", [f"{tmp / 'a_file'} is a file"]),
        src(no_config, "convert_no_config_json", [f"{no_config} has no config.json"]),
        src(bert, "convert_weights_of_another_family", [
            f"{bert}/model.safetensors", "unexpected keys not in a bert", "h.0.attn.c_attn"]),
        src(t5, "convert_unknown_family", [f"{t5}/config.json", "model_type='t5'",
                                              "accepted: gpt2, bert, vit, llama, mistral, qwen2"]),
        src(bad_json, "convert_config_json_garbled", [f"{bad_json}/config.json:1"]),
        src(str_size, "convert_config_size_not_int", [f"{str_size}/config.json",
                                                      "n_layer='1'"]),
        src(wide, "convert_config_does_not_fit_weights", [str(wide), "has shape"]),
        src(st_trunc, "convert_safetensors_truncated",
            [f"{st_trunc}/model.safetensors", "truncated"]),
        src(st_noise, "convert_safetensors_garbled", [f"{st_noise}/model.safetensors"]),
        src(st_empty, "convert_safetensors_empty", [f"{st_empty}/model.safetensors"]),
        src(bin_trunc, "convert_bin_truncated", [f"{bin_trunc}/pytorch_model.bin"]),
        src(bin_noise, "convert_bin_garbled", [f"{bin_noise}/pytorch_model.bin"]),
        src(msgpack, "convert_msgpack_garbled", [f"{msgpack}/flax_model.msgpack"]),
        src(damaged_conv, "convert_converted_checkpoint_damaged",
            [f"{damaged_conv}/params", "convert the model again"]),
        src(no_params, "convert_converted_without_params", [str(no_params), "params/"]),
        ("convert_output_is_a_file", [f"--source={good}", f"--output={tmp / 'a_file'}"],
         [f"--output={tmp / 'a_file'} is a file"], None),
        ("convert_output_parent_is_a_file", [f"--source={good}",
                                             f"--output={tmp / 'a_file' / 'sub'}"],
         [f"--output={tmp / 'a_file' / 'sub'}", f"{tmp / 'a_file'} is a file"], None),
        ("convert_output_cannot_be_created", [f"--source={good}",
                                              "--output=/proc/fpt_jax_convert_out"],
         ["--output=/proc/fpt_jax_convert_out"], None),
        ("convert_output_holds_other_files", [f"--source={good}", f"--output={others}"],
         [f"--output={others} is not empty", "notes.txt"],
         lambda: None if sorted(p.name for p in others.iterdir()) == ["notes.txt"]
         else "the directory was changed"),
        ("convert_output_holds_earlier_conversion", [f"--source={good}",
                                                     f"--output={earlier}"],
         [f"--output={earlier} already holds a converted checkpoint", "--overwrite"], None),
        ("convert_overwrite_from_a_damaged_source", [f"--source={st_trunc}",
                                                     f"--output={earlier}", "--overwrite"],
         [f"{st_trunc}/model.safetensors"], _still_loads(earlier)),
    ]


def _still_loads(converted: Path) -> Callable[[], str | None]:
    """The earlier conversion (n_positions=24) survived a failed --overwrite, unchanged."""
    def check() -> str | None:
        from fpt_jax import weights
        try:
            config, _ = weights.load_gpt2(converted)
        except weights.WeightsError as e:
            return f"the earlier conversion was damaged: {e}"
        return None if config.n_positions == 24 else "the earlier conversion was replaced"
    return check


def test_convert_bad_inputs_and_overwrite(tmp_path):
    pytest.importorskip("transformers")
    cases = _convert_cases(tmp_path)
    earlier = tmp_path / "earlier_to_replace"
    replaced, = _run_table("experiments.convert", cases, good=[
        [f"--source={tmp_path / 'gpt2'}", f"--output={earlier}", "--overwrite"]])
    assert replaced["rc"] == 0, replaced["stderr"][-2000:]
    from fpt_jax import weights
    config, _ = weights.load_gpt2(earlier)  # now the Hugging Face model's conversion
    assert config.n_positions == 32 and (earlier / weights.CONVERTED_MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if ".converting-" in p.name or
                ".replaced-" in p.name]


# --- prepare_data -------------------------------------------------------------------------

def _prepare_cases(tmp: Path) -> list[Case]:
    from fpt_jax.tasks import tfds_builders
    mnist = tmp / "mnist_raw"
    write_mnist_raw(mnist, n_train=8, n_test=4, compress=False)

    def raw_variant(name, change):
        return _variant(mnist, tmp / name, change)

    images = "train-images-idx3-ubyte"
    idx_trunc = raw_variant("idx_truncated", lambda d: _truncate(d / images, 0.9))
    idx_magic = raw_variant("idx_wrong_magic", lambda d: shutil.copy(
        d / "train-labels-idx1-ubyte", d / images))
    idx_gz = raw_variant("idx_bad_gzip", lambda d: ((d / images).unlink(), (
        d / f"{images}.gz").write_bytes(b"not gzip at all")))
    idx_missing = raw_variant("idx_missing", lambda d: (d / "t10k-labels-idx1-ubyte").unlink())
    idx_header = raw_variant("idx_header_only", lambda d: (d / images).write_bytes(
        (0x803).to_bytes(4, "big") + (8).to_bytes(4, "big")))
    cifar = tmp / "cifar_raw"
    write_cifar_raw(cifar, n_per_batch=2, n_test=2)
    batches = cifar / "cifar-10-batches-py"
    cifar_garbled = _variant(cifar, tmp / "cifar_garbled", lambda d: (
        d / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x04garbage"))
    cifar_missing = _variant(cifar, tmp / "cifar_missing", lambda d: (
        d / "cifar-10-batches-py" / "test_batch").unlink())
    cifar_wrong = _variant(cifar, tmp / "cifar_wrong_shape", lambda d: (
        d / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(
            {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})))
    tarball_dir = tmp / "cifar_tarball"
    tarball_dir.mkdir()
    with tarfile.open(tarball_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    _truncate(tarball_dir / "cifar-10-python.tar.gz", 0.5)
    (tmp / "a_file").write_text("not a directory")
    damaged = tmp / "damaged_tfds"
    tfds_builders.prepare_images("mnist", mnist, damaged)
    record_file = next(damaged.rglob("fpt_images-train.array_record*"))
    _truncate(record_file, 0.6)
    out = f"--data_dir={tmp / 'out'}"
    lo = ["--dataset=listops", f"--data_dir={tmp / 'listops'}"]

    def img(raw: Path, dataset: str = "mnist") -> list[str]:
        return [f"--dataset={dataset}", f"--raw_dir={raw}", out]

    return [
        ("prepare_no_dataset_flag", [out], ["--dataset"], None),
        ("prepare_unknown_dataset", ["--dataset=svhn", out], ["--dataset=svhn", "mnist"], None),
        ("prepare_no_raw_dir_flag", ["--dataset=mnist", out], ["--raw_dir is required"], None),
        ("prepare_raw_dir_missing", img(tmp / "nothing"), [f"--raw_dir={tmp / 'nothing'}"],
         None),
        ("prepare_raw_dir_without_files", img(tmp / "out_of_files"),
         [f"{tmp / 'out_of_files'}: missing raw file {images}"], None),
        ("prepare_idx_file_missing", img(idx_missing), [str(idx_missing),
                                                        "t10k-labels-idx1-ubyte"], None),
        ("prepare_idx_truncated", img(idx_trunc), [f"{idx_trunc / images}: IDX header says"],
         None),
        ("prepare_idx_header_only", img(idx_header), [f"{idx_header / images}"], None),
        ("prepare_idx_wrong_magic", img(idx_magic), [f"{idx_magic / images}: IDX magic"],
         None),
        ("prepare_idx_bad_gzip", img(idx_gz), [f"{idx_gz / images}.gz: cannot read"], None),
        ("prepare_cifar_batch_garbled", img(cifar_garbled, "cifar10"),
         [f"{cifar_garbled}/cifar-10-batches-py/data_batch_2"], None),
        ("prepare_cifar_batch_missing", img(cifar_missing, "cifar10"),
         [str(cifar_missing), "test_batch"], None),
        ("prepare_cifar_batch_wrong_shape", img(cifar_wrong, "cifar10"),
         ["data_batch_1: b'data' must be uint8 [N, 3072]"], None),
        ("prepare_cifar_tarball_truncated", img(tarball_dir, "cifar10"),
         [f"{tarball_dir / 'cifar-10-python.tar.gz'}: cannot read tarball"], None),
        ("prepare_data_dir_cannot_be_created", [*img(mnist)[:2],
                                                "--data_dir=/proc/fpt_jax_prepare"],
         ["--data_dir=/proc/fpt_jax_prepare"], None),
        ("prepare_data_dir_is_a_file", [*img(mnist)[:2], f"--data_dir={tmp / 'a_file'}"],
         [f"--data_dir={tmp / 'a_file'}", "is a file"], None),
        ("prepare_earlier_preparation_damaged", [*img(mnist)[:2], f"--data_dir={damaged}"],
         [str(record_file), f"delete {damaged / 'fpt_images' / 'mnist'}"], None),
        ("prepare_listops_flag_with_images", [*img(mnist), "--num_train=100"],
         ["--num_train applies only to --dataset=listops"], None),
        ("prepare_raw_dir_with_listops", [*lo, f"--raw_dir={mnist}"], ["--raw_dir="], None),
        ("prepare_num_train_negative", [*lo, "--num_train=-5"], ["--num_train=-5; accepted"],
         None),
        ("prepare_num_val_zero", [*lo, "--num_val=0"], ["--num_val=0; accepted"], None),
        ("prepare_num_test_not_an_int", [*lo, "--num_test=many"], ["--num_test=many"], None),
        ("prepare_max_depth_zero", [*lo, "--max_depth=0"], ["--max_depth=0; accepted"], None),
        ("prepare_max_args_one", [*lo, "--max_args=1"], ["--max_args=1; accepted"], None),
        ("prepare_lengths_inverted", [*lo, "--min_length=100", "--max_length=50"],
         ["--min_length=100 --max_length=50"], None),
        ("prepare_min_length_unreachable", [*lo, "--max_depth=1"],
         ["--min_length=500", "--max_depth=1"], None),
        ("prepare_listops_task_with_slash", [*lo, "--listops_task=../x"],
         ["--listops_task='../x'"], None),
        ("prepare_listops_data_dir_cannot_be_created",
         ["--dataset=listops", "--data_dir=/proc/fpt_jax_listops", "--num_train=2"],
         ["--data_dir=/proc/fpt_jax_listops"], None),
        ("prepare_positional_argument", [*lo, "now"], ["'now'"], None),
    ]


def test_prepare_data_bad_inputs(tmp_path):
    (tmp_path / "out_of_files").mkdir()
    _run_table("experiments.prepare_data", _prepare_cases(tmp_path))
    assert not (tmp_path / "listops").exists()  # every listops case failed before writing


# --- benchmark ----------------------------------------------------------------------------

BENCH = ["--config.init=random", "--config.n_layer=1", "--config.n_head=2",
         "--config.n_embd=16", "--config.dropout=0", "--bench.steps=1", "--bench.rounds=1",
         "--bench.warmup=0", "--bench.torch_reference=false", "--bench.peak_tflops=0.05",
         "--bench.plot=no"]
NOT_TIMED = "init: random"  # printed just before bench.run: nothing may be timed


def _bench_cases(tmp: Path) -> list[Case]:
    """Every bad setting of the benchmark: each field of --bench, the process flags, and the
    settings against the model and the devices."""
    (tmp / "a_file").write_text("not a directory")
    out = f"--out_dir={tmp / 'results'}"
    xor = ["--bench.shapes=bit_xor", "--bench.modes=frozen", out]

    def bad(field: str, value: str, wanted: list[str], *more: str) -> Case:
        # a tuple field given twice collects both values (config_flags): given once here
        given = [a for a in xor if not a.startswith(f"--bench.{field}=")]
        return (f"bench_{field}_{value or 'empty'}", [*given, *more, f"--bench.{field}={value}"],
                wanted, None)
    return [
        # --- each field on its own
        bad("shapes", "imagenet", ["--bench.shapes=imagenet: unknown shape 'imagenet'; "
                                   "accepted: bit_xor, cifar10"]),
        bad("seq_lens", "8,long", ["--bench.seq_lens=8,long; accepted: integers >= 1"]),
        bad("seq_lens", "0", ["--bench.seq_lens=0; accepted: integers >= 1"]),
        bad("batch_size", "0", ["--bench.batch_size=0; accepted: an integer >= 1"]),
        bad("batch_size", "four", ["--bench.batch_size=four", "int"]),
        bad("features", "0", ["--bench.features=0; accepted: an integer >= 1"]),
        bad("classes", "1", ["--bench.classes=1; accepted: an integer >= 2"]),
        bad("modes", "frozen,fastest", ["--bench.modes=frozen,fastest: unknown mode 'fastest'; "
                                        "accepted: frozen, full, forward"]),
        bad("modes", "", ["--bench.modes=(empty) and no selections: nothing to time; "
                          "accepted: one or more of frozen, full, forward, or selections"]),
        bad("selections", "attn[5]", ["--bench.selections=attn[5]: 'attn[5]'", "out of range",
                                      "accepted: trainable selections"]),
        bad("selections", "sideways", ["--bench.selections=sideways: 'sideways'",
                                       "accepted: trainable selections"]),
        bad("dtypes", "float16", ["--bench.dtypes=float16: unknown dtype 'float16'; accepted: "
                                  "float32, bfloat16"]),
        bad("remats", "maybe", ["--bench.remats=maybe: 'maybe' is not a boolean; accepted: "
                                "true, false"]),
        bad("sweeps", "1,0", ["--bench.sweeps=1,0; accepted: integers >= 1"]),
        bad("sweeps", "four", ["--bench.sweeps=four; accepted: integers >= 1"]),
        bad("baselines", "nonsense", ["--bench.baselines=nonsense: unknown baseline "
                                      "'nonsense'; accepted: fnet, fnet-medium, "
                                      "fnet-orthonormal, lstm"]),
        bad("steps", "0", ["--bench.steps=0; accepted: an integer >= 1"]),
        bad("steps", "2", ["--bench.steps=2 is fewer than rounds=3", "accepted: steps >= rounds"],
            "--bench.rounds=3"),
        bad("warmup", "-1", ["--bench.warmup=-1; accepted: an integer >= 0"]),
        bad("rounds", "0", ["--bench.rounds=0; accepted: an integer >= 1"]),
        bad("switch_steps", "-1", ["--bench.switch_steps=-1; accepted: an integer >= 0"]),
        bad("torch_reference", "maybe", ["--bench.torch_reference=maybe", "boolean"]),
        bad("torch_threads", "0", ["--bench.torch_threads=0; accepted: an integer >= 1"]),
        bad("torch_attn", "flash", ["--bench.torch_attn='flash'; accepted: eager, sdpa"]),
        bad("peak_tflops", "-1", ["--bench.peak_tflops=-1.0; accepted: a finite number > 0"]),
        bad("compile_only", "maybe", ["--bench.compile_only=maybe", "boolean"]),
        bad("memory_fraction", "1.5", ["--bench.memory_fraction=1.5; accepted: a number in "
                                       "(0, 1]"]),
        bad("plot", "sometimes", ["--bench.plot='sometimes'; accepted: auto, yes, no"]),
        ("bench_not_a_field", [*xor, "--bench.shape=cifar10"],
         ["--bench.shape: not a setting; accepted: --bench.<field> for the fields shapes, "], None),
        # --- against the model and the devices
        ("bench_seq_len_beyond_n_positions",
         ["--bench.seq_lens=8,2048", "--bench.batch_size=4", "--bench.modes=frozen", out],
         ["--bench.seq_lens=2048", "n_positions=1024", "accepted: sequence lengths <= 1024"],
         None),
        ("bench_named_shape_vs_cpu_devices", [*xor, "--cpu_devices=3"],
         ["--bench.shapes=bit_xor", "3 devices", "--cpu_devices", "accepted: a multiple of 3"],
         None),
        ("bench_batch_size_vs_cpu_devices", ["--bench.seq_lens=8", "--bench.batch_size=6",
                                             "--bench.modes=frozen", "--cpu_devices=4", out],
         ["--bench.batch_size=6", "4 devices", "--cpu_devices"], None),
        ("bench_shape_vs_grad_accum", [*xor, "--config.num_devices=1", "--config.grad_accum=3"],
         ["--bench.shapes=bit_xor", "grad_accum 3", "--config.grad_accum"], None),
        ("bench_too_many_devices", [*xor, "--config.num_devices=64"], ["num_devices=64"], None),
        ("bench_model_auto", [*xor, "--config.model=auto"],
         ["--config.model='auto'", "accepted: a model preset"], None),
        ("bench_baseline_lacks_the_selection", [*xor, "--config.trainable=output,attn",
                                                "--bench.baselines=fnet"],
         ["--bench.baselines=fnet: fnet: trainable='output,attn'", "no attn parameters"], None),
        # --- the process flags
        ("bench_out_dir_missing", ["--bench.shapes=bit_xor"], ["--out_dir", "required"], None),
        ("bench_out_dir_cannot_be_created", ["--bench.shapes=bit_xor",
                                             "--out_dir=/proc/fpt_jax_bench"],
         ["--out_dir=/proc/fpt_jax_bench"], None),
        ("bench_out_dir_is_a_file", ["--bench.shapes=bit_xor", f"--out_dir={tmp / 'a_file'}"],
         [f"--out_dir={tmp / 'a_file'}", "is a file"], None),
        ("bench_name_with_slash", [*xor, "--name=a/b"],
         ["--name='a/b'; accepted: a file name without '/'"], None),
        ("bench_name_empty", [*xor, "--name="], ["--name=''; accepted: a file name"], None),
        ("bench_cpu_devices_zero", [*xor, "--cpu_devices=0"],
         ["--cpu_devices=0", "positive integer"], None),
        ("bench_old_flag", [out, "--shapes=bit_xor"], ["shapes"], None),
        ("bench_positional_argument", [*xor, "fast"], ["'fast'"], None),
    ]


def test_benchmark_bad_inputs_fail_before_anything_is_timed(tmp_path):
    cases = _bench_cases(tmp_path)
    _run_table("experiments.benchmark", cases, base=BENCH, not_in_stdout=NOT_TIMED)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


# --- training's data files, through this project's readers ---------------------------------

TRAIN = ["--config.init=random", "--config.n_layer=1", "--config.n_head=2",
         "--config.n_embd=16", "--config.batch_size=4", "--config.steps=4",
         "--config.eval_every=2", "--config.log_every=2", "--config.checkpoint_every=2",
         "--config.num_devices=1"]


def _tape(root: Path, change: Callable[[Path], None] | None = None) -> Path:
    """TAPE's remote_homology LMDB files for the three splits training reads; `change` gets
    the validation LMDB (a directory holding data.mdb)."""
    folder = root / "remote_homology"
    folder.mkdir(parents=True)
    for split, n in (("train", 12), ("valid", 6), ("test_fold_holdout", 4)):
        write_lmdb(folder / f"remote_homology_{split}.lmdb", make_records(n, seed=len(split)))
    if change:
        change(folder / "remote_homology_valid.lmdb")
    return root


def _train_cases(tmp: Path) -> list[Case]:
    from fpt_jax.tasks import tfds_builders
    valid = "remote_homology/remote_homology_valid.lmdb"
    truncated = _tape(tmp / "tape_truncated", lambda d: os.truncate(d / "data.mdb", 3 * 4096))
    empty = _tape(tmp / "tape_empty", lambda d: os.truncate(d / "data.mdb", 0))
    garbage = _tape(tmp / "tape_garbage", lambda d: (d / "data.mdb").write_bytes(
        np.random.default_rng(4).bytes(5 * 4096)))
    no_data = _tape(tmp / "tape_no_data_mdb", lambda d: (d / "data.mdb").unlink())

    write_mnist_raw(tmp / "mnist_raw", n_train=8, n_test=4)
    good = tmp / "tfds"
    tfds_builders.prepare_images("mnist", tmp / "mnist_raw", good)
    version = Path("fpt_images/mnist") / tfds_builders.FPT_IMAGES_VERSION
    train_file = next((good / version).glob("fpt_images-train.array_record*")).name

    def images(name: str, change: Callable[[Path], None]) -> Path:
        return _variant(good, tmp / name, lambda d: change(d / version))

    ar_trunc = images("ar_truncated", lambda d: _truncate(d / train_file, 0.7))
    ar_missing = images("ar_missing", lambda d: (d / train_file).unlink())
    # Noise inside the data (the index intact): the record's checksum no longer matches.
    ar_noise = images("ar_damaged_record", lambda d: _overwrite(d / train_file, 2000, 500))
    ar_info = images("ar_info_garbled", lambda d: (d / "dataset_info.json").write_text("{x"))

    homology = ["--config=experiments/configs/remote_homology.py", *TRAIN]
    mnist = ["--config=experiments/configs/mnist.py", *TRAIN]

    def run(name: str, base: list[str], data_dir: Path, wanted: list[str]) -> Case:
        return (name, [*base, f"--config.task_options.data_dir={data_dir}",
                       f"--workdir={tmp / 'runs' / name}"], wanted, None)

    return [
        run("train_lmdb_truncated", homology, truncated,
            [f"{truncated / valid}/data.mdb: truncated or damaged LMDB"]),
        run("train_lmdb_empty", homology, empty, [f"{empty / valid}/data.mdb: empty file"]),
        run("train_lmdb_not_an_lmdb", homology, garbage, [f"{garbage / valid}: cannot open it "
                                                          "as an LMDB"]),
        run("train_lmdb_without_data_mdb", homology, no_data, [f"{no_data / valid}/data.mdb"]),
        run("train_array_record_truncated", mnist, ar_trunc,
            [f"{ar_trunc / version / train_file}: truncated or damaged"]),
        run("train_array_record_missing", mnist, ar_missing,
            [f"{ar_missing / version / train_file}: missing"]),
        run("train_array_record_damaged_record", mnist, ar_noise,
            [f"{ar_noise / version / train_file}: damaged"]),
        run("train_dataset_info_garbled", mnist, ar_info, [str(ar_info / "fpt_images/mnist")]),
    ]


def _overwrite(file: Path, offset: int, n: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(5).bytes(n))


def test_training_data_files_are_checked_before_the_first_step(tmp_path):
    _run_table("experiments.train", _train_cases(tmp_path), not_in_stdout=STARTED)
