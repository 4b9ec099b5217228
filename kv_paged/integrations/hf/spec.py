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


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks share the model's attention heads: transformers' tensor-parallel degree
    (from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))), 1 when the model
    is whole."""
    size = getattr(model, "_tp_size", None)
    return int(size) if size else 1


def kv_cache_spec(model: torch.nn.Module) -> dict[str, Any]:
    """What the K/V pools of `model` look like, from its config: per-layer num_kv_heads, head_dim
    and sliding window (lists; None = full attention), dtype and device of its parameters.

    Under tensor parallelism (tensor_parallel_size(model) = N > 1) num_kv_heads is this rank's
    share, the config's count / N: transformers' plans shard k_proj / v_proj by output columns,
    so each rank's attention sees 1/N of the KV heads and its pool holds only those."""
    config = model.config.get_text_config(decoder=True)
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    tp = tensor_parallel_size(model)
    if tp > 1:
        if num_kv_heads % tp or num_heads % tp:
            raise ValueError(
                f"kv_paged: the model has {num_heads} attention heads and {num_kv_heads} KV heads, "
                f"which a tensor-parallel degree of {tp} does not divide; kv_paged supports tensor "
                "parallelism only when every rank holds whole KV heads (choose a degree that "
                "divides the KV head count)"
            )
        num_kv_heads //= tp
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
