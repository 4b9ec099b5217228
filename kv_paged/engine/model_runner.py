"""The Engine's model forward: one packed varlen step through a HuggingFace model over the pool,
and the pool's default size.

Design decision: the step's tokens (prefill chunks and decode rows together) go in as input_ids
[1, T] with explicit position_ids and no transformers cache (use_cache=False); the attention
metadata is built once per step and handed to the "kv_paged" attention through
kv_paged.forward_context; logits are computed only for the rows that sample (logits_to_keep as an
index tensor), so lm_head never sees prefill rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from kv_paged.cache import AttentionMetadata, KVCachePool
from kv_paged.forward_context import forward_context

DEFAULT_CPU_KV_MEMORY = 1 << 30  # at most 1 GiB of KV pool on CPU unless kv_memory says otherwise
CPU_FREE_MEMORY_FRACTION = 0.25  # ... and at most this much of the host's available memory
CUDA_FREE_MEMORY_FRACTION = 0.7  # of the free device memory after the model is loaded


def default_kv_memory(device: torch.device) -> int:
    """The KV pool budget in bytes when the user gives none: CUDA_FREE_MEMORY_FRACTION of the free
    device memory on CUDA; on CPU the smaller of DEFAULT_CPU_KV_MEMORY and CPU_FREE_MEMORY_FRACTION
    of the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_FRACTION)
    available = host_available_memory()
    if available is None:
        return DEFAULT_CPU_KV_MEMORY
    return min(DEFAULT_CPU_KV_MEMORY, int(available * CPU_FREE_MEMORY_FRACTION))


def host_available_memory() -> int | None:
    """Bytes of host memory available without swapping (Linux MemAvailable; free pages elsewhere),
    or None when the platform does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def kv_bytes_per_block(model, block_size: int) -> int:
    """K + V bytes one block of block_size tokens takes over every layer of the model."""
    from kv_paged.integrations import hf

    spec = hf.kv_cache_spec(model)
    itemsize = torch.empty((), dtype=spec["dtype"]).element_size()
    return (
        2
        * block_size
        * itemsize
        * sum(h * d for h, d in zip(spec["num_kv_heads"], spec["head_dim"]))
    )


class ModelRunner:
    """Owns the KV pools (sized like the engine's BlockManager); one packed forward per step.

    model: a transformers causal LM; its attention is switched to "kv_paged" (hf integration).
    cascade: plan shared-prefix (cascade) attention each step (kv_paged.cascade); off = plain
    paged attention only.
    """

    def __init__(self, model, num_blocks: int, block_size: int, cascade: bool = True) -> None:
        from kv_paged.integrations import hf

        spec = hf.kv_cache_spec(model)
        self.model = model
        self.cascade = cascade
        self.block_size = block_size
        self.device = spec["device"]
        self.pool = KVCachePool(
            num_layers=len(spec["num_kv_heads"]),
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=spec["num_kv_heads"],
            head_dim=spec["head_dim"],
            dtype=spec["dtype"],
            device=self.device,
        )
        hf.use_kv_paged_attention(model)

    @torch.inference_mode()
    def forward(
        self,
        token_chunks: Sequence[Sequence[int]],
        starts: Sequence[int],
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        copies: torch.Tensor,
        sampling_rows: Sequence[int],
    ) -> torch.Tensor:
        """Logits of the sampling rows' last tokens.

        token_chunks: B lists, the new tokens of each sequence; starts: B positions of their first.
        slot_mapping: int64 [T]; block_tables: int32 [B, max_blocks]; copies: int64 [n, 2]
        copy-on-write pairs applied to every layer before the forward; sampling_rows: which of the
        B sequences need logits. Returns [len(sampling_rows), vocab].
        """
        self.pool.copy_blocks(copies)
        q_lens = [len(c) for c in token_chunks]
        kv_lens = [s + q for s, q in zip(starts, q_lens)]
        ids = [t for c in token_chunks for t in c]
        pos = [p for s, q in zip(starts, q_lens) for p in range(s, s + q)]
        meta = AttentionMetadata.build(
            query_lens=q_lens,
            kv_lens=kv_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            device=self.device,
            cascade_block_size=self.block_size if self.cascade else None,
        )
        cu = [0]
        for q in q_lens:
            cu.append(cu[-1] + q)
        last = torch.tensor(
            [cu[i + 1] - 1 for i in sampling_rows], dtype=torch.int64, device=self.device
        )
        input_ids = torch.tensor([ids], dtype=torch.int64, device=self.device)  # [1, T]
        position_ids = torch.tensor([pos], dtype=torch.int64, device=self.device)  # [1, T]
        with forward_context(meta, self.pool, owner=self):
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=last
            )
        return out.logits[0]  # [len(sampling_rows), vocab]
