"""Qwen2 (Hugging Face `Qwen2Model`, also Qwen2.5): the Llama decoder (models/llama.py) with
biases on the query, key and value projections and none on the output projection. Only
full attention (`use_sliding_window=False`, every released checkpoint's setting)."""
from __future__ import annotations

import dataclasses

from fpt_jax.models import llama


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    """Hugging Face's `Qwen2Config`: Llama's fields; the attention biases are fixed."""
    model_type = "qwen2"
    display_name = "Qwen2"
    HF_SUPPORTED = {"hidden_act": ("silu",), "use_sliding_window": (False,)}

    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def out_bias(self) -> bool:
        return False


QWEN2_PRESETS = {
    "qwen2.5-0.5b": Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, vocab_size=151936, tie_word_embeddings=True),
}
HUB_REPOS = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B"}

FAMILY = llama.family(Qwen2Config, QWEN2_PRESETS, HUB_REPOS)
