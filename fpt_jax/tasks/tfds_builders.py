"""tensorflow-datasets builders that prepare local raw image files without TensorFlow.

TFDS's own `mnist`, `fashion_mnist` and `cifar10` builders download from the internet and
need TensorFlow to encode their `tfds.features.Image` features. `FptImages` instead reads
the raw files a user already has and stores `tfds.features.Tensor` features in the
`array_record` format, which TFDS prepares and reads (`tfds.data_source`) without
TensorFlow:

  raw files                                       -> data_dir/fpt_images/<config>/1.0.0/
  MNIST / Fashion-MNIST: the four IDX files          features: image uint8 [H, W, C],
    (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)   label int64
  CIFAR-10: the python pickle batches
    (cifar-10-batches-py/data_batch_1..5, test_batch, or cifar-10-python.tar.gz)

The builder is named `fpt_images` (configs `mnist`, `fashion_mnist`, `cifar10`) so that it
never collides with TFDS's own datasets: a data_dir may hold both `fpt_images/mnist` and
TFDS's `mnist` (prepared elsewhere with TensorFlow). Both have the same feature keys
(`image` uint8 [H, W, C], `label`), and `open_image_source` reads either one (TFDS's
`Image` features decode with PIL without TensorFlow).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

FPT_IMAGES_VERSION = "1.0.0"

MNIST_LABELS = tuple(str(i) for i in range(10))
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                        "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck")

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


class RawDataError(ValueError):
    """A raw input file is missing or malformed; the message names the file."""


class DatasetFileError(ValueError):
    """A prepared dataset's file is missing, truncated or damaged; the message names it (and
    says what to do), `detail` only what is wrong."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


# --- raw readers ------------------------------------------------------------------------

def _find(raw_dir: Path, name: str) -> Path:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise RawDataError(f"{raw_dir}: missing raw file {name} (or {name}.gz)")


