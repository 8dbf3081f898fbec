"""Image tasks: shapes, sharding, determinism, preprocessing, and both TFDS dataset layouts."""
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from fpt_jax.tasks import get_task, images as images_lib, tfds_builders
from tests.test_prepare_data import write_cifar_raw, write_mnist_raw

N_TRAIN, N_TEST = 48, 17


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny real fpt_images datasets (mnist, fashion_mnist, cifar10) prepared from raw files
    written in their real formats."""
    root = tmp_path_factory.mktemp("images")
    raw = {}
    for name in ("mnist", "fashion_mnist"):
        raw[name] = write_mnist_raw(root / f"{name}_raw", n_train=N_TRAIN, n_test=N_TEST,
                                    seed=len(name))
        tfds_builders.prepare_images(name, root / f"{name}_raw", root / "tfds")
    raw["cifar10"] = write_cifar_raw(root / "cifar_raw", n_per_batch=N_TRAIN // 5 + 1,
                                     n_test=N_TEST)
    tfds_builders.prepare_images("cifar10", root / "cifar_raw", root / "tfds")
    return root / "tfds"


def ids_of(batch) -> np.ndarray:
    """Example numbers encoded in the first two pixels (mnist at 28x28, patch 4)."""
    first = np.rint(batch["x"][:, 0, :2] * 255).astype(np.int64)
    return first[:, 0] + 256 * first[:, 1]


EXPECTED = {  # task, options -> (x shape without batch)
    ("mnist", ()): (64, 16),
    ("mnist", (("image_size", 28),)): (49, 16),
    ("fashion_mnist", ()): (64, 16),
    ("fashion_mnist", (("image_size", 28), ("patch_size", 7))): (16, 49),
    ("cifar10", ()): (64, 48),
    ("cifar10_lra", ()): (1024, 1),
    ("cifar10", (("patch_size", 8),)): (16, 192),
}


@pytest.mark.parametrize("source", ["fpt", "tfds"])
def test_shapes_under_mock_data(source):
    """tfds.testing.mock_data serves tfds.data_source without TensorFlow: every task yields
    the documented shapes and dtypes from both dataset layouts."""
    with tfds.testing.mock_data(num_examples=12):
        for (name, options), shape in EXPECTED.items():
            task = get_task(name, data_dir="/unused", source=source, **dict(options))
            assert task.example_shape == shape and task.input_dim == shape[1]
            assert (task.input_kind, task.output_dim) == ("real", 10)
            batch = task.batch("train", 2, 5, seed=0)
            assert set(batch) == {"x", "y"}
            assert batch["x"].shape == (5, *shape) and batch["x"].dtype == np.float32
            assert batch["y"].shape == (5,) and batch["y"].dtype == np.int32
            assert np.isfinite(batch["x"]).all() and ((0 <= batch["y"]) & (batch["y"] < 10)).all()
            evals = list(task.eval_batches("test", 5, seed=0, num_batches=None))
            assert len(evals) == 3  # 12 examples in batches of 5, the last padded
            assert evals[-1]["mask"].tolist() == [1, 1, 0, 0, 0]
            assert evals[0]["x"].shape == (5, *shape) and evals[0]["mask"].dtype == np.float32


def test_training_shards_are_disjoint_and_cover_each_epoch(data_dir):
    task = get_task("mnist", data_dir=str(data_dir), image_size=28, validation_fraction=0.25)
    assert task.num_examples("train") == 36
    train_ids = sorted(set(range(N_TRAIN)) - set(
        np.concatenate([ids_of(b) for b in task.eval_batches("validation", 12, seed=0,
                                                            num_batches=None)])))
    hosts, per_host = 3, 4  # global batch 12: 3 steps per epoch
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            parts = [ids_of(task.batch("train", step, per_host, seed=7, process_index=i,
                                       process_count=hosts)) for i in range(hosts)]
            seen.extend(np.concatenate(parts))
        assert sorted(seen) == train_ids, f"epoch {epoch} is not a permutation"
    # epochs are shuffled differently
    first = ids_of(task.batch("train", 0, 12, seed=7))
    second = ids_of(task.batch("train", 3, 12, seed=7))
    assert not np.array_equal(first, second)


def test_same_seed_same_batches_and_host_count_invariance(data_dir):
    """A batch is a pure function of (split, step, seed, host); the global batch (with its
    augmentation) does not depend on how many hosts share it."""
    for name in ("mnist", "cifar10", "cifar10_lra"):
        a = get_task(name, data_dir=str(data_dir))
        b = get_task(name, data_dir=str(data_dir))
        for step in (0, 6, 12):  # step 12 straddles an epoch boundary of cifar10 (n=50)
            one = a.batch("train", step, 8, seed=3)
            np.testing.assert_array_equal(one["x"], b.batch("train", step, 8, seed=3)["x"])
            halves = [b.batch("train", step, 4, seed=3, process_index=i, process_count=2)
                      for i in range(2)]
            np.testing.assert_array_equal(one["x"], np.concatenate([h["x"] for h in halves]))
            np.testing.assert_array_equal(one["y"], np.concatenate([h["y"] for h in halves]))
        assert not np.array_equal(a.batch("train", 0, 8, seed=3)["x"],
                                  a.batch("train", 0, 8, seed=4)["x"])


def test_eval_covers_each_host_shard_once(data_dir):
    task = get_task("mnist", data_dir=str(data_dir), image_size=28)
    seen, counts = [], []
    for host in range(3):
        batches = list(task.eval_batches("test", 4, seed=0, num_batches=None, process_index=host,
                                         process_count=3))
        counts.append(len(batches))
        for batch in batches:
            assert batch["x"].shape == (4, 49, 16)
            seen.extend(ids_of(batch)[batch["mask"] == 1])
    assert counts == [2, 2, 2]  # the same number of batches on every host
    assert sorted(seen) == list(range(N_TEST))
    # dataset tasks always cover their split (num_batches is for generated tasks)
    assert len(list(task.eval_batches("test", 4, seed=0, num_batches=1))) == 5


def test_validation_split_is_a_fixed_hold_out_of_train(data_dir):
    task = get_task("fashion_mnist", data_dir=str(data_dir), image_size=28,
                    validation_fraction=0.2)
    assert task.splits == ("train", "validation", "test") and task.eval_split == "validation"
    held_out = round(0.2 * N_TRAIN)
    assert task.num_examples("train") == N_TRAIN - held_out
    val = np.concatenate([ids_of(b)[b["mask"] == 1] for b in
                          task.eval_batches("validation", 5, seed=0, num_batches=None)])
    train = np.concatenate([ids_of(task.batch("train", s, 10, seed=0)) for s in range(4)])
    assert len(set(val)) == held_out and not set(train) & set(val)
    assert set(train) == set(range(N_TRAIN)) - set(val)
    assert sorted(val) != list(range(N_TRAIN - held_out, N_TRAIN))  # a random subset
    # the same examples for every run and seed; the default holds out 10%
    again = get_task("fashion_mnist", data_dir=str(data_dir), image_size=28,
                     validation_fraction=0.2)
    assert np.array_equal(again._where("validation")[1], task._where("validation")[1])
    assert get_task("mnist", data_dir=str(data_dir)).num_examples("validation") == round(
        0.1 * N_TRAIN)
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        get_task("mnist", data_dir=str(data_dir), validation_fraction=1.0)


def test_preprocessing_matches_the_original(data_dir):
    raw = tfds_builders.open_image_source("cifar10", "test", data_dir)
    rec = raw[0]
    image = np.asarray(rec["image"]).astype(np.float32) / 255
    # cifar10 without augmentation: per-channel normalisation, (p1 p2 c) patch features
    task = get_task("cifar10", data_dir=str(data_dir), augment=False)
    x = task.preprocess(np.asarray(rec["image"])[None], None)[0]
    patch = (image[:4, 4:8] - images_lib.CIFAR10_MEAN) / images_lib.CIFAR10_STD
    np.testing.assert_allclose(x[1], patch.reshape(-1), rtol=1e-5, atol=1e-5)
    # cifar10_lra: grayscale, one pixel per token in [-1, 1]
    lra = get_task("cifar10_lra", data_dir=str(data_dir), augment=False)
    x = lra.preprocess(np.asarray(rec["image"])[None], None)[0]
    gray = image @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(x[:, 0], (gray.reshape(-1) - 0.5) / 0.5, rtol=1e-5, atol=1e-5)
    # eval batches are never augmented; training batches of the CIFAR tasks are
    ev = next(task.eval_batches("test", 2, seed=0, num_batches=1))
    aug = get_task("cifar10", data_dir=str(data_dir))
    assert np.array_equal(next(aug.eval_batches("test", 2, seed=0, num_batches=1))["x"],
                          ev["x"])
    assert not np.array_equal(aug.batch("train", 0, 8, seed=0)["x"],
                              task.batch("train", 0, 8, seed=0)["x"])


def test_mnist_resize_is_torch_bilinear():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    ours = images_lib.resize_bilinear(images, 32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                          size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def _params(**kw):
    p = {"dy": 4, "dx": 4, "flip": False, "angle": 0.0}
    p.update(kw)
    return {k: np.array([v]) for k, v in p.items()}


def test_augmentation_geometry():
    img = np.random.default_rng(1).random((1, 32, 32, 3)).astype(np.float32)
    aug = images_lib.augment
    np.testing.assert_array_equal(aug(img, _params()), img)  # centre crop, no flip/rotation
    np.testing.assert_array_equal(aug(img, _params(flip=True)), img[:, :, ::-1])
    np.testing.assert_array_equal(aug(img, _params(angle=90.0))[0], np.rot90(img[0]))  # CCW
    shifted = aug(img, _params(dy=0, dx=8))  # crop 4 px up / right of the padded image
    np.testing.assert_array_equal(shifted[0, 4:, :28], img[0, :28, 4:])
    assert shifted[0, :4].max() == 0 and shifted[0, :, 28:].max() == 0  # zero padding
    rotated = aug(img, _params(angle=20.0))[0]
    assert rotated[0, 0].max() == 0  # corners rotate out of the image: zero fill
    np.testing.assert_array_equal(rotated[15:17, 15:17], img[0, 15:17, 15:17])
    params = images_lib.sample_augmentation(np.random.default_rng(0), 1000)
    assert params["dy"].min() == 0 and params["dy"].max() == 8
    assert np.abs(params["angle"]).max() <= 20 and 0.4 < params["flip"].mean() < 0.6


class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS's own `mnist` layout (version 3.0.1, Image + ClassLabel features), as if prepared
    elsewhere with TensorFlow; PNGs are encoded with PIL here, so no TensorFlow is needed."""
    VERSION = tfds.core.Version("3.0.1")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Raw IDX files written by the test."
    code_path = epath.Path(__file__)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(
            *tfds_builders.read_idx_split(dl_manager.manual_dir, split))
            for split in ("train", "test")}

    def _generate_examples(self, images, labels):
        from PIL import Image
        for i, (image, label) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(image[..., 0]).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "label": int(label)}


