"""Which parameters learn: parameter groups, the trainable selection, the optimizer.

One function, `param_group`, maps a parameter path to its group and layer. A selection
string names the trainable groups, optionally restricted to a range of blocks with Python
slice syntax:

    fpt                       the paper's default: input,pos,ln,output (and bridge)
    full / all                everything
    encoder                   everything but frozen blocks of another model (`blocks`)
    input,pos,ln,output,mlp   the paper's "+ MLP" ablation
    output,attn[-2:]          the output head and the last two blocks' attention
    ln[0:6]                   the layer norms of blocks 0-5 (ln_f has no block: plain `ln`)

Frozen is everything not selected. `partition` splits the parameter tree into the trainable
and the frozen part: the train step differentiates and updates the trainable tree only, and
reads the frozen one in place (never an output of the step, so never copied).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fpt_jax.models import backbones

# lstm: the LSTM baseline; bridge and blocks: the linear maps into and out of frozen
# blocks of another model, and those blocks (models/blocks.py)
GROUPS = ("input", "pos", "ln", "attn", "mlp", "lstm", "output", "bridge", "blocks")
LAYERED = ("ln", "attn", "mlp", "lstm", "blocks")
SELECTION_PRESETS = {"fpt": "input,pos,ln,output,bridge", "full": ",".join(GROUPS),
                     "all": ",".join(GROUPS),
                     "encoder": ",".join(g for g in GROUPS if g != "blocks")}
# Paths standing for the frozen-blocks part of a model (its groups), for the settings check.
BLOCKS_PATHS = (("blocks", "proj_in"), ("blocks", "block_0"))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_group(path: Iterable[Any]) -> tuple[str, int | None]:
    """`(group, layer)` of a parameter path such as ('transformer', 'h_3', 'attn', 'c_attn',
    'kernel') -> ('attn', 3). The layer is None outside the blocks. Below `transformer`
    the backbone's family names the group (`models.backbones.param_group`)."""
    keys = _keys(path) if not all(isinstance(k, str) for k in path) else tuple(path)
    top = keys[0]
    if top in ("input", "output"):
        return top, None
    if top == "blocks" and len(keys) > 1:
        if keys[1] in ("proj_in", "proj_out"):
            return "bridge", None
        if keys[1].startswith("block_"):
            return "blocks", int(keys[1].removeprefix("block_"))
    group = backbones.param_group(keys[1:]) if top == "transformer" and len(keys) > 1 else None
    if group is None:
        raise ValueError(f"parameter {'/'.join(keys)} belongs to no group {GROUPS}")
    return group


@dataclasses.dataclass(frozen=True)
class Selection:
    """The trainable part: per group, None (every layer) or the set of layer indices.
    `named`: the groups the spec names itself (not through a preset such as `full`), each
    of which must select parameters of the model it is applied to."""
    groups: dict[str, frozenset[int] | None]
    spec: str
    named: frozenset[str] = frozenset()

    def is_trainable(self, group: str, layer: int | None) -> bool:
        if group not in self.groups:
            return False
        layers = self.groups[group]
        return layers is None or (layer is not None and layer in layers)


_ITEM = re.compile(r"^(?P<group>[a-z_]+)(\[(?P<slice>-?\d*:?-?\d*)\])?$")


def parse_selection(spec: str, n_layer: int, n_blocks: int | None = None) -> Selection:
    """Parses a trainable selection (see the module doc); errors name the bad item. A range
    on `blocks` counts the frozen blocks of another model (`n_blocks` of them), every other
    the backbone's `n_layer`."""
    expanded = ",".join(SELECTION_PRESETS.get(item.strip(), item)
                        for item in _split_items(spec))
    groups: dict[str, frozenset[int] | None] = {}
    for item in filter(None, (s.strip() for s in _split_items(expanded))):
        m = _ITEM.match(item)
        if not m or m.group("group") not in GROUPS:
            raise ValueError(f"unknown trainable group {item!r} in {spec!r}; accepted: groups "
                             f"{GROUPS}, optionally with a block range like attn[-2:], or "
                             f"presets {sorted(SELECTION_PRESETS)}")
        group, slc = m.group("group"), m.group("slice")
        if slc is None:
            groups[group] = None
            continue
        if group not in LAYERED:
            raise ValueError(f"group {group!r} has no blocks; a range like {item!r} is only "
                             f"accepted for {LAYERED}")
        n = n_blocks if group == "blocks" and n_blocks is not None else n_layer
        if ":" in slc:
            start, stop = (int(s) if s else None for s in slc.split(":"))
            layers = range(n)[slice(start, stop)]
        else:
            i = int(slc)
            if not -n <= i < n:
                raise ValueError(f"block {i} in {item!r} is out of range for {n} blocks")
            layers = [i % n]
        if not layers:
            raise ValueError(f"{item!r} selects no block of {n}")
        previous = groups.get(group, frozenset())
        groups[group] = None if previous is None else previous | frozenset(layers)
    if not groups:
        raise ValueError(f"trainable selection {spec!r} selects nothing to train; accepted: "
                         f"groups {GROUPS} or presets {sorted(SELECTION_PRESETS)}")
    named = frozenset(m.group("group") for item in _split_items(spec)
                      if item.strip() not in SELECTION_PRESETS
                      and (m := _ITEM.match(item.strip())))
    return Selection(groups, spec, named)


