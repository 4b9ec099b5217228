"""The Engine never loses or corrupts a request: failures while building outputs, NaN / inf
logits, bad prompts and sampling parameters, request ids, and metrics that stay bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from test_engine import (
    BLOCK_SIZE,
    CharTokenizer,
    check_freed,
    greedy,
    prompts,
    run_to_end,
    tiny_llama,
)

from kv_paged import Engine, SamplingParams
from kv_paged.engine.metrics import MAX_LATENCY_SAMPLES, MAX_TIMELINE_POINTS, EngineMetrics


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


class RaisingTokenizer(CharTokenizer):
    """decode raises `error` on the given calls (1-based)."""

    def __init__(self, fail_on: set[int], error: type[BaseException]) -> None:
        self.fail_on, self.error, self.calls = fail_on, error, 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.error("tokenizer failure")
        return super().decode(ids, skip_special_tokens)


def test_a_failing_tokenizer_fails_one_request(model):
    """decode raising while a finished request's output is built: that request finishes with the
    error (reported once), the step and the other requests go on."""
    ps = prompts(300, [9, 12, 7])
    ref = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, tokenizer=CharTokenizer())
    want = [o.token_ids for o in ref.generate(ps, greedy(), use_tqdm=False)]
    tok = RaisingTokenizer({1}, ValueError)  # the first text built: the first request to finish
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, tokenizer=tok)
    for i, p in enumerate(ps):
        engine.add_request(p, greedy(), request_id=str(i))
    finished, _ = run_to_end(engine)
    assert sorted(finished) == ["0", "1", "2"]
    failed = [o for o in finished.values() if o.error]
    assert len(failed) == 1 and "building its output failed" in failed[0].error
    for i, w in enumerate(want):
        if finished[str(i)].error is None:
            assert finished[str(i)].token_ids == w
    check_freed(engine)


def test_an_interrupt_while_building_outputs_loses_nothing(model):
    """Ctrl-C while outputs are built: the requests it did not report come with the next step."""
    ps = prompts(310, [9, 9, 9])
    tok = RaisingTokenizer({2}, KeyboardInterrupt)
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, tokenizer=tok)
    for i, p in enumerate(ps):
        engine.add_request(p, greedy(), request_id=str(i))
    finished, caught = run_to_end(engine, catch=(KeyboardInterrupt,))
    assert caught == 1 and sorted(finished) == ["0", "1", "2"]
    assert all(o.error is None for o in finished.values())
    check_freed(engine)


def test_non_finite_logits_fail_that_request_alone(model):
    ps = prompts(320, [9, 14, 6])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    ref = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    want = {str(i): o.token_ids for i, o in enumerate(ref.generate(ps, params, use_tqdm=False))}
    for poison in (float("nan"), float("inf")):
        engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
        forward, calls = engine.runner.forward, [0]

        def poisoned(*args, **kwargs):
            logits = forward(*args, **kwargs)
            calls[0] += 1
            if calls[0] == 3 and logits.shape[0]:
                logits = logits.clone()
                logits[0, 5] = poison  # one request's row, one vocabulary entry
            return logits

        engine.runner.forward = poisoned
        for i, p in enumerate(ps):
            engine.add_request(p, params, request_id=str(i))
        finished, _ = run_to_end(engine)
        failed = [rid for rid, o in finished.items() if o.error]
        assert len(failed) == 1 and "NaN or inf" in finished[failed[0]].error
        assert all(finished[r].token_ids == want[r] for r in finished if r not in failed)
        check_freed(engine)


def test_bad_prompts_are_refused_by_name(model):
    engine = Engine(model, num_blocks=16, block_size=BLOCK_SIZE)
    for bad, match in [
        (torch.tensor([1.7, 2.2]), "integer token ids, got dtype torch.float32"),
        (torch.tensor([True, False]), "integer token ids, got dtype torch.bool"),
        ([3, 4.0], "not an integer token id"),
        ([3, True], "not an integer token id"),
        ([3, -1], r"not in \[0, vocab_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(bad, greedy())
    assert not engine.has_unfinished()
    rid = engine.add_request(np.array([3, 4, 5], dtype=np.int64).tolist() + [np.int64(6)])
    assert engine._requests[rid].prompt_token_ids == [3, 4, 5, 6]


def test_tiny_temperatures_are_greedy(model):
    """Dividing by 1e-45 overflows; below 1e-5 sampling is greedy (vLLM's rule)."""
    p = prompts(330, [11])[0]
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE)
    out0 = engine.generate([p], greedy(), use_tqdm=False)[0].token_ids
    for t in (1e-45, 1e-6):
        params = SamplingParams(max_new_tokens=10, temperature=t, seed=1)
        assert engine.generate([p], params, use_tqdm=False)[0].token_ids == out0
    for bad in (float("inf"), float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)


