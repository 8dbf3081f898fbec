"""Remote homology: TAPE's LMDB format (written here as TAPE wrote it), tokens, dropping of
long sequences, sharding, and errors naming the file and record key."""
import pickle

import lmdb
import numpy as np
import pytest

from fpt_jax.tasks import get_task, homology
from fpt_jax.tasks.homology import HomologyFormatError

LETTERS = list("ACDEFGHIKLMNPQRSTVWY")  # the 20 standard amino acids (+ rare ones below)


def make_records(n: int, seed: int, lengths=(5, 60)) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        length = int(rng.integers(*lengths))
        primary = "".join(rng.choice(LETTERS, length))
        if i % 7 == 3:
            primary = "X" + primary[1:] + "U"  # unknown residue / selenocysteine occur
        records.append({
            "id": f"d{seed}.{i}", "primary": primary, "protein_length": length,
            "class_label": int(rng.integers(0, 7)),
            "fold_label": np.int64(rng.integers(0, homology.NUM_FOLDS)),
            "superfamily_label": int(rng.integers(0, 1000)),
            "family_label": int(rng.integers(0, 3000)),
            "secondary_structure": rng.integers(0, 3, length),
            "solvent_accessibility": rng.integers(0, 2, length),
            "evolutionary": rng.random((length, 30)).astype(np.float32)})
    return records


