"""Slow, obvious references for the attention ops: gather blocks -> dense tensors -> explicit mask
-> softmax, in float64 by default (pass dtype= to get "torch's own dense attention in that dtype",
the yardstick of the accuracy tests). A query row that sees no key outputs zeros, like the kernels.
"""

from __future__ import annotations

import torch


def visible_mask(q_len: int, kv_len: int, causal: bool, sliding_window: int | None) -> torch.Tensor:
    """bool [q_len, kv_len]: query i sits at kv position kv_len - q_len + i (bottom-right)."""
    pos = torch.arange(q_len).unsqueeze(1) + (kv_len - q_len)
    j = torch.arange(kv_len).unsqueeze(0)
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        mask &= j <= pos
    if sliding_window is not None and sliding_window > 0:
        mask &= j > pos - sliding_window
    return mask


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """q: [q_len, num_heads, head_dim]; k, v: [kv_len, num_kv_heads, head_dim] -> [q_len, num_heads,
    head_dim] in `dtype`. Query head h reads kv head h // (num_heads // num_kv_heads)."""
    q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    out = torch.zeros(q_len, num_heads, head_dim, dtype=dtype)
    if q_len == 0 or kv_len == 0:
        return out
    group = num_heads // num_kv_heads
    qd = q.detach().cpu().to(dtype).transpose(0, 1)  # [H, q_len, D]
    kd = (
        k.detach().cpu().to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    )  # [H, kv_len, D]
    vd = v.detach().cpu().to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    logits = (qd @ kd.transpose(1, 2)) * scale  # [H, q_len, kv_len]
    if softcap is not None and softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    mask = visible_mask(q_len, kv_len, causal, sliding_window)
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(~mask, 0.0)  # rows with no key: NaN -> 0
    out = (probs @ vd).transpose(0, 1)
    return torch.where(mask.any(dim=1)[:, None, None], out, torch.zeros_like(out)).to(dtype)


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_table: [max_blocks] ->
    [seq_len, num_kv_heads, head_dim], the sequence's keys (or values) in position order."""
    block_size = cache.shape[1]
    num = -(-seq_len // block_size)
    blocks = cache[block_table[:num].long().cpu()]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_reference(
    query,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    seq_lens_kv,
    *,
    scale,
    causal=True,
    sliding_window=None,
    softcap=None,
    dtype=torch.float64,
) -> torch.Tensor:
    """Same arguments as kv_paged.ops.paged_attention -> [total_q, num_heads, head_dim] in dtype."""
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    cu = cu_seqlens_q.cpu().tolist()
    lens = seq_lens_kv.cpu().tolist()
    out = torch.zeros(query.shape, dtype=dtype)
    for i, kv_len in enumerate(lens):
        k = gather_blocks(k_cache, block_tables[i], kv_len)
        v = gather_blocks(v_cache, block_tables[i], kv_len)
        out[cu[i] : cu[i + 1]] = dense_attention(
            query[cu[i] : cu[i + 1]],
            k,
            v,
            scale=scale,
            causal=causal,
            sliding_window=sliding_window,
            softcap=softcap,
            dtype=dtype,
        )
    return out


def flash_attention_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    scale,
    causal=True,
    sliding_window=None,
    softcap=None,
    dtype=torch.float64,
) -> torch.Tensor:
    """Same arguments as kv_paged.ops.flash_attention -> [total_q, num_heads, head_dim] in dtype."""
    cq, ck = cu_seqlens_q.cpu().tolist(), cu_seqlens_k.cpu().tolist()
    out = torch.zeros(q.shape, dtype=dtype)
    for i in range(len(cq) - 1):
        out[cq[i] : cq[i + 1]] = dense_attention(
            q[cq[i] : cq[i + 1]],
            k[ck[i] : ck[i + 1]],
            v[ck[i] : ck[i + 1]],
            scale=scale,
            causal=causal,
            sliding_window=sliding_window,
            softcap=softcap,
            dtype=dtype,
        )
    return out


def flash_attention_reference_grads(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    dout,
    *,
    scale,
    causal=True,
    sliding_window=None,
    softcap=None,
    dtype=torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in `dtype`: autograd through the dense reference per sequence, with upstream
    gradient dout [total_q, num_heads, head_dim]. Rows that see no key get zero gradients."""
    qd, kd, vd = (t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v))
    cq, ck = cu_seqlens_q.cpu().tolist(), cu_seqlens_k.cpu().tolist()
    group = q.shape[1] // k.shape[1]
    outs = []
    for i in range(len(cq) - 1):
        qs, ks, vs = qd[cq[i] : cq[i + 1]], kd[ck[i] : ck[i + 1]], vd[ck[i] : ck[i + 1]]
        mask = visible_mask(qs.shape[0], ks.shape[0], causal, sliding_window)
        seen = mask.any(dim=1)
        if qs.shape[0] == 0 or not bool(seen.any()):
            outs.append(torch.zeros_like(qs))
            continue
        kh = ks.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, kv_len, D]
        vh = vs.repeat_interleave(group, dim=1).transpose(0, 1)
        logits = (qs[seen].transpose(0, 1) @ kh.transpose(1, 2)) * scale  # [H, seen rows, kv_len]
        if softcap is not None and softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.masked_fill(~mask[seen], float("-inf"))
        rows = (torch.softmax(logits, dim=-1) @ vh).transpose(0, 1)
        outs.append(torch.zeros_like(qs).index_put((seen.nonzero().squeeze(1),), rows))
    out = torch.cat(outs) if outs else qd * 0
    if out.requires_grad:  # else no row sees a key and every gradient is zero
        out.backward(dout.detach().cpu().to(dtype))
    grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (qd, kd, vd))
    return grads
