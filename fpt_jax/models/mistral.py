"""Mistral (Hugging Face `MistralModel`): the Llama decoder (models/llama.py) with a sliding
attention window: a query attends to the `sliding_window` latest positions, itself included."""
from __future__ import annotations

import dataclasses

from fpt_jax.models import llama


@dataclasses.dataclass(frozen=True)
class MistralConfig(llama.LlamaConfig):
    """Hugging Face's `MistralConfig`: Llama's fields plus `sliding_window` (None: none)."""
    model_type = "mistral"
    display_name = "Mistral"
    SIZES = (*llama.LlamaConfig.SIZES, "sliding_window")
    HF_SUPPORTED = {"hidden_act": ("silu",)}

    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096

    @property
    def window(self) -> int | None:
        return self.sliding_window


MISTRAL_PRESETS = {
    "mistral-7b": MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=4096, vocab_size=32000),
}
HUB_REPOS = {"mistral-7b": "mistralai/Mistral-7B-v0.1"}

FAMILY = llama.family(MistralConfig, MISTRAL_PRESETS, HUB_REPOS)
