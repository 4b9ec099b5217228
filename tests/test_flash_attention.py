"""flash_attention (varlen, no cache) against the float64 reference.

Grid: a seeded pairwise covering design over the axes below (the full product, 960 points, is too
slow for CI); test_grid_is_pairwise checks the cover. Each point runs one varlen batch with an empty
sequence, length 1, q_len < k_len (chunk after a prefix), q_len > k_len (bottom-right causal: the
first rows see no key and must be zeros) and a sequence longer than one q tile and one kv tile.
q/k/v are non-contiguous views.
"""

import pytest
import torch

from kv_paged import ops

from conftest import (
    DEVICES,
    DTYPES,
    assert_close_to_reference,
    covers_all_pairs,
    pairwise_grid,
    randn,
)
from reference import flash_attention_reference

AXES = {
    "head_dim": [64, 80, 96, 128, 256],
    "heads": [(8, 8), (8, 4), (8, 1), (12, 4)],
    "dtype": DTYPES,
    "sliding_window": [None, 7],
    "softcap": [None, 3.0],
    "causal": [True, False],
}
GRID = pairwise_grid(AXES, seed=5)

# (q_len, k_len) per sequence
LENGTHS = [(0, 0), (1, 1), (3, 17), (20, 9), (70, 70), (0, 5)]


def _id(p: dict) -> str:
    h, kvh = p["heads"]
    return (
        f"d{p['head_dim']}-h{h}/{kvh}-{str(p['dtype'])[6:]}-w{p['sliding_window']}"
        f"-cap{p['softcap']}-{'causal' if p['causal'] else 'full'}"
    )


def make_varlen(lengths, h, kvh, d, dtype, device, gen):
    q_lens, k_lens = zip(*lengths)
    q = randn((sum(q_lens), h, d), dtype, gen, device, pad_last=4)
    kv = randn((sum(k_lens), 2, kvh, d), dtype, gen, device)  # k and v: strided views of one tensor
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    return (
        q,
        kv[:, 0],
        kv[:, 1],
        cu(q_lens).to(device),
        cu(k_lens).to(device),
        max(q_lens),
        max(k_lens),
    )


def run_and_check(q, k, v, cq, ck, mq, mk, dtype, **kw):
    out = ops.flash_attention(q, k, v, cq, ck, mq, mk, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    scale = kw.pop("scale", None) or q.shape[-1] ** -0.5
    ref = flash_attention_reference(q, k, v, cq, ck, scale=scale, **kw)
    same = flash_attention_reference(q, k, v, cq, ck, scale=scale, dtype=dtype, **kw)
    assert_close_to_reference(out, ref, same)
    return out


def test_grid_is_pairwise():
    assert covers_all_pairs(AXES, GRID)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("point", GRID, ids=[_id(p) for p in GRID])
def test_flash_attention_grid(point, device, gen):
    h, kvh = point["heads"]
    args = make_varlen(LENGTHS, h, kvh, point["head_dim"], point["dtype"], device, gen)
    out = run_and_check(
        *args,
        point["dtype"],
        causal=point["causal"],
        sliding_window=point["sliding_window"],
        softcap=point["softcap"],
    )
    if point["causal"]:
        start = sum(q for q, _ in LENGTHS[:3])  # sequence (20, 9): its first 11 rows see no key
        assert out[start : start + 11].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence(device, gen):
    args = make_varlen([(300, 300), (1, 257)], 4, 2, 64, torch.float32, device, gen)
    run_and_check(*args, torch.float32)
    run_and_check(*args, torch.float32, sliding_window=50, softcap=5.0, scale=0.2)


@pytest.mark.parametrize("max_q", [2048, 8192])
def test_wide_items(max_q, gen):
    """The CPU kernel widens its work items with max_seqlen_q (128 rows from 2048, 256 from 4096):
    an over-stated bound takes those paths on short sequences, with a remainder item, GQA rows
    and causal rows that see nothing."""
    q, k, v, cq, ck, _, mk = make_varlen(
        [(300, 300), (20, 9), (0, 5), (1, 257)], 8, 2, 64, torch.float32, "cpu", gen
    )
    run_and_check(q, k, v, cq, ck, max_q, mk, torch.float32)
    run_and_check(q, k, v, cq, ck, max_q, mk, torch.float32, sliding_window=50, softcap=5.0)


def _bad_cases():
    def case(name, fn, match):
        return pytest.param(fn, match, id=name)

    def write(key, index, value):
        def apply(a):
            a[key] = a[key].clone()
            a[key][index] = value

        return apply

    def set_(key, f):
        def apply(a):
            a[key] = f(a)

        return apply

    return [
        case("q-rank", set_("q", lambda a: a["q"].flatten(1)), "q"),
        case("q-float64", set_("q", lambda a: a["q"].double()), "q"),
        case("k-dtype", set_("k", lambda a: a["k"].half()), "k"),
        case("v-shape", set_("v", lambda a: a["v"][:-1]), "v"),
        case("head-dim-mismatch", set_("q", lambda a: a["q"][..., :8].contiguous()), "head_dim"),
        case("heads-not-multiple", set_("q", lambda a: a["q"][:, :3].contiguous()), "num_heads"),
        case("cu-q-decreasing", write("cu_q", 1, 9), "cu_seqlens_q"),
        case("cu-k-total", write("cu_k", 2, 3), "cu_seqlens_k"),
        case("cu-k-length", set_("cu_k", lambda a: a["cu_k"][:2]), "cu_seqlens_k"),
        case("cu-q-int64", set_("cu_q", lambda a: a["cu_q"].long()), "cu_seqlens_q"),
        case("max-seqlen-q-small", set_("max_q", lambda a: 2), "max_seqlen_q"),
        case("max-seqlen-k-small", set_("max_k", lambda a: 1), "max_seqlen_k"),
    ]


@pytest.mark.parametrize("mutate, match", _bad_cases())
def test_bad_input(mutate, match, gen):
    q, k, v, cq, ck, mq, mk = make_varlen([(3, 5), (4, 4)], 4, 2, 16, torch.float32, "cpu", gen)
    a = dict(q=q, k=k, v=v, cu_q=cq, cu_k=ck, max_q=mq, max_k=mk)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kv_paged.flash_attention(
            a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["max_q"], a["max_k"], 0.25, True, 0, 0.0
        )


def test_opcheck(gen):
    q, k, v, cq, ck, mq, mk = make_varlen(
        [(3, 5), (4, 4), (0, 2)], 4, 2, 16, torch.float32, "cpu", gen
    )
    torch.library.opcheck(
        torch.ops.kv_paged.flash_attention.default, (q, k, v, cq, ck, mq, mk, 0.25, True, 3, 5.0)
    )