def write_lmdb(path, records, *, num_examples=None, raw: dict | None = None):
    """An LMDB as TAPE's files: b'num_examples' and str(i) keys, pickled values."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, record in enumerate(records):
            txn.put(str(i).encode(), pickle.dumps(record))
        for key, value in (raw or {}).items():
            txn.put(key, value)
        if num_examples is not False:
            txn.put(b"num_examples", pickle.dumps(len(records) if num_examples is None
                                                  else num_examples))
    env.close()
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tape")
    (root / "remote_homology").mkdir()
    for split, n in (("train", 40), ("valid", 9), ("test_fold_holdout", 6),
                     ("test_superfamily_holdout", 5), ("test_family_holdout", 4)):
        write_lmdb(root / "remote_homology" / f"remote_homology_{split}.lmdb",
                   make_records(n, seed=len(split)))
    return root


def test_vocabulary_is_tapes():
    assert homology.VOCAB[:5] == ("<pad>", "<mask>", "<cls>", "<sep>", "<unk>")
    assert len(homology.VOCAB) == 30 and homology.VOCAB.index("A") == 5
    assert homology.VOCAB.index("Z") == 29
    np.testing.assert_array_equal(homology.encode("ACZ"), [2, 5, 7, 29, 3])


def test_batches_match_records(data_dir):
    task = get_task("remote_homology", data_dir=str(data_dir))
    assert (task.input_kind, task.input_dim, task.output_dim) == ("tokens", 30, 1195)
    assert task.example_shape == (1024,) and task.eval_split == "validation"
    records = make_records(9, seed=len("valid"))
    batches = list(task.eval_batches("validation", 4, seed=0, num_batches=None))
    assert [b["mask"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 0, 0, 0]]
    first = batches[0]
    assert first["x"].shape == (4, 1024) and first["x"].dtype == np.int32
    assert first["length"].dtype == np.int32 and first["y"].dtype == np.int32
    for row, n, y, rec in zip(first["x"], first["length"], first["y"], records):
        assert n == len(rec["primary"]) + 2
        assert "".join(homology.VOCAB[i] for i in row[1:n - 1]) == rec["primary"]
        assert (row[0], row[n - 1]) == (homology.CLS_ID, homology.SEP_ID)
        assert (row[n:] == homology.PAD_ID).all() and y == rec["fold_label"]
    for split in ("test", "test_fold_holdout", "test_superfamily_holdout",
                  "test_family_holdout"):
        assert task.batch(split, 0, 2, seed=0)["x"].shape == (2, 1024)
    assert task.num_examples("test") == 6


def test_long_sequences_dropped_and_counted(data_dir):
    records = make_records(40, seed=len("train"))
    limit = 32
    kept = sum(len(r["primary"]) + 2 <= limit for r in records)
    assert 0 < kept < 40
    task = get_task("remote_homology", data_dir=str(data_dir), max_length=limit)
    assert task.num_examples("train") == kept
    assert task.stats["train"] == {"total": 40, "kept": kept}
    assert task.kept_fraction("train") == pytest.approx(kept / 40)
    batch = task.batch("train", 0, kept, seed=0)
    assert batch["x"].shape == (kept, limit) and batch["length"].max() <= limit


def test_shards_disjoint_cover_and_deterministic(data_dir):
    task = get_task("remote_homology", data_dir=str(data_dir), bucket_size=16)
    seen = []
    for step in range(5):  # 2 hosts x 4 x 5 steps = the 40 training examples
        parts = [task.batch("train", step, 4, seed=2, process_index=i, process_count=2)
                 for i in range(2)]
        assert parts[0]["x"].shape == parts[1]["x"].shape and parts[0]["x"].shape[1] % 16 == 0
        for p in parts:
            seen += [tuple(r[:n]) for r, n in zip(p["x"], p["length"])]
    assert len(set(seen)) == 40
    np.testing.assert_array_equal(task.batch("train", 7, 3, seed=2)["x"],
                                  get_task("remote_homology", data_dir=str(data_dir),
                                           bucket_size=16).batch("train", 7, 3, seed=2)["x"])


def test_data_dir_may_be_the_remote_homology_folder(data_dir):
    task = get_task("remote_homology", data_dir=str(data_dir / "remote_homology"))
    assert task.num_examples("validation") == 9


@pytest.mark.parametrize("case, message", [
    ("no_num_examples", r"remote_homology_train\.lmdb \[key b'num_examples'\]: record missing"),
    ("missing_record", r"remote_homology_train\.lmdb \[key b'2'\]: record missing"),
    ("garbage", r"remote_homology_train\.lmdb \[key b'1'\]: cannot unpickle"),
    ("no_primary", r"remote_homology_train\.lmdb \[key b'1'\]: no 'primary' field"),
    ("no_label", r"remote_homology_train\.lmdb \[key b'0'\]: no 'fold_label' field"),
    ("bad_letter", r"remote_homology_train\.lmdb \[key b'1'\]: unknown amino acid 'j'"),
    ("bad_label", r"remote_homology_train\.lmdb \[key b'2'\]: fold_label 1195 out of range"),
    ("not_dict", r"remote_homology_train\.lmdb \[key b'0'\]: expected a dict"),
])
def test_malformed_records_name_file_and_key(tmp_path, case, message):
    records = make_records(3, seed=0)
    path = tmp_path / "remote_homology_train.lmdb"
    raw, kwargs = None, {}
    if case == "no_num_examples":
        kwargs["num_examples"] = False
    elif case == "missing_record":
        records = records[:2]
        kwargs["num_examples"] = 3
    elif case == "garbage":
        raw = {b"1": b"\x80\x04garbage"}
        records = records[:1]
        kwargs["num_examples"] = 3
    elif case == "no_primary":
        del records[1]["primary"]
    elif case == "no_label":
        del records[0]["fold_label"]
    elif case == "bad_letter":
        records[1]["primary"] = "ACjD"
    elif case == "bad_label":
        records[2]["fold_label"] = 1195
    elif case == "not_dict":
        records[0] = ["ACD", 3]
    write_lmdb(path, records, raw=raw, **kwargs)
    task = get_task("remote_homology", data_dir=str(tmp_path))
    with pytest.raises(HomologyFormatError, match=message):
        task.batch("train", 0, 2, seed=0)


def test_missing_files_and_bad_options(tmp_path):
    task = get_task("remote_homology", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"remote_homology_valid\.lmdb"):
        task.batch("validation", 0, 2, seed=0)
    with pytest.raises(ValueError, match="no split 'valid'"):
        task.batch("valid", 0, 2, seed=0)
    with pytest.raises(ValueError, match="data_dir is required"):
        get_task("remote_homology").prepare("train")  # describing it needs no data
