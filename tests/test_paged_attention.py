"""paged_attention (decode + chunked-prefill rows in one call) against the float64 reference.

Grid: the full product of the axes below is 5*4*4*3*2*2*2*2 = 3840 points, too slow for CI, so the
grid is a seeded pairwise covering design (conftest.pairwise_grid): every value of every axis is
paired with every value of every other axis at least once; test_grid_is_pairwise checks it. Each
point runs one batch that mixes a decode row, prefill chunks over a cached prefix, a whole prompt,
a kv length of 1, lengths that are not multiples of block_size, a q_len-0 sequence and a
zero-length sequence, with shuffled block tables and NaN in every unused slot and block.
"""

import pytest
import torch

from kv_paged import ops

from conftest import (
    DEVICES,
    DTYPES,
    assert_close_to_reference,
    covers_all_pairs,
    make_paged_batch,
    pairwise_grid,
    set_arg,
    write_arg,
)
from reference import paged_attention_reference

AXES = {
    "head_dim": [64, 80, 96, 128, 256],
    "block_size": [1, 8, 16, 32],
    "heads": [(8, 8), (8, 4), (8, 1), (12, 4)],
    "dtype": DTYPES,
    "sliding_window": [None, 5],
    "softcap": [None, 3.0],
    "causal": [True, False],
    "kv_fused": [False, True],
}
GRID = pairwise_grid(AXES, seed=3)


def _id(point: dict) -> str:
    h, kvh = point["heads"]
    return (
        f"d{point['head_dim']}-bs{point['block_size']}-h{h}/{kvh}-{str(point['dtype'])[6:]}"
        f"-w{point['sliding_window']}-cap{point['softcap']}-{'causal' if point['causal'] else 'full'}"
        f"{'-fused' if point['kv_fused'] else ''}"
    )


def run_and_check(batch, dtype, **kw):
    args = batch.args
    out = ops.paged_attention(*args, **kw)
    assert out.shape == batch.query.shape and out.dtype == dtype and out.is_contiguous()
    scale = kw.pop("scale", None) or batch.query.shape[-1] ** -0.5
    ref = paged_attention_reference(*args, scale=scale, **kw)
    same_dtype = paged_attention_reference(*args, scale=scale, dtype=dtype, **kw)
    assert_close_to_reference(out, ref, same_dtype)
    return out


def test_grid_is_pairwise():
    assert covers_all_pairs(AXES, GRID)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("point", GRID, ids=[_id(p) for p in GRID])
def test_paged_attention_grid(point, device, gen):
    bs = point["block_size"]
    h, kvh = point["heads"]
    # decode row, prefill chunk over a cached prefix, q_len 0 with kv, empty sequence, kv len 1,
    # a whole prompt, a chunk of 2 * block_size + 3.
    seq_lens_kv = [23, 2 * bs + 3, 11, 0, 1, 33]
    q_lens = [1, 5, 0, 0, 1, 33]
    batch = make_paged_batch(
        seq_lens_kv,
        q_lens,
        h,
        kvh,
        point["head_dim"],
        bs,
        point["dtype"],
        device,
        gen,
        kv_fused=point["kv_fused"],
    )
    run_and_check(
        batch,
        point["dtype"],
        causal=point["causal"],
        sliding_window=point["sliding_window"],
        softcap=point["softcap"],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads, head_dim, block_size",
    [((8, 8), 64, 16), ((8, 4), 80, 1), ((12, 4), 128, 32), ((8, 1), 256, 8)],
)
def test_decode_batch(heads, head_dim, block_size, dtype, device, gen):
    """Decode-shaped calls (q_len <= 4, many sequences): the CPU kernel groups kv heads per work item
    here, a different path from the prefill grid above."""
    seq_lens_kv = [1, 0, 37, 16, 70, 5, 3, 64, 2, 9, 33, 48]
    q_lens = [1, 0, 1, 4, 1, 0, 3, 1, 2, 1, 1, 1]
    batch = make_paged_batch(
        seq_lens_kv,
        q_lens,
        *heads,
        head_dim,
        block_size,
        dtype,
        device,
        gen,
        kv_fused=block_size == 32,
    )
    run_and_check(batch, dtype)
    run_and_check(batch, dtype, sliding_window=6, softcap=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(7, 1), (10, 2), (5, 5), (16, 4)])
@pytest.mark.parametrize("head_dim", [12, 40, 100])
def test_cpu_core_paths(heads, head_dim, dtype, gen):
    """The CPU core's three tile paths: decode tiles every row sees whole run through register
    blocks of 4, 2 and 1 rows (GQA groups of 7, 5, 4 and 1 leave each remainder) and 1-4 keys
    (lengths leave every tail); head_dim 12 and 100 (not whole 8-float vectors) and tiles cut by a
    window edge run row by row; prefill chunks (>= 16 rows per head) run as GEMMs, causal and
    window edges zeroed in P. Decode-only and mixed batches both (they group heads differently)."""
    seq_lens_kv = [1, 37, 66, 131, 5, 64, 3]
    for q_lens in ([1, 1, 1, 1, 1, 1, 1], [1, 9, 1, 40, 5, 1, 2]):
        batch = make_paged_batch(seq_lens_kv, q_lens, *heads, head_dim, 16, dtype, "cpu", gen)
        run_and_check(batch, dtype)
        run_and_check(batch, dtype, softcap=4.0, sliding_window=50)


