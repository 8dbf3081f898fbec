"""Image classification tasks: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-10 LRA.

Images are read with tensorflow-datasets from `data_dir`, without TensorFlow:
`tfds.data_source` gives random access over the array_record files that
`experiments.prepare_data` writes (`fpt_images/<dataset>`), or over TFDS's own dataset of
the same name if that is what `data_dir` holds (see `tfds_builders.open_image_source`).

Each image becomes a sequence of patch tokens (einops, as the original):
`[H, W, C] -> [(H / p) * (W / p), p * p * C]`, features ordered (row in patch, column in
patch, channel). What every task yields, per host batch of B:

  task           tokens x features    x float32          options (defaults)
  mnist          64 x 16 (32x32)      [B, 64, 16]        image_size=32 (paper) | 28 (code:
                 49 x 16 (28x28)      [B, 49, 16]          49 tokens), patch_size=4
  fashion_mnist  as mnist                                 as mnist
  cifar10        64 x 48              [B, 64, 48]        patch_size=4, augment=True
  cifar10_lra    1024 x 1 (grayscale) [B, 1024, 1]       patch_size=1, augment=True

and y int32 [B] in 0..9; eval batches add mask float32 [B]. Preprocessing follows the
original code: pixels scaled to [0, 1]; MNIST's Normalize(0, 1) is the identity; the paper's
32x32 MNIST is a bilinear resize (half-pixel centres, as torch's Resize). CIFAR-10 is
normalised per channel with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010);
CIFAR-10 LRA is converted to grayscale (0.2989 R + 0.587 G + 0.114 B) and normalised with
(0.5, 0.5). Training augmentation (`augment`, on for the CIFAR tasks, as the original's
data_aug=True default): random crop of 32 after zero padding 4, horizontal flip with p=1/2,
rotation by a uniform angle in [-20, 20] degrees (nearest neighbour, zero fill), all applied
before normalisation as torchvision does. Its random parameters for the whole global batch
come from (seed, split, step), so a batch does not depend on how many hosts share it.

The 'validation' split is a deterministic hold-out of `validation_fraction` (default 10%) of
the training set: a random subset drawn with a fixed seed, the same for every run and every
seed, never trained on; 'test' stays untouched until the selected step (the paper has no
validation split; Rothermel et al. select on one).
`source` picks the dataset layout: 'fpt' (fpt_images/<dataset>), 'tfds' (TFDS's own), or
'auto' (the default: the first found). `data_dir` defaults to $TFDS_DATA_DIR or
~/tensorflow_datasets. Shuffling, host shards and eval coverage: see `data_utils`.
"""
from __future__ import annotations

import os
from typing import Iterator

import einops
import jax
import numpy as np

from fpt_jax.tasks import data_utils
from fpt_jax.tasks import tfds_builders
from fpt_jax.tasks.base import Batch, Task, classification_metrics, register, split_id

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)
_AUG_TAG = 0xA116
_HOLDOUT_SEED = 0x4E1D  # the validation hold-out: one draw for every run


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation weights (align_corners=False, edge clamped)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m.astype(np.float32)


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """float [B, H, W, C] -> [B, size, size, C]."""
    mh = resize_matrix(images.shape[1], size)
    mw = resize_matrix(images.shape[2], size)
    x = np.moveaxis(images.astype(np.float32), -1, 1)  # [B, C, H, W]
    return np.ascontiguousarray(np.moveaxis(mh @ x @ mw.T, 1, -1))


def sample_augmentation(rng: np.random.Generator, n: int, pad: int = 4,
                        max_degrees: float = 20.0) -> dict[str, np.ndarray]:
    """Random crop offsets in [0, 2 * pad], flips with p=1/2, angles in [-max, max] degrees."""
    return {"dy": rng.integers(0, 2 * pad + 1, n), "dx": rng.integers(0, 2 * pad + 1, n),
            "flip": rng.random(n) < 0.5, "angle": rng.uniform(-max_degrees, max_degrees, n)}


