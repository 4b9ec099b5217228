"""Tiny random-weight causal LMs of several architectures, for the tests and the demo.

Design: built in code from a config (no download, no network); the seed alone fixes the weights, so
copies of a model with different attention implementations can be compared.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from kv_paged.integrations.hf.names import ATTN_NAME

_COMMON_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}
# arch -> (config class, model class, overrides). Windows and softcaps are small so that 32
# generated tokens cross them and random weights make them matter.
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 7}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": 6,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"head_dim": None, "sliding_window": None}),
}


def tiny_model(
    arch: str,
    *,
    attn_implementation: str = ATTN_NAME,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random-weight causal LM of `arch` (see TINY_ARCHS), in eval mode.

    Same `seed` -> same weights whatever attn_implementation, so "eager" and "kv_paged" copies of
    a model can be compared. config_overrides replace TINY_ARCHS / common config fields.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {sorted(TINY_ARCHS)}, got {arch!r}")
    config_name, model_name, overrides = TINY_ARCHS[arch]
    fields = {**_COMMON_CONFIG, **overrides, **config_overrides}
    fields = {k: v for k, v in fields.items() if v is not None or k == "eos_token_id"}
    config = getattr(transformers, config_name)(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=dtype).eval()
