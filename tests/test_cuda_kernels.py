"""CUDA-only tests of the kv_paged kernels (all skipped without a CUDA device): the cases the CPU
grid (tests/test_*.py, also run on CUDA) does not reach — 32k-token contexts, pools of >= 10,000
blocks (index overflow), repeated block-table entries, both routes of paged_attention (split-KV
decode kernel, tensor-core prefill kernel), 16k-token prefill, lengths that are no multiple of any
tile, empty sequences, CUDA-graph capture and replay, bitwise-identical reruns, the KV_PAGED_DEBUG
device checks, and the three cache ops against plain torch indexing.

Accuracy: err(ours) <= 2 * err(torch's dense attention in the same dtype) + 1e-5 against float64
(tests/reference.py; long shapes use the chunked float64 reference below, computed on the GPU, which
test_chunked_reference_matches_reference ties to tests/reference.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import kv_paged  # noqa: F401
from kv_paged import ops

from conftest import assert_close_to_reference, make_paged_batch, max_err, randn
from reference import dense_attention, flash_attention_reference, paged_attention_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA kernels need a CUDA device"
)

DEV = "cuda"
LOW = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]


# ---- helpers ---------------------------------------------------------------------------------


def fast_paged_batch(seq_lens, q_lens, H, Hkv, D, bs, dtype, gen, *, num_blocks=None, repeat=False):
    """Vectorised builder for long contexts: NaN pools of `num_blocks` blocks (default: just enough
    plus 3), blocks from a random permutation, NaN past every sequence's length. repeat=True makes
    every sequence's table reuse its first block id at every 4th entry (all used blocks then hold
    data in every slot, so repeats stay consistent)."""
    per_seq = [math.ceil(n / bs) for n in seq_lens]
    nb = num_blocks or sum(per_seq) + 3
    k_cache = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype, device=DEV)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(nb, generator=gen)
    width = max(per_seq + [0]) + 1
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    start = 0
    for i, n in enumerate(seq_lens):
        ids = perm[start : start + per_seq[i]].clone()
        start += per_seq[i]
        if repeat and len(ids) > 4:
            ids[4::4] = ids[0]
        tables[i, : len(ids)] = ids.to(torch.int32)
        if n == 0:
            continue
        if repeat:
            used = ids.unique().to(DEV)
            k_cache[used] = torch.randn(len(used), bs, Hkv, D, generator=gen).to(dtype).to(DEV)
            v_cache[used] = torch.randn(len(used), bs, Hkv, D, generator=gen).to(dtype).to(DEV)
        else:
            pos = torch.arange(n)
            slots = (ids[pos // bs] * bs + pos % bs).to(DEV)
            k_cache.view(-1, Hkv, D)[slots] = (
                torch.randn(n, Hkv, D, generator=gen).to(dtype).to(DEV)
            )
            v_cache.view(-1, Hkv, D)[slots] = (
                torch.randn(n, Hkv, D, generator=gen).to(dtype).to(DEV)
            )
    query = randn((sum(q_lens), H, D), dtype, gen, DEV, pad_last=8)
    cu = torch.tensor([0] + [sum(q_lens[: i + 1]) for i in range(len(q_lens))], dtype=torch.int32)
    return (
        query,
        k_cache,
        v_cache,
        tables.to(DEV),
        cu.to(DEV),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
    )


def chunked_dense(q, k, v, *, scale, causal, sliding_window, softcap, dtype, chunk=2048):
    """One sequence's attention on the GPU in `dtype`, `chunk` query rows at a time (bottom-right
    alignment as tests/reference.py). q: [q_len, H, D]; k, v: [kv_len, Hkv, D] -> [q_len, H, D]."""
    q_len, H, D = q.shape
    kv_len, Hkv, _ = k.shape
    g = H // Hkv
    out = torch.zeros(q_len, H, D, dtype=dtype, device=q.device)
    kd = k.to(dtype).repeat_interleave(g, dim=1).transpose(0, 1)
    vd = v.to(dtype).repeat_interleave(g, dim=1).transpose(0, 1)
    for a in range(0, q_len, chunk):
        b = min(q_len, a + chunk)
        pos = torch.arange(a, b, device=q.device)[:, None] + (kv_len - q_len)
        j = torch.arange(kv_len, device=q.device)[None, :]
        mask = torch.ones(b - a, kv_len, dtype=torch.bool, device=q.device)
        if causal:
            mask &= j <= pos
        if sliding_window:
            mask &= j > pos - sliding_window
        logits = (q[a:b].to(dtype).transpose(0, 1) @ kd.transpose(1, 2)) * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(
            ~mask, 0
        )
        o = (probs @ vd).transpose(0, 1)
        out[a:b] = torch.where(mask.any(1)[:, None, None], o, torch.zeros_like(o))
    return out


def check_long(out, ref64, ref_low):
    """assert_close_to_reference for tensors that stay on the GPU."""
    assert torch.isfinite(out).all(), "non-finite output"
    ours = (out.double() - ref64).abs().max().item()
    theirs = (ref_low.double() - ref64).abs().max().item()
    assert ours <= 2 * theirs + 1e-5, f"max error {ours:.3g} vs torch same-dtype {theirs:.3g}"


def paged_reference_check(query, k_cache, v_cache, tables, cu, lens, out, **kw):
    ref64 = paged_attention_reference(query, k_cache, v_cache, tables, cu, lens, **kw)
    low = paged_attention_reference(
        query, k_cache, v_cache, tables, cu, lens, dtype=query.dtype, **kw
    )
    assert_close_to_reference(out, ref64, low)


# ---- cache ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("kv_fused", [False, True])
def test_reshape_and_cache_large_pool(dtype, kv_fused, gen):
    """10,240 blocks of 32 x 8 x 256: byte offsets pass 2^31 (fp32: 2.7 GB pools); -1 skips; the
    very last slot is written; key is a non-contiguous view; no other slot changes."""
    nb, bs, Hkv, D, n = 10_240, 32, 8, 256, 300
    if kv_fused:
        pool = torch.full((nb, 2, bs, Hkv, D), float("nan"), dtype=dtype, device=DEV)
        k_cache, v_cache = pool[:, 0], pool[:, 1]
    else:
        k_cache = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype, device=DEV)
        v_cache = torch.full_like(k_cache, float("nan"))
    key = randn((n, Hkv, D), dtype, gen, DEV, pad_last=8)
    value = randn((n, Hkv, D), dtype, gen, DEV)
    slots = torch.randperm(nb * bs - 1, generator=gen)[:n]  # the last slot is added below
    slots[::7] = -1
    slots[1] = nb * bs - 1
    slots = slots.to(DEV)
    keep = slots >= 0
    ops.reshape_and_cache(key, value, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    for cache, src in ((k_cache, key), (v_cache, value)):
        rows = cache.reshape(-1, Hkv, D)  # a copy for the fused (strided) pools
        assert torch.equal(rows[slots[keep]], src[keep])
        written = int(keep.sum()) * Hkv * D
        assert int(cache.isnan().sum()) == cache.numel() - written  # nothing else was touched


@pytest.mark.parametrize("mapping_device", ["cpu", DEV])
@pytest.mark.parametrize("dtype", ALL)
def test_copy_blocks_all_layers(mapping_device, dtype, gen):
    layers, nb, bs, Hkv, D = 5, 64, 16, 2, 64
    pools = [torch.randn(nb, 2, bs, Hkv, D, generator=gen).to(dtype).to(DEV) for _ in range(layers)]
    k_caches, v_caches = [p[:, 0] for p in pools], [p[:, 1] for p in pools]
    perm = torch.randperm(nb, generator=gen)
    mapping = torch.stack([perm[:10], perm[10:20]], dim=1).to(torch.int64)
    expected = [p.clone() for p in pools]
    for e in expected:
        e[mapping[:, 1].to(DEV)] = e[mapping[:, 0].to(DEV)]
    ops.copy_blocks(k_caches, v_caches, mapping.to(mapping_device))
    for p, e in zip(pools, expected):
        assert torch.equal(p, e)


@pytest.mark.parametrize("direction", ["d2h_pinned", "d2h", "h2d_pinned", "d2d"])
def test_swap_blocks(direction, gen):
    nb, shape = 40, (16, 2, 64)
    src_dev, dst_dev = {
        "d2h_pinned": (DEV, "cpu"),
        "d2h": (DEV, "cpu"),
        "h2d_pinned": ("cpu", DEV),
        "d2d": (DEV, DEV),
    }[direction]
    pin = direction.endswith("pinned")
    src = torch.randn(nb, *shape, generator=gen).to(torch.bfloat16).to(src_dev)
    dst = torch.zeros(nb, *shape, dtype=torch.bfloat16, device=dst_dev)
    if pin:
        src = src.pin_memory() if src_dev == "cpu" else src
        dst = dst.pin_memory() if dst_dev == "cpu" else dst
    # a run of consecutive pairs (one memcpy) and scattered ones
    mapping = torch.tensor([[3, 10], [4, 11], [5, 12], [30, 0], [1, 39]], dtype=torch.int64)
    expected = dst.cpu().clone()
    expected[mapping[:, 1]] = src.cpu()[mapping[:, 0]]
    ops.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


# ---- paged attention ---------------------------------------------------------------------------


# fp16/bf16 with GQA >= 4 take the decode kernel's tensor-core path, the rest its CUDA-core path.
DECODE_CASES = [  # (dtype, head_dim, num_heads, num_kv_heads, block_size)
    (torch.bfloat16, 128, 32, 8, 16),  # group 4: tensor cores
    (torch.float16, 64, 8, 8, 32),
    (torch.float32, 256, 8, 2, 16),
    (torch.bfloat16, 80, 24, 1, 16),  # group 24 > 16 rows per pass; padded head_dim
    (torch.float16, 256, 16, 1, 128),  # group 16: tensor cores, d256
    (torch.float32, 96, 6, 3, 8),
    (torch.float16, 128, 20, 4, 3),  # group 5: tensor cores, block size 3
    (torch.bfloat16, 64, 32, 4, 16),  # group 8: tensor cores, d64
    (torch.float16, 64, 32, 1, 1),  # group 32: two tensor-core passes, block size 1
    (torch.float32, 128, 16, 2, 16),  # group 8 in fp32: CUDA cores
]


@pytest.mark.parametrize("dtype,D,H,Hkv,bs", DECODE_CASES)
def test_paged_decode_route(dtype, D, H, Hkv, bs, gen):
    """total_q == num_seqs -> split-KV kernel, including a 0-query and a 2-query sequence."""
    lens, q_lens = [1, 517, 33, 2048, 0, 77], [1, 1, 2, 1, 0, 1]
    b = make_paged_batch(lens, q_lens, H, Hkv, D, bs, dtype, DEV, gen)
    for kw in [
        {"causal": True},
        {"causal": True, "sliding_window": 100, "softcap": 20.0},
        {"causal": False},
    ]:
        out = ops.paged_attention(
            *b.args,
            scale=D**-0.5,
            **kw,
        )
        paged_reference_check(
            *b.args,
            out,
            scale=D**-0.5,
            **kw,
        )


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "D,H,Hkv,bs",
    [(128, 8, 2, 16), (64, 4, 4, 32), (256, 4, 1, 16), (80, 4, 2, 16), (96, 6, 2, 32)],
)
@pytest.mark.parametrize("kv_fused", [False, True])
def test_paged_prefill_route(dtype, D, H, Hkv, bs, kv_fused, gen):
    """Chunked prefill over a cached prefix mixed with decode rows and an empty sequence: the
    tensor-core kernel through the block table (unpadded kernels for head_dim 80 and 96); chunk
    lengths are no multiple of the 64- or 128-row query tiles."""
    lens, q_lens = [130, 1, 700, 0, 65], [130, 1, 97, 0, 3]
    b = make_paged_batch(lens, q_lens, H, Hkv, D, bs, dtype, DEV, gen, kv_fused=kv_fused)
    for kw in [
        {"causal": True},
        {"causal": True, "sliding_window": 50},
        {"causal": False, "softcap": 10.0},
    ]:
        out = ops.paged_attention(
            *b.args,
            scale=D**-0.5,
            **kw,
        )
        paged_reference_check(
            *b.args,
            out,
            scale=D**-0.5,
            **kw,
        )


def test_chunked_reference_matches_reference(gen):
    q = randn((70, 4, 32), torch.float32, gen)
    k, v = randn((90, 2, 32), torch.float32, gen), randn((90, 2, 32), torch.float32, gen)
    for kw in [
        {"causal": True, "sliding_window": 9, "softcap": 5.0},
        {"causal": False, "sliding_window": None, "softcap": None},
    ]:
        ref = dense_attention(q, k, v, scale=0.3, **kw)
        mine = chunked_dense(
            q.to(DEV), k.to(DEV), v.to(DEV), scale=0.3, dtype=torch.float64, chunk=16, **kw
        )
        assert max_err(mine, ref) < 1e-12


@pytest.mark.parametrize("repeat", [False, True])
def test_paged_decode_32k_large_pool(repeat, gen):
    """32k-token contexts in a 12,000-block pool, shuffled (optionally repeated) block ids."""
    H, Hkv, D, bs, dtype = 16, 2, 128, 16, torch.bfloat16
    lens = [32_768, 20_001, 5]
    q, kc, vc, tables, cu, sl = fast_paged_batch(
        lens, [1, 1, 1], H, Hkv, D, bs, dtype, gen, num_blocks=12_000, repeat=repeat
    )
    out = ops.paged_attention(q, kc, vc, tables, cu, sl, scale=D**-0.5, sliding_window=None)
    tables_cpu = tables.cpu()
    for i, n in enumerate(lens):
        nblk = math.ceil(n / bs)
        k = kc[tables_cpu[i, :nblk].long().to(DEV)].reshape(-1, Hkv, D)[:n]
        v = vc[tables_cpu[i, :nblk].long().to(DEV)].reshape(-1, Hkv, D)[:n]
        kw = {"scale": D**-0.5, "causal": True, "sliding_window": None, "softcap": None}
        ref64 = chunked_dense(q[i : i + 1], k, v, dtype=torch.float64, **kw)
        low = chunked_dense(q[i : i + 1], k, v, dtype=dtype, **kw)
        check_long(out[i : i + 1], ref64, low)


def test_paged_prefill_long_chunk_over_prefix(gen):
    """A 3,000-token chunk over a 9,000-token cached prefix (block_size 16)."""
    H, Hkv, D, bs, dtype = 8, 2, 128, 16, torch.bfloat16
    q, kc, vc, tables, cu, sl = fast_paged_batch([12_000], [3_000], H, Hkv, D, bs, dtype, gen)
    out = ops.paged_attention(q, kc, vc, tables, cu, sl, scale=D**-0.5)
    nblk = math.ceil(12_000 / bs)
    k = kc[tables[0, :nblk].long()].reshape(-1, Hkv, D)[:12_000]
    v = vc[tables[0, :nblk].long()].reshape(-1, Hkv, D)[:12_000]
    kw = {"scale": D**-0.5, "causal": True, "sliding_window": None, "softcap": None}
    check_long(
        out,
        chunked_dense(q, k, v, dtype=torch.float64, **kw),
        chunked_dense(q, k, v, dtype=dtype, **kw),
    )


# ---- flash attention ---------------------------------------------------------------------------


FLASH_CASES = [  # (dtype, head_dim, num_heads, num_kv_heads)
    (torch.bfloat16, 128, 8, 2),
    (torch.float16, 64, 4, 4),
    (torch.bfloat16, 256, 4, 1),
    (torch.float16, 36, 6, 2),  # 72-byte rows: the zero-padded copy path
    (torch.bfloat16, 80, 2, 1),  # the unpadded head_dim 80 kernel
    (torch.float16, 96, 4, 2),  # the unpadded head_dim 96 kernel
    (torch.bfloat16, 72, 2, 2),  # kernel head_dim 80, padded in shared memory
    (torch.float32, 128, 4, 2),
    (torch.float32, 72, 2, 1),
]


@pytest.mark.parametrize("dtype,D,H,Hkv", FLASH_CASES)
@pytest.mark.parametrize(
    "causal,window,softcap",
    [(True, None, None), (False, None, None), (True, 37, 15.0), (False, 37, None)],
)
def test_flash_attention_varlen(dtype, D, H, Hkv, causal, window, softcap, gen):
    """Empty sequences, q_len < k_len, q_len > k_len (rows seeing nothing -> 0), odd lengths."""
    q_lens, k_lens = [0, 1, 63, 65, 200, 17, 0], [5, 1, 63, 130, 200, 9, 0]
    cq = torch.tensor([0] + [sum(q_lens[: i + 1]) for i in range(len(q_lens))], dtype=torch.int32)
    ck = torch.tensor([0] + [sum(k_lens[: i + 1]) for i in range(len(k_lens))], dtype=torch.int32)
    q = randn((sum(q_lens), H, D), dtype, gen, DEV, pad_last=8)
    k = randn((sum(k_lens), Hkv, D), dtype, gen, DEV)
    v = randn((sum(k_lens), Hkv, D), dtype, gen, DEV, pad_last=8)
    kw = {"scale": D**-0.5, "causal": causal, "sliding_window": window, "softcap": softcap}
    out = ops.flash_attention(q, k, v, cq.to(DEV), ck.to(DEV), max(q_lens), max(k_lens), **kw)
    ref64 = flash_attention_reference(q, k, v, cq, ck, **kw)
    low = flash_attention_reference(q, k, v, cq, ck, dtype=dtype, **kw)
    assert_close_to_reference(out, ref64, low)


@pytest.mark.parametrize("D", [64, 128])
def test_flash_attention_16k(D, gen):
    """16,383 tokens (no multiple of any tile), causal, GQA 2:1."""
    n, H, Hkv, dtype = 16_383, 4, 2, torch.bfloat16
    q = randn((n, H, D), dtype, gen, DEV)
    k, v = randn((n, Hkv, D), dtype, gen, DEV), randn((n, Hkv, D), dtype, gen, DEV)
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    kw = {"scale": D**-0.5, "causal": True, "sliding_window": None, "softcap": None}
    out = ops.flash_attention(q, k, v, cu, cu, n, n, **kw)
    check_long(
        out,
        chunked_dense(q, k, v, dtype=torch.float64, **kw),
        chunked_dense(q, k, v, dtype=dtype, **kw),
    )


# ---- graphs, determinism, debug checks -----------------------------------------------------------


def test_cuda_graph_capture_and_replay(gen):
    """reshape_and_cache + paged decode captured once; replays follow new inputs written in place."""
    H, Hkv, D, bs, dtype = 8, 2, 128, 16, torch.bfloat16
    lens = [300, 1000, 17, 64]
    b = make_paged_batch(lens, [1] * 4, H, Hkv, D, bs, dtype, DEV, gen, spare_blocks=8)
    query = b.query.contiguous()
    new_k, new_v = randn((4, Hkv, D), dtype, gen, DEV), randn((4, Hkv, D), dtype, gen, DEV)
    tables = b.block_tables.cpu()
    seq_lens = b.seq_lens_kv.clone()
    slots = torch.tensor(
        [int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(lens)],
        dtype=torch.int64,
        device=DEV,
    )

    def step():
        ops.reshape_and_cache(new_k, new_v, b.k_cache, b.v_cache, slots)
        return ops.paged_attention(
            query, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, seq_lens, scale=D**-0.5
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture (allocator, function attributes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        query.copy_(randn(tuple(query.shape), dtype, gen, DEV))
        new_k.copy_(randn((4, Hkv, D), dtype, gen, DEV))
        new_v.copy_(randn((4, Hkv, D), dtype, gen, DEV))
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        assert torch.equal(static_out, expected)
        paged_reference_check(
            query,
            b.k_cache,
            b.v_cache,
            b.block_tables,
            b.cu_seqlens_q,
            seq_lens,
            static_out,
            scale=D**-0.5,
            causal=True,
            sliding_window=None,
            softcap=None,
        )


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 90, 5]])
def test_bitwise_identical_reruns(q_lens, gen):
    lens = [4000, 90, 700]
    b = make_paged_batch(lens, q_lens, 16, 4, 128, 16, torch.bfloat16, DEV, gen)
    args = b.args
    first = ops.paged_attention(*args, softcap=30.0)
    second = ops.paged_attention(*args, softcap=30.0)
    assert torch.equal(first, second)


DEBUG_SCRIPT = r"""
import torch, kv_paged
from kv_paged import ops
k = torch.zeros(8, 16, 2, 64, dtype=torch.float16, device="cuda")
q = torch.zeros(1, 2, 64, dtype=torch.float16, device="cuda")
tables = torch.tensor([[0, 9]], dtype=torch.int32, device="cuda")   # 9 >= num_blocks
cu = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
lens = torch.tensor([20], dtype=torch.int32, device="cuda")
try:
    ops.paged_attention(q, k, k, tables, cu, lens)
except RuntimeError as e:
    print("RAISED", e)
try:
    ops.reshape_and_cache(q, q, k, k, torch.tensor([8 * 16], device="cuda"))
except RuntimeError as e:
    print("RAISED", e)
"""


def test_debug_checks_name_the_argument():
    env = dict(os.environ, KV_PAGED_DEBUG="1")
    res = subprocess.run(
        [sys.executable, "-c", DEBUG_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert "block_tables[0][1] = 9" in res.stdout, res.stdout + res.stderr
    assert "slot_mapping[0] = 128" in res.stdout, res.stdout + res.stderr