def test_reads_tfds_own_mnist_layout(tmp_path):
    pytest.importorskip("PIL")
    raw = write_mnist_raw(tmp_path / "raw", n_train=10, n_test=6, seed=5)
    Mnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "dl"),
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))
    assert (tmp_path / "mnist" / "3.0.1").is_dir() and not (tmp_path / "fpt_images").exists()
    task = get_task("mnist", data_dir=str(tmp_path), image_size=28)  # source='auto'
    assert task.num_examples("test") == 6
    batch = next(task.eval_batches("test", 6, seed=0, num_batches=None))
    assert sorted(ids_of(batch)) == list(range(6))
    by_id = dict(zip(ids_of(batch), batch["y"]))
    assert [by_id[i] for i in range(6)] == raw["test"][1].tolist()


def test_clear_errors(tmp_path, data_dir):
    task = get_task("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"prepare_data --dataset=cifar10"):
        task.batch("train", 0, 2, seed=0)
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=32"):
        get_task("mnist", data_dir=str(data_dir), patch_size=5)
    with pytest.raises(ValueError, match="source must be"):
        get_task("mnist", data_dir=str(data_dir), source="web")
    with pytest.raises(ValueError, match="no split 'valid'"):
        get_task("mnist", data_dir=str(data_dir)).batch("valid", 0, 2, seed=0)
    with pytest.raises(ValueError, match="process_index=2 must be in"):
        get_task("mnist", data_dir=str(data_dir)).batch("train", 0, 2, seed=0,
                                                        process_index=2, process_count=2)


def test_tfrecord_dataset_gives_a_clear_error(tmp_path, data_dir):
    """A dataset prepared in TFDS's default tfrecord format cannot be read without
    TensorFlow; the error says so (simulated by relabelling an array_record dataset)."""
    import json
    import shutil
    src = data_dir / "fpt_images" / "mnist"
    dst = tmp_path / "fpt_images" / "mnist"
    shutil.copytree(src, dst)
    info_path = next(dst.glob("*/dataset_info.json"))
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    task = get_task("mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs the array_record file format"):
        task.batch("train", 0, 2, seed=0)
