"""ListOps: tokenisation with closing brackets, the LRA-grammar generator, the TSV reader's
errors, and the task's batches, sharding and length handling."""
import random

import numpy as np
import pytest

from fpt_jax.tasks import get_task, listops
from fpt_jax.tasks.listops import ListOpsFormatError, TOKEN_IDS


def evaluate(tokens: list[str]) -> tuple[int, int, int]:
    """Independent evaluator of a bracketed prefix expression: (value, depth, max args)."""
    stack, depth, max_args = [], 0, 0
    for tok in tokens:
        if tok.startswith("["):
            stack.append((tok, []))
            depth = max(depth, len(stack))
        elif tok == "]":
            op, args = stack.pop()
            max_args = max(max_args, len(args))
            if op == "[MIN":
                v = min(args)
            elif op == "[MAX":
                v = max(args)
            elif op == "[MED":
                v = int(np.median(args))
            else:
                v = sum(args) % 10
            if not stack:
                return v, depth, max_args
            stack[-1][1].append(v)
        else:
            if not stack:
                return int(tok), 0, 0
            stack[-1][1].append(int(tok))
    raise AssertionError("unterminated expression")


def test_tokenize_keeps_closing_brackets_and_drops_parentheses():
    source = "( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) ] )"
    ids = listops.tokenize(source)
    assert [listops.VOCAB[i] for i in ids] == ["[MAX", "2", "9", "[MIN", "4", "7", "]", "]"]
    assert ids.dtype == np.uint8 and listops.PAD_ID == 0 and 0 not in ids
    assert len(listops.VOCAB) == 16 and TOKEN_IDS["0"] == 1 and TOKEN_IDS["]"] == 15
    # the original (alphanumeric-only tokenizer) could not tell these two apart
    a = listops.tokenize("[MAX [MIN 1 2 ] 3 ]")
    b = listops.tokenize("[MAX [MIN 1 2 3 ] ]")
    assert not np.array_equal(a, b)


def test_generator_follows_lra_grammar_and_limits():
    rows = listops.generate_listops(40, seed=1, max_depth=5, max_args=4, min_length=15,
                                    max_length=60)
    assert len({s for s, _ in rows}) == 40  # distinct
    for source, target in rows:
        tokens = [t for t in source.split() if t not in "()"]
        assert 15 < len(tokens) < 60
        value, depth, max_args = evaluate(tokens)
        assert value == target and depth <= 5 and 2 <= max_args <= 4
        # LRA's string: one '(' per argument plus one for the ']' of every operator
        n_ops = tokens.count("]")
        n_values = len(tokens) - 2 * n_ops
        assert source.count("(") == source.count(")") == n_values + 2 * n_ops - 1
        assert len(listops.tokenize(source)) == len(tokens)
    assert rows == listops.generate_listops(40, seed=1, max_depth=5, max_args=4,
                                            min_length=15, max_length=60)
    assert rows != listops.generate_listops(40, seed=2, max_depth=5, max_args=4,
                                            min_length=15, max_length=60)


def test_generator_string_format_is_lras():
    """LRA writes an operator with arguments a, b as '( ( ( OP a ) b ) ] )'."""
    rng = random.Random(0)
    for _ in range(200):
        source, value, length = listops.generate_example(rng, max_depth=3, max_args=3)
        if length == 4:  # one operator, two value arguments
            op, a, b = [t for t in source.split() if t not in "()]"]
            assert source == f"( ( ( {op} {a} ) {b} ) ] )"
            return
    raise AssertionError("no two-argument expression generated")


def test_default_limits_are_lras():
    rows = listops.generate_listops(3, seed=0)  # depth 10, args 10, 500 < length < 2000
    assert all(500 < len(listops.tokenize(s)) < 2000 for s, _ in rows)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops")
    listops.write_listops(root, num_train=30, num_val=7, num_test=5, seed=0, max_depth=6,
                          max_args=5, min_length=20, max_length=90)
    return root


def as_tuples(batch) -> list[tuple]:
    return [tuple(row[:n]) for row, n in zip(batch["x"], batch["length"])]


def test_batches_shapes_and_content(data_dir):
    task = get_task("listops", data_dir=str(data_dir), max_length=128)
    assert (task.input_kind, task.input_dim, task.output_dim) == ("tokens", 16, 10)
    assert task.example_shape == (128,) and task.eval_split == "validation"
    batch = task.batch("train", 0, 6, seed=0)
    assert set(batch) == {"x", "length", "y"}
    assert batch["x"].shape == (6, 128) and batch["x"].dtype == np.int32
    assert batch["length"].dtype == np.int32 and batch["y"].dtype == np.int32
    for row, n, y in zip(batch["x"], batch["length"], batch["y"]):
        assert (row[n:] == 0).all() and (row[:n] > 0).all()
        assert evaluate([listops.VOCAB[i] for i in row[:n]])[0] == y
        assert row[n - 1] == TOKEN_IDS["]"]  # the model reads the closing bracket
    ev = list(task.eval_batches("validation", 3, seed=0, num_batches=None))
    assert [b["mask"].tolist() for b in ev] == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert task.stats["train"] == {"total": 30, "overlength": 0, "kept": 30}


