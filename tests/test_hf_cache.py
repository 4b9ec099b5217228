"""kv_paged.integrations.hf.PagedCache: batched generate, prefix reuse across generate calls, a
hand-written forward loop, sampling, the engine-facing metadata path, and bad input.

Tiny random-weight models in float32 on CPU; references are the same weights with
attn_implementation="eager" (no PagedCache).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_models import ATOL, _ids, _left_pad, assert_greedy_equal, cache_kw

import kv_paged
from kv_paged.cache import AttentionMetadata, KVCachePool
from kv_paged.forward_context import forward_context
from kv_paged.integrations import hf

BLOCK_SIZE = 4
GEN = {"do_sample": False, "output_scores": True, "return_dict_in_generate": True}


def _count_forward_tokens(model: torch.nn.Module) -> list[int]:
    """Records the input width of every forward of model."""
    widths: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(
            (kwargs.get("input_ids", args[0] if args else None)).shape[1]
        ),
        with_kwargs=True,
    )
    return widths


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_batched_generate_equals_single(arch: str) -> None:
    model = hf.tiny_model(arch)
    lengths = (13, 5, 9, 1)
    prompts = [_ids(1, n, seed=10 + n)[0] for n in lengths]
    ids, mask = _left_pad(prompts)
    new = 12
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    batched = model.generate(ids, attention_mask=mask, **cache_kw(cache), max_new_tokens=new, **GEN)
    for i, prompt in enumerate(prompts):
        single_cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
        alone = model.generate(prompt[None], **cache_kw(single_cache), max_new_tokens=new, **GEN)
        pad = ids.shape[1] - prompt.numel()
        assert_greedy_equal(_Row(batched, i, pad), _Row(alone, 0, 0), prompt.numel())
    # transformers' own cache (DynamicCache; sliding layers trimmed on Gemma-2) with kv_paged attention.
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=new, **GEN)
    for i in range(len(prompts)):
        assert_greedy_equal(_Row(dense, i, 0), _Row(batched, i, 0), ids.shape[1])
    # Pads never take blocks: each sequence holds its prompt + new - 1 tokens.
    expect = sum(math.ceil((n + new - 1) / BLOCK_SIZE) for n in lengths)
    assert cache.block_manager.stats()["blocks_in_use"] == expect


class _Row:
    """One row of a generate output, cut after its prompt, shaped like a generate output."""

    def __init__(self, out, row: int, start: int) -> None:
        self.sequences = out.sequences[row : row + 1, start:]
        self.scores = [s[row : row + 1] for s in out.scores]


def test_prefix_cached_generate_equals_uncached() -> None:
    model = hf.tiny_model("qwen3")
    eager = hf.tiny_model("qwen3", attn_implementation="eager")
    new = 8
    first = _ids(1, 21, seed=1)
    shared = 18  # tokens the later prompts share with `first`
    second = [torch.cat([first[0, :shared], _ids(1, n, seed=2 + n)[0]]) for n in (7, 3)]
    ids, mask = _left_pad(second)  # lengths 25 and 21: the second row has 4 pads

    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    model.generate(first, **cache_kw(cache), max_new_tokens=new, **GEN)
    cache.reset()
    assert cache.block_manager.stats()["blocks_in_use"] == 0
    hits_before = cache.block_manager.stats()["prefix_hit_tokens"]

    skip = cache.add_prompts(ids, mask)
    shared_blocks = shared // BLOCK_SIZE
    # Row 0 has no pads, so the first shared_blocks * block_size columns are cached for everyone.
    assert skip == shared_blocks * BLOCK_SIZE
    assert cache.get_seq_length() == skip
    assert (
        cache.block_manager.stats()["prefix_hit_tokens"] - hits_before
        == 2 * shared_blocks * BLOCK_SIZE
    )
    widths = _count_forward_tokens(model)
    ours = model.generate(ids, attention_mask=mask, **cache_kw(cache), max_new_tokens=new, **GEN)
    assert widths[0] == ids.shape[1] - skip, "the cached prefix must not be recomputed"

    ref = eager.generate(ids, attention_mask=mask, max_new_tokens=new, **GEN)
    assert_greedy_equal(ours, ref, ids.shape[1])
    # Blocks: ceil(len / block_size) per sequence, minus the shared ones counted once.
    lens = [p.numel() + new - 1 for p in second]
    expect = sum(math.ceil(n / BLOCK_SIZE) for n in lens) - shared_blocks
    assert cache.block_manager.stats()["blocks_in_use"] == expect
    for b in cache.block_manager.block_table(cache.seq_ids[0])[:shared_blocks]:
        assert cache.block_manager.ref_count(b) == 2


def test_add_prompts_then_resubmit_exact_prompt() -> None:
    """A prompt identical to a cached one still computes its last block (never the whole prompt)."""
    model = hf.tiny_model("llama")
    prompt = _ids(1, 16, seed=3)
    cache = hf.PagedCache.for_model(model, num_blocks=32, block_size=BLOCK_SIZE)
    a = model.generate(prompt, **cache_kw(cache), max_new_tokens=4, **GEN)
    cache.reset()
    assert cache.add_prompts(prompt) == 12
    b = model.generate(prompt, **cache_kw(cache), max_new_tokens=4, **GEN)
    assert torch.equal(a.sequences, b.sequences)


def test_hand_written_loop_matches_eager() -> None:
    model = hf.tiny_model("mistral")  # sliding window 7: crossed by the chunks below
    eager = hf.tiny_model("mistral", attn_implementation="eager")
    tokens = _ids(2, 20, seed=5)
    with torch.no_grad():
        ref = eager(tokens).logits
        cache = hf.PagedCache.for_model(model, num_blocks=32, block_size=BLOCK_SIZE)
        got, start = [], 0
        for width in (7, 6, 1, 1, 3, 1, 1):  # chunked prefill, then decode-sized and odd steps
            step = tokens[:, start : start + width]
            pos = torch.arange(start, start + width)[None].expand(2, -1)
            got.append(model(input_ids=step, position_ids=pos, **cache_kw(cache)).logits)
            start += width
            assert cache.get_seq_length() == start
    out = torch.cat(got, dim=1)
    assert (out - ref).abs().max() <= ATOL


def test_sampling_with_seed() -> None:
    model = hf.tiny_model("qwen2")
    eager = hf.tiny_model("qwen2", attn_implementation="eager")
    ids, mask = _left_pad([_ids(1, n, seed=n)[0] for n in (6, 10)])
    kw = {"do_sample": True, "top_k": 20, "temperature": 0.9, "max_new_tokens": 16}
    outs = []
    for _ in range(2):
        cache = hf.PagedCache.for_model(model, num_blocks=32, block_size=BLOCK_SIZE)
        torch.manual_seed(123)
        outs.append(model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw))
    torch.manual_seed(123)
    ref = eager.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], ref)


def test_engine_metadata_packed_forward() -> None:
    """An engine packs a prefill chunk and a decode row into input_ids [1, T] and runs the forward
    inside forward_context(meta, pool), with no transformers cache."""
    model = hf.tiny_model("gemma2")
    eager = hf.tiny_model("gemma2", attn_implementation="eager")
    pool = KVCachePool(**_pool_kwargs(model, num_blocks=32))
    bm = kv_paged.BlockManager(32, BLOCK_SIZE)
    a, b = _ids(1, 14, seed=8)[0], _ids(1, 9, seed=9)[0]
    with torch.no_grad():
        ref_a, ref_b = eager(a[None]).logits[0], eager(b[None]).logits[0]
        # Step 1: all of b's prompt but its last token, and a's first 6 tokens (a chunk).
        bm.allocate(0, a.tolist())
        bm.allocate(1, b[:8].tolist())
        meta = AttentionMetadata.build(
            query_lens=[6, 8],
            kv_lens=[6, 8],
            block_tables=bm.block_tables([0, 1]),
            slot_mapping=torch.cat([bm.slot_mapping(0, 0, 6), bm.slot_mapping(1, 0, 8)]),
        )
        packed = torch.cat([a[:6], b[:8]])[None]
        pos = torch.cat([torch.arange(6), torch.arange(8)])[None]
        with forward_context(meta, pool, owner="test"):
            out1 = model(input_ids=packed, position_ids=pos, use_cache=False).logits[0]
        bm.mark_computed([0, 1], [6, 8])
        # Step 2: the rest of a's prompt (8 tokens) and one decode token for b.
        slot_b = bm.append_slot(1, int(b[8]))
        meta = AttentionMetadata.build(
            query_lens=[8, 1],
            kv_lens=[14, 9],
            block_tables=bm.block_tables([0, 1]),
            slot_mapping=torch.cat([bm.slot_mapping(0, 6, 14), torch.tensor([slot_b])]),
        )
        packed = torch.cat([a[6:], b[8:]])[None]
        pos = torch.cat([torch.arange(6, 14), torch.tensor([8])])[None]
        with forward_context(meta, pool, owner="test"):
            out2 = model(input_ids=packed, position_ids=pos, use_cache=False).logits[0]
    assert (out1[:6] - ref_a[:6]).abs().max() <= ATOL
    assert (out1[6:] - ref_b[:8]).abs().max() <= ATOL
    assert (out2[:8] - ref_a[6:]).abs().max() <= ATOL
    assert (out2[8:] - ref_b[8:]).abs().max() <= ATOL


def _pool_kwargs(model: torch.nn.Module, num_blocks: int) -> dict:
    spec = hf.kv_cache_spec(model)
    return {
        "num_layers": len(spec["num_kv_heads"]),
        "num_blocks": num_blocks,
        "block_size": BLOCK_SIZE,
        "num_kv_heads": spec["num_kv_heads"],
        "head_dim": spec["head_dim"],
        "dtype": spec["dtype"],
        "device": spec["device"],
    }


def test_metadata_build_validates() -> None:
    tables = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="query_lens"):
        AttentionMetadata.build(
            query_lens=[1], kv_lens=[1, 2], block_tables=tables, slot_mapping=torch.zeros(1)
        )
    with pytest.raises(ValueError, match="kv_lens"):
        AttentionMetadata.build(
            query_lens=[3, 1], kv_lens=[2, 2], block_tables=tables, slot_mapping=torch.zeros(4)
        )
    with pytest.raises(ValueError, match="slot_mapping"):
        AttentionMetadata.build(
            query_lens=[1, 1], kv_lens=[2, 2], block_tables=tables, slot_mapping=torch.zeros(3)
        )
    with pytest.raises(ValueError, match="block_tables"):
        AttentionMetadata.build(
            query_lens=[1], kv_lens=[2], block_tables=tables, slot_mapping=torch.zeros(1)
        )
    meta = AttentionMetadata.build(
        query_lens=[0, 2], kv_lens=[3, 2], block_tables=tables, slot_mapping=torch.tensor([5, -1])
    )
    assert (
        meta.cu_seqlens_q.tolist() == [0, 0, 2] and meta.max_seqlen_kv == 3 and not meta.no_prefix
    )


# ---- bad input: a clear error, and the cache unchanged -------------------------------------------


def test_errors_leave_cache_unchanged() -> None:
    model = hf.tiny_model("llama")
    cache = hf.PagedCache.for_model(model, num_blocks=4, block_size=BLOCK_SIZE)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="out of blocks"):
            model(_ids(2, 9, seed=1), **cache_kw(cache))  # needs 6 blocks
        assert cache.block_manager.stats()["blocks_in_use"] == 0 and cache.get_seq_length() == 0
        with pytest.raises(ValueError, match="left padding"):
            model(
                _ids(1, 4, seed=1),
                attention_mask=torch.tensor([[1, 0, 1, 1]]),
                **cache_kw(cache),
            )
        with pytest.raises(ValueError, match="inputs_embeds|input_ids"):
            model(inputs_embeds=torch.zeros(1, 3, 64), **cache_kw(cache))
        model(_ids(1, 6, seed=1), **cache_kw(cache))
        used = cache.block_manager.stats()["blocks_in_use"]
        with pytest.raises(ValueError, match="attention_mask"):
            model(
                _ids(1, 1, seed=2),
                attention_mask=torch.ones(1, 3, dtype=torch.long),
                **cache_kw(cache),
            )
        with pytest.raises(ValueError, match="batch"):
            model(_ids(2, 1, seed=2), **cache_kw(cache))
        with pytest.raises(RuntimeError, match="out of blocks"):
            model(_ids(1, 20, seed=2), **cache_kw(cache))
        assert cache.block_manager.stats()["blocks_in_use"] == used and cache.get_seq_length() == 6
        model(_ids(1, 1, seed=2), **cache_kw(cache))  # still usable
        assert cache.get_seq_length() == 7
        with pytest.raises(RuntimeError, match="reset"):
            cache.add_prompts(_ids(1, 3, seed=1))
    eager = hf.tiny_model("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        eager(
            _ids(1, 3, seed=1),
            **cache_kw(hf.PagedCache.for_model(eager, num_blocks=4, block_size=4)),
        )
    with pytest.raises(ValueError, match="arch"):
        hf.tiny_model("gpt-17")


def test_update_outside_hooked_forward_raises() -> None:
    model = hf.tiny_model("llama")
    pool = KVCachePool(
        num_layers=2,
        num_blocks=4,
        block_size=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        device="cpu",
    )
    cache = hf.PagedCache(pool, kv_paged.BlockManager(4, 4))
    with pytest.raises(RuntimeError, match="for_model"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    del model


def test_registered_on_import() -> None:
    import transformers

    assert transformers.AttentionInterface._global_mapping["kv_paged"] is hf.kv_paged_attention
    assert (
        transformers.masking_utils.AttentionMaskInterface._global_mapping["kv_paged"]
        is hf.kv_paged_mask
    )
    model = hf.tiny_model("llama", attn_implementation="eager")
    model.set_attn_implementation("kv_paged")
    assert model.config._attn_implementation == "kv_paged"
    assert kv_paged.BlockManager is not None


# ---- transformers' own continuous batching ("paged|kv_paged") -----------------------------------


def _cb_unavailable() -> str | None:
    if not hf._HAS_CB_PAGED_NAMES:
        import transformers

        return (
            f"transformers {transformers.__version__} dispatches continuous batching only to paged|eager, "
            "sdpa and flash attention (no custom paged| names)"
        )
    if not torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("psutil") is None:
            return "transformers' continuous batching sizes its cache from psutil on CPU"
    return None


@pytest.mark.skipif(_cb_unavailable() is not None, reason=str(_cb_unavailable()))
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_transformers_continuous_batching(arch: str) -> None:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = hf.tiny_model(arch, attn_implementation="paged|kv_paged")
    eager = hf.tiny_model(arch, attn_implementation="eager")
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (5, 21, 9)]
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    # max_batch_tokens below the longest prompt forces chunked prefill through the paged cache.
    cb = ContinuousBatchingConfig(block_size=16, num_blocks=16, max_batch_tokens=16)
    out = model.generate_batch(
        prompts, generation_config=config, continuous_batching_config=cb, progress_bar=False
    )
    assert len(out) == len(prompts)
    by_prompt = {tuple(o.prompt_ids): o.generated_tokens for o in out.values()}
    for p in prompts:
        ref = eager.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[
            0, len(p) :
        ].tolist()
        assert by_prompt[tuple(p)] == ref
    with torch.no_grad(), pytest.raises(ValueError, match="continuous batching"):
        model(torch.tensor([prompts[0]]))  # a plain forward has no varlen metadata under this name


def test_generate_continues_a_conversation() -> None:
    """A second generate on the same cache with the full sequence + a new turn (transformers' cache
    reuse convention) runs only the new columns and equals eager on the whole text."""
    model = hf.tiny_model("llama")
    eager = hf.tiny_model("llama", attn_implementation="eager")
    ids, mask = _left_pad([_ids(1, n, seed=20 + n)[0] for n in (7, 4)])
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    first = model.generate(
        ids, attention_mask=mask, **cache_kw(cache), max_new_tokens=5, do_sample=False
    )
    turn = _ids(2, 3, seed=30)
    ids2 = torch.cat([first, turn], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)
    assert cache.get_seq_length() == first.shape[1] - 1  # the last sampled token was never fed back
    widths = _count_forward_tokens(model)
    ours = model.generate(ids2, attention_mask=mask2, **cache_kw(cache), max_new_tokens=6, **GEN)
    assert widths[0] == turn.shape[1] + 1
    ref = eager.generate(ids2, attention_mask=mask2, max_new_tokens=6, **GEN)
    assert_greedy_equal(ours, ref, ids2.shape[1])
    # An input shorter than what the cache holds is not a continuation: refused, cache unchanged.
    with pytest.raises(ValueError, match="attention_mask must cover"):
        model.generate(ids2, attention_mask=mask2, **cache_kw(cache), max_new_tokens=1)
    assert cache.get_seq_length() == ours.sequences.shape[1] - 1


def test_recomputed_cached_tokens_must_match() -> None:
    model = hf.tiny_model("llama")
    a = _ids(1, 12, seed=40)
    cache = hf.PagedCache.for_model(model, num_blocks=32, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model(a, **cache_kw(cache))
        cache.reset()
        ids, mask = _left_pad(
            [torch.cat([a[0, :8], _ids(1, 3, seed=41)[0]]), _ids(1, 4, seed=42)[0]]
        )
        skip = cache.add_prompts(ids, mask)
        assert skip == 7  # row 1 has 7 pads and nothing cached: row 0 recomputes its token 7
        bad = ids.clone()
        bad[0, 7] = (bad[0, 7] + 1) % 128
        with pytest.raises(ValueError, match="do not match"):
            model(bad[:, skip:], attention_mask=mask, **cache_kw(cache))
        assert cache.get_seq_length() == skip
        model(ids[:, skip:], attention_mask=mask, **cache_kw(cache))
        assert cache.get_seq_length() == ids.shape[1]


def test_import_without_transformers() -> None:
    """`import kv_paged` works where transformers cannot be imported (the extra is optional)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; import kv_paged; "
        "assert 'kv_paged.integrations.hf' not in sys.modules; print(kv_paged.BlockManager.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BlockManager"


