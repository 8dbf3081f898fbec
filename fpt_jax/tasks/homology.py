"""Remote homology (TAPE): protein sequence -> one of 1,195 SCOP folds.

Reads TAPE's LMDB files as the original did through `tape.datasets`:
`{data_dir}/remote_homology/remote_homology_{split}.lmdb` (data_dir may also be the
`remote_homology` directory itself). An LMDB holds `b'num_examples'` -> pickled int and
`str(i).encode()` -> a pickled dict per example with at least `primary` (the amino-acid
string) and `fold_label` (int; TAPE also stores id, protein_length, class_label,
superfamily_label, family_label, secondary_structure, solvent_accessibility, evolutionary).

Tokens are TAPE's IUPAC vocabulary (30 ids): 0 <pad>, 1 <mask>, 2 <cls>, 3 <sep>, 4 <unk>,
then the 25 letters A B C D E F G H I K L M N O P Q R S T U V W X Y Z = 5..29; a sequence is
<cls> residues <sep>, as TAPE encodes it (an unknown letter is an error, as in TAPE). The
original code (input dim 30, 1,200 outputs) skipped batches longer than 1,024 tokens; here
every example longer than `max_length` (default 1024 = GPT-2's positions, <cls> and <sep>
included) is dropped from its split, and the kept fraction is logged and kept in
`task.stats` (the paper: 97.39% kept; reported accuracies were multiplied by 0.9739).

Splits: train, validation (TAPE's 'valid', the default eval split, as the original),
test_fold_holdout (alias 'test'), test_superfamily_holdout, test_family_holdout.
Batches (per host batch B): x int32 [B, T] right-padded with 0, length int32 [B],
y int32 [B] in 0..num_classes-1; T = max_length or bucketed (see `TokenSequenceTask`).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
from absl import logging

from fpt_jax.tasks.base import register
from fpt_jax.tasks.sequence import SequenceTable, TokenSequenceTask

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<sep>", "<unk>")
AMINO_ACIDS = "ABCDEFGHIKLMNOPQRSTUVWXYZ"
VOCAB = SPECIAL_TOKENS + tuple(AMINO_ACIDS)
PAD_ID, CLS_ID, SEP_ID = 0, 2, 3
NUM_FOLDS = 1195
SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test_fold_holdout",
               "test_fold_holdout": "test_fold_holdout",
               "test_superfamily_holdout": "test_superfamily_holdout",
               "test_family_holdout": "test_family_holdout"}

_BAD = 255
_LUT = np.full(256, _BAD, np.uint8)
for _i, _a in enumerate(AMINO_ACIDS):
    _LUT[ord(_a)] = len(SPECIAL_TOKENS) + _i


class HomologyFormatError(ValueError):
    """A malformed TAPE LMDB file; the message names the file and record key."""


def encode(primary: str, where: str = "<string>") -> np.ndarray:
    """Amino-acid string -> uint8 ids <cls> ... <sep> (TAPE's iupac tokenizer)."""
    try:
        raw = np.frombuffer(primary.encode("ascii"), np.uint8)
    except UnicodeEncodeError:
        raw = None
    ids = None if raw is None else _LUT[raw]
    if ids is None or (ids == _BAD).any():
        bad = next(c for c in primary if c not in AMINO_ACIDS)
        raise HomologyFormatError(f"{where}: unknown amino acid {bad!r} in 'primary'; "
                                  f"accepted: {AMINO_ACIDS}")
    out = np.empty(len(ids) + 2, np.uint8)
    out[0], out[1:-1], out[-1] = CLS_ID, ids, SEP_ID
    return out


def lmdb_path(data_dir: str | os.PathLike, split: str) -> Path:
    name = f"remote_homology_{SPLIT_FILES[split]}.lmdb"
    data_dir = Path(data_dir)
    for candidate in (data_dir / "remote_homology" / name, data_dir / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"remote homology split {split!r}: neither "
                            f"{data_dir / 'remote_homology' / name} nor {data_dir / name} "
                            f"exists (TAPE's remote_homology LMDB files)")


def _unpickle(raw: bytes | None, where: str):
    if raw is None:
        raise HomologyFormatError(f"{where}: record missing")
    try:
        return pickle.loads(raw)
    except Exception as e:  # garbage raises many types
        raise HomologyFormatError(f"{where}: cannot unpickle record: {e!r}") from e


def lmdb_data_file(path: str | os.PathLike) -> Path:
    """The file LMDB maps for `path` (`data.mdb` in a directory, else the file itself), checked
    to be a readable, non-empty file."""
    path = Path(path)
    data = path / "data.mdb" if path.is_dir() else path
    if not data.is_file():
        raise HomologyFormatError(f"{path}: an LMDB directory without its data file {data}")
    try:
        with open(data, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise HomologyFormatError(f"{data}: cannot read it: {e.strerror or e}") from e
    if not head:
        raise HomologyFormatError(f"{data}: empty file (0 bytes), not an LMDB; copy or "
                                  "download it again")
    return data


def check_lmdb_size(env: lmdb.Environment, data: Path) -> None:
    """Refuses an LMDB whose file is shorter than its own header says, before any page is read.

    LMDB maps the file and follows page numbers up to the header's last page; a page past the
    end of a truncated file is not an error but SIGBUS, which kills the process. Opening only
    reads the two meta pages (with read(2)), so the header is safe to ask here."""
    psize = env.stat()["psize"]
    last = env.info()["last_pgno"]
    needed, size = (last + 1) * psize, data.stat().st_size
    if size < needed:
        raise HomologyFormatError(
            f"{data}: truncated or damaged LMDB: {size:,} bytes, but its header says its "
            f"{last + 1:,} pages of {psize:,} bytes end at byte {needed:,}; copy or download "
            "it again")


def read_lmdb(path: str | os.PathLike, *, num_classes: int = NUM_FOLDS
              ) -> tuple[list[np.ndarray], list[int]]:
    """(token ids per example, fold labels) of one TAPE remote-homology LMDB file."""
    path = Path(path)
    data = lmdb_data_file(path)
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                        subdir=path.is_dir(), max_readers=1)
    except lmdb.Error as e:
        raise HomologyFormatError(f"{path}: cannot open it as an LMDB (truncated, damaged or "
                                  f"another format): {str(e).replace(f'{path}: ', '')}") from e
    try:
        check_lmdb_size(env, data)
        with env.begin(write=False) as txn:
            return _read_records(txn, path, num_classes)
    except lmdb.Error as e:  # a page that LMDB finds inconsistent: damaged, not truncated
        raise HomologyFormatError(f"{path}: damaged LMDB ({type(e).__name__}: {e}); copy or "
                                  "download it again") from e
    finally:
        env.close()


def _read_records(txn: lmdb.Transaction, path: Path, num_classes: int
                  ) -> tuple[list[np.ndarray], list[int]]:
    sequences, labels = [], []
    num = _unpickle(txn.get(b"num_examples"), f"{path} [key b'num_examples']")
    if not isinstance(num, (int, np.integer)) or num < 0:
        raise HomologyFormatError(f"{path} [key b'num_examples']: expected a "
                                  f"non-negative int, got {num!r}")
    for i in range(int(num)):
        key = str(i).encode()
        where = f"{path} [key {key!r}]"
        item = _unpickle(txn.get(key), where)
        if not isinstance(item, dict):
            raise HomologyFormatError(f"{where}: expected a dict, got "
                                      f"{type(item).__name__}")
        for field in ("primary", "fold_label"):
            if field not in item:
                raise HomologyFormatError(f"{where}: no {field!r} field (has "
                                          f"{sorted(item)})")
        primary, label = item["primary"], item["fold_label"]
        if isinstance(primary, bytes):
            primary = primary.decode("ascii", errors="replace")
        if not isinstance(primary, str) or not primary:
            raise HomologyFormatError(f"{where}: 'primary' must be a non-empty "
                                      f"string, got {primary!r:.60}")
        try:
            label = int(np.asarray(label).item())
        except (TypeError, ValueError) as e:
            raise HomologyFormatError(f"{where}: 'fold_label' {label!r} is not an "
                                      f"int") from e
        if not 0 <= label < num_classes:
            raise HomologyFormatError(f"{where}: fold_label {label} out of range "
                                      f"0..{num_classes - 1}")
        sequences.append(encode(primary, where))
        labels.append(label)
    return sequences, labels


@register("remote_homology")
class RemoteHomology(TokenSequenceTask):
    """TAPE remote homology: fold classification of protein sequences."""
    name = "remote_homology"
    input_dim = len(VOCAB)
    splits = tuple(SPLIT_FILES)
    eval_split = "validation"  # the original evaluates on TAPE's 'valid'
    test_splits = ("test_fold_holdout", "test_superfamily_holdout", "test_family_holdout")

    def __init__(self, *, data_dir: str | None = None, max_length: int = 1024,
                 num_classes: int = NUM_FOLDS, bucket_size: int = 0):
        super().__init__()
        if max_length < 3:
            raise ValueError(f"task remote_homology: max_length must be >= 3, got "
                             f"{max_length}")
        if num_classes < 1:
            raise ValueError(f"task remote_homology: num_classes must be >= 1, got "
                             f"{num_classes}")
        if bucket_size < 0:
            raise ValueError(f"task remote_homology: bucket_size must be >= 0, got "
                             f"{bucket_size}")
        # data_dir is needed to read (`_load`), not to describe the task (shapes, counts)
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.max_length, self.bucket_size = int(max_length), int(bucket_size)
        self.output_dim = int(num_classes)
        self.example_shape = (self.max_length,)
        self.stats: dict[str, dict[str, int]] = {}

    def _load(self, split: str) -> SequenceTable:
        if self.data_dir is None:
            raise ValueError("task remote_homology: data_dir is required (TAPE's data "
                             "directory holding remote_homology/remote_homology_*.lmdb): set "
                             "task_options.data_dir")
        path = lmdb_path(self.data_dir, split)
        sequences, labels = read_lmdb(path, num_classes=self.output_dim)
        total = len(sequences)
        keep = [i for i, s in enumerate(sequences) if len(s) <= self.max_length]
        if not keep:
            raise ValueError(f"task remote_homology: no example of {path} has <= "
                             f"max_length={self.max_length} tokens (of {total})")
        self.stats[split] = {"total": total, "kept": len(keep)}
        log = logging.warning if len(keep) < total else logging.info
        log("remote_homology %s (%s): kept %d of %d sequences (%.2f%%) with <= max_length=%d "
            "tokens incl. <cls>/<sep>; the rest are dropped", split, path, len(keep), total,
            100 * len(keep) / max(total, 1), self.max_length)
        return SequenceTable.from_lists([sequences[i] for i in keep],
                                        [labels[i] for i in keep])
