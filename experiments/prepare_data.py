r"""Prepares datasets offline, without TensorFlow and without the internet.

Images: local raw files -> a tensorflow-datasets dataset (`fpt_images/<dataset>`, array_record
files) in --data_dir, which the image tasks read with tfds.data_source:

  # Fashion-MNIST from Debian's dataset-fashion-mnist package
  python -m experiments.prepare_data --dataset=fashion_mnist \
      --raw_dir=/usr/share/datasets/fashion-mnist --data_dir=/data/tfds
  # MNIST from the four IDX files (train-images-idx3-ubyte[.gz], ...)
  python -m experiments.prepare_data --dataset=mnist --raw_dir=/data/mnist_raw --data_dir=/data/tfds
  # CIFAR-10 (also serves cifar10_lra) from cifar-10-batches-py/ or cifar-10-python.tar.gz
  python -m experiments.prepare_data --dataset=cifar10 --raw_dir=/data/cifar --data_dir=/data/tfds

ListOps: generates {task}_train.tsv / _val.tsv / _test.tsv with LRA's grammar and limits
(LRA's defaults: 96,000 / 2,000 / 2,000 examples, depth <= 10, <= 10 arguments,
500 < length < 2000; about 0.002 s per example on one CPU core):

  python -m experiments.prepare_data --dataset=listops --data_dir=/data/listops

Then train with --data_dir pointing at the same directory.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags

from fpt_jax.tasks import listops, tfds_builders

IMAGE_DATASETS = sorted(tfds_builders.IMAGE_CONFIGS)

_DATASET = flags.DEFINE_enum("dataset", None, IMAGE_DATASETS + ["listops"],
                             "Dataset to prepare.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output: the tensorflow-datasets data_dir "
                                "(images) or the directory of the TSV files (listops).",
                                required=True)
_RAW_DIR = flags.DEFINE_string("raw_dir", None, "Images: directory of the raw files (IDX "
                               "files for mnist/fashion_mnist; CIFAR-10 python batches).")
_TASK_NAME = flags.DEFINE_string("listops_task", "basic", "ListOps: file prefix.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 96_000, "ListOps: training examples.")
_NUM_VAL = flags.DEFINE_integer("num_val", 2_000, "ListOps: validation examples.")
_NUM_TEST = flags.DEFINE_integer("num_test", 2_000, "ListOps: test examples.")
_MAX_DEPTH = flags.DEFINE_integer("max_depth", 10, "ListOps: maximum tree depth.")
_MAX_ARGS = flags.DEFINE_integer("max_args", 10, "ListOps: maximum arguments per operator.")
_MIN_LENGTH = flags.DEFINE_integer("min_length", 500, "ListOps: lengths must exceed this.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2000, "ListOps: lengths must stay below this.")
_SEED = flags.DEFINE_integer("seed", 0, "ListOps: generator seed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.time()
    try:
        if _DATASET.value == "listops":
            for flag in (_NUM_TRAIN, _NUM_VAL, _NUM_TEST):
                if flag.value < 0:
                    raise ValueError(f"--{flag.name} must be >= 0, got {flag.value}")
            paths = listops.write_listops(
                _DATA_DIR.value, task_name=_TASK_NAME.value, num_train=_NUM_TRAIN.value,
                num_val=_NUM_VAL.value, num_test=_NUM_TEST.value, seed=_SEED.value,
                max_depth=_MAX_DEPTH.value, max_args=_MAX_ARGS.value,
                min_length=_MIN_LENGTH.value, max_length=_MAX_LENGTH.value)
            for split, path in paths.items():
                print(f"wrote {path} ({split})")
        else:
            if _RAW_DIR.value is None:
                raise ValueError(f"--raw_dir is required for --dataset={_DATASET.value}")
            out = tfds_builders.prepare_images(_DATASET.value, _RAW_DIR.value, _DATA_DIR.value)
            print(f"prepared {out}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"done in {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
