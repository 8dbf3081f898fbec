"""One definition per setting: the config dataclass, its flags, and the per-task files."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from experiments import cli
from fpt_jax import build
from fpt_jax.config import TASK_FIELDS, TrainConfig
from fpt_jax.models.fpt import make_model
from fpt_jax.tasks import get_task, task_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "experiments" / "configs").glob("*.py"))


def _parse(*args: str) -> TrainConfig:
    """The config that `--config...` flags give, parsed exactly as the entry points do."""
    argv = ["prog", *args]
    fv = flags.FlagValues()
    cli.define_config_flag(fv, argv)
    fv(argv)
    return fv["config"].value


def test_command_line_defaults_are_the_library_defaults():
    parsed = _parse()
    for field in dataclasses.fields(TrainConfig):
        assert getattr(parsed, field.name) == field.default, field.name


def _other_value(field: dataclasses.Field) -> tuple[str, object]:
    """A command-line value for `field` that differs from its default, and what it parses to."""
    default, kind = field.default, str(field.type)
    if default is not None and "None" in kind:
        return "none", None
    if "bool" in kind:
        return ("false", False) if default else ("true", True)
    if "tuple" in kind:
        return "(7, 8)", (7, 8)
    if "int" in kind:
        return "7", 7
    if "float" in kind:
        return "0.25", 0.25
    return "some_value", "some_value"


@pytest.mark.parametrize("field", dataclasses.fields(TrainConfig), ids=lambda f: f.name)
def test_an_override_of_every_field_reaches_the_config(field):
    text, value = _other_value(field)
    assert value != field.default
    parsed = _parse(f"--config.{field.name}={text}")
    assert getattr(parsed, field.name) == value
    others = [f.name for f in dataclasses.fields(TrainConfig) if f.name != field.name]
    assert all(getattr(parsed, n) == getattr(TrainConfig(), n) for n in others)


def test_a_config_file_then_overrides_on_top():
    parsed = _parse("--config=experiments/configs/remote_homology.py",
                    "--config.learning_rate=3e-4", "--config.bucket_size=none")
    assert (parsed.task, parsed.max_length, parsed.learning_rate, parsed.bucket_size) == (
        "remote_homology", 1024, 3e-4, None)


def test_helpfull_lists_every_config_field_once():
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--helpfull"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={"FPT_JAX_HUGEPAGES": "0", "PATH": "/usr/bin:/bin"}).stdout
    for field in dataclasses.fields(TrainConfig):
        assert out.count(f"--config.{field.name} ") == 1, field.name
    assert "--workdir" in out and "--coordinator_address" in out


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_task_config_builds_its_task_and_model(path, tmp_path):
    cfg = cli.load_config_file(str(path))
    assert cfg.validate() is cfg
    # The paper's defaults are not repeated in the files: TrainConfig holds them.
    assert (cfg.model, cfg.trainable, cfg.optimizer, cfg.grad_clip, cfg.dropout) == (
        "gpt2", "fpt", "adam", 1.0, 0.1)
    options = cfg.task_options()
    if "data_dir" in task_settings(cfg.task):
        options["data_dir"] = str(tmp_path)  # dataset tasks read their files lazily
    task = get_task(cfg.task, **options)
    config, _ = build.backbone(dataclasses.replace(cfg, init="random"))
    model = make_model(cfg, task, config)
    dtype = np.int32 if task.input_kind == "tokens" else np.float32
    x = jax.ShapeDtypeStruct((2, *task.example_shape), dtype)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros(x.shape, dtype)))
    logits = jax.eval_shape(lambda p: model.apply(p, np.zeros(x.shape, dtype)), params)
    assert logits.shape[0] == 2


def test_task_fields_are_exactly_the_options_the_tasks_take():
    from fpt_jax.tasks import task_names
    # every option of every task is a config field (the benchmark's synthetic task aside)
    taken = {o for name in task_names() if name != "synthetic" for o in task_settings(name)}
    assert taken == set(TASK_FIELDS)