def test_auto_ids_skip_ids_in_use(model):
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE)
    engine.add_request([3, 4], greedy(2), request_id="1")
    ids = [engine.add_request([5, 6], greedy(2)) for _ in range(3)]
    assert ids == ["0", "2", "3"]
    finished, _ = run_to_end(engine)
    assert sorted(finished) == ["0", "1", "2", "3"]


def test_metrics_memory_is_bounded():
    m = EngineMetrics(num_blocks=100, block_size=16, bytes_per_block=1024, start=0.0)
    steps = 10 * MAX_TIMELINE_POINTS + 7
    for i in range(steps):
        m.record(t=float(i), blocks_in_use=i % 97, blocks_unshared=i % 89, contiguous_tokens=i % 83)
    assert len(m.t) <= MAX_TIMELINE_POINTS + 1 and len(m.t) == len(m.blocks_in_use)
    s = m.summary()
    assert s["peak_blocks_paged_shared"] == 96 and s["peak_blocks_paged_unshared"] == 88
    assert s["mean_blocks_paged_shared"] == pytest.approx(sum(i % 97 for i in range(steps)) / steps)
    assert m.t == sorted(m.t) and m.t[0] == 0.0
    assert m.elapsed == pytest.approx(steps - 1)
    for i in range(MAX_LATENCY_SAMPLES + 500):
        m.record_request(ttft=float(i), decode_time=2.0, num_tokens=3)
    assert len(m.ttft) == len(m.tpot) == MAX_LATENCY_SAMPLES
    n = MAX_LATENCY_SAMPLES + 500
    assert s is not m.summary() and m.summary()["ttft_mean_s"] == pytest.approx((n - 1) / 2)


def test_cache_salt_separates_tenants(model):
    """Requests share cached prefixes only within one cache_salt; without salts, num_cached_tokens
    tells a user that someone sent the same leading blocks."""
    p = prompts(340, [40])[0]
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    first = engine.generate([p], greedy(), use_tqdm=False, cache_salt="alice")[0]
    other = engine.generate([p], greedy(), use_tqdm=False, cache_salt="bob")[0]
    same = engine.generate([p], greedy(), use_tqdm=False, cache_salt="alice")[0]
    unsalted = engine.generate([p], greedy(), use_tqdm=False)[0]
    unsalted2 = engine.generate([p], greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0
    # 40 tokens = 5 full blocks of 8; a fully cached prompt recomputes its last block.
    assert same.num_cached_tokens == 32
    assert unsalted.num_cached_tokens == 0 and unsalted2.num_cached_tokens > 0
    assert first.token_ids == other.token_ids == same.token_ids == unsalted.token_ids
    assert engine.block_manager.stats()["extra_keys"] <= 2  # alice, bob: held by cached blocks
    with pytest.raises(TypeError, match="cache_salt"):
        engine.add_request(p, greedy(), cache_salt=7)
    check_freed(engine)


def test_a_burst_computes_the_shared_prompt_once(model):
    """Prompts admitted in one step share the system prompt's blocks that an earlier prompt of the
    same step writes (issue 12, part 4): hit rate near (n-1)/n on the prefix, same outputs as one
    by one; an undone step leaves nothing in the prefix cache that was not written."""
    system = prompts(350, [64])[0]  # 8 full blocks of 8
    users = [system + u for u in prompts(351, [5, 9, 3, 12, 7, 6])]
    alone = Engine(model, num_blocks=256, block_size=BLOCK_SIZE)
    want = [alone.generate([u], greedy(), use_tqdm=False)[0].token_ids for u in users]
    engine = Engine(model, num_blocks=256, block_size=BLOCK_SIZE)
    outs = engine.generate(users, greedy(), use_tqdm=False)
    assert [o.token_ids for o in outs] == want
    assert engine.metrics().steps < 2 * len(users)  # all admitted together, not one per step
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == len(system) for o in outs[1:])
    m = engine.metrics()
    assert m.prefix_hit_tokens == (len(users) - 1) * len(system)
    check_freed(engine)

    # The same burst with its first forward failing: the blocks marked computed at scheduling are
    # forgotten, so the retry and a later request never read K/V that was not written (the pool
    # starts as NaN: a stale hit would be caught as a non-finite logits error).
    engine = Engine(model, num_blocks=256, block_size=BLOCK_SIZE)
    forward, calls = engine.runner.forward, [0]

    def fail_first(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("injected")
        return forward(*args, **kwargs)

    engine.runner.forward = fail_first
    for i, u in enumerate(users):
        engine.add_request(u, greedy(), request_id=str(i))
    assert engine.block_manager.stats()["cached_blocks"] == 0
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.block_manager.check_invariants()
    assert engine.block_manager.stats()["cached_blocks"] == 0
    finished, _ = run_to_end(engine)
    assert [finished[str(i)].token_ids for i in range(len(users))] == want
    later = engine.generate([users[2]], greedy(), use_tqdm=False)[0]
    assert later.token_ids == want[2] and later.num_cached_tokens > 0
    check_freed(engine)