def test_shards_disjoint_cover_and_deterministic(data_dir):
    task = get_task("listops", data_dir=str(data_dir), bucket_size=16)
    seen = []
    for step in range(5):  # 5 steps x 2 hosts x 3 = one epoch of 30
        parts = [task.batch("train", step, 3, seed=1, process_index=i, process_count=2)
                 for i in range(2)]
        assert parts[0]["x"].shape == parts[1]["x"].shape  # bucket from the global batch
        assert parts[0]["x"].shape[1] % 16 == 0
        whole = task.batch("train", step, 6, seed=1)
        assert as_tuples(whole) == as_tuples(parts[0]) + as_tuples(parts[1])
        seen += as_tuples(whole)
    everything = as_tuples(next(task.eval_batches("train", 30, seed=0, num_batches=None)))
    assert sorted(seen) == sorted(everything) and len(set(seen)) == 30
    again = get_task("listops", data_dir=str(data_dir), bucket_size=16)
    np.testing.assert_array_equal(again.batch("train", 3, 4, seed=1)["x"],
                                  task.batch("train", 3, 4, seed=1)["x"])
    # eval: each host's shard once, equal batch counts and shapes on every host
    per_host = [list(task.eval_batches("test", 2, seed=0, num_batches=None, process_index=i,
                                       process_count=2)) for i in range(2)]
    assert [len(b) for b in per_host] == [2, 2]
    assert all(a["x"].shape == b["x"].shape for a, b in zip(*per_host))
    masked = [t for batches in per_host for b in batches
              for t, m in zip(as_tuples(b), b["mask"]) if m]
    assert len(set(masked)) == len(masked) == 5


def test_overlength_drop_truncate_error(data_dir):
    lengths = [len(s) for s in listops.read_tsv(data_dir / "basic_train.tsv")[0]]
    limit = int(np.median(lengths))
    over = sum(n > limit for n in lengths)
    assert 0 < over < 30
    drop = get_task("listops", data_dir=str(data_dir), max_length=limit)
    assert drop.num_examples("train") == 30 - over
    assert drop.stats["train"] == {"total": 30, "overlength": over, "kept": 30 - over}
    assert drop.kept_fraction("train") == pytest.approx((30 - over) / 30)
    trunc = get_task("listops", data_dir=str(data_dir), max_length=limit, overlength="truncate")
    assert trunc.num_examples("train") == 30
    assert trunc.batch("train", 0, 30, seed=0)["length"].max() == limit
    strict = get_task("listops", data_dir=str(data_dir), max_length=limit, overlength="error")
    with pytest.raises(ListOpsFormatError, match=r"basic_train\.tsv:\d+: \d+ tokens > "
                                                 r"max_length"):
        strict.batch("train", 0, 2, seed=0)


def _write(path, lines):
    path.write_text("".join(line + "\r\n" for line in lines))
    return path


@pytest.mark.parametrize("lines, message", [
    (["Input\tOutput", "[MIN 1 2 ]\t1"], r"bad\.tsv:1: header must be"),
    (["Source\tTarget", "[MIN 1 2 ]\t1", "[MIN 1 [FOO 3 ] ]\t1"],
     r"bad\.tsv:3: unknown token '\[FOO'"),
    (["Source\tTarget", "[MIN 1 12 ]\t1"], r"bad\.tsv:2: unknown token '12'"),
    (["Source\tTarget", "[MIN 1 2 ]\tx"], r"bad\.tsv:2: target 'x' is not an integer"),
    (["Source\tTarget", "[MIN 1 2 ]\t10"], r"bad\.tsv:2: target 10 out of range"),
    (["Source\tTarget", "[MIN 1 2 ]\t1", "", "[MIN 1 2"],
     r"bad\.tsv:4: expected 2 tab-separated fields"),
    (["Source\tTarget", "( [MIN 1 2 )\t1"], r"bad\.tsv:2: unbalanced brackets"),
    (["Source\tTarget", "\t1"], r"bad\.tsv:2: empty expression"),
    (["Source\tTarget"], r"bad\.tsv: no examples"),
])
def test_malformed_files_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(ListOpsFormatError, match=message):
        listops.read_tsv(_write(tmp_path / "bad.tsv", lines))


def test_missing_files_and_bad_options(tmp_path):
    task = get_task("listops", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"basic_val\.tsv does not exist.*prepare_data"):
        task.batch("validation", 0, 2, seed=0)
    with pytest.raises(ValueError, match="data_dir is required"):
        get_task("listops").prepare("train")  # describing it needs no data
    with pytest.raises(ValueError, match="overlength must be"):
        get_task("listops", data_dir=str(tmp_path), overlength="wrap")


@pytest.mark.parametrize("n, batch, hosts", [(17, 4, 3), (5, 4, 8), (12, 3, 4), (1, 2, 2)])
def test_index_sharding_edge_cases(n, batch, hosts):
    """The shared index logic: eval covers every example once across hosts with equal batch
    counts (empty shards included); training epochs are permutations."""
    from fpt_jax.tasks import data_utils
    seen, counts = [], []
    for host in range(hosts):
        batches = list(data_utils.eval_index_batches(n, batch, process_index=host,
                                                     process_count=hosts))
        counts.append(len(batches))
        for per_host, mask in batches:
            assert len(per_host) == hosts and mask.shape == (batch,)
            assert ((0 <= per_host[host]) & (per_host[host] < n)).all()
            seen += per_host[host][mask == 1].tolist()
    assert len(set(counts)) == 1 and sorted(seen) == list(range(n))
    stream = np.concatenate([data_utils.train_indices(n, s, batch, seed=0, split="train",
                                                      process_index=h, process_count=hosts)[1]
                             for s in range(n) for h in range(hosts)])
    for e in range(batch * hosts):  # the stream is a sequence of whole-split permutations
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
