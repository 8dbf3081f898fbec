"""Offline preparation: raw files in their real formats -> TFDS datasets / ListOps TSVs.

The helpers here write MNIST-family IDX files (gzipped, real magic numbers) and CIFAR-10
python pickle batches (b'data' / b'labels'); other test files import them.
"""
import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fpt_jax.tasks import listops, tfds_builders
from fpt_jax.tasks.tfds_builders import RawDataError

REPO = Path(__file__).resolve().parents[1]


# --- writers of the real raw formats ----------------------------------------------------

def write_idx(path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    """An IDX file: magic (0x00000803 images / 0x00000801 labels), big-endian dims, bytes."""
    array = np.asarray(array, np.uint8)
    assert magic & 0xFF == array.ndim
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload += array.tobytes()
    path = Path(str(path) + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_images(n: int, shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images whose first two pixels encode the example number, and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    return images, rng.integers(0, 10, n).astype(np.uint8)


def image_ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def write_mnist_raw(raw_dir, n_train: int = 40, n_test: int = 17, seed: int = 0,
                    compress: bool = True) -> dict:
    """The four MNIST-family IDX files; returns {split: (images [N,28,28,1], labels)}."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, (img_name, lbl_name) in (("train", n_train, tfds_builders.IDX_FILES["train"]),
                                           ("test", n_test, tfds_builders.IDX_FILES["test"])):
        images, labels = make_images(n, (28, 28, 1), seed + (split == "test"))
        write_idx(raw_dir / img_name, images[..., 0], tfds_builders.IDX_IMAGES_MAGIC, compress)
        write_idx(raw_dir / lbl_name, labels, tfds_builders.IDX_LABELS_MAGIC, compress)
        out[split] = (images, labels.astype(np.int64))
    return out


def write_cifar_raw(raw_dir, n_per_batch: int = 8, n_test: int = 11, seed: int = 0) -> dict:
    """cifar-10-batches-py/{data_batch_1..5, test_batch} as CIFAR's python pickles."""
    batch_dir = Path(raw_dir) / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True, exist_ok=True)
    train, test = make_images(5 * n_per_batch, (32, 32, 3), seed), \
        make_images(n_test, (32, 32, 3), seed + 1)

    def dump(name, images, labels):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # channel-major rows
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                 b"data": rows, b"filenames": [f"{i}.png".encode() for i in range(len(rows))]}
        (batch_dir / name).write_bytes(pickle.dumps(batch, protocol=2))

    for i in range(5):
        sl = slice(i * n_per_batch, (i + 1) * n_per_batch)
        dump(f"data_batch_{i + 1}", train[0][sl], train[1][sl])
    dump("test_batch", *test)
    return {"train": (train[0], train[1].astype(np.int64)),
            "test": (test[0], test[1].astype(np.int64))}


def read_all(source) -> tuple[np.ndarray, np.ndarray]:
    recs = [source[i] for i in range(len(source))]
    return (np.stack([np.asarray(r["image"]) for r in recs]),
            np.array([int(r["label"]) for r in recs]))


def _sorted_by_id(images, labels):
    order = np.argsort(image_ids(images))
    return images[order], labels[order]


# --- images -----------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_cli_idx_files_roundtrip(tmp_path):
    """The documented command on real-format IDX .gz files; tfds.data_source reads back
    exactly the raw images and labels (TFDS shuffles the record order)."""
    raw = write_mnist_raw(tmp_path / "raw", n_train=30, n_test=12)
    data_dir = tmp_path / "tfds"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_data", "--dataset=fashion_mnist",
         f"--raw_dir={tmp_path / 'raw'}", f"--data_dir={data_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "prepared" in run.stdout
    version_dir = data_dir / "fpt_images" / "fashion_mnist" / tfds_builders.FPT_IMAGES_VERSION
    assert any(p.name.startswith("fpt_images-train.array_record") for p in version_dir.iterdir())
    for split, (images, labels) in raw.items():
        source = tfds_builders.open_image_source("fashion_mnist", split, data_dir)
        got_images, got_labels = _sorted_by_id(*read_all(source))
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


def test_prepare_uncompressed_idx_and_cifar_pickles(tmp_path):
    raw = write_mnist_raw(tmp_path / "mnist_raw", n_train=9, n_test=4, compress=False)
    tfds_builders.prepare_images("mnist", tmp_path / "mnist_raw", tmp_path / "tfds")
    images, labels = _sorted_by_id(*read_all(
        tfds_builders.open_image_source("mnist", "test", tmp_path / "tfds")))
    np.testing.assert_array_equal(images, raw["test"][0])
    np.testing.assert_array_equal(labels, raw["test"][1])

    raw = write_cifar_raw(tmp_path / "cifar_raw", n_per_batch=3, n_test=5)
    out = tfds_builders.prepare_images("cifar10", tmp_path / "cifar_raw", tmp_path / "tfds")
    assert out.parent.name == "cifar10"
    for split in ("train", "test"):
        images, labels = _sorted_by_id(*read_all(
            tfds_builders.open_image_source("cifar10", split, tmp_path / "tfds", "fpt")))
        # pixel layout: the pickle's channel-major rows become [32, 32, 3] images
        np.testing.assert_array_equal(images, raw[split][0])
        np.testing.assert_array_equal(labels, raw[split][1])


def test_cifar_tarball_is_read(tmp_path):
    import tarfile
    raw = write_cifar_raw(tmp_path / "x", n_per_batch=2, n_test=3)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "x" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    images, labels = tfds_builders.read_cifar10_split(tmp_path, "test")
    np.testing.assert_array_equal(images, raw["test"][0])
    np.testing.assert_array_equal(labels, raw["test"][1])


def test_malformed_idx_files_name_the_file(tmp_path):
    write_mnist_raw(tmp_path, n_train=5, n_test=3)
    images_path = tmp_path / "train-images-idx3-ubyte.gz"
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"

    # labels file where images are expected: wrong magic number
    images_path.write_bytes(labels_path.read_bytes())
    with pytest.raises(RawDataError, match=r"train-images-idx3-ubyte\.gz.*magic number "
                                           r"0x00000801, expected 0x00000803"):
        tfds_builders.read_idx_split(tmp_path, "train")

    # truncated data
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28)),
              tfds_builders.IDX_IMAGES_MAGIC)
    images_path.write_bytes(gzip.compress(gzip.decompress(images_path.read_bytes())[:-10]))
    with pytest.raises(RawDataError, match=r"train-images-idx3-ubyte\.gz.*holds 3910 bytes"):
        tfds_builders.read_idx_split(tmp_path, "train")

    # not gzip at all
    images_path.write_bytes(b"garbage")
    with pytest.raises(RawDataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        tfds_builders.read_idx_split(tmp_path, "train")

    # label count mismatch
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 28, 28)),
              tfds_builders.IDX_IMAGES_MAGIC)
    with pytest.raises(RawDataError, match=r"train-labels-idx1-ubyte\.gz: 5 labels for 6"):
        tfds_builders.read_idx_split(tmp_path, "train")

    # missing file
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(RawDataError, match="missing raw file t10k-labels-idx1-ubyte"):
        tfds_builders.read_idx_split(tmp_path, "test")