def augment(images: np.ndarray, params: dict[str, np.ndarray], pad: int = 4) -> np.ndarray:
    """torchvision's RandomCrop(size, padding=pad) -> RandomHorizontalFlip -> RandomRotation
    (nearest, fill 0, counter-clockwise for positive angles) on float [B, H, W, C], as one
    gather: each output pixel is traced back through the rotation, the flip and the crop."""
    b, h, w, _ = images.shape
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    theta = np.deg2rad(params["angle"])[:, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    # Inverse rotation in math coordinates (y up) about the image centre.
    u, v = x - cx, cy - y
    ys = np.rint(cy - (-u * sin + v * cos)).astype(np.int64)
    xs = np.rint(cx + (u * cos + v * sin)).astype(np.int64)
    valid = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    xs = np.where(params["flip"][:, None, None], w - 1 - xs, xs)
    ys = ys + params["dy"][:, None, None] - pad
    xs = xs + params["dx"][:, None, None] - pad
    valid &= (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out = images[np.arange(b)[:, None, None], np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)]
    return out * valid[..., None].astype(images.dtype)


class ImageTask(Task):
    """An image dataset read with tfds.data_source, patchified into tokens."""
    input_kind = "real"
    output_dim = 10
    splits = ("train", "validation", "test")
    eval_split = "validation"
    dataset: str  # fpt_images config name (= TFDS's own name)
    native_size: int
    channels: int  # channels of the model input (after an optional grayscale conversion)

    def __init__(self, *, data_dir: str | None = None, patch_size: int = 4,
                 image_size: int | None = None, augment: bool = False, source: str = "auto",
                 validation_fraction: float = 0.1):
        image_size = self.native_size if image_size is None else int(image_size)
        if image_size < 1:
            raise ValueError(f"task {self.name}: image_size must be >= 1, got {image_size}")
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"task {self.name}: patch_size={patch_size} must divide "
                             f"image_size={image_size}")
        if source not in ("auto", "fpt", "tfds"):
            raise ValueError(f"task {self.name}: source must be 'auto', 'fpt' or 'tfds', got "
                             f"{source!r}")
        if not 0 < validation_fraction < 1:
            raise ValueError(f"task {self.name}: validation_fraction must be in (0, 1), got "
                             f"{validation_fraction}")
        if data_dir is None:
            data_dir = os.environ.get("TFDS_DATA_DIR",
                                      os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
        self.data_dir, self.source = os.fspath(data_dir), source
        self.patch_size, self.image_size = int(patch_size), image_size
        self.augment, self.validation_fraction = bool(augment), float(validation_fraction)
        tokens = (image_size // patch_size) ** 2
        self.input_dim = patch_size * patch_size * self.channels
        self.example_shape = (tokens, self.input_dim)
        self._sources: dict = {}
        self._records: dict[str, tuple[str, np.ndarray]] = {}

    # --- reading --------------------------------------------------------------------------

    def _source(self, tfds_split: str):
        if tfds_split not in self._sources:
            self._sources[tfds_split] = tfds_builders.open_image_source(
                self.dataset, tfds_split, self.data_dir, self.source)
        return self._sources[tfds_split]

    def _where(self, split: str) -> tuple[str, np.ndarray]:
        """(TFDS split, its record indices in our split's order) behind one of our splits."""
        self.check_split(split)
        if split not in self._records:
            self._records[split] = self._split_records(split)
        return self._records[split]

    def _split_records(self, split: str) -> tuple[str, np.ndarray]:
        if split == "test":
            return "test", np.arange(len(self._source("test")))
        n = len(self._source("train"))
        held_out = max(1, round(self.validation_fraction * n))
        if held_out >= n:
            raise ValueError(f"task {self.name}: validation_fraction="
                             f"{self.validation_fraction} leaves no training example of {n}")
        # A fixed seed, not the run's: every run holds out the same examples.
        order = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
        chosen = np.sort(order[:held_out] if split == "validation" else order[held_out:])
        return "train", chosen

    is_dataset = True

    def num_examples(self, split: str) -> int:
        return len(self._where(split)[1])

    def prepare(self, split: str) -> None:
        """Opens the split and reads its first and last example (format checked)."""
        n = self.num_examples(split)
        if n < 1:
            raise ValueError(f"task {self.name}: split {split!r} in {self.data_dir} is empty")
        self._read(split, np.array([0, n - 1]))

    def _read(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [B, H, W, C_stored] and int32 labels [B] at split indices `idx`."""
        tfds_split, records = self._where(split)
        source = self._source(tfds_split)
        keys = [int(records[i]) for i in idx]
        try:
            records = source.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data's __getitems__ is not callable this way
            records = [source[k] for k in keys]
        images = np.stack([np.asarray(r["image"]) for r in records])
        expect = (self.native_size, self.native_size, self.stored_channels)
        if images.shape[1:] != expect or images.dtype != np.uint8:
            raise ValueError(f"task {self.name}: {self.dataset} in {self.data_dir} has images "
                             f"{images.dtype} {images.shape[1:]}, expected uint8 {expect}")
        labels = np.array([int(r["label"]) for r in records], np.int32)
        return images, labels

    # --- preprocessing --------------------------------------------------------------------

    stored_channels: int = 1

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        return x

    def _to_float(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 255.0
        if self.image_size != self.native_size:
            x = resize_bilinear(x, self.image_size)
        return x

    def preprocess(self, images: np.ndarray, aug: dict[str, np.ndarray] | None) -> np.ndarray:
        """uint8 [B, H, W, C] -> float32 tokens [B, T, F]."""
        x = self._to_float(images)
        if aug is not None:
            x = augment(x, aug)
        x = self._normalize(x)
        p = self.patch_size
        x = einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        return np.ascontiguousarray(x, dtype=np.float32)

    # --- the contract ---------------------------------------------------------------------

    def batch(self, split: str, step: int, batch_size: int, *, seed: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        n = self.num_examples(split)
        _, idx = data_utils.train_indices(n, step, batch_size, seed=seed, split=split,
                                          process_index=process_index,
                                          process_count=process_count)
        images, labels = self._read(split, idx)
        aug = None
        if self.augment and split == "train":
            rng = np.random.default_rng([seed, split_id(split), step, _AUG_TAG])
            params = sample_augmentation(rng, batch_size * process_count)
            lo = process_index * batch_size
            aug = {k: v[lo:lo + batch_size] for k, v in params.items()}
        return {"x": self.preprocess(images, aug), "y": labels}

    def eval_batches(self, split: str, batch_size: int, *, seed: int, num_batches: int | None,
                     process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
        """The host's shard of `split` once, in order, without augmentation. As the task
        contract says for dataset tasks, the whole split is covered: `num_batches` and
        `seed` are ignored."""
        del seed, num_batches
        n = self.num_examples(split)
        for per_host, mask in data_utils.eval_index_batches(
                n, batch_size, process_index=process_index, process_count=process_count):
            images, labels = self._read(split, per_host[process_index])
            yield {"x": self.preprocess(images, None), "y": labels, "mask": mask}

    def per_example_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        return classification_metrics(logits, batch["y"])


class _MnistFamily(ImageTask):
    native_size = 28
    channels = stored_channels = 1

    def __init__(self, *, data_dir: str | None = None, patch_size: int = 4,
                 image_size: int = 32, augment: bool = False, source: str = "auto",
                 validation_fraction: float = 0.1):
        super().__init__(data_dir=data_dir, patch_size=patch_size, image_size=image_size,
                         augment=augment, source=source,
                         validation_fraction=validation_fraction)


@register("mnist")
class MNIST(_MnistFamily):
    """MNIST. image_size=32 (default) is the paper's 64 tokens of 16; 28 is the code's 49."""
    name = dataset = "mnist"


@register("fashion_mnist")
class FashionMNIST(_MnistFamily):
    """Fashion-MNIST: MNIST's format, options and defaults (not in the paper)."""
    name = dataset = "fashion_mnist"


@register("cifar10")
class CIFAR10(ImageTask):
    """CIFAR-10, RGB: 4x4 patches -> 64 tokens of 48 features."""
    name = dataset = "cifar10"
    native_size = 32
    channels = stored_channels = 3

    def __init__(self, *, data_dir: str | None = None, patch_size: int = 4,
                 augment: bool = True, source: str = "auto", validation_fraction: float = 0.1):
        super().__init__(data_dir=data_dir, patch_size=patch_size, image_size=32,
                         augment=augment, source=source,
                         validation_fraction=validation_fraction)

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        return (x - CIFAR10_MEAN) / CIFAR10_STD


@register("cifar10_lra")
class CIFAR10LRA(ImageTask):
    """CIFAR-10 in grayscale, one pixel per token: 1024 tokens of 1 feature (LRA's image
    task as the FPT code ran it: real-valued pixels, not pixel-value token ids)."""
    name = "cifar10_lra"
    dataset = "cifar10"
    native_size = 32
    channels, stored_channels = 1, 3

    def __init__(self, *, data_dir: str | None = None, patch_size: int = 1,
                 augment: bool = True, source: str = "auto", validation_fraction: float = 0.1):
        super().__init__(data_dir=data_dir, patch_size=patch_size, image_size=32,
                         augment=augment, source=source,
                         validation_fraction=validation_fraction)

    def _to_float(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 255.0
        return (x @ GRAY_WEIGHTS)[..., None]

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        return (x - 0.5) / 0.5
