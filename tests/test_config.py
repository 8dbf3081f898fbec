"""One definition per setting: the config dataclass, its flags, and the per-task files."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from experiments import cli
from fpt_jax import build
from fpt_jax.config import TrainConfig
from fpt_jax.models.fpt import make_model
from fpt_jax.tasks import task_names, task_options, task_settings
from tests.settings import train_config

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
        if field.name != "task_options":
            assert getattr(parsed, field.name) == field.default, field.name
    assert parsed.task_options.to_dict() == task_options(parsed.task).to_dict()


def test_config_holds_what_every_run_has():
    # issue 25: task options and baseline-only settings are not top-level fields (issue 28
    # added the frozen blocks' four and the alignment stage's five)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert len(names) <= 49
    assert not names & {o for t in task_names() for o in task_settings(t)}
    assert not names & {"match_model", "match_count"}


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


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(TrainConfig)
                                   if f.name != "task_options"], ids=lambda f: f.name)
def test_an_override_of_every_field_reaches_the_config(field):
    text, value = _other_value(field)
    assert value != field.default
    parsed = _parse(f"--config.{field.name}={text}")
    assert getattr(parsed, field.name) == value
    others = [f.name for f in dataclasses.fields(TrainConfig) if f.name != field.name]
    assert all(getattr(parsed, n) == getattr(train_config(), n) for n in others)


_OPTION_VALUES = {int: ("7", 7), float: ("0.25", 0.25), bool: ("false", False),
                  str: ("some_value", "some_value")}


@pytest.mark.parametrize("task,option", [(t, o) for t in task_names() if t != "synthetic"
                                         for o in task_settings(t)], ids=str)
def test_an_override_of_every_task_option_reaches_the_config(task, option):
    text, value = _OPTION_VALUES[task_options(task).get_type(option)]
    if value == task_options(task)[option]:
        text, value = ("true", True) if value is False else (text, value)
    parsed = _parse(f"--config=experiments/configs/{task}.py",
                    f"--config.task_options.{option}={text}")
    assert parsed.task_options[option] == value
    file_options = cli.load_config_file(f"experiments/configs/{task}.py").task_options
    assert all(parsed.task_options[o] == file_options[o] for o in file_options if o != option)
    assert _parse(f"--config=experiments/configs/{task}.py",
                  f"--config.task_options.{option}=none").task_options[option] is None


def test_a_tuple_field_reads_none_as_not_set():
    assert _parse("--config.mesh=(2,2)").mesh == (2, 2)
    assert _parse("--config=experiments/configs/bit_xor.py", "--config.mesh=(2,2)",
                  "--config.mesh=none").mesh is None


def test_a_config_file_then_overrides_on_top():
    parsed = _parse("--config=experiments/configs/remote_homology.py",
                    "--config.learning_rate=3e-4", "--config.task_options.bucket_size=none")
    assert (parsed.task, parsed.task_options.max_length, parsed.learning_rate,
            parsed.task_options.bucket_size) == ("remote_homology", 1024, 3e-4, None)


@pytest.mark.slow
def test_helpfull_lists_every_config_field_once():
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--helpfull"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={"FPT_JAX_HUGEPAGES": "0", "PATH": "/usr/bin:/bin"}).stdout
    for field in dataclasses.fields(TrainConfig):
        assert out.count(f"--config.{field.name} ") == 1, field.name
    flat = " ".join(out.split())  # absl wraps help lines
    for task in task_names():  # each task's options, once, with their defaults
        line = re.search(rf" {task}: (.*?)(?= \w+: |$)", flat).group(1)
        assert all(len(re.findall(rf"(?<![\w.]){o}=", line)) == 1
                   for o in task_settings(task)), line
    assert "--workdir" in out and "--coordinator_address" in out


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_task_config_builds_its_task_and_model(path, tmp_path):
    cfg = cli.load_config_file(str(path))
    assert cfg.validate() is cfg
    # The paper's defaults are not repeated in the files: TrainConfig holds them.
    assert (cfg.model, cfg.trainable, cfg.optimizer, cfg.grad_clip, cfg.dropout) == (
        "gpt2", "fpt", "adam", 1.0, 0.1)
    if "data_dir" in task_settings(cfg.task):  # dataset tasks read their files lazily
        cfg = dataclasses.replace(cfg, task_options={**cfg.task_options.to_dict(),
                                                     "data_dir": str(tmp_path)})
    task = cfg.make_task()
    config, _ = build.backbone(dataclasses.replace(cfg, init="random"))
    model = make_model(cfg, task, config)
    dtype = np.int32 if task.input_kind == "tokens" else np.float32
    x = jax.ShapeDtypeStruct((2, *task.example_shape), dtype)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros(x.shape, dtype)))
    logits = jax.eval_shape(lambda p: model.apply(p, np.zeros(x.shape, dtype)), params)
    assert logits.shape[0] == 2


def test_task_options_are_each_tasks_signature_and_refuse_others():
    cfg = train_config(task="listops", task_options={"max_length": 64})
    assert cfg.task_options.to_dict() == {**task_options("listops").to_dict(), "max_length": 64}
    with pytest.raises(ValueError, match="task_options n: not options of task listops"):
        train_config(task="listops", task_options={"n": 3})
    with pytest.raises(ValueError, match="task_options"):
        dataclasses.replace(train_config(), task="listops")  # bit_xor's options stay
