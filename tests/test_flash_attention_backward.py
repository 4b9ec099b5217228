"""flash_attention's backward (flash_attention_backward, FA2 by recomputation) against autograd
through the float64 dense reference, on the forward's adversarial varlen batch (empty sequences,
q_len < k_len and q_len > k_len, several kv/q tiles, non-contiguous q/k/v and dout) over a pairwise
grid of head_dim (incl. 80/96/256), GQA up to 7:1, windows, softcap, causal and dtype; gradcheck;
opcheck with its autograd checks; torch.compile; the split-dQ path; paged_attention's refusal.
"""

import pytest
import torch
from test_flash_attention import make_varlen

from kv_paged import ops

from conftest import DEVICES, DTYPES, covers_all_pairs, max_err, pairwise_grid, randn
from reference import flash_attention_reference_grads

AXES = {
    "head_dim": [64, 80, 96, 256],
    "heads": [(8, 8), (7, 1), (8, 2), (12, 4)],
    "dtype": DTYPES,
    "sliding_window": [None, 7, 70],
    "softcap": [None, 3.0],
    "causal": [True, False],
}
GRID = pairwise_grid(AXES, seed=13)

# (q_len, k_len) per sequence: empty, single, chunk after a prefix, q_len > k_len (bottom-right:
# rows that see nothing), and 150 x 150 (three 64-key tiles, three 64-row query tiles).
LENGTHS = [(0, 0), (1, 1), (3, 17), (20, 9), (150, 150), (0, 5), (4, 0)]


def _id(p: dict) -> str:
    h, kvh = p["heads"]
    return (
        f"d{p['head_dim']}-h{h}/{kvh}-{str(p['dtype'])[6:]}-w{p['sliding_window']}"
        f"-cap{p['softcap']}-{'causal' if p['causal'] else 'full'}"
    )


def grads_of(q, k, v, cq, ck, mq, mk, dout, **kw):
    """(out, dq, dk, dv) of ops.flash_attention through autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ops.flash_attention(*leaves, cq, ck, mq, mk, **kw)
    out.backward(dout)
    return (out, *(t.grad for t in leaves))


def check_grads(args, dout, dtype, **kw):
    q, k, v, cq, ck, mq, mk = args
    _, *ours = grads_of(*args, dout, **kw)
    scale = kw.pop("scale", None) or q.shape[-1] ** -0.5
    ref = flash_attention_reference_grads(q, k, v, cq, ck, dout, scale=scale, **kw)
    same = flash_attention_reference_grads(q, k, v, cq, ck, dout, scale=scale, dtype=dtype, **kw)
    for name, g, r, t in zip(("dq", "dk", "dv"), ours, ref, same):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        # err(ours) <= 2 * err(torch's dense autograd in the same dtype) + eps relative to the size
        # of the gradient (gradients of long sequences are sums of many terms).
        eps = 1e-5 * max(1.0, r.abs().max().item())
        e_ours, e_torch = max_err(g, r), max_err(t, r)
        assert e_ours <= 2 * e_torch + eps, f"{name}: max error {e_ours:.3g} vs torch {e_torch:.3g}"
    return ours


def test_grid_is_pairwise():
    assert covers_all_pairs(AXES, GRID)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("point", GRID, ids=[_id(p) for p in GRID])
def test_backward_grid(point, device, gen):
    h, kvh = point["heads"]
    dtype = point["dtype"]
    args = make_varlen(LENGTHS, h, kvh, point["head_dim"], dtype, device, gen)
    dout = randn(args[0].shape, dtype, gen, device, pad_last=3)  # non-contiguous upstream grad
    dq, dk, dv = check_grads(
        args,
        dout,
        dtype,
        causal=point["causal"],
        sliding_window=point["sliding_window"],
        softcap=point["softcap"],
    )
    # Keys of the (0, 5) sequence are seen by no query: exactly zero gradient.
    k_start = sum(k for _, k in LENGTHS[:5])
    assert dk[k_start : k_start + 5].eq(0).all() and dv[k_start : k_start + 5].eq(0).all()


@pytest.mark.parametrize("threads", [1, 4])
def test_split_kv_path(threads, gen):
    """One sequence x one kv head: with 4 threads the kernel splits the kv tiles (dQ partial
    buffers summed at the end); with 1 it does not. Both must match the reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = make_varlen([(300, 300)], 4, 1, 64, torch.float32, "cpu", gen)
        dout = randn(args[0].shape, torch.float32, gen)
        check_grads(args, dout, torch.float32, softcap=5.0)
        check_grads(args, dout, torch.float32, causal=False, sliding_window=100, scale=0.3)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("max_q", [2048, 4096])
def test_wide_kv_tiles(max_q, gen):
    """The CPU backward widens its kv tiles with max_seqlen_q (128 keys from 2048, 256 from 4096):
    an over-stated bound takes those paths on short sequences, with remainder tiles, GQA 7:1,
    empty sequences and rows that see nothing."""
    q, k, v, cq, ck, _, mk = make_varlen(
        LENGTHS + [(300, 300)], 7, 1, 80, torch.float32, "cpu", gen
    )
    args = (q, k, v, cq, ck, max_q, mk)
    dout = randn(q.shape, torch.float32, gen)
    check_grads(args, dout, torch.float32)
    check_grads(args, dout, torch.float32, sliding_window=70, softcap=3.0)


