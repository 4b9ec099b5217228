"""Ctrl-C (KeyboardInterrupt) at several points of a forward, through a PagedCache's generate and
through the Engine: afterwards nothing of the interrupted step is left behind. A retry equals an
undisturbed run, the prefix cache serves correct K/V, and another "kv_paged" model on the same
thread is unaffected. Plus the forward context's own contract (cleared on any exit, no nesting).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_engine import hf_greedy, prompts, tiny_llama
from test_hf_models import _ids, _left_pad, assert_greedy_equal, cache_kw

from kv_paged import Engine, SamplingParams
from kv_paged.cache import AttentionMetadata, KVCachePool
from kv_paged.forward_context import forward_context, get_forward_context
from kv_paged.integrations import hf

BLOCK_SIZE = 4
NEW_TOKENS = 6
GEN = {"do_sample": False, "output_scores": True, "return_dict_in_generate": True}
# Where the interrupt strikes: before any K/V is written, after the first layer wrote its K/V,
# after the last layer, and in lm_head (every layer done, logits not yet returned).
POINTS = ["embed", "first_attn", "last_attn", "lm_head"]


def _interrupt_at(model: torch.nn.Module, where: str, call: int):
    """Raises KeyboardInterrupt in `where` on its call-th run (1-based); returns the hook handle."""
    module = {
        "embed": model.model.embed_tokens,
        "first_attn": model.model.layers[0].self_attn,
        "last_attn": model.model.layers[-1].self_attn,
        "lm_head": model.lm_head,
    }[where]
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt

    if where == "embed":
        return module.register_forward_pre_hook(hook)
    return module.register_forward_hook(hook)


def _other_model_unaffected() -> None:
    """A different "kv_paged" model (no PagedCache, no Engine) on this thread matches eager."""
    other = hf.tiny_model("qwen2", seed=5)
    ref = hf.tiny_model("qwen2", seed=5, attn_implementation="eager")
    ids = _ids(2, 7, seed=40)
    with torch.no_grad():
        assert (other(ids).logits - ref(ids).logits).abs().max() <= 1e-5


def _batch(seed: int, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _left_pad([_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lens)])


@pytest.mark.parametrize("call", [1, 3], ids=["prefill", "decode"])
@pytest.mark.parametrize("where", POINTS)
def test_generate_interrupted(where: str, call: int) -> None:
    model = hf.tiny_model("llama")
    eager = hf.tiny_model("llama", attn_implementation="eager")
    ids, mask = _batch(30, [9, 6, 13])
    kw = {"max_new_tokens": NEW_TOKENS, **GEN}
    with torch.no_grad():
        ref = eager.generate(ids, attention_mask=mask, **kw)
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    handle = _interrupt_at(model, where, call)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw)
    handle.remove()
    assert get_forward_context() is None
    with torch.no_grad(), pytest.raises(RuntimeError, match="reset"):
        model(ids, attention_mask=mask, **cache_kw(cache))
    cache.reset()
    cache.block_manager.check_invariants()
    assert cache.block_manager.stats()["blocks_in_use"] == 0
    _other_model_unaffected()

    with torch.no_grad():
        again = model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw)
    assert_greedy_equal(again, ref, ids.shape[1])
    # The prefix cache serves what the retry computed (and nothing the interrupted run half wrote).
    cache.reset()
    longer, longer_mask = _left_pad(
        [torch.cat([ids[i][mask[i].bool()], _ids(1, 3, 50 + i)[0]]) for i in range(3)]
    )
    skipped = cache.add_prompts(longer, longer_mask)
    assert skipped > 0
    with torch.no_grad():
        ours = model.generate(longer, attention_mask=longer_mask, **cache_kw(cache), **kw)
        ref2 = eager.generate(longer, attention_mask=longer_mask, **kw)
    assert_greedy_equal(ours, ref2, longer.shape[1])
    _other_model_unaffected()


@pytest.mark.parametrize("where", POINTS)
def test_engine_interrupted(where: str) -> None:
    model, eager = tiny_llama(), tiny_llama()
    ps = prompts(60, [11, 5, 17])
    ref = [hf_greedy(eager, p, NEW_TOKENS) for p in ps]
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    handle = _interrupt_at(model, where, call=3)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(ps, greedy, use_tqdm=False)
    handle.remove()
    assert get_forward_context() is None
    engine.block_manager.check_invariants()
    assert engine.block_manager.stats()["num_seqs"] == 0
    _other_model_unaffected()

    outs = engine.generate(ps, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    # Same prompts again: served from the prefix cache, still exact.
    outs = engine.generate(ps, greedy, use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in outs if len(o.prompt_token_ids) >= BLOCK_SIZE)
    assert [o.outputs[0].token_ids for o in outs] == ref
    engine.close()
    _other_model_unaffected()


# ---- the forward context itself ----------------------------------------------------------------


def _tiny_context() -> tuple[AttentionMetadata, KVCachePool]:
    pool = KVCachePool(
        num_layers=1,
        num_blocks=2,
        block_size=2,
        num_kv_heads=1,
        head_dim=4,
        dtype=torch.float32,
        device="cpu",
    )
    meta = AttentionMetadata.build(
        query_lens=[1],
        kv_lens=[1],
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(1, dtype=torch.int64),
    )
    return meta, pool


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, ValueError])
def test_context_cleared_on_any_exit(error: type[BaseException]) -> None:
    meta, pool = _tiny_context()
    with pytest.raises(error):
        with forward_context(meta, pool, owner="a") as ctx:
            assert get_forward_context() is ctx and ctx.meta is meta and ctx.pool is pool
            raise error
    assert get_forward_context() is None


def test_context_refuses_to_nest() -> None:
    meta, pool = _tiny_context()
    with forward_context(meta, pool, owner="outer"):
        with pytest.raises(RuntimeError, match="already running"):
            with forward_context(meta, pool, owner="inner"):
                pass
        assert get_forward_context().owner == "outer"  # the refused one cleared nothing
    assert get_forward_context() is None
    with pytest.raises(TypeError, match="meta"):
        with forward_context("not metadata", pool, owner="x"):
            pass


def test_context_is_per_thread() -> None:
    import threading

    meta, pool = _tiny_context()
    seen = []
    with forward_context(meta, pool, owner="main"):
        thread = threading.Thread(target=lambda: seen.append(get_forward_context()))
        thread.start()
        thread.join()
    assert seen == [None]


# ---- PagedCache bookkeeping interrupted half way -------------------------------------------------


class _InterruptOnCall:
    """Wraps a BlockManager method; raises KeyboardInterrupt on its call-th call (1-based)."""

    def __init__(self, fn, call: int) -> None:
        self.fn, self.call, self.calls = fn, call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def _assert_clean_after_reset(cache) -> None:
    cache.reset()
    cache.block_manager.check_invariants()
    stats = cache.block_manager.stats()
    assert stats["num_seqs"] == 0 and stats["blocks_in_use"] == 0, stats


def test_interrupted_booking_breaks_the_cache_until_reset() -> None:
    """Ctrl-C between two of a prefill's per-row appends: the BlockManager holds part of the step,
    so the cache refuses work (never attends over a half-booked batch) until reset()."""
    model = hf.tiny_model("llama")
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model(_ids(2, 5, seed=70), **cache_kw(cache))
        bm = cache.block_manager
        bm.append_slot = _InterruptOnCall(bm.append_slot, call=4)  # row 2 of a 3-token chunk
        with pytest.raises(KeyboardInterrupt):
            model(_ids(2, 3, seed=71), **cache_kw(cache))
        del bm.append_slot
        with pytest.raises(RuntimeError, match="reset"):
            model(_ids(2, 3, seed=71), **cache_kw(cache))
    _assert_clean_after_reset(cache)


def test_bad_token_ids_are_refused_before_booking() -> None:
    model = hf.tiny_model("llama")
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model(_ids(2, 5, seed=72), **cache_kw(cache))
        before = cache.block_manager.stats()
        for bad, match in [
            (torch.tensor([[5, 6, 7], [1, 1 << 31, 3]]), r"\[0, 2\^31\)"),
            (torch.tensor([[5, 6, 7], [1, -2, 3]]), r"\[0, 2\^31\)"),
            (torch.ones(2, 3), "integer"),
        ]:
            with pytest.raises(ValueError, match=match):
                model(bad, **cache_kw(cache))
            assert cache.block_manager.stats() == before and cache.get_seq_length() == 5
        model(_ids(2, 1, seed=73), **cache_kw(cache))  # still usable
    with pytest.raises(ValueError, match=r"\[0, 2\^31\)"):
        hf.PagedCache.for_model(model, num_blocks=8, block_size=4).add_prompts(
            torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, -1]])
        )


@pytest.mark.parametrize("call", [1, 2])
def test_interrupted_reorder_changes_nothing(call: int) -> None:
    """Ctrl-C during reorder_cache's forks: the rows and the BlockManager are as before."""
    model = hf.tiny_model("llama")
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model(_ids(3, 6, seed=74), **cache_kw(cache))
    before = (cache.seq_ids, cache.block_manager.stats())
    bm = cache.block_manager
    bm.fork = _InterruptOnCall(bm.fork, call=call)
    with pytest.raises(KeyboardInterrupt):
        cache.reorder_cache(torch.tensor([1, 1, 1]))  # two forks of row 1, rows 0 and 2 freed
    del bm.fork
    assert (cache.seq_ids, cache.block_manager.stats()) == before
    cache.reorder_cache(torch.tensor([1, 1, 1]))
    assert len(set(cache.seq_ids)) == 3
    _assert_clean_after_reset(cache)