def read_idx(path: str | os.PathLike, *, magic: int) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes; checks magic and size."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise RawDataError(f"{path}: cannot read IDX file: {e}") from e
    if len(data) < 4:
        raise RawDataError(f"{path}: IDX file too short ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise RawDataError(f"{path}: IDX magic number {found:#010x}, expected {magic:#010x} "
                           f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise RawDataError(f"{path}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise RawDataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the "
                           f"file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_split(raw_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-family split: images uint8 [N, 28, 28, 1], labels int64 [N]."""
    raw_dir = Path(raw_dir)
    images_name, labels_name = IDX_FILES[split]
    images_path, labels_path = _find(raw_dir, images_name), _find(raw_dir, labels_name)
    images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise RawDataError(f"{images_path}: expected [N, H, W] images, got shape {images.shape}")
    if labels.shape != images.shape[:1]:
        raise RawDataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} "
                           f"images in {images_path}")
    if labels.size and labels.max() > 9:
        raise RawDataError(f"{labels_path}: label {labels.max()} out of range 0..9")
    return images[..., None], labels.astype(np.int64)


def _cifar_members(raw_dir: Path) -> dict[str, bytes | Path]:
    """The CIFAR-10 batch files by name, from a directory or the python tarball."""
    for d in (raw_dir / "cifar-10-batches-py", raw_dir):
        if (d / CIFAR10_TEST_BATCH).exists() or (d / "data_batch_1").exists():
            return {p.name: p for p in d.iterdir()}
    tarball = raw_dir / "cifar-10-python.tar.gz"
    if tarball.exists():
        try:
            with tarfile.open(tarball) as tar:
                return {Path(m.name).name: tar.extractfile(m).read()
                        for m in tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError, EOFError) as e:
            raise RawDataError(f"{tarball}: cannot read tarball: {e}") from e
    raise RawDataError(f"{raw_dir}: no CIFAR-10 python batches found (expected "
                       f"cifar-10-batches-py/{{data_batch_1..5,test_batch}}, the same files "
                       f"directly in it, or cifar-10-python.tar.gz)")


def read_cifar10_batch(name: str, content: bytes | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle batch: images uint8 [N, 32, 32, 3], labels int64 [N]."""
    where = str(content) if isinstance(content, Path) else name
    try:
        raw = content.read_bytes() if isinstance(content, Path) else content
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # pickle raises many types on garbage input
        raise RawDataError(f"{where}: not a CIFAR-10 python pickle batch: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise RawDataError(f"{where}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise RawDataError(f"{where}: b'data' must be uint8 [N, 3072], got {data.dtype} "
                           f"{list(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise RawDataError(f"{where}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise RawDataError(f"{where}: labels out of range 0..9")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10_split(raw_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    raw_dir = Path(raw_dir)
    members = _cifar_members(raw_dir)
    names = CIFAR10_TRAIN_BATCHES if split == "train" else (CIFAR10_TEST_BATCH,)
    missing = [n for n in names if n not in members]
    if missing:
        raise RawDataError(f"{raw_dir}: missing CIFAR-10 batch file(s) {missing}")
    parts = [read_cifar10_batch(n, members[n]) for n in names]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


# --- the builder ------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class FptImagesConfig(tfds.core.BuilderConfig):
    shape: tuple[int, int, int] = (28, 28, 1)
    raw_format: str = "idx"  # 'idx' or 'cifar10_pickle'
    label_names: tuple[str, ...] = MNIST_LABELS
    tfds_name: str = "mnist"  # TFDS's own dataset with the same content


IMAGE_CONFIGS = {
    c.name: c for c in (
        FptImagesConfig(name="mnist", version=FPT_IMAGES_VERSION, shape=(28, 28, 1),
                        raw_format="idx", label_names=MNIST_LABELS, tfds_name="mnist",
                        description="MNIST from the four IDX files."),
        FptImagesConfig(name="fashion_mnist", version=FPT_IMAGES_VERSION, shape=(28, 28, 1),
                        raw_format="idx", label_names=FASHION_MNIST_LABELS,
                        tfds_name="fashion_mnist",
                        description="Fashion-MNIST from the four IDX files."),
        FptImagesConfig(name="cifar10", version=FPT_IMAGES_VERSION, shape=(32, 32, 3),
                        raw_format="cifar10_pickle", label_names=CIFAR10_LABELS,
                        tfds_name="cifar10",
                        description="CIFAR-10 from the python pickle batches."),
    )
}


class FptImages(tfds.core.GeneratorBasedBuilder):
    """MNIST, Fashion-MNIST and CIFAR-10 from local raw files, as uint8 tensors."""

    VERSION = tfds.core.Version(FPT_IMAGES_VERSION)
    RELEASE_NOTES = {FPT_IMAGES_VERSION: "Tensor features in array_record; prepares without "
                                         "TensorFlow."}
    BUILDER_CONFIGS = list(IMAGE_CONFIGS.values())
    # TFDS derives `code_path` through `importlib_resources`, which it does not install for
    # Python >= 3.9 (ModuleNotFoundError when preparing a builder defined in a package).
    code_path = epath.Path(__file__)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the directory of the raw files as the manual_dir (prepare_data --raw_dir): the "
        "four IDX files for mnist / fashion_mnist (e.g. Debian's dataset-fashion-mnist in "
        "/usr/share/datasets/fashion-mnist), the CIFAR-10 python batches for cifar10.")

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=cfg.shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(cfg.label_names)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        raw_dir = dl_manager.manual_dir
        reader = read_idx_split if self.builder_config.raw_format == "idx" else read_cifar10_split
        out = {}
        for split in ("train", "test"):
            images, labels = reader(raw_dir, split)
            if images.shape[1:] != self.builder_config.shape:
                raise RawDataError(f"{raw_dir}: {split} images have shape {images.shape[1:]}, "
                                   f"expected {self.builder_config.shape}")
            out[split] = self._generate_examples(images, labels)
        return out

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i in range(len(images)):
            yield i, {"image": images[i], "label": int(labels[i])}


def check_raw_files(dataset: str, raw_dir: Path) -> None:
    """Every raw file the dataset needs is there (their contents are checked as they are read):
    a missing one is named before TFDS starts preparing."""
    if IMAGE_CONFIGS[dataset].raw_format == "idx":
        for names in IDX_FILES.values():
            for name in names:
                _find(raw_dir, name)
    elif not (raw_dir / "cifar-10-python.tar.gz").exists():  # a tarball: checked as read
        members = _cifar_members(raw_dir)
        missing = [n for n in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH) if n not in members]
        if missing:
            raise RawDataError(f"{raw_dir}: missing CIFAR-10 batch file(s) {missing}")


def prepare_images(dataset: str, raw_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Prepares `fpt_images/<dataset>` in `data_dir` from raw files; returns its directory."""
    if dataset not in IMAGE_CONFIGS:
        raise ValueError(f"unknown image dataset {dataset!r}; accepted: {sorted(IMAGE_CONFIGS)}")
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise RawDataError(f"--raw_dir {raw_dir} is not a directory")
    check_raw_files(dataset, raw_dir)
    builder = FptImages(config=dataset, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.path.join(os.fspath(data_dir), "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(raw_dir)))
    return Path(builder.data_dir)


# --- reading ----------------------------------------------------------------------------

def fpt_dataset_dir(data_dir: str | os.PathLike, dataset: str) -> Path:
    return Path(data_dir) / "fpt_images" / dataset


def open_image_source(dataset: str, split: str, data_dir: str | os.PathLike | None,
                      source: str = "auto"):
    """A random-access `tfds.data_source` over `split` of an image dataset.

    `source`: 'fpt' reads `fpt_images/<dataset>` (prepared by `experiments.prepare_data`),
    'tfds' reads TFDS's own `<dataset>` (e.g. prepared elsewhere with TensorFlow in the
    array_record format), 'auto' the first of the two found in `data_dir`. Records are dicts
    with `image` uint8 [H, W, C] and `label`.
    """
    if dataset not in IMAGE_CONFIGS:
        raise ValueError(f"unknown image dataset {dataset!r}; accepted: {sorted(IMAGE_CONFIGS)}")
    if source not in ("auto", "fpt", "tfds"):
        raise ValueError(f"image source must be 'auto', 'fpt' or 'tfds', got {source!r}")
    tfds_name = IMAGE_CONFIGS[dataset].tfds_name
    if source == "auto":
        if data_dir is None:
            raise ValueError(f"task {dataset}: data_dir is required (the tensorflow-datasets "
                             f"data_dir holding fpt_images/{dataset} or {tfds_name})")
        # A directory without a prepared version is what a failed preparation leaves.
        if _is_prepared(fpt_dataset_dir(data_dir, dataset)):
            source = "fpt"
        elif _is_prepared(Path(data_dir) / tfds_name):
            source = "tfds"
        else:
            raise FileNotFoundError(
                f"task {dataset}: neither {fpt_dataset_dir(data_dir, dataset)} nor "
                f"{Path(data_dir) / tfds_name} holds a prepared dataset. Prepare it offline "
                f"with: python -m experiments.prepare_data --dataset={dataset} --raw_dir=RAW "
                f"--data_dir={data_dir}")
    name = f"fpt_images/{dataset}" if source == "fpt" else tfds_name
    where = Path(data_dir) / name if data_dir is not None else Path(name)
    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    try:
        # download=False: never the internet, and never a preparation at training time.
        data = tfds.data_source(name, split=split, download=False, **kwargs)
    except NotImplementedError as e:  # e.g. a dataset stored as tfrecord
        raise ValueError(f"task {dataset}: {name} in {data_dir} cannot be read by "
                         f"tfds.data_source (it needs the array_record file format; "
                         f"re-prepare it with experiments.prepare_data): {e}") from e
    except Exception as e:  # TFDS raises many types for a missing or damaged dataset
        detail = f"cannot open {where} (split {split!r}): {type(e).__name__}: {_first_line(e)}"
        raise DatasetFileError(f"task {dataset}: {detail}; prepare it again with "
                               "experiments.prepare_data", detail=detail) from e
    files = check_array_record_files(data, split, where)
    return CheckedSource(data, files) if files else data


def _is_prepared(dataset_dir: Path) -> bool:
    return any(dataset_dir.glob("*/dataset_info.json"))


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


VERIFY_CHUNK = 4096  # records read at a time when a file's contents are verified


def check_array_record_files(data, split: str, where: Path) -> list[str]:
    """Every array_record file behind `split` of a `tfds.data_source`, checked before training
    reads a record: present, readable, its index (footer) intact, as many records as the
    dataset's info says, and every record's checksum (riegeli hashes each chunk; reading the
    whole file costs about 0.2 s for MNIST's training split here). Returns the files (none for
    sources without files, e.g. `tfds.testing.mock_data`)."""
    splits = getattr(getattr(data, "dataset_info", None), "splits", None)
    if not splits or split not in splits:
        return []
    files = []
    for instruction in splits[split].file_instructions:
        path = Path(instruction.filename)
        problem = _array_record_problem(path, instruction.examples_in_shard, where)
        if problem:
            raise DatasetFileError(f"{path}: {problem}; split {split!r} of {where} cannot be "
                                   "read. Prepare the dataset again with "
                                   "experiments.prepare_data (delete its directory first)",
                                   detail=f"{path}: {problem}")
        files.append(str(path))
    return files


def _array_record_problem(path: Path, expected: int, where: Path) -> str | None:
    """What is wrong with one array_record file, or None."""
    from array_record.python.array_record_module import ArrayRecordReader
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    try:
        reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
    except Exception as e:  # riegeli raises RuntimeError and OSError variants
        return f"truncated or damaged ({size:,} bytes; cannot be opened: {_first_line(e)})"
    try:
        if not reader.ok():
            return f"truncated or damaged ({size:,} bytes; its index cannot be read)"
        found = reader.num_records()
        if found != expected:
            return f"holds {found} records, but {where}'s dataset_info.json says {expected}"
        for start in range(0, found, VERIFY_CHUNK):
            reader.read(start, min(start + VERIFY_CHUNK, found))
    except Exception as e:
        return f"damaged ({size:,} bytes): {_first_line(e)}"
    finally:
        try:
            reader.close()
        except Exception:  # closing a reader that failed re-raises its failure: told above
            pass
    return None


class CheckedSource:
    """A data source whose read errors (a record damaged inside an intact file) name the
    files, as a `DatasetFileError`, rather than surfacing as riegeli's RuntimeError."""

    def __init__(self, data, files: list[str]):
        self.data, self.files = data, files

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        return self._read(lambda: self.data[key])

    def __getitems__(self, keys):
        return self._read(lambda: self.data.__getitems__(keys))

    def _read(self, call):
        try:
            return call()
        except RuntimeError as e:
            shown = self.files[0] + (f" (or one of {len(self.files) - 1} more)"
                                     if len(self.files) > 1 else "")
            raise DatasetFileError(f"{shown}: damaged record ({_first_line(e)}); prepare the "
                                   "dataset again with experiments.prepare_data") from e
