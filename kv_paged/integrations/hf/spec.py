"""What a transformers model's KV pools look like, read from its config and parameters."""

from __future__ import annotations

from typing import Any

import torch

from kv_paged.integrations.hf.names import ATTN_NAME


def _sliding_windows(config: Any) -> list[int | None]:
    """Per-layer sliding window from a transformers config (None = full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * config.num_hidden_layers
    return [window] * config.num_hidden_layers


def kv_cache_spec(model: torch.nn.Module) -> dict[str, Any]:
    """What the K/V pools of `model` look like, from its config: per-layer num_kv_heads, head_dim
    and sliding window (lists; None = full attention), dtype and device of its parameters."""
    config = model.config.get_text_config(decoder=True)
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    param = next(model.parameters())
    return {
        "num_kv_heads": [num_kv_heads] * num_layers,
        "head_dim": [head_dim] * num_layers,
        "sliding_windows": _sliding_windows(config),
        "dtype": param.dtype,
        "device": param.device,
    }


def use_kv_paged_attention(model: torch.nn.Module) -> None:
    """Switch model to the "kv_paged" attention (and mask) implementation."""
    model.set_attn_implementation(ATTN_NAME)
