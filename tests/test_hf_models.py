"""kv_paged attention inside HuggingFace transformers models vs attn_implementation="eager".

Every architecture of kv_paged.integrations.hf.TINY_ARCHS (tiny random weights, float32 on CPU):
logits of prefill + continuation + decode steps through a PagedCache and through transformers' own
cache, and 32 greedy tokens. GPU variants (bfloat16) run only when CUDA is available.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from kv_paged.integrations import hf

ARCHS = sorted(hf.TINY_ARCHS)
ATOL = 1e-5
NEAR_TIE = 1e-4  # top-2 score gap under which greedy may legitimately pick either token
BLOCK_SIZE = 4
NEW_TOKENS = 32


def cache_kw(cache) -> dict:
    """The cache as forward / generate take it on the installed transformers (`cache=` from 5.24,
    `past_key_values=` before: a deprecated alias there)."""
    return {hf.CACHE_KWARG: cache}


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel() :] = p
        mask[i, width - p.numel() :] = 1
    return ids, mask


def assert_greedy_equal(ours, ref, prompt_len: int) -> None:
    """Tokens must match; at a first difference the reference's top-2 scores must be a near-tie."""
    a, b = ours.sequences[:, prompt_len:], ref.sequences[:, prompt_len:]
    assert a.shape == b.shape
    for row in range(a.shape[0]):
        diff = (a[row] != b[row]).nonzero()
        if diff.numel() == 0:
            continue
        step = int(diff[0])
        top2 = ref.scores[step][row].float().topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < NEAR_TIE, (
            f"row {row}: tokens differ at step {step} (ours {a[row, step]}, eager {b[row, step]}) "
            f"but eager's top-2 gap is {gap:.3g}, not a near-tie"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_eager(arch: str) -> None:
    eager = hf.tiny_model(arch, attn_implementation="eager")
    model = hf.tiny_model(arch)
    # Left-padded batch: 3 prompts of different lengths, then a 3-token continuation and 2 decodes.
    prompts = [_ids(1, n, seed=n)[0] for n in (11, 5, 8)]
    ids, mask = _left_pad(prompts)
    steps = [_ids(3, 3, seed=1), _ids(3, 1, seed=2), _ids(3, 1, seed=3)]
    full_ids = torch.cat([ids, *steps], dim=1)
    full_mask = torch.cat(
        [mask, torch.ones(3, full_ids.shape[1] - ids.shape[1], dtype=torch.long)], dim=1
    )
    valid = full_mask.bool()
    with torch.no_grad():
        ref = eager(full_ids, attention_mask=full_mask).logits
        # transformers' own DynamicCache path (no PagedCache): one forward.
        dense = model(full_ids, attention_mask=full_mask).logits
        assert (dense - ref)[valid].abs().max() <= ATOL
        # PagedCache path, step by step.
        cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
        got = [model(ids, attention_mask=mask, **cache_kw(cache)).logits]
        col = ids.shape[1]
        for step in steps:
            col += step.shape[1]
            got.append(model(step, attention_mask=full_mask[:, :col], **cache_kw(cache)).logits)
    paged = torch.cat(got, dim=1)
    err = (paged - ref)[valid].abs().max()
    assert err <= ATOL, f"{arch}: max |kv_paged - eager| = {err:.3g}"
    assert torch.isfinite(paged[valid]).all()
    # Only real tokens occupy blocks.
    lengths = valid.sum(dim=1).tolist()
    expect = sum(math.ceil(n / BLOCK_SIZE) for n in lengths)
    assert cache.block_manager.stats()["blocks_in_use"] == expect


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_eager(arch: str) -> None:
    eager = hf.tiny_model(arch, attn_implementation="eager")
    model = hf.tiny_model(arch)
    ids = _ids(1, 9, seed=8)
    kw = {
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    ref = eager.generate(ids, **kw)
    cache = hf.PagedCache.for_model(model, num_blocks=32, block_size=BLOCK_SIZE)
    ours = model.generate(ids, **cache_kw(cache), **kw)
    assert ours.sequences.shape == (1, 9 + NEW_TOKENS)
    assert_greedy_equal(ours, ref, 9)
    # The last generated token is never fed back: the cache holds prompt + NEW_TOKENS - 1 tokens.
    assert cache.block_manager.seq_len(cache.seq_ids[0]) == 9 + NEW_TOKENS - 1
    # Without a PagedCache (transformers' DynamicCache + kv_paged varlen attention).
    assert_greedy_equal(model.generate(ids, **kw), ref, 9)


# ---- GPU (bfloat16), only when CUDA is available ------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_bf16_cuda(arch: str) -> None:
    """err(kv_paged bf16) <= 2 * err(eager bf16) + eps, both against eager float32."""
    ref_model = hf.tiny_model(arch, attn_implementation="eager", device="cuda")
    eager = hf.tiny_model(arch, attn_implementation="eager", device="cuda", dtype=torch.bfloat16)
    model = hf.tiny_model(arch, device="cuda", dtype=torch.bfloat16)
    prompts = [_ids(1, n, seed=n)[0] for n in (37, 5, 20)]
    ids, mask = _left_pad(prompts)
    step = _ids(3, 1, seed=3)
    full_ids, full_mask = (
        torch.cat([ids, step], 1).cuda(),
        torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1).cuda(),
    )
    valid = full_mask.bool()
    with torch.no_grad():
        ref = ref_model(full_ids, attention_mask=full_mask).logits
        base = eager(full_ids, attention_mask=full_mask).logits.float()
        cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=16)
        first = model(ids.cuda(), attention_mask=mask.cuda(), **cache_kw(cache)).logits
        last = model(step.cuda(), attention_mask=full_mask, **cache_kw(cache)).logits
    paged = torch.cat([first, last], 1).float()
    err_eager = (base - ref)[valid].abs().max().item()
    err_ours = (paged - ref)[valid].abs().max().item()
    assert err_ours <= 2 * err_eager + 1e-3, (
        f"{arch}: kv_paged bf16 err {err_ours:.3g}, eager bf16 err {err_eager:.3g}"
    )


@cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_bf16_cuda(arch: str) -> None:
    eager = hf.tiny_model(arch, attn_implementation="eager", device="cuda", dtype=torch.bfloat16)
    model = hf.tiny_model(arch, device="cuda", dtype=torch.bfloat16)
    ids = _ids(2, 9, seed=7).cuda()
    kw = {
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    ref = eager.generate(ids, **kw)
    cache = hf.PagedCache.for_model(model, num_blocks=32, block_size=16)
    ours = model.generate(ids, **cache_kw(cache), **kw)
    a, b = ours.sequences[:, 9:], ref.sequences[:, 9:]
    for row in range(2):
        diff = (a[row] != b[row]).nonzero()
        if diff.numel():
            step = int(diff[0])
            top2 = ref.scores[step][row].float().topk(2).values
            # bf16 logits carry ~3 significant digits: a near-tie is a gap within bf16 resolution.
            assert float(top2[0] - top2[1]) <= 2**-7 * float(top2[0].abs()) + 1e-2
