"""Cascade (shared-prefix) attention: find the sequences of a step whose block tables start with the
same physical blocks, attend each group's queries to its shared blocks in one multi-query pass
(ops.shared_prefix_attention), each sequence to the rest of its table (ops.paged_attention_lse), and
merge the states exactly (ops.merge_attention_states).

Design decision: the plan is built once per step on the host from the block tables (physical block
ids are the proof of sharing: the BlockManager's prefix cache and forks share blocks, never copies)
and shared by every layer. Nesting is a tree walked level by level: a group's members that also
share the blocks after the group's prefix form a group of the next level (a system prompt shared by
all, a document shared by some), up to max_levels; sharing deeper than that is read by each
sequence in its suffix (exact, just not deduplicated). Sliding-window layers never use a plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from kv_paged import ops

__all__ = ["CascadeLevel", "CascadePlan", "plan_cascade", "cascade_attention"]

# A group pays when reading its prefix once instead of once per member outweighs two more ops and a
# merge per layer. The thresholds are a judgment, not a measured sweep: at B = 64 with a 1k prefix
# cascade already wins 1.4x (benchmarks/results/cascade.md), small groups were not timed.
MIN_GROUP_SIZE = 8
MIN_PREFIX_TOKENS = 64
MAX_LEVELS = 2


@dataclasses.dataclass
class CascadeLevel:
    """One level of shared prefixes: G groups, disjoint in rows.

    prefix_block_tables: int32 [G, max_prefix_blocks]; prefix_lens: int32 [G] (tokens);
    cu_group_rows: int32 [G + 1]; group_rows: int32 [R], query rows (packed token indices).
    """

    prefix_block_tables: torch.Tensor
    prefix_lens: torch.Tensor
    cu_group_rows: torch.Tensor
    group_rows: torch.Tensor

    def to(self, device: torch.device | str) -> CascadeLevel:
        return CascadeLevel(*(t.to(device) for t in dataclasses.astuple(self)))


@dataclasses.dataclass
class CascadePlan:
    """levels: the shared-prefix passes, outermost first; kv_start: int32 [B], where each
    sequence's suffix starts (0 for a sequence in no group). shared_tokens: sum over groups of
    prefix length x (members - 1), the kv reads the plan saves per layer and kv head."""

    levels: list[CascadeLevel]
    kv_start: torch.Tensor
    shared_tokens: int = 0

    def to(self, device: torch.device | str) -> CascadePlan:
        return CascadePlan(
            [lv.to(device) for lv in self.levels], self.kv_start.to(device), self.shared_tokens
        )


def plan_cascade(
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    kv_lens: Sequence[int],
    block_size: int,
    *,
    causal: bool = True,
    min_group_size: int = MIN_GROUP_SIZE,
    min_prefix_tokens: int = MIN_PREFIX_TOKENS,
    max_levels: int = MAX_LEVELS,
) -> CascadePlan | None:
    """The step's cascade plan, or None when no group is large enough to pay.

    block_tables: int32 [B, max_blocks] (host); query_lens, kv_lens: B ints as in
    AttentionMetadata.build. A group's prefix is the leading run of block ids its members share,
    cut to the positions all their queries see (with causal, the member's first query position:
    a prefix may therefore end mid-block).
    """
    bt = block_tables.cpu()
    q_lens = [int(n) for n in query_lens]
    k_lens = [int(n) for n in kv_lens]
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    used = [-(-k // block_size) for k in k_lens]
    visible = [k - q if causal else k for q, k in zip(q_lens, k_lens)]
    kv_start = [0] * len(k_lens)
    levels: list[list[tuple[list[int], int, int, int]]] = [[] for _ in range(max_levels)]

    def split(members: list[int], start: int, depth: int) -> None:
        buckets: dict[int, list[int]] = {}
        column = bt[:, start].tolist() if start < bt.shape[1] else []
        for i in members:
            if used[i] > start:
                buckets.setdefault(column[i], []).append(i)
        for group in buckets.values():
            if len(group) < min_group_size:
                continue
            end = min(used[i] for i in group)
            rows = bt[group, start:end]
            same = (rows == rows[0]).all(dim=0).to(torch.int32)
            end = start + int(same.cumprod(0).sum())
            plen = min(end * block_size, min(visible[i] for i in group)) - start * block_size
            if plen < min_prefix_tokens:
                continue
            levels[depth].append((group, start, end, plen))
            for i in group:
                kv_start[i] = start * block_size + plen
            if plen == (end - start) * block_size and depth + 1 < max_levels:
                split(group, end, depth + 1)

    split([i for i, q in enumerate(q_lens) if q > 0], 0, 0)
    if not levels[0]:
        return None
    plan_levels = []
    shared = 0
    for groups in levels:
        if not groups:
            break
        width = max(end - start for _, start, end, _ in groups)
        tables = torch.zeros(len(groups), width, dtype=torch.int32)
        lens, cu_rows, rows = [], [0], []
        for g, (members, start, end, plen) in enumerate(groups):
            tables[g, : end - start] = bt[members[0], start:end]
            lens.append(plen)
            for i in members:
                rows.extend(range(cu[i], cu[i + 1]))
            cu_rows.append(len(rows))
            shared += plen * (len(members) - 1)
        plan_levels.append(
            CascadeLevel(
                tables,
                torch.tensor(lens, dtype=torch.int32),
                torch.tensor(cu_rows, dtype=torch.int32),
                torch.tensor(rows, dtype=torch.int32),
            )
        )
    return CascadePlan(plan_levels, torch.tensor(kv_start, dtype=torch.int32), shared)


def cascade_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    plan: CascadePlan,
    *,
    scale: float | None = None,
    causal: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """ops.paged_attention (no sliding window) computed through `plan`: equal to it up to float
    rounding. Arguments as paged_attention; plan from plan_cascade on the same tables and lengths
    (and the same causal), on query's device. Returns [total_q, num_heads, head_dim], query's dtype.
    """
    state = None
    for level in plan.levels:
        part = ops.shared_prefix_attention(
            query,
            k_cache,
            v_cache,
            level.prefix_block_tables,
            level.prefix_lens,
            level.cu_group_rows,
            level.group_rows,
            scale=scale,
            softcap=softcap,
        )
        state = part if state is None else ops.merge_attention_states(*state, *part)
    suffix = ops.paged_attention_lse(
        query,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens_kv,
        plan.kv_start,
        scale=scale,
        causal=causal,
        softcap=softcap,
    )
    out, _ = suffix if state is None else ops.merge_attention_states(*state, *suffix)
    return out.to(query.dtype)
