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

Then train with --config.task_options.data_dir pointing at the same directory
(experiments.reproduce: --data_dir).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from absl import app, flags

from experiments import cli
from fpt_jax.tasks import listops, tfds_builders

IMAGE_DATASETS = sorted(tfds_builders.IMAGE_CONFIGS)

_DATASET = flags.DEFINE_enum("dataset", None, IMAGE_DATASETS + ["listops"],
                             "Dataset to prepare.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output: the tensorflow-datasets data_dir "
                                "(images; a dataset already prepared there is kept) or the "
                                "directory of the TSV files (listops; existing files of the "
                                "same --listops_task are replaced).", required=True)
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

_LISTOPS_FLAGS = (_TASK_NAME, _NUM_TRAIN, _NUM_VAL, _NUM_TEST, _MAX_DEPTH, _MAX_ARGS,
                  _MIN_LENGTH, _MAX_LENGTH, _SEED)


def _at_least(holder, low: int) -> None:
    if holder.value < low:
        raise ValueError(f"--{holder.name}={holder.value}; accepted: an integer >= {low}")


def longest_listops(max_depth: int, max_args: int, cap: int) -> int:
    """The most tokens an expression can have under these limits (every operator at full
    arity down to max_depth), or more than `cap`."""
    longest = 1  # a value, at max_depth
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest  # operator + arguments + ']'
        if longest > cap:
            break
    return longest


def check_listops_flags() -> None:
    if _RAW_DIR.value is not None:
        raise ValueError(f"--raw_dir={_RAW_DIR.value} is for the image datasets; "
                         "--dataset=listops generates its data")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", _TASK_NAME.value):
        raise ValueError(f"--listops_task={_TASK_NAME.value!r}; accepted: a file-name prefix "
                         "of letters, digits, '_', '.', '-' (no '/')")
    for holder in (_NUM_TRAIN, _NUM_VAL, _NUM_TEST, _MAX_DEPTH):
        _at_least(holder, 1)  # an empty split file would only fail later, in training
    _at_least(_MAX_ARGS, 2)
    _at_least(_MIN_LENGTH, 0)
    _at_least(_SEED, 0)
    if _MAX_LENGTH.value <= _MIN_LENGTH.value + 1:
        raise ValueError(f"--min_length={_MIN_LENGTH.value} --max_length={_MAX_LENGTH.value}: "
                         "lengths must lie strictly between them; accepted: --max_length >= "
                         "--min_length + 2")
    longest = longest_listops(_MAX_DEPTH.value, _MAX_ARGS.value, _MIN_LENGTH.value)
    if longest <= _MIN_LENGTH.value:  # the generator would draw forever
        raise ValueError(f"--min_length={_MIN_LENGTH.value}: no expression with "
                         f"--max_depth={_MAX_DEPTH.value} and --max_args={_MAX_ARGS.value} "
                         f"is longer than {longest} token(s); accepted: a smaller --min_length "
                         "or a larger --max_depth / --max_args")


def check_image_flags() -> None:
    given = [f"--{h.name}" for h in _LISTOPS_FLAGS if flags.FLAGS[h.name].present]
    if given:  # e.g. --num_train does not subsample MNIST: say so rather than ignore it
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} "
                         f"only to --dataset=listops, not "
                         f"--dataset={_DATASET.value} (which is prepared whole)")
    if _RAW_DIR.value is None:
        raise ValueError(f"--raw_dir is required for --dataset={_DATASET.value}: the "
                         "directory of its raw files")
    if not Path(_RAW_DIR.value).is_dir():
        raise ValueError(f"--raw_dir={_RAW_DIR.value} is not a directory")


def check_data_dir(data_dir: Path) -> None:
    """--data_dir exists (created here) and takes files: checked before anything is read or
    generated."""
    cli.writable_dir(data_dir, "--data_dir")


def check_prepared(prepared: Path) -> None:
    """An earlier preparation that TFDS would keep: its files are checked, so that a damaged
    one is reported here rather than in training."""
    for split in ("train", "test"):
        try:
            tfds_builders.open_image_source(_DATASET.value, split, _DATA_DIR.value, "fpt")
        except tfds_builders.DatasetFileError as e:
            raise ValueError(f"--data_dir={_DATA_DIR.value} holds a damaged earlier "
                             f"preparation of {_DATASET.value}: {e.detail}; delete {prepared} "
                             "and run this again") from e


def main(argv):
    cli.begin(argv)
    start = time.time()
    try:
        if _DATASET.value == "listops":
            check_listops_flags()
            check_data_dir(Path(_DATA_DIR.value))
            paths = listops.write_listops(
                _DATA_DIR.value, task_name=_TASK_NAME.value, num_train=_NUM_TRAIN.value,
                num_val=_NUM_VAL.value, num_test=_NUM_TEST.value, seed=_SEED.value,
                max_depth=_MAX_DEPTH.value, max_args=_MAX_ARGS.value,
                min_length=_MIN_LENGTH.value, max_length=_MAX_LENGTH.value)
            for split, path in paths.items():
                print(f"wrote {path} ({split})")
        else:
            check_image_flags()
            check_data_dir(Path(_DATA_DIR.value))
            prepared = tfds_builders.fpt_dataset_dir(_DATA_DIR.value, _DATASET.value)
            if any(prepared.glob("*/dataset_info.json")):
                check_prepared(prepared)
                print(f"{prepared} is already prepared (its files check out); kept as it is "
                      "(delete it to prepare again)")
            else:
                out = tfds_builders.prepare_images(_DATASET.value, _RAW_DIR.value,
                                                   _DATA_DIR.value)
                print(f"prepared {out}")
    except (ValueError, OSError) as e:
        cli.fail(str(e))
    print(f"done in {time.time() - start:.1f} s", flush=True)


def run() -> None:
    """The entry point: a bad or missing flag is `error: ...` and exit code 2, too."""
    app.run(main, flags_parser=cli.parse_plain_flags)


if __name__ == "__main__":
    run()