def test_version_guard_names_the_installed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf.transformers, "__version__", "5.9.1")
    with pytest.raises(ImportError, match=r"transformers>=5\.17.*transformers 5\.9\.1"):
        hf._check_transformers()
    monkeypatch.setattr(hf.transformers, "__version__", "5.30.0")
    monkeypatch.delattr(hf.masking_utils, "AttentionMaskInterface")
    with pytest.raises(ImportError, match="5.30.0 lacks.*AttentionMaskInterface"):
        hf._check_transformers()


def test_metadata_built_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = hf.tiny_model("gemma2")  # 2 layers of different kinds (sliding, full)
    cache = hf.PagedCache.for_model(model, num_blocks=16, block_size=BLOCK_SIZE)
    calls = []
    build = AttentionMetadata.build.__func__
    monkeypatch.setattr(
        AttentionMetadata,
        "build",
        classmethod(lambda cls, **kw: calls.append(1) or build(cls, **kw)),
    )
    with torch.no_grad():
        model(_ids(2, 5, seed=1), **cache_kw(cache))
        model(_ids(2, 1, seed=2), **cache_kw(cache))
    assert len(calls) == 2


def test_packed_sequences_without_cache_are_refused() -> None:
    """position_ids that restart inside a row (packed training batches) need a block-diagonal
    mask that varlen-by-row attention does not build: refused, not silently wrong."""
    model = hf.tiny_model("llama")
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad(), pytest.raises(NotImplementedError, match="packed"):
        model(_ids(1, 7, seed=1), position_ids=pos, use_cache=False)


def test_top_level_names() -> None:
    import kv_paged

    assert kv_paged.PagedCache is hf.PagedCache
    for name in kv_paged.__all__:  # every advertised name resolves (some load lazily)
        assert getattr(kv_paged, name) is not None, name
