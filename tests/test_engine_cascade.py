"""The Engine's automatic cascade attention: on a shared-system-prompt workload it plans groups and
runs the shared-prefix op, and its greedy tokens equal those of Engine(cascade_attention=False);
sliding-window layers keep the plain path."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from test_engine import BLOCK_SIZE, VOCAB, tiny_llama  # noqa: E402

from kv_paged import ops  # noqa: E402
from kv_paged.cache import AttentionMetadata, AttentionParams, KVCachePool  # noqa: E402
from kv_paged.cascade import MIN_GROUP_SIZE, MIN_PREFIX_TOKENS  # noqa: E402
from kv_paged.engine import Engine  # noqa: E402
from kv_paged.engine.sampling import SamplingParams  # noqa: E402


class Counter:
    """Wraps an op and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def shared_prompt_workload(num_users: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(1, VOCAB) for _ in range(MIN_PREFIX_TOKENS + 2 * BLOCK_SIZE + 3)]
    return [
        system + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))]
        for _ in range(num_users)
    ]


def run(model, prompts, cascade: bool, monkeypatch) -> tuple[list[list[int]], int]:
    counter = Counter(ops.shared_prefix_attention)
    monkeypatch.setattr(ops, "shared_prefix_attention", counter)
    with Engine(
        model,
        num_blocks=256,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=256,
        cascade_attention=cascade,
    ) as engine:
        outs = engine.generate(
            prompts, SamplingParams(max_new_tokens=12, temperature=0.0), use_tqdm=False
        )
    monkeypatch.undo()
    return [o.outputs[0].token_ids for o in outs], counter.calls


def test_engine_cascade_same_greedy_tokens(monkeypatch):
    model = tiny_llama()
    prompts = shared_prompt_workload(2 * MIN_GROUP_SIZE + 3)
    with_cascade, calls = run(model, prompts, True, monkeypatch)
    without, calls_off = run(model, prompts, False, monkeypatch)
    assert calls > 0, "the shared-prompt workload never took the cascade path"
    assert calls_off == 0
    assert with_cascade == without


def test_sliding_window_layers_use_the_plain_path(monkeypatch):
    """A plan in the metadata is ignored by a layer with a sliding window (the window could cut
    into the shared prefix), and used by the others."""
    bs, n = 4, MIN_GROUP_SIZE
    pool = KVCachePool(
        num_layers=1,
        num_blocks=64,
        block_size=bs,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        device="cpu",
    )
    pool.k_caches[0].normal_()
    pool.v_caches[0].normal_()
    shared = list(range(MIN_PREFIX_TOKENS // bs + 1))
    tables = torch.tensor([shared + [40 + i] for i in range(n)], dtype=torch.int32)
    kv = len(shared) * bs + 2
    meta = AttentionMetadata.build(
        query_lens=[1] * n,
        kv_lens=[kv] * n,
        block_tables=tables,
        slot_mapping=torch.full((n,), -1, dtype=torch.int64),
        cascade_block_size=bs,
    )
    assert meta.cascade is not None
    counter = Counter(ops.shared_prefix_attention)
    monkeypatch.setattr(ops, "shared_prefix_attention", counter)
    q = torch.randn(n, 4, 16)
    windowed = pool.attend(0, q, meta, AttentionParams.of(sliding_window=8))
    assert counter.calls == 0
    full = pool.attend(0, q, meta, AttentionParams.of())
    assert counter.calls == 1
    plain = ops.paged_attention(
        q,
        pool.k_caches[0],
        pool.v_caches[0],
        meta.block_tables,
        meta.cu_seqlens_q,
        meta.seq_lens_kv,
    )
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)
    windowed_plain = ops.paged_attention(
        q,
        pool.k_caches[0],
        pool.v_caches[0],
        meta.block_tables,
        meta.cu_seqlens_q,
        meta.seq_lens_kv,
        sliding_window=8,
    )
    assert torch.equal(windowed, windowed_plain)


def test_paged_cache_beam_search_with_cascade(monkeypatch):
    """PagedCache(cascade_attention=True): 8 beams of one 70-token prompt fork its blocks, so every
    step has a group; the beams equal those of the plain path."""
    from test_hf_beam import _beam_kwargs, _prompts
    from test_hf_models import cache_kw

    from kv_paged.integrations import hf

    model = hf.tiny_model("llama")
    ids, mask = _prompts(3, [MIN_PREFIX_TOKENS + 6])
    kw = _beam_kwargs(MIN_GROUP_SIZE, 1.0, False, 1, None)
    outs, calls = [], []
    for cascade in (False, True):
        counter = Counter(ops.shared_prefix_attention)
        monkeypatch.setattr(ops, "shared_prefix_attention", counter)
        cache = hf.PagedCache.for_model(
            model, num_blocks=128, block_size=4, cascade_attention=cascade
        )
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw))
        calls.append(counter.calls)
        monkeypatch.undo()
    assert calls[0] == 0 and calls[1] > 0
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert (outs[0].sequences_scores - outs[1].sequences_scores).abs().max() <= 1e-4
