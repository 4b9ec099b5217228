"""Quick end-to-end check of the ops on one small adversarial point each, flash_attention's backward
included (the full grids live in tests/test_<op>.py)."""

import torch

from kv_paged import ops

from conftest import assert_close_to_reference, make_paged_batch
from reference import (
    flash_attention_reference,
    flash_attention_reference_grads,
    paged_attention_reference,
)


def test_paged_attention_smoke(gen):
    b = make_paged_batch(
        [5, 0, 37, 16], [5, 0, 1, 3], 8, 2, 64, 16, torch.float32, "cpu", gen, kv_fused=True
    )
    out = ops.paged_attention(*b.args)
    args = b.args
    ref = paged_attention_reference(*args, scale=64**-0.5)
    same = paged_attention_reference(*args, scale=64**-0.5, dtype=torch.float32)
    assert_close_to_reference(out, ref, same)


def test_flash_attention_smoke(gen):
    q = torch.randn(10, 4, 32, generator=gen)
    k = torch.randn(12, 2, 32, generator=gen)
    v = torch.randn(12, 2, 32, generator=gen)
    cq = torch.tensor([0, 4, 10], dtype=torch.int32)
    ck = torch.tensor([0, 7, 12], dtype=torch.int32)
    out = ops.flash_attention(q, k, v, cq, ck, 6, 7)
    ref = flash_attention_reference(q, k, v, cq, ck, scale=32**-0.5)
    same = flash_attention_reference(q, k, v, cq, ck, scale=32**-0.5, dtype=torch.float32)
    assert_close_to_reference(out, ref, same)


def test_flash_attention_backward_smoke(gen):
    q, k, v = (
        torch.randn(n, h, 32, generator=gen).requires_grad_()
        for n, h in ((10, 4), (12, 2), (12, 2))
    )
    cq = torch.tensor([0, 4, 10], dtype=torch.int32)
    ck = torch.tensor([0, 7, 12], dtype=torch.int32)
    dout = torch.randn(10, 4, 32, generator=gen)
    ops.flash_attention(q, k, v, cq, ck, 6, 7, softcap=4.0).backward(dout)
    ref = flash_attention_reference_grads(q, k, v, cq, ck, dout, scale=32**-0.5, softcap=4.0)
    for got, want in zip((q.grad, k.grad, v.grad), ref):
        assert (got.double() - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_cache_ops_smoke(gen):
    k_cache = torch.zeros(4, 2, 1, 8)
    v_cache = torch.zeros(4, 2, 1, 8)
    key, value = torch.randn(3, 1, 8, generator=gen), torch.randn(3, 1, 8, generator=gen)
    ops.reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[0, 0], value[2])
    ops.copy_blocks([k_cache], [v_cache], torch.tensor([[2, 3]]))
    assert torch.equal(k_cache[3], k_cache[2]) and torch.equal(v_cache[3], v_cache[2])
    dst = torch.zeros_like(k_cache)
    ops.swap_blocks(k_cache, dst, torch.tensor([[3, 1]]))
    assert torch.equal(dst[1], k_cache[3]) and dst[0].eq(0).all()