def _split_items(spec: str) -> list[str]:
    # Commas separate items, except inside brackets (none today, but keep ranges intact).
    return re.split(r",(?![^\[]*\])", spec)


def is_trainable(path: Iterable[Any], selection: Selection) -> bool:
    return selection.is_trainable(*param_group(path))


def partition(params, selection: Selection) -> tuple[dict, dict]:
    """`(trainable, frozen)`: the parameter tree split into two nested dicts of the same
    layout, each holding only its own leaves. The optimizer only ever sees `trainable`, so
    frozen parameters get no gradient, no optimizer state and no update by construction."""
    flat = traverse_util.flatten_dict(params)
    check_named_groups(selection, flat)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, selection)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


@functools.lru_cache(maxsize=None)
def fpt_paths(backbone_config: Any) -> tuple[tuple[str, ...], ...]:
    """FPT's parameter paths on the backbone `backbone_config`, from shapes only (a plan
    checks many cells of one architecture): `input`, `output` and the backbone's."""
    shapes = backbones.family_of(backbone_config).param_shapes(backbone_config)
    return (("input",), ("output",),
            *(("transformer", *p) for p in traverse_util.flatten_dict(shapes)))


def check_named_groups(selection: Selection, paths: Iterable[tuple[str, ...]]) -> None:
    """Every group the selection names by hand has parameters among `paths` (a model's):
    `attn` on the LSTM would otherwise train silently less than asked for."""
    groups = [param_group(p)[0] for p in paths]
    if missing := sorted(selection.named - set(groups), key=GROUPS.index):
        raise ValueError(f"trainable={selection.spec!r}: this model has no {', '.join(missing)} "
                         f"parameters; its groups: {', '.join(dict.fromkeys(groups))}")


def cast_frozen(frozen: dict, dtype) -> dict:
    """The frozen parameters in the compute `dtype`, cast once: they never change, so a
    bfloat16 run keeps them (and reads them every step) at half the bytes. Trainable
    parameters stay float32, and checkpoints (which hold the trainable part) are unaffected."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, frozen)


# A frozen top-level key `<name>` + PER_RUN holds a run's own copy of the subtree `<name>`
# (a random backbone drawn per seed): stacked over runs like every other per-run part, and
# named `<name>` again when merged into the model's tree.
PER_RUN = "@per_run"


def merge(trainable: dict, frozen: dict) -> dict:
    """The whole parameter tree again (no copy: the leaves are the same arrays)."""
    flat = {(k[0].removesuffix(PER_RUN), *k[1:]): v
            for k, v in traverse_util.flatten_dict(frozen).items()}
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def count_table(params, selection: Selection) -> tuple[str, dict[str, dict[str, int]]]:
    """Trainable and frozen parameter counts per group, as text and as numbers."""
    counts = {g: {"trainable": 0, "frozen": 0} for g in GROUPS}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        group, layer = param_group(path)
        key = "trainable" if selection.is_trainable(group, layer) else "frozen"
        counts[group][key] += int(np.prod(leaf.shape))
    total_t = sum(c["trainable"] for c in counts.values())
    total_f = sum(c["frozen"] for c in counts.values())
    lines = [f"trainable selection: {selection.spec!r}",
             f"{'group':<8}{'trainable':>14}{'frozen':>14}"]
    for g, c in counts.items():
        if not c["trainable"] + c["frozen"]:
            continue  # a group this model lacks (lstm on a transformer, attn on the LSTM)
        lines.append(f"{g:<8}{c['trainable']:>14,}{c['frozen']:>14,}")
    share = 100 * total_t / max(total_t + total_f, 1)
    lines.append(f"{'total':<8}{total_t:>14,}{total_f:>14,}   ({share:.3f}% trainable)")
    counts["total"] = {"trainable": total_t, "frozen": total_f}
    return "\n".join(lines), counts