def test_malformed_cifar_pickles_name_the_file(tmp_path):
    write_cifar_raw(tmp_path, n_per_batch=2, n_test=2)
    batch_dir = tmp_path / "cifar-10-batches-py"
    (batch_dir / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072),
                                                                             np.uint8)}))
    with pytest.raises(RawDataError, match=r"data_batch_3: expected a dict with b'data' and "
                                           r"b'labels'"):
        tfds_builders.read_cifar10_split(tmp_path, "train")
    (batch_dir / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(RawDataError, match=r"data_batch_3: not a CIFAR-10 python pickle"):
        tfds_builders.read_cifar10_split(tmp_path, "train")
    (batch_dir / "test_batch").write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(RawDataError, match=r"test_batch: b'data' must be uint8 \[N, 3072\]"):
        tfds_builders.read_cifar10_split(tmp_path, "test")
    (batch_dir / "data_batch_5").unlink()
    with pytest.raises(RawDataError, match=r"missing CIFAR-10 batch file\(s\) \['data_batch_5'"):
        tfds_builders.read_cifar10_split(tmp_path, "train")
    with pytest.raises(RawDataError, match="no CIFAR-10 python batches"):
        tfds_builders.read_cifar10_split(tmp_path / "cifar-10-batches-py" / "nothing", "test")


@pytest.mark.slow
def test_prepare_cli_reports_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_data", "--dataset=mnist",
         f"--raw_dir={tmp_path}", f"--data_dir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "missing raw file train-images-idx3-ubyte" in run.stderr


# --- listops ----------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_cli_listops(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_data", "--dataset=listops",
         f"--data_dir={tmp_path}", "--num_train=12", "--num_val=3", "--num_test=4",
         "--min_length=20", "--max_length=80", "--max_depth=4", "--max_args=5", "--seed=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    counts = {}
    for split, name in (("train", "basic_train.tsv"), ("validation", "basic_val.tsv"),
                        ("test", "basic_test.tsv")):
        text = (tmp_path / name).read_bytes()
        assert text.startswith(b"Source\tTarget\r\n")  # csv.writer, as LRA wrote them
        sequences, targets, _ = listops.read_tsv(tmp_path / name)
        assert all(20 < len(s) < 80 for s in sequences)
        counts[split] = len(sequences)
    assert counts == {"train": 12, "validation": 3, "test": 4}