@pytest.mark.parametrize("device", DEVICES)
def test_long_context_many_tiles(device, gen):
    batch = make_paged_batch([1000, 517], [1, 70], 8, 2, 64, 16, torch.float32, device, gen)
    run_and_check(batch, torch.float32)
    run_and_check(batch, torch.float32, sliding_window=100, softcap=10.0)


@pytest.mark.parametrize("device", DEVICES)
def test_window_edges_and_explicit_scale(device, gen):
    batch = make_paged_batch([9, 40], [9, 3], 4, 4, 32, 8, torch.float32, device, gen)
    run_and_check(batch, torch.float32, sliding_window=1)  # each query sees only itself
    run_and_check(batch, torch.float32, sliding_window=1000)  # wider than the context: no effect
    run_and_check(batch, torch.float32, scale=0.3)
    off = ops.paged_attention(
        *batch.args,
        sliding_window=0,
        softcap=0.0,
    )
    on = ops.paged_attention(
        *batch.args,
    )
    assert torch.equal(off, on)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_blocks(device, gen):
    """Two sequences whose tables name the same blocks (a forked prefix) read them independently."""
    batch = make_paged_batch([20, 20], [1, 1], 4, 2, 64, 8, torch.float32, device, gen)
    batch.block_tables[1, :2] = batch.block_tables[0, :2]  # positions 0..15 shared
    run_and_check(batch, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_query(device, gen):
    batch = make_paged_batch([4, 0], [0, 0], 4, 2, 16, 4, torch.float16, device, gen)
    out = ops.paged_attention(
        *batch.args,
    )
    assert out.shape == (0, 4, 16)


# ---- bad input: each raises a RuntimeError naming the argument -----------------------------------


def _bad_cases():
    def mod(name, fn, match):
        return pytest.param(fn, match, id=name)

    return [
        mod("query-float64", set_arg("query", lambda a: a["query"].double()), "query"),
        mod("query-int", set_arg("query", lambda a: a["query"].to(torch.int32)), "query"),
        mod("query-rank", set_arg("query", lambda a: a["query"].flatten(1)), "query"),
        mod("kcache-dtype", set_arg("k_cache", lambda a: a["k_cache"].half()), "k_cache"),
        mod("kcache-rank", set_arg("k_cache", lambda a: a["k_cache"].flatten(2)), "k_cache"),
        mod("vcache-shape", set_arg("v_cache", lambda a: a["v_cache"][:, :, :1]), "v_cache"),
        mod(
            "head-dim-mismatch",
            set_arg("query", lambda a: a["query"][..., :8].contiguous()),
            "head_dim",
        ),
        mod(
            "heads-not-multiple",
            set_arg("query", lambda a: a["query"][:, :3].contiguous()),
            "num_heads",
        ),
        mod("query-head-dim-strided", set_arg("query", lambda a: a["query"][..., ::2]), "query"),
        mod("block-id-too-large", write_arg("block_tables", (1, 0), 10_000), "block_tables"),
        mod("block-id-negative", write_arg("block_tables", (0, 1), -1), "block_tables"),
        mod(
            "block-tables-int64",
            set_arg("block_tables", lambda a: a["block_tables"].long()),
            "block_tables",
        ),
        mod(
            "block-tables-rows",
            set_arg("block_tables", lambda a: a["block_tables"][:1]),
            "block_tables",
        ),
        mod("seq-len-beyond-capacity", write_arg("seq_lens_kv", 0, 10_000), "seq_lens_kv"),
        mod("seq-len-negative", write_arg("seq_lens_kv", 1, -1), "seq_lens_kv"),
        mod(
            "seq-lens-int64",
            set_arg("seq_lens_kv", lambda a: a["seq_lens_kv"].long()),
            "seq_lens_kv",
        ),
        mod("cu-seqlens-decreasing", write_arg("cu_seqlens_q", 1, 8), "cu_seqlens_q"),
        mod("cu-seqlens-first-nonzero", write_arg("cu_seqlens_q", 0, 1), "cu_seqlens_q"),
        mod("cu-seqlens-total", write_arg("cu_seqlens_q", 2, 5), "cu_seqlens_q"),
        mod(
            "cu-seqlens-length",
            set_arg("cu_seqlens_q", lambda a: a["cu_seqlens_q"][:2]),
            "cu_seqlens_q",
        ),
        mod("q-len-beyond-kv", write_arg("seq_lens_kv", 1, 2), "seq_lens_kv"),
        mod("scale-nan", set_arg("scale", lambda a: float("nan")), "scale"),
    ]


@pytest.mark.parametrize("mutate, match", _bad_cases())
def test_bad_input(mutate, match, gen):
    batch = make_paged_batch([10, 9], [1, 6], 4, 2, 16, 4, torch.float32, "cpu", gen)
    a = dict(
        query=batch.query,
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        block_tables=batch.block_tables,
        cu_seqlens_q=batch.cu_seqlens_q,
        seq_lens_kv=batch.seq_lens_kv,
        scale=0.25,
    )
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kv_paged.paged_attention(
            a["query"],
            a["k_cache"],
            a["v_cache"],
            a["block_tables"],
            a["cu_seqlens_q"],
            a["seq_lens_kv"],
            a["scale"],
            True,
            0,
            0.0,
        )


def test_bad_device():
    """A cache on another device than the query is refused (the meta device stands in for a GPU)."""
    q = torch.randn(1, 2, 8)
    cache = torch.zeros(2, 4, 2, 8, device="meta")
    with pytest.raises(RuntimeError, match="k_cache"):
        ops.paged_attention(
            q,
            cache,
            cache,
            torch.zeros(1, 1, dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32),
        )


# ---- registration: opcheck and torch.compile ----------------------------------------------------


def test_opcheck(gen):
    batch = make_paged_batch([10, 9, 0], [1, 6, 0], 4, 2, 16, 4, torch.float32, "cpu", gen)
    args = (
        *batch.args,
        0.25,
        True,
        3,
        5.0,
    )
    torch.library.opcheck(torch.ops.kv_paged.paged_attention.default, args)


def test_compile_reshape_and_cache_then_paged_attention(gen):
    """torch.compile(fullgraph=True) of one decode step (write the new K/V, then attend) matches eager,
    including the in-place cache update."""
    batch = make_paged_batch([10, 9, 17], [1, 1, 1], 4, 2, 16, 4, torch.float32, "cpu", gen)
    lens = batch.seq_lens_kv
    key, value = torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)
    bt = batch.block_tables.long()
    slots = torch.stack(
        [bt[i, (n - 1) // 4] * 4 + (n - 1) % 4 for i, n in enumerate(lens.tolist())]
    )

    def step(query, key, value, k_cache, v_cache, slot_mapping, block_tables, cu, seq_lens):
        ops.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
        return ops.paged_attention(
            query, k_cache, v_cache, block_tables, cu, seq_lens, softcap=20.0
        )

    k_eager, v_eager = batch.k_cache.clone(), batch.v_cache.clone()
    eager = step(
        batch.query,
        key,
        value,
        k_eager,
        v_eager,
        slots,
        batch.block_tables,
        batch.cu_seqlens_q,
        lens,
    )
    compiled = torch.compile(step, fullgraph=True)
    k_comp, v_comp = batch.k_cache.clone(), batch.v_cache.clone()
    out = compiled(
        batch.query, key, value, k_comp, v_comp, slots, batch.block_tables, batch.cu_seqlens_q, lens
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, eager)
    assert torch.equal(k_comp.nan_to_num(7.0), k_eager.nan_to_num(7.0))
    assert torch.equal(v_comp.nan_to_num(7.0), v_eager.nan_to_num(7.0))


def test_max_seqlen_kv_hint(gen):
    """max_seqlen_kv (the host's max(seq_lens_kv), a split-count hint for the CUDA decode kernel)
    leaves the output unchanged when it is the truth or above it, and is refused by name when it is
    negative or, on CPU where the lengths are at hand, below the longest sequence."""
    batch = make_paged_batch([10, 9, 33], [1, 6, 1], 4, 2, 16, 4, torch.float32, "cpu", gen)
    args = batch.args
    plain = ops.paged_attention(*args)
    for hint in (33, 40, None):
        assert torch.equal(ops.paged_attention(*args, max_seqlen_kv=hint), plain)
    with pytest.raises(RuntimeError, match="max_seqlen_kv = 32 is below the longest seq_lens_kv"):
        ops.paged_attention(*args, max_seqlen_kv=32)
    with pytest.raises(RuntimeError, match="max_seqlen_kv must be -1"):
        ops.paged_attention(*args, max_seqlen_kv=-2)


def test_max_seqlen_kv_check_reads_the_lengths_once(gen):
    """The CPU op compares max_seqlen_kv with seq_lens_kv inside its one pass over the host's index
    values: no second read of seq_lens_kv (a max() reduction and an item(): on CUDA, a host sync
    per layer)."""
    batch = make_paged_batch([10, 9, 33], [1, 6, 1], 4, 2, 16, 4, torch.float32, "cpu", gen)
    args = batch.args
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.paged_attention(*args, max_seqlen_kv=33)
    names = {e.name for e in prof.events()}
    assert "kv_paged::paged_attention" in names, sorted(names)  # the profiler sees inside the op
    assert not names & {"aten::max", "aten::item", "aten::_local_scalar_dense"}, sorted(names)