def test_gradcheck(gen):
    """torch.autograd.gradcheck on small varlen cases. The kernels compute in float32 at most (no
    float64 kernel), so float64 leaves are cast to float32 at the op: eps and tolerances are sized
    for float32 round-off (the float64 comparison above is the precision test)."""
    for lengths, kvh, kw in [
        ([(3, 5), (0, 2), (4, 4), (2, 0)], 1, dict(causal=True)),
        ([(5, 3), (6, 6)], 2, dict(causal=False, sliding_window=2, softcap=2.0)),
        ([(7, 7)], 2, dict(causal=True, sliding_window=3, scale=0.7)),
    ]:
        q, k, v, cq, ck, mq, mk = make_varlen(lengths, 2, kvh, 8, torch.float32, "cpu", gen)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]

        def f(q64, k64, v64):
            return ops.flash_attention(
                q64.float(), k64.float(), v64.float(), cq, ck, mq, mk, **kw
            ).double()

        assert torch.autograd.gradcheck(f, leaves, eps=1e-3, atol=2e-3, rtol=1e-2)


def _opcheck_args(gen, requires_grad):
    q, k, v, cq, ck, mq, mk = make_varlen(
        [(3, 5), (4, 4), (0, 2)], 4, 2, 16, torch.float32, "cpu", gen
    )
    q, k, v = (t.detach().clone().requires_grad_(requires_grad) for t in (q, k, v))
    return q, k, v, cq, ck, mq, mk


def test_opcheck(gen):
    q, k, v, cq, ck, mq, mk = _opcheck_args(gen, requires_grad=True)
    scalars = (mq, mk, 0.25, True, 3, 5.0)
    # Default test_utils include test_autograd_registration and test_aot_dispatch_dynamic, which
    # runs the registered backward under AOTAutograd.
    torch.library.opcheck(
        torch.ops.kv_paged.flash_attention_forward.default, (q, k, v, cq, ck, *scalars)
    )
    torch.library.opcheck(torch.ops.kv_paged.flash_attention.default, (q, k, v, cq, ck, *scalars))
    with torch.no_grad():
        out, lse = torch.ops.kv_paged.flash_attention_forward(q, k, v, cq, ck, *scalars)
    dout = torch.randn(out.shape, generator=gen)
    torch.library.opcheck(
        torch.ops.kv_paged.flash_attention_backward.default,
        (dout, q.detach(), k.detach(), v.detach(), out, lse, cq, ck, *scalars),
    )
    # lse rows that see no key are -inf; the others the log of the softmax sum.
    assert lse.shape == (q.shape[0], q.shape[1]) and lse.dtype == torch.float32


def test_torch_compile_grads_equal_eager(gen):
    args = make_varlen([(5, 9), (0, 3), (12, 12)], 4, 2, 32, torch.float32, "cpu", gen)
    dout = randn(args[0].shape, torch.float32, gen)

    def loss(q, k, v, cq, ck, mq, mk):
        return (
            ops.flash_attention(q, k, v, cq, ck, mq, mk, sliding_window=4, softcap=2.0) * dout
        ).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in args[:3]]
        fn(*leaves, *args[3:]).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_paged_attention_backward_raises(gen):
    from conftest import make_paged_batch

    b = make_paged_batch([5, 9], [2, 1], 4, 2, 16, 4, torch.float32, "cpu", gen)
    query = b.query.detach().clone().requires_grad_()
    out = ops.paged_attention(
        query, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens_kv
    )
    with pytest.raises(RuntimeError, match="paged_attention is inference-only"):
        out.sum().backward()


def _bad_backward_cases():
    def case(name, fn, match):
        return pytest.param(fn, match, id=name)

    def set_(key, f):
        def apply(a):
            a[key] = f(a)

        return apply

    return [
        case("dout-shape", set_("dout", lambda a: a["dout"][:-1]), "dout"),
        case("dout-dtype", set_("dout", lambda a: a["dout"].half()), "dout"),
        case("out-shape", set_("out", lambda a: a["out"][:, :2]), "out"),
        case("lse-dtype", set_("lse", lambda a: a["lse"].double()), "lse"),
        case("lse-shape", set_("lse", lambda a: a["lse"][:, :1]), "lse"),
        case("lse-transposed", set_("lse", lambda a: a["lse"].t().contiguous().t()), "lse"),
        case("k-dtype", set_("k", lambda a: a["k"].half()), "k"),
        case("cu-k-total", set_("cu_k", lambda a: a["cu_k"] * 2), "cu_seqlens_k"),
    ]


@pytest.mark.parametrize("mutate, match", _bad_backward_cases())
def test_backward_bad_input(mutate, match, gen):
    q, k, v, cq, ck, mq, mk = make_varlen([(3, 5), (4, 4)], 4, 2, 16, torch.float32, "cpu", gen)
    out, lse = torch.ops.kv_paged.flash_attention_forward(
        q, k, v, cq, ck, mq, mk, 0.25, True, 0, 0.0
    )
    a = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, cu_q=cq, cu_k=ck)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kv_paged.flash_attention_backward(
            a["dout"],
            a["q"],
            a["k"],
            a["v"],
            a["out"],
            a["lse"],
            a["cu_q"],
            a["cu_k"],
            mq,
            mk,
            0.25,
            True,
            0,
            0.0,
        )
