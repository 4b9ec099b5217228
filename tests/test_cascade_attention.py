"""Cascade (shared-prefix) attention: the three ops against float64 references, and the composition
(plan_cascade + cascade_attention) against plain paged_attention and the reference.

Batches are built from shared segments of whole blocks (a segment's blocks are physically shared by
every sequence that lists it) plus private tails; every block id comes from a random permutation,
every unused slot and block holds NaN, and query views are non-contiguous. The grid covers groups of
1..256 sequences, prefixes cut mid-block, empty suffixes, GQA, softcap and nested prefixes.
"""

from __future__ import annotations

import math

import pytest
import torch

from kv_paged import ops
from kv_paged.cascade import cascade_attention, plan_cascade

from conftest import DEVICES, DTYPES, PagedBatch, assert_close_to_reference, max_err, randn
from reference import dense_attention, gather_blocks, paged_attention_reference

GROUP_SIZES = [1, 2, 7, 64, 256]
HEADS = [(4, 4), (8, 2), (6, 1)]


class SharedBatch:
    """Sequences made of shared segments and a private tail.

    seqs: per sequence (segment names, private_len, q_len, trim): its table is the segments' blocks
    then ceil(private_len / bs) private blocks; kv_len = whole segment tokens + private_len - trim
    (trim > 0 ends the sequence inside its last shared block: the rest holds other members' data).
    """

    def __init__(self, segments, seqs, heads, head_dim, bs, dtype, device, gen):
        h, kvh = heads
        priv = [math.ceil(p / bs) for _, p, _, _ in seqs]
        num_blocks = sum(segments.values()) + sum(priv) + 2
        shape = (num_blocks, bs, kvh, head_dim)
        k = torch.full(shape, float("nan"), dtype=dtype)
        v = torch.full(shape, float("nan"), dtype=dtype)
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        seg_ids = {}
        for name, n in segments.items():
            seg_ids[name] = [perm.pop() for _ in range(n)]
            k[seg_ids[name]] = torch.randn(n, bs, kvh, head_dim, generator=gen).to(dtype)
            v[seg_ids[name]] = torch.randn(n, bs, kvh, head_dim, generator=gen).to(dtype)
        tables, self.kv_lens, self.q_lens = [], [], []
        for (names, p, q, trim), nb in zip(seqs, priv):
            ids = [b for name in names for b in seg_ids[name]]
            own = [perm.pop() for _ in range(nb)]
            for pos in range(p):
                k[own[pos // bs], pos % bs] = torch.randn(kvh, head_dim, generator=gen).to(dtype)
                v[own[pos // bs], pos % bs] = torch.randn(kvh, head_dim, generator=gen).to(dtype)
            tables.append(ids + own)
            self.kv_lens.append(len(ids) * bs + p - trim)
            self.q_lens.append(q)
        width = max(len(t) for t in tables) + 1
        bt = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        cu = [0]
        for q in self.q_lens:
            cu.append(cu[-1] + q)
        self.bs = bs
        self.segment_blocks = seg_ids
        self.query = randn((cu[-1], h, head_dim), dtype, gen, pad_last=8).to(device)
        self.k_cache, self.v_cache = k.to(device), v.to(device)
        self.block_tables_host = bt
        self.block_tables = bt.to(device)
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=device)
        self.seq_lens_kv = torch.tensor(self.kv_lens, dtype=torch.int32, device=device)

    args = PagedBatch.args  # the six leading arguments of ops.paged_attention


def lse_reference(q, k, v, scale, softcap, mask=None) -> torch.Tensor:
    """float64 log-sum-exp of the logits: q [n, H, D], k [m, KVH, D] -> [n, H]; -inf without keys."""
    g = q.shape[1] // k.shape[1]
    qd, kd = q.double().transpose(0, 1), k.double().repeat_interleave(g, 1).transpose(0, 1)
    logits = (qd @ kd.transpose(1, 2)) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(logits, dim=-1).transpose(0, 1)


def check_state(out, lse, ref_out, same_dtype_out, ref_lse):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close_to_reference(out, ref_out, same_dtype_out)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty), (
        "lse must be -inf exactly for rows without keys"
    )
    assert max_err(lse.cpu()[~empty], ref_lse[~empty]) < 1e-3


# ---- shared_prefix_attention ------------------------------------------------------------------


def check_shared_prefix(
    plens, sizes, heads, head_dim, bs, dtype, softcap, device, gen, q_scale=1.0
):
    """Runs shared_prefix_attention with group g = sizes[g] rows (shuffled, 60 query rows in all, the
    rest in no group) over a prefix of plens[g] keys, and checks (out, lse) against the reference."""
    h, kvh = heads
    batch = SharedBatch(
        {f"s{g}": -(-n // bs) for g, n in enumerate(plens)},
        [([], 0, 0, 0)],
        heads,
        head_dim,
        bs,
        dtype,
        "cpu",
        gen,
    )
    total_q = 60
    query = randn((total_q, h, head_dim), dtype, gen, pad_last=8)
    if q_scale != 1.0:
        query = (query.float() * q_scale).to(dtype)
    order = torch.randperm(total_q, generator=gen)[: sum(sizes)]
    width = max(1, *(len(b) for b in batch.segment_blocks.values()))
    tables = torch.full((len(plens), width), -1, dtype=torch.int32)
    for g in range(len(plens)):
        blocks = batch.segment_blocks[f"s{g}"]
        tables[g, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    scale = head_dim**-0.5
    out, lse = ops.shared_prefix_attention(
        query.to(device),
        batch.k_cache,
        batch.v_cache,
        tables.to(device),
        torch.tensor(plens, dtype=torch.int32, device=device),
        cu.to(device),
        order.to(torch.int32).to(device),
        scale=scale,
        softcap=softcap,
    )
    ref = torch.zeros(total_q, h, head_dim, dtype=torch.float64)
    same = torch.zeros(total_q, h, head_dim, dtype=dtype)
    ref_lse = torch.full((total_q, h), float("-inf"), dtype=torch.float64)
    for g, n in enumerate(plens):
        rows = order[cu[g] : cu[g + 1]]
        k = gather_blocks(batch.k_cache.cpu(), tables[g], n)
        v = gather_blocks(batch.v_cache.cpu(), tables[g], n)
        kw = dict(scale=scale, causal=False, sliding_window=None, softcap=softcap)
        ref[rows] = dense_attention(query[rows], k, v, **kw)
        same[rows] = dense_attention(query[rows], k, v, dtype=dtype, **kw)
        if n:
            ref_lse[rows] = lse_reference(query[rows], k, v, scale, softcap)
    check_state(out, lse, ref, same, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads, head_dim, bs", [((4, 4), 64, 16), ((8, 2), 80, 8), ((6, 1), 36, 1)]
)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_shared_prefix_op(heads, head_dim, bs, dtype, softcap, device, gen):
    """Groups of 1, 5 and 40 rows in shuffled row order, prefixes ending mid-block and mid-tile
    (>64 keys), an empty prefix, and rows in no group."""
    plens = [3 * bs + 5 if bs > 1 else 7, 0, 130, bs]
    check_shared_prefix(plens, [5, 3, 40, 1], heads, head_dim, bs, dtype, softcap, device, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_underflow_and_empty_rows(device, gen):
    """Logits hundreds apart, so exp(s - max) underflows to 0 for most keys (past the fp32 range of
    the vectorised exp), a last tile with one key and 15 -inf pads (65 keys), a one-key prefix, and empty
    prefixes (rows with no key at all): outputs stay finite, lse is -inf exactly for the empty rows."""
    plens = [65, 0, 1, 200, 0]
    check_shared_prefix(
        plens, [6, 4, 3, 20, 1], (4, 2), 64, 16, torch.float32, None, device, gen, q_scale=60.0
    )


# ---- paged_attention_lse and merge_attention_states ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "causal, window, softcap", [(True, None, None), (True, 5, 3.0), (False, None, None)]
)
def test_paged_attention_lse(dtype, causal, window, softcap, device, gen):
    """Suffixes starting at 0, mid-block, at a block edge and at seq_len (empty), decode and
    prefill rows, GQA; the state matches the float64 reference over keys [kv_start, seq_len)."""
    bs = 8
    batch = SharedBatch(
        {},
        [([], 30, 1, 0), ([], 21, 5, 0), ([], 16, 1, 0), ([], 9, 2, 0), ([], 12, 0, 0)],
        (8, 2),
        64,
        bs,
        dtype,
        device,
        gen,
    )
    kv_start = torch.tensor([0, 13, 8, 9, 4], dtype=torch.int32)
    scale = 0.125
    out, lse = ops.paged_attention_lse(
        *batch.args,
        kv_start.to(device),
        scale=scale,
        causal=causal,
        sliding_window=window,
        softcap=softcap,
    )
    total_q = batch.query.shape[0]
    ref = torch.zeros(total_q, 8, 64, dtype=torch.float64)
    same = torch.zeros(total_q, 8, 64, dtype=dtype)
    ref_lse = torch.full((total_q, 8), float("-inf"), dtype=torch.float64)
    cu = batch.cu_seqlens_q.tolist()
    from reference import visible_mask

    for i, (n, s) in enumerate(zip(batch.kv_lens, kv_start.tolist())):
        q = batch.query[cu[i] : cu[i + 1]].cpu()
        k = gather_blocks(batch.k_cache.cpu(), batch.block_tables_host[i], n)[s:]
        v = gather_blocks(batch.v_cache.cpu(), batch.block_tables_host[i], n)[s:]
        kw = dict(scale=scale, causal=causal, sliding_window=window, softcap=softcap)
        ref[cu[i] : cu[i + 1]] = dense_attention(q, k, v, **kw)
        same[cu[i] : cu[i + 1]] = dense_attention(q, k, v, dtype=dtype, **kw)
        if len(q) and len(k):
            mask = visible_mask(len(q), len(k), causal, window)[None]
            ref_lse[cu[i] : cu[i + 1]] = lse_reference(q, k, v, scale, softcap, mask)
    check_state(out, lse, ref, same, ref_lse)
    # sequence 3 (kv_start == seq_len) saw nothing: exactly the empty state
    assert torch.equal(out[cu[3] : cu[4]].cpu(), torch.zeros(2, 8, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_is_exact_and_ignores_empty_states(device, gen):
    """merge(state over keys A, state over keys B) == state over A + B; a side with lse -inf is
    never read (its out may be NaN), and two empty sides give (0, -inf)."""
    batch = SharedBatch(
        {}, [([], 40, 1, 0), ([], 17, 3, 0)], (4, 2), 32, 8, torch.float32, device, gen
    )
    args = batch.args
    lens = batch.seq_lens_kv
    zero = torch.zeros_like(lens)
    split = torch.tensor([19, 6], dtype=torch.int32, device=device)
    whole = ops.paged_attention_lse(*args, zero)
    tail = ops.paged_attention_lse(*args, split)
    # head: keys [0, split), all visible to the queries (which sit at positions >= split)
    head = ops.paged_attention_lse(*args[:5], split, zero, causal=False)
    out, lse = ops.merge_attention_states(*head, *tail)
    torch.testing.assert_close(out, whole[0], atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(lse, whole[1], atol=2e-6, rtol=2e-5)
    nan_out = torch.full_like(whole[0], float("nan"))
    empty_lse = torch.full_like(whole[1], float("-inf"))
    out, lse = ops.merge_attention_states(nan_out, empty_lse, *whole)
    assert torch.equal(out, whole[0]) and torch.equal(lse, whole[1])
    out, lse = ops.merge_attention_states(nan_out, empty_lse, nan_out, empty_lse)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, empty_lse)


# ---- the composition: plan_cascade + cascade_attention == paged_attention -----------------------


def group_batch(n, heads, head_dim, bs, dtype, device, gen, *, causal=True):
    """n sequences over a shared 'sys' prefix (5 blocks) with private tails of 0..2 bs tokens, one
    member ending inside the last shared block, one with a prefill chunk of 3 rows; plus two
    outsiders (one with no query)."""
    lens = torch.randint(0, 2 * bs + 1, (n,), generator=gen).tolist()
    seqs = [(["sys"], p, 1, 0) for p in lens]
    if n >= 2:
        seqs[0] = (["sys"], 0, 1, bs // 2 if causal else 0)  # ends mid-block in the shared prefix
        seqs[1] = (["sys"], bs + 3, 3, 0)
    seqs += [([], 3 * bs + 1, 1, 0), (["own"], 5, 0, 0)]
    return SharedBatch({"sys": 5, "own": 2}, seqs, heads, head_dim, bs, dtype, device, gen)


def check_cascade(batch, dtype, *, causal=True, softcap=None, **plan_kw):
    plan = plan_cascade(
        batch.block_tables_host, batch.q_lens, batch.kv_lens, batch.bs, causal=causal, **plan_kw
    )
    assert plan is not None
    plan = plan.to(batch.query.device)
    out = cascade_attention(*batch.args, plan, causal=causal, softcap=softcap)
    plain = ops.paged_attention(*batch.args, causal=causal, softcap=softcap)
    assert out.dtype == dtype and out.shape == batch.query.shape
    scale = batch.query.shape[-1] ** -0.5
    kw = dict(scale=scale, causal=causal, softcap=softcap)
    ref = paged_attention_reference(*batch.args, **kw)
    assert_close_to_reference(out, ref, paged_attention_reference(*batch.args, dtype=dtype, **kw))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_err(out, plain.double().cpu()) <= tol * max(1.0, max_err(plain, ref) / tol)
    return plan


CASES = [  # group size, heads, head_dim, block size, dtype, softcap
    (1, (4, 4), 64, 16, torch.float32, None),
    (2, (8, 2), 80, 8, torch.bfloat16, 3.0),
    (7, (6, 1), 36, 1, torch.float16, None),
    (64, (8, 2), 128, 16, torch.float32, 5.0),
    (256, (4, 4), 64, 16, torch.bfloat16, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, heads, head_dim, bs, dtype, softcap", CASES)
def test_cascade_matches_paged_attention(n, heads, head_dim, bs, dtype, softcap, device, gen):
    batch = group_batch(n, heads, head_dim, bs, dtype, device, gen)
    plan = check_cascade(batch, dtype, softcap=softcap, min_group_size=1, min_prefix_tokens=1)
    level = plan.levels[0]
    sizes = (level.cu_group_rows[1:] - level.cu_group_rows[:-1]).tolist()
    # the group (n members, +2 rows for the prefill chunk) and, below it, the outsiders' own groups
    assert n + (2 if n >= 2 else 0) in sizes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_levels", [1, 2, 3])
def test_nested_prefixes(max_levels, device, gen):
    """A system prompt shared by 20 sequences, a document by 10 of them (and a chapter of it by 5),
    another document by 6; deeper sharing than max_levels is read in the suffix."""
    segs = {"sys": 3, "docA": 2, "chap": 1, "docB": 2}
    seqs = (
        [(["sys", "docA", "chap"], p, 1, 0) for p in (0, 3, 9, 1, 4)]
        + [(["sys", "docA"], p, 1, 0) for p in (2, 5, 8, 3, 7)]
        + [(["sys", "docB"], p, 1, 0) for p in (6, 1, 2, 9, 4, 3)]
        + [(["sys"], p, 1, 0) for p in (5, 10, 11, 12)]
    )
    batch = SharedBatch(segs, seqs, (8, 2), 64, 8, torch.float32, device, gen)
    plan = check_cascade(
        batch, torch.float32, min_group_size=4, min_prefix_tokens=1, max_levels=max_levels
    )
    assert len(plan.levels) == max_levels
    expected = [[20], [10, 6], [5]][:max_levels]
    for level, sizes in zip(plan.levels, expected):
        got = (level.cu_group_rows[1:] - level.cu_group_rows[:-1]).tolist()
        assert sorted(got, reverse=True) == sizes


@pytest.mark.parametrize("device", DEVICES)
def test_non_causal_empty_suffixes(device, gen):
    """causal=False: sequences that end exactly at the shared prefix have empty suffixes."""
    seqs = [(["sys"], 0, 1, 0)] * 5 + [(["sys"], 7, 2, 0)] * 3
    batch = SharedBatch({"sys": 4}, seqs, (4, 2), 64, 8, torch.float16, device, gen)
    plan = check_cascade(batch, torch.float16, causal=False, min_group_size=2, min_prefix_tokens=1)
    assert (plan.kv_start.cpu() == batch.seq_lens_kv.cpu())[:5].all()


def test_plan_thresholds(gen):
    batch = group_batch(6, (4, 4), 32, 16, torch.float32, "cpu", gen)
    args = (batch.block_tables_host, batch.q_lens, batch.kv_lens, 16)
    assert plan_cascade(*args, min_group_size=7) is None
    # member 0 ends 8 tokens into the 5th shared block: its query at position 71 sees 71 keys
    # before it, so the prefix is cut there, mid-block
    assert plan_cascade(*args, min_group_size=6, min_prefix_tokens=72) is None
    plan = plan_cascade(*args, min_group_size=6, min_prefix_tokens=71)
    assert len(plan.levels) == 1 and plan.levels[0].prefix_lens.tolist() == [71]
    assert plan.kv_start.tolist() == [71] * 6 + [0, 0]
    assert plan.shared_tokens == 71 * 5


# ---- bad input and registration ---------------------------------------------------------------


def _prefix_args(gen):
    batch = SharedBatch({"s": 3}, [([], 0, 0, 0)], (4, 2), 16, 4, torch.float32, "cpu", gen)
    blocks = torch.tensor([batch.segment_blocks["s"]], dtype=torch.int32)
    return dict(
        query=torch.randn(6, 4, 16, generator=gen),
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        prefix_block_tables=blocks,
        prefix_lens=torch.tensor([10], dtype=torch.int32),
        cu_group_rows=torch.tensor([0, 3], dtype=torch.int32),
        group_rows=torch.tensor([4, 0, 2], dtype=torch.int32),
        scale=0.25,
        softcap=0.0,
    )


def _set(key, value):
    def apply(a):
        a[key] = value(a) if callable(value) else value

    return apply


PREFIX_BAD = [
    ("query-int", _set("query", lambda a: a["query"].int()), "query"),
    ("query-rank", _set("query", lambda a: a["query"][0]), "query"),
    ("kcache-dtype", _set("k_cache", lambda a: a["k_cache"].half()), "k_cache"),
    ("vcache-shape", _set("v_cache", lambda a: a["v_cache"][:, :, :1]), "v_cache"),
    ("heads", _set("query", lambda a: a["query"][:, :3].contiguous()), "num_heads"),
    (
        "table-int64",
        _set("prefix_block_tables", lambda a: a["prefix_block_tables"].long()),
        "prefix_block_tables",
    ),
    (
        "block-out-of-range",
        _set("prefix_block_tables", torch.tensor([[0, 99, 1]], dtype=torch.int32)),
        "prefix_block_tables",
    ),
    (
        "prefix-len-too-long",
        _set("prefix_lens", torch.tensor([13], dtype=torch.int32)),
        "prefix_lens",
    ),
    (
        "prefix-len-negative",
        _set("prefix_lens", torch.tensor([-1], dtype=torch.int32)),
        "prefix_lens",
    ),
    (
        "prefix-lens-length",
        _set("prefix_lens", torch.tensor([4, 4], dtype=torch.int32)),
        "prefix_lens",
    ),
    ("cu-first", _set("cu_group_rows", torch.tensor([1, 3], dtype=torch.int32)), "cu_group_rows"),
    ("cu-last", _set("cu_group_rows", torch.tensor([0, 2], dtype=torch.int32)), "cu_group_rows"),
    (
        "row-out-of-range",
        _set("group_rows", torch.tensor([4, 0, 6], dtype=torch.int32)),
        "group_rows",
    ),
    ("row-twice", _set("group_rows", torch.tensor([4, 0, 4], dtype=torch.int32)), "group_rows"),
    ("rows-int64", _set("group_rows", lambda a: a["group_rows"].long()), "group_rows"),
    ("scale-inf", _set("scale", float("inf")), "scale"),
]


@pytest.mark.parametrize("mutate, match", [pytest.param(m, x, id=i) for i, m, x in PREFIX_BAD])
def test_shared_prefix_bad_input(mutate, match, gen):
    a = _prefix_args(gen)
    torch.ops.kv_paged.shared_prefix_attention(*a.values())  # the unmutated call is fine
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kv_paged.shared_prefix_attention(*a.values())


def test_suffix_and_merge_bad_input(gen):
    batch = SharedBatch(
        {}, [([], 9, 1, 0), ([], 5, 2, 0)], (4, 2), 16, 4, torch.float32, "cpu", gen
    )
    for start, match in [
        ([0, 6], "kv_start"),
        ([-1, 0], "kv_start"),
        ([0], "kv_start"),
        ([0, 0, 0], "kv_start"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.paged_attention_lse(*batch.args, torch.tensor(start, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="kv_start"):
        ops.paged_attention_lse(*batch.args, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="seq_lens_kv"):  # paged_attention's own checks apply
        ops.paged_attention_lse(
            *batch.args[:5],
            torch.tensor([9, 99], dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        )
    out, lse = ops.paged_attention_lse(*batch.args, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out_b"):
        ops.merge_attention_states(out, lse, out[:2], lse)
    with pytest.raises(RuntimeError, match="lse_a"):
        ops.merge_attention_states(out, lse.double(), out, lse)
    with pytest.raises(RuntimeError, match="out_a"):
        ops.merge_attention_states(out.half(), lse, out, lse)


def test_opcheck(gen):
    a = _prefix_args(gen)
    torch.library.opcheck(torch.ops.kv_paged.shared_prefix_attention.default, tuple(a.values()))
    batch = SharedBatch(
        {}, [([], 9, 1, 0), ([], 5, 2, 0)], (4, 2), 16, 4, torch.float32, "cpu", gen
    )
    start = torch.tensor([3, 5], dtype=torch.int32)
    suffix_args = (*batch.args, start, 0.25, True, 0, 2.0)
    torch.library.opcheck(torch.ops.kv_paged.paged_attention_lse.default, suffix_args)
    out, lse = torch.ops.kv_paged.paged_attention_lse(*suffix_args)
    torch.library.opcheck(torch.ops.kv_paged.merge_attention_states.default, (out, lse, out, lse))
