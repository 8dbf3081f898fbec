"""Frozen pretrained blocks inside a trainable model (Pang et al. 2024, "Frozen Transformers
in Language Models Are Effective Visual Encoder Layers").

After the model's own backbone (a trainable ViT, say), `FrozenBlocks` maps the hidden state
to the blocks' width (`proj_in`), runs one or more blocks taken from another checkpoint of
any family (GPT-2, BERT/MiniLM, ViT, Llama: `Family.block_cls`), and maps back (`proj_out`)
before the head. Its tree, under the model's top-level `blocks`:

    blocks/proj_in, blocks/proj_out    group 'bridge' (trainable in `fpt` and `encoder`)
    blocks/block_0 ... block_{n-1}     group 'blocks', layered (frozen unless selected)

Block j is the source checkpoint's block `indices[j]` (`take_blocks`), under the name
`block_j`: loading is a rename. Each block is the family's own module, called as the
family's backbone calls it (`layers.stack`), so it computes what it computes there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from fpt_jax.models import backbones, layers, mixed

PREFIX = "block_"


class FrozenBlocks(nn.Module):
    """`[b, t, width]` -> proj_in -> the blocks of `config` (its `n_layer` of them) ->
    proj_out -> `[b, t, width]` (`[b, r, width]` with `read_positions`: the last block is
    then computed at those rows only, as a backbone's is)."""
    config: Any  # the source family's config with n_layer = the number of blocks taken
    width: int
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, deterministic: bool = True,
                 read_positions: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> jax.Array:
        family = backbones.family_of(self.config)
        dtype = self.dtype or h.dtype
        h = mixed.Dense(self.config.n_embd, dtype=dtype, name="proj_in")(h)
        h = layers.stack(family.block_cls, self.config, dtype, self.remat, deterministic, h,
                         read_positions, prefix=PREFIX,
                         lengths=lengths if family.takes_lengths else None)
        return mixed.Dense(self.width, dtype=dtype, name="proj_out")(h)


def blocks_config(source_config: Any, indices: Sequence[int]) -> Any:
    """The config of `len(indices)` blocks of `source_config`'s architecture."""
    return dataclasses.replace(source_config,
                               **{type(source_config).GENERIC.get("n_layer", "n_layer"):
                                  len(indices)})


def take_blocks(source_config: Any, source_params: dict, indices: Sequence[int]) -> dict:
    """`{block_j: <the source backbone's block indices[j]>}` (host numpy), the subtree
    `FrozenBlocks` names `block_j`. Raises ValueError for an index the source lacks."""
    family = backbones.family_of(source_config)
    flat = traverse_util.flatten_dict(source_params, sep="/")
    out = {}
    for j, i in enumerate(indices):
        prefix = family.block_path.format(i) + "/"
        block = {k.removeprefix(prefix): np.asarray(v) for k, v in flat.items()
                 if k.startswith(prefix)}
        if not block:
            raise ValueError(f"block {i}: the {family.display_name} checkpoint has no "
                             f"{family.block_path.format(i)} (its blocks: 0.."
                             f"{source_config.n_layer - 1})")
        out[f"{PREFIX}{j}"] = traverse_util.unflatten_dict(block, sep="/")
    return out
