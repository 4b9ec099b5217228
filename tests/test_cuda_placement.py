"""Where CUDA tensors live, which the other CUDA tests never vary (issue 15, item 5; all skipped
without a CUDA device, so not yet run on one): pools and query views with the strides the CPU grid
gives them, built on the device itself (`.to(device)` would make them contiguous, so the kernels'
strided paths would never run on a GPU), inputs produced on a non-default stream the op must
follow, a second GPU (cuda:1) with a mixed-device call refused by name, and split counts varied
independently of the GPU's SM count.
"""

from __future__ import annotations

import pytest
import torch

import kv_paged  # noqa: F401
from kv_paged import ops

from conftest import assert_close_to_reference, make_paged_batch
from reference import paged_attention_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA placement tests need a CUDA device"
)


def same_strides_on(t: torch.Tensor, device: str) -> torch.Tensor:
    """t on `device` with t's sizes and strides; the storage gaps between its elements hold NaN
    (-1 for integers), so a kernel that reads past a stride shows it."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    fill = float("nan") if t.is_floating_point() else -1
    base = torch.full((span,), fill, dtype=t.dtype, device=device)
    return base.as_strided(t.shape, t.stride()).copy_(t)


def batch_on(batch, device: str) -> dict:
    return dict(
        query=same_strides_on(batch.query, device),
        k_cache=same_strides_on(batch.k_cache, device),
        v_cache=same_strides_on(batch.v_cache, device),
        block_tables=batch.block_tables.to(device),
        cu_seqlens_q=batch.cu_seqlens_q.to(device),
        seq_lens_kv=batch.seq_lens_kv.to(device),
    )


def check(out: torch.Tensor, batch, **kw) -> None:
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables)
    args += (batch.cu_seqlens_q, batch.seq_lens_kv)
    scale = batch.query.shape[-1] ** -0.5
    ref = paged_attention_reference(*args, scale=scale, **kw)
    same_dtype = paged_attention_reference(*args, scale=scale, dtype=batch.query.dtype, **kw)
    assert_close_to_reference(out.cpu(), ref, same_dtype)


SEQ_LENS = [23, 35, 11, 0, 1, 300]
Q_LENS = [1, 5, 0, 0, 1, 1]  # decode rows and a prefill chunk: both kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (16, 2)])
def test_strided_pools_and_query_on_device(dtype, heads, gen):
    batch = make_paged_batch(SEQ_LENS, Q_LENS, *heads, 128, 16, dtype, "cpu", gen, kv_fused=True)
    args = batch_on(batch, "cuda")
    assert not args["k_cache"].is_contiguous() and not args["query"].is_contiguous()
    out = ops.paged_attention(**args, softcap=5.0)
    check(out, batch, softcap=5.0)


def test_follows_the_current_stream(gen):
    """The query is written on a side stream behind a ~50 ms spin; the op, called on that stream
    without a sync, must run after the write (on the default stream it would read the NaN)."""
    batch = make_paged_batch(SEQ_LENS, Q_LENS, 8, 2, 128, 16, torch.bfloat16, "cpu", gen)
    args = batch_on(batch, "cuda")
    query = args["query"]
    args["query"] = torch.full_like(query, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # cycles: tens of ms on any current GPU
        args["query"].copy_(query)
        out = ops.paged_attention(**args)
    side.synchronize()
    check(out, batch)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(gen):
    batch = make_paged_batch(SEQ_LENS, Q_LENS, 8, 2, 128, 16, torch.bfloat16, "cpu", gen)
    args = batch_on(batch, "cuda:1")
    with torch.cuda.device(0):  # the current device is not the tensors' device
        out = ops.paged_attention(**args)
    assert out.device == torch.device("cuda:1")
    check(out, batch)
    args["k_cache"] = args["k_cache"].to("cuda:0")
    with pytest.raises(RuntimeError, match="k_cache: expected a tensor on cuda:1"):
        ops.paged_attention(**args)


def test_split_count_does_not_change_the_answer(gen):
    """The decode kernel's split count follows the GPU's SM count and max_seqlen_kv; varying the
    hint (1: one split; the exact longest; the block table's width) varies it on any GPU, and
    every count must agree with the reference (a 3000-key sequence next to 1-key ones)."""
    seq_lens = [3000, 1, 17, 0, 900]
    batch = make_paged_batch(seq_lens, [1, 1, 1, 0, 1], 8, 2, 128, 16, torch.bfloat16, "cpu", gen)
    args = batch_on(batch, "cuda")
    outs = [ops.paged_attention(**args, max_seqlen_kv=m) for m in (1, max(seq_lens), -1)]
    for out in outs:
        check(out, batch)
