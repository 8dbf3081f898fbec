"""Where a run's backbone comes from: a preset at random init, pretrained weights, or the
backbone that a finished run ended with.

`init` is 'random' (the preset's architecture, `n_layer`/`n_head`/`n_embd` overrides, the
initialisation from `backbone_seed`), 'pretrained' (`weights`, or the preset's own source:
its hub repository, or for `minilm-l6` the installed package; the architecture is the
weights') or the path of a finished run's workdir. From a workdir, the backbone is what that
run's last checkpoint holds: its trained parameters and its frozen ones (rebuilt exactly as
the run built them, from its recorded identity), in the architecture the identity records.
That gives the paper's "Bit-Memory-pretrained" rows: train on Bit Memory, then freeze that
backbone for another task.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from fpt_jax import weights
from fpt_jax.config import TrainConfig
from fpt_jax.models import backbones

_ARCH = ("n_layer", "n_head", "n_embd")
# The preset whose pretrained weights ship as a named source (weights.NAMED_SOURCES).
_PRESET_SOURCES = {"minilm-l6": "minilm"}
_NAMES = {"gpt2": "GPT-2", "bert": "BERT", "vit": "ViT", "fnet": "FNet",
          "lstm": "LSTM"}  # for messages


def is_run_dir(init: str) -> bool:
    """Whether `init` names a run's workdir rather than 'random' / 'pretrained'."""
    return init not in ("random", "pretrained")


def backbone(cfg: TrainConfig, task=None) -> tuple[Any, dict | None]:
    """The backbone's config (with the run's dropout) and, unless `init='random'`, its
    parameters (host numpy, float32). A parameter-matched LSTM (`match_model`) takes its
    width from `task` (built from `cfg` when not given)."""
    overrides = {k: getattr(cfg, k) for k in _ARCH if getattr(cfg, k) is not None}
    if cfg.model != "auto" and not backbones.family_of_preset(cfg.model).has_checkpoints \
            and cfg.init == "pretrained":
        raise ValueError(f"model={cfg.model} is a baseline with no pretrained weights; "
                         "accepted: init=random (or the workdir of a finished run)")
    if cfg.match_model is not None and not is_run_dir(cfg.init):
        from fpt_jax import baselines
        from fpt_jax.tasks import get_task
        overrides["n_embd"] = baselines.match(
            cfg, task or get_task(cfg.task, **cfg.task_options())).width
    if is_run_dir(cfg.init):
        if overrides or cfg.weights:
            raise ValueError(f"init={cfg.init} takes the backbone of that run; architecture "
                             f"overrides and weights do not apply (got "
                             f"{ {**overrides, 'weights': cfg.weights} })")
        config, params = backbone_of_run(cfg.init, cfg.model)
    elif cfg.init == "random":
        if cfg.model == "auto":
            raise ValueError("model='auto' takes the architecture from pretrained weights; "
                             "with init='random' pass a preset name as model")
        config = backbones.family_of_preset(cfg.model).config_cls.preset(cfg.model, **overrides)
        params = None
    else:
        if overrides:
            raise ValueError(f"architecture overrides {overrides} apply to init='random' "
                             "only; pretrained weights fix the architecture")
        if cfg.model == "auto":  # the architecture is whatever the weights hold
            if not cfg.weights:
                raise ValueError("model='auto' takes the architecture from weights; set "
                                 "weights, or a preset name as model")
            config, params = weights.load(cfg.weights)
        else:
            fam = backbones.family_of_preset(cfg.model)  # an unknown preset is an error first
            expected = fam.presets[cfg.model]
            config, params = weights.load(cfg.weights or _PRESET_SOURCES.get(cfg.model,
                                                                             cfg.model))
            got_fam = backbones.family_of(config).name
            if got_fam != fam.name or any(getattr(config, a) != getattr(expected, a)
                                          for a in _ARCH):
                got = {a: getattr(config, a) for a in _ARCH}
                want = {a: getattr(expected, a) for a in _ARCH}
                raise ValueError(f"weights={cfg.weights} holds a {_NAMES[got_fam]} with {got}, "
                                 f"but model={cfg.model} is a {_NAMES[fam.name]} with {want}; "
                                 "set the matching model (or model='auto' to take the "
                                 "architecture from the weights)")
    return config.with_dropout(cfg.dropout), params


def backbone_of_run(workdir: str, model: str = "auto") -> tuple[Any, dict]:
    """`(config, params)` of the backbone that the run in `workdir` ended with (its newest
    checkpoint), rebuilt from the identity that run recorded."""
    from fpt_jax import freeze, train  # train builds runs from this module
    from fpt_jax.checkpoint import Checkpoints
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"init={workdir}: accepted values are 'pretrained', 'random' or the "
                         "workdir of a finished run (with checkpoints/); "
                         f"{'no such directory' if not os.path.isdir(workdir) else 'it has no checkpoints/'}")
    ckpts = Checkpoints(ckpt_dir, keep=1000, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise ValueError(f"init={workdir}: the run has no checkpoint to take a backbone "
                             "from")
        identity = ckpts.meta(step).get("identity", {})
        if "learning_rates" in identity:
            raise ValueError(f"init={workdir} is a sweep cell ({len(identity['learning_rates'])}"
                             " runs); pass a single run's workdir")
        source = run_config(identity, workdir)
        if model not in ("auto", source.model):
            raise ValueError(f"init={workdir} is a run of model={source.model}, but "
                             f"model={model}; set model={source.model} or model=auto")
        s = train.setup(source)
        # the trainable part only: the optimizer state's layout depends on settings
        # (adamw, nonfinite_skips) that the identity does not record
        trainable = ckpts.restore_trainable(step, s.state.trainable)
    finally:
        ckpts.close()
    return s.config, freeze.merge(trainable, s.frozen)["transformer"]


def run_config(identity: dict, workdir: str) -> TrainConfig:
    """The settings that rebuild a run's model and initial parameters from its identity."""
    try:
        arch = backbones.family(identity.get("family", "gpt2")).config_cls(
            **identity["backbone"])
        cfg = TrainConfig(task=identity["task"], **identity["task_options"],
                          model=identity["model"], init=identity["init"],
                          weights=identity["weights"], trainable=identity["trainable"],
                          seed=identity["seed"], backbone_seed=identity["backbone_seed"],
                          in_layer_sizes=identity["in_layer_sizes"],
                          out_layer_sizes=identity["out_layer_sizes"], dtype="float32",
                          dropout=0.0)
    except (KeyError, TypeError) as e:
        raise ValueError(f"init={workdir}: its checkpoint's identity lacks {e}; a run of an "
                         "older version cannot be used as an init") from None
    if cfg.init == "random":
        cfg = dataclasses.replace(cfg, **{a: getattr(arch, a) for a in _ARCH})
    return cfg
