"""kv_paged.Engine end to end on a tiny random-weight Llama (float32, CPU).

The reference for every output is transformers' own model.generate with eager attention, one prompt
at a time; prompt lengths straddle block boundaries (1, block_size - 1, block_size, block_size + 1,
...) and the token budget is small so prefills are chunked and mixed with decode rows.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import random
import time
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kv_paged.engine import Engine  # noqa: E402  (after the importorskip)
from kv_paged.engine.sampling import SamplingParams  # noqa: E402
from kv_paged.integrations import hf  # noqa: E402

BLOCK_SIZE = 8
VOCAB = 96
MAX_POS = 160
PROMPT_LENS = [1, 7, 8, 9, 17, 30, 41]
MAX_NEW = 10


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Larger weights than the init default so logits are far from uniform (fewer greedy near-ties).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def eager(model):
    return copy.deepcopy(model)


def prompts(seed: int, lens=PROMPT_LENS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(n)] for n in lens]


def hf_greedy(eager, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = eager.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def greedy(max_new: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, **kw)


def check_freed(engine: Engine) -> None:
    engine.block_manager.check_invariants()
    stats = engine.block_manager.stats()
    assert stats["blocks_in_use"] == 0 and stats["num_seqs"] == 0, stats
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert not engine.has_unfinished()


def run_to_end(engine: Engine, catch: tuple[type[BaseException], ...] = ()):
    """Steps until nothing is unfinished. Returns (every finished output by request id, how many
    steps raised one of `catch`); the BlockManager's invariants hold after each such failure, and
    no request is reported finished twice."""
    finished, caught = {}, 0
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except catch:
            caught += 1
            engine.block_manager.check_invariants()
            continue
        for o in outs:
            if o.finished:
                assert o.request_id not in finished, f"{o.request_id} reported twice"
                finished[o.request_id] = o
    return finished, caught


def test_greedy_equals_hf_generate_eager(model, eager):
    ps = prompts(1)
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=20)
    outs = engine.generate(ps, greedy(), use_tqdm=False)
    assert [o.request_id for o in outs] == [str(i) for i in range(len(ps))]
    for p, o in zip(ps, outs):
        assert o.finished and o.error is None
        assert o.outputs[0].finish_reason == "length"
        assert o.token_ids == hf_greedy(eager, p, MAX_NEW), f"prompt of {len(p)} tokens"
    check_freed(engine)


def test_tiny_pool_preempts_and_matches_large_pool(model):
    ps = prompts(2)
    params = [
        SamplingParams(max_new_tokens=MAX_NEW + i, temperature=1.0, top_k=20, seed=100 + i)
        for i in range(len(ps))
    ]
    big = Engine(model, num_blocks=128, block_size=BLOCK_SIZE)
    ref = big.generate(ps, params, use_tqdm=False)
    assert big.metrics().preemptions == 0
    # 8 blocks of 8 tokens: the longest request (41 + 16 tokens) needs all of them alone.
    small = Engine(model, num_blocks=8, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    got = small.generate(ps, params, use_tqdm=False)
    assert small.metrics().preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert max(small.metrics().blocks_in_use) <= 8
    check_freed(small)
    check_freed(big)


def test_without_prefix_caching_same_outputs(model):
    ps = prompts(3)
    shared = [list(range(1, 25)) + p for p in ps]  # a common 24-token prefix (3 full blocks)
    a = Engine(model, num_blocks=128, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    b = Engine(model, num_blocks=128, block_size=BLOCK_SIZE, max_num_seqs=2)
    ra = a.generate(shared, greedy(), use_tqdm=False)
    rb = b.generate(shared, greedy(), use_tqdm=False)
    assert [o.token_ids for o in ra] == [o.token_ids for o in rb]
    assert a.metrics().prefix_hit_tokens == 0
    # max_num_seqs=2: later requests are admitted after earlier ones computed the shared blocks.
    assert b.metrics().prefix_hit_tokens >= 24 * (len(ps) - 2)
    check_freed(b)


def test_second_turn_reuses_first(model, eager):
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    turn1 = prompts(4, [29])[0]
    out1 = engine.generate([turn1], greedy(), use_tqdm=False)[0]
    turn2 = turn1 + out1.token_ids + [5, 6, 7]
    out2 = engine.generate([turn2], greedy(), use_tqdm=False)[0]
    # The KV of turn 1's prompt and all but its last reply token is computed: full blocks are hit.
    assert out2.num_cached_tokens == (len(turn1) + MAX_NEW - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert out2.token_ids == hf_greedy(eager, turn2, MAX_NEW)
    check_freed(engine)


def test_parallel_sampling_shares_prompt_blocks(model):
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    prompt = prompts(5, [20])[0]  # 2 full blocks + a partial one of 4 tokens
    n = 4
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, n=n, seed=7))
    engine.step()  # prefill once, sample n first tokens, fork
    bm = engine.block_manager
    seqs = [s for s in engine.scheduler.running if s.request.request_id == rid]
    assert len(seqs) == n
    tables = [bm.block_table(s.seq_id) for s in seqs]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 3
    assert [bm.ref_count(b) for b in tables[0]] == [n, n, n]
    assert bm.stats()["blocks_in_use"] == 3
    engine.step()  # first decode: n - 1 copy-on-write copies of the shared partial block
    assert engine.metrics().cow_copies == n - 1
    assert bm.stats()["blocks_in_use"] == 2 + n
    assert [bm.ref_count(b) for b in tables[0][:2]] == [n, n]
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert len(outs) == 1 and len(outs[0].outputs) == n
    samples = [c.token_ids for c in outs[0].outputs]
    assert all(len(s) == 6 for s in samples)
    assert len({tuple(s) for s in samples}) > 1, "n samples with distinct generators should differ"
    check_freed(engine)
    # The same request in a fresh engine gives the same samples (seeded per sample, not per batch).
    again = Engine(model, num_blocks=64, block_size=BLOCK_SIZE).generate(
        [prompt, prompts(6, [13])[0]],
        SamplingParams(max_new_tokens=6, temperature=1.0, n=n, seed=7),
        use_tqdm=False,
    )[0]
    assert [c.token_ids for c in again.outputs] == samples


def test_greedy_n_samples_equal_single(model):
    ps = prompts(8, [9, 16])
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    many = engine.generate(ps, greedy(n=3), use_tqdm=False)
    one = engine.generate(ps, greedy(), use_tqdm=False)
    for m, o in zip(many, one):
        assert [c.token_ids for c in m.outputs] == [o.token_ids] * 3


def test_impossible_request_fails_alone(model, eager):
    ps = prompts(9, [12, 60, 5, 155])
    params = [greedy(), greedy(max_new=20), greedy(), greedy()]
    engine = Engine(model, num_blocks=8, block_size=BLOCK_SIZE)  # 64 tokens of KV in all
    outs = engine.generate(ps, params, use_tqdm=False)
    assert outs[1].error is not None and "pool" in outs[1].error and outs[1].outputs == []
    assert outs[3].error is not None and "max_position_embeddings" in outs[3].error
    for i in (0, 2):
        assert outs[i].error is None
        assert outs[i].token_ids == hf_greedy(eager, ps[i], MAX_NEW)
    check_freed(engine)


def test_stop_tokens_and_streaming(model):
    p = prompts(10, [11])[0]
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE)
    full = engine.generate([p], greedy(max_new=12), use_tqdm=False)[0].token_ids
    stop = full[4]
    first = full.index(stop)
    engine.add_request(p, greedy(max_new=12, stop_token_ids=[stop]), request_id="s")
    streamed, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.outputs[0].new_token_ids
            last = out
    assert last.finished and last.outputs[0].finish_reason == "stop"
    assert streamed == last.token_ids == full[: first + 1]
    check_freed(engine)


def test_abort_frees_and_reports(model):
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE)
    keep = engine.add_request(prompts(12, [10])[0], greedy(max_new=8))
    gone = engine.add_request(prompts(13, [21])[0], SamplingParams(max_new_tokens=50, n=2, seed=1))
    engine.step()
    engine.step()
    engine.abort(gone)
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished[gone].finished and {c.finish_reason for c in finished[gone].outputs} == {
        "abort"
    }
    assert len(finished[keep].token_ids) == 8
    check_freed(engine)


def test_metrics_add_up(model):
    ps = prompts(11, [5, 23, 40, 9, 33, 16])
    engine = Engine(model, num_blocks=12, block_size=BLOCK_SIZE, max_num_batched_tokens=24)
    outs = engine.generate(ps, greedy(), use_tqdm=False)
    m = engine.metrics()
    s = m.summary()
    assert s["requests"] == len(ps)
    assert m.generated_tokens == sum(len(o.token_ids) for o in outs)
    # Every token fed to the model is a prefill token or a decode row; recomputes add prefill.
    assert (
        m.prefill_tokens + m.decode_tokens
        >= sum(map(len, ps)) + m.generated_tokens - len(ps) - m.prefix_hit_tokens
    )
    assert m.decode_tokens == m.generated_tokens - len(ps)
    assert max(m.blocks_in_use) <= engine.num_blocks
    assert all(u >= 0 for u in m.blocks_in_use) and len(m.t) == m.steps
    assert m.prefix_hit_tokens <= m.prefix_queried_tokens
    assert "prefix-cache hit rate" in m.table()
    check_freed(engine)


def test_bad_arguments_raise_clearly(model):
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, num_blocks=8, block_size=0)
    with pytest.raises(ValueError, match="num_blocks or kv_memory"):
        Engine(model, num_blocks=8, kv_memory=1 << 20)
    engine = Engine(model, num_blocks=8, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="vocab_size"):
        engine.add_request([1, VOCAB])
    with pytest.raises(TypeError, match="tokenizer"):
        engine.add_request("hello")
    engine.add_request([1, 2], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], request_id="x")
    for kw in (
        dict(max_new_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(n=0),
        dict(top_k=-2),
        dict(stop_token_ids=[-1]),
    ):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(**kw)
    while engine.has_unfinished():
        engine.step()
    check_freed(engine)


def test_kv_memory_sizes_the_pool(model):
    engine = Engine(model, kv_memory=40 * 1024, block_size=BLOCK_SIZE)
    # 2 layers x (K + V) x 8 tokens x 2 kv heads x 16 dims x 4 bytes = 4 KiB per block.
    assert engine.bytes_per_block == 2 * 2 * BLOCK_SIZE * 2 * 16 * 4
    assert engine.num_blocks == 10


class CharTokenizer:
    """A stand-in for a transformers tokenizer: one token per character (ids 1..VOCAB-1)."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x41 + i % 26) for i in ids)


def test_string_prompts_with_a_tokenizer(model, eager):
    tok = CharTokenizer()
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, tokenizer=tok)
    out = engine.generate(["hello paged world"], greedy(), use_tqdm=False)[0]
    ids = tok("hello paged world")["input_ids"]
    assert out.prompt_token_ids == ids
    assert out.token_ids == hf_greedy(eager, ids, MAX_NEW)
    assert out.outputs[0].text == tok.decode(out.token_ids)


@pytest.mark.parametrize("arch", sorted(hf.TINY_ARCHS))
def test_every_tiny_arch_greedy_equals_eager(arch):
    # Sliding windows (mistral 7, gemma2 6), softcapping (gemma2), qk-norm (qwen3), fused qkv (phi3):
    # prompts longer than the window, chunked prefill mixed with decode rows.
    model = hf.tiny_model(arch, attn_implementation="eager")
    eager_model = copy.deepcopy(model)
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    ps = [p for p in prompts(20, [1, 7, 9, 17, 33, 50]) if max(p) < vocab]
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=24)
    outs = engine.generate(ps, greedy(max_new=12), use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(eager_model, p, 12), f"{arch}: prompt of {len(p)} tokens"
    check_freed(engine)


def test_preempted_forks_match_large_pool(model):
    # n > 1 requests in a pool too small for all samples: forked children get preempted, recompute
    # their prompt + output, and still draw the same tokens from their own generators.
    ps = prompts(21, [13, 22, 6])
    params = SamplingParams(max_new_tokens=14, temperature=1.0, n=3, seed=5)
    ref = Engine(model, num_blocks=128, block_size=BLOCK_SIZE).generate(ps, params, use_tqdm=False)
    small = Engine(model, num_blocks=10, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    got = small.generate(ps, params, use_tqdm=False)
    assert small.metrics().preemptions > 0 and small.metrics().forks > 0
    for g, r in zip(got, ref):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in r.outputs]
    check_freed(small)


class FailOnCall:
    """Wraps a callable; raises RuntimeError on the given call numbers (1-based)."""

    def __init__(self, fn, fail_on: set[int]) -> None:
        self.fn, self.fail_on, self.calls = fn, fail_on, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected failure on call {self.calls}")
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("where", ["forward", "sample"])
def test_failed_step_is_undone(model, monkeypatch, where):
    ps = prompts(22, [9, 30, 17])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=3)
    ref = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    ref_out = ref.generate(ps, params, use_tqdm=False)
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    if where == "forward":
        engine.runner.forward = FailOnCall(engine.runner.forward, {2, 5, 6})
    else:
        import kv_paged.engine.step as engine_module

        monkeypatch.setattr(engine_module, "sample", FailOnCall(engine_module.sample, {3, 7}))
    for i, p in enumerate(ps):
        engine.add_request(p, params, request_id=str(i))
    finished, failures = {}, 0
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except RuntimeError as e:
            assert "injected failure" in str(e)
            failures += 1
            engine.block_manager.check_invariants()
            continue
        finished.update({o.request_id: o for o in outs if o.finished})
    assert failures >= 2
    for i, r in enumerate(ref_out):
        assert [c.token_ids for c in finished[str(i)].outputs] == [c.token_ids for c in r.outputs]
    check_freed(engine)


def test_interrupted_generate_leaves_no_orphans(model):
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    engine.runner.forward = FailOnCall(engine.runner.forward, {3})
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(prompts(23, [5, 12, 20]), greedy(), use_tqdm=False)
    assert engine.block_manager.stats()["num_seqs"] == 0  # aborted, blocks already freed
    again = engine.generate(prompts(24, [7, 9]), greedy(), use_tqdm=False)
    assert [o.request_id for o in again] == ["3", "4"] and all(o.finished for o in again)
    check_freed(engine)


def test_single_prompt_forms(model, eager):
    p = prompts(25, [10])[0]
    ref = hf_greedy(eager, p, MAX_NEW)
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE)
    for form in (p, torch.tensor(p), [p], [torch.tensor(p)]):
        outs = engine.generate(form, greedy(), use_tqdm=False)
        assert len(outs) == 1 and outs[0].token_ids == ref
    engine.tokenizer = CharTokenizer()
    assert len(engine.generate("hi there", greedy(), use_tqdm=False)) == 1


def test_latency_metrics(model):
    ps = prompts(26, [5, 19, 33])
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    t0 = time.perf_counter()
    outs = engine.generate(ps, [greedy(max_new=1), greedy(), greedy(max_new=4)], use_tqdm=False)
    t1 = time.perf_counter()
    for o in outs:
        m = o.metrics
        assert t0 <= m.arrival_time <= m.first_token_time <= m.finished_time <= t1
        assert m.time_to_first_token == m.first_token_time - m.arrival_time
    em = engine.metrics()
    assert len(em.ttft) == 3 and len(em.tpot) == 2  # a 1-token reply has no time per output token
    # The 33-token prompt is prefilled in 3 chunks of <= 16 tokens: its first token comes last.
    assert outs[2].metrics.time_to_first_token == max(em.ttft)
    s = em.summary()
    assert s["ttft_p99_s"] == max(em.ttft) and 0 < s["ttft_mean_s"] <= s["ttft_p99_s"]
    assert "time to first token" in em.table()


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_small_pool(model, seed):
    # Staggered arrivals, shared prefixes, n in {1, 2, 3}, greedy and sampled requests, one abort,
    # a pool that forces preemption: invariants hold after every step and every request that was
    # not aborted gets exactly the tokens it gets alone in a large pool.
    rng = random.Random(seed)
    bases = [prompts(100 + seed, [rng.randrange(8, 25)])[0] for _ in range(2)]
    requests = []
    for i in range(12):
        tail = prompts(200 + 12 * seed + i, [rng.randrange(1, 20)])[0]
        prompt = (rng.choice(bases) if rng.random() < 0.6 else []) + tail
        temperature = rng.choice([0.0, 1.0])
        params = SamplingParams(
            max_new_tokens=rng.randrange(1, 20),
            temperature=temperature,
            top_k=rng.choice([None, 10]),
            top_p=rng.choice([1.0, 0.8]),
            n=rng.choice([1, 1, 2, 3]),
            seed=1000 * seed + i,
            logprobs=rng.choice([None, 2]),
        )
        requests.append((prompt, params))
    ref = Engine(model, num_blocks=256, block_size=BLOCK_SIZE)
    ref_runs = {
        str(i): o
        for i, o in enumerate(
            ref.generate([p for p, _ in requests], [q for _, q in requests], use_tqdm=False)
        )
    }
    need = max(-(-(len(p) + q.max_new_tokens - 1) // BLOCK_SIZE) for p, q in requests)
    engine = Engine(
        model,
        num_blocks=need + rng.randrange(0, 4),
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=rng.choice([8, 16, 64]),
        max_num_seqs=rng.choice([3, 8, 256]),
    )
    bm = engine.block_manager
    pending = list(enumerate(requests))
    abort_id, abort_step = str(rng.randrange(12)), rng.randrange(2, 12)
    finished, step = {}, 0
    while pending or engine.has_unfinished():
        arriving = pending[: rng.randrange(0, 4)]
        del pending[: len(arriving)]
        for i, (p, q) in arriving:
            engine.add_request(p, q, request_id=str(i))
        if step == abort_step and abort_id in engine._requests:
            engine.abort(abort_id)
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
        step += 1
        bm.check_invariants()
        assert bm.stats()["blocks_in_use"] <= engine.num_blocks
        for s in engine.scheduler.running:
            assert bm.seq_len(s.seq_id) == s.num_in_manager
    assert engine.metrics().preemptions > 0 and engine.metrics().forks > 0  # the pool was tight
    assert sorted(finished, key=int) == [str(i) for i in range(12)]
    for rid, out in finished.items():
        assert out.error is None
        if rid == abort_id and any(c.finish_reason == "abort" for c in out.outputs):
            continue
        ref = ref_runs[rid].outputs
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref], f"request {rid}"
        for c, r in zip(out.outputs, ref):  # logprobs survive preemption and recompute
            if r.logprobs is None:
                assert c.logprobs is None
                continue
            assert len(c.logprobs) == len(c.token_ids)
            for t, a, b in zip(c.token_ids, c.logprobs, r.logprobs):
                assert abs(a[t] - b[t]) < 1e-4
    check_freed(engine)


def test_dropping_the_engine_frees_the_pool_at_once(model):
    # No reference cycle may hold the KV pool (most of a GPU's memory) until a gc pass: dropping the
    # engine, or a PagedCache after model.generate, frees it by reference counting alone.
    gc.collect()
    gc.disable()
    try:
        engine = Engine(model, num_blocks=16, block_size=BLOCK_SIZE)
        engine.generate(prompts(27, [12, 5]), SamplingParams(max_new_tokens=4, n=2), use_tqdm=False)
        pool = weakref.ref(engine.runner.pool)
        del engine
        assert pool() is None, "the Engine's KV pool outlived the Engine"
        cache = hf.PagedCache.for_model(model, num_blocks=16, block_size=BLOCK_SIZE)
        ids = torch.tensor([prompts(28, [9])[0]])
        with torch.no_grad():
            model.generate(ids, **{hf.CACHE_KWARG: cache}, max_new_tokens=3, do_sample=False)
        pool = weakref.ref(cache.pool)
        del cache
        assert pool() is None, "a PagedCache's pool outlived the cache"
    finally:
        gc.enable()


def test_close_gives_the_model_back(eager):
    model = tiny_llama()  # its own copy: other tests' engines leave the shared model on "kv_paged"
    assert model.config._attn_implementation == "eager"
    p = prompts(29, [11])[0]
    with Engine(model, num_blocks=16, block_size=BLOCK_SIZE) as engine:
        assert model.config._attn_implementation == "kv_paged"
        engine.add_request(p, greedy(max_new=30))
        engine.step()
        bm = engine.block_manager
    assert engine.closed and model.config._attn_implementation == "eager"
    bm.check_invariants()
    assert bm.stats()["blocks_in_use"] == 0 and bm.stats()["num_seqs"] == 0
    assert engine.runner is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([p], greedy(), use_tqdm=False)
    engine.close()  # idempotent
    ids = torch.tensor([p])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    assert out[0, len(p) :].tolist() == hf_greedy(eager, p, MAX_NEW)


def test_default_pool_size_on_cpu(model, monkeypatch):
    import kv_paged.engine.model_runner as runner_module

    per_block = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # layers x (K, V) x tokens x kv heads x dims x fp32
    # Plenty of host memory: the 1 GiB default holds more than max_num_seqs full-length
    # sequences need, so that is the size.
    monkeypatch.setattr(runner_module, "host_available_memory", lambda: 64 << 30)
    assert (1 << 30) // per_block > 256 * (MAX_POS // BLOCK_SIZE)
    assert Engine(model, block_size=BLOCK_SIZE).num_blocks == 256 * (MAX_POS // BLOCK_SIZE)
    # Little host memory: a quarter of what is available.
    monkeypatch.setattr(runner_module, "host_available_memory", lambda: 4 << 20)
    assert Engine(model, block_size=BLOCK_SIZE).num_blocks == (1 << 20) // per_block
    # The platform does not say: the 1 GiB default alone.
    monkeypatch.setattr(runner_module, "host_available_memory", lambda: None)
    engine = Engine(model, block_size=BLOCK_SIZE, max_num_seqs=1 << 20)
    assert engine.num_blocks == (1 << 30) // per_block
    monkeypatch.undo()
    assert runner_module.host_available_memory() > 0  # Linux reports MemAvailable


def test_stop_strings(model):
    tok = CharTokenizer()
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, tokenizer=tok)
    p = prompts(30, [13])[0]
    full = engine.generate([p], greedy(max_new=20), use_tqdm=False)[0]
    text = full.outputs[0].text
    # A 2-character stop string whose first occurrence ends at output token k + 1.
    k = next(i for i in range(3, 18) if text.find(text[i : i + 2]) == i)
    stop = text[k : k + 2]
    outs = engine.generate(
        [p, p], [greedy(max_new=20, stop=[stop, "never"]), greedy(max_new=20)], use_tqdm=False
    )
    hit = outs[0].outputs[0]
    assert hit.finish_reason == "stop"
    assert hit.token_ids == full.token_ids[: k + 2]  # the token that completed the string is kept
    assert hit.text == text[:k]  # the text stops before the string
    assert outs[1].token_ids == full.token_ids  # the request beside it is unaffected
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, num_blocks=8, block_size=BLOCK_SIZE).add_request(p, greedy(stop=["x"]))
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])
    check_freed(engine)


def test_logprobs_match_the_models_distribution(model, eager):
    p = prompts(31, [14])[0]
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, max_num_batched_tokens=8)
    sampled, greedy_out = engine.generate(
        [p, p],
        [
            SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, seed=2, logprobs=0),
            greedy(max_new=6, logprobs=3),
        ],
        use_tqdm=False,
    )
    for out, k in ((sampled, 0), (greedy_out, 3)):
        c = out.outputs[0]
        # The reference: eager forward over prompt + output, log_softmax in float64.
        ids = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logits = eager(ids).logits[0, len(p) - 1 : -1].double()  # [6, vocab]
        ref = torch.log_softmax(logits, dim=-1)
        assert len(c.logprobs) == len(c.token_ids) == 6
        for t, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            top = torch.topk(ref[t], k).indices.tolist() if k else []
            assert set(entry) == set(top) | {token}
            for tok, lp in entry.items():
                assert abs(lp - ref[t, tok].item()) < 1e-4
        assert abs(c.cumulative_logprob - sum(e[t] for t, e in zip(c.token_ids, c.logprobs))) < 1e-9
    assert greedy_out.outputs[0].logprobs[0][greedy_out.token_ids[0]] == max(
        greedy_out.outputs[0].logprobs[0].values()
    )
    plain = engine.generate([p], greedy(max_new=2), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)


def test_generate_refuses_or_cleans_up(model):
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE)
    # A bad prompt after good ones: nothing stays behind for a later call to serve.
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], [3, 4], []], greedy(), use_tqdm=False)
    assert not engine.has_unfinished() and engine.block_manager.stats()["num_seqs"] == 0
    outs = engine.generate([[9, 9]], greedy(), use_tqdm=False)
    assert len(outs) == 1 and engine.metrics().num_requests == engine.metrics().num_finished == 1
    # Requests of the step API are not silently consumed by generate().
    rid = engine.add_request([5, 6, 7], greedy(max_new=3))
    with pytest.raises(RuntimeError, match="unfinished"):
        engine.generate([[1, 2]], greedy(), use_tqdm=False)
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [rid]
    assert engine.abort(rid) is False and engine.abort("nope") is False  # finished / unknown
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request([1], SamplingParams(logprobs=VOCAB + 1))
    check_freed(engine)


def test_max_num_seqs_counts_unforked_samples(model):
    # n = 3 requests hold 3 sequence slots from admission on, while their prompts are prefilled
    # in chunks (they fork only afterwards): running sequences never exceed max_num_seqs.
    ps = prompts(32, [30, 25, 6, 9, 28])
    params = [SamplingParams(max_new_tokens=5, n=3 if i % 2 == 0 else 1, seed=i) for i in range(5)]
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=4)
    engine.scheduler.max_num_batched_tokens = 8
    for p, q in zip(ps, params):
        engine.add_request(p, q)
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert peak <= 4 and engine.metrics().forks == 3 * 2
    check_freed(engine)


class FlakyTokenizer(CharTokenizer):
    """Raises KeyboardInterrupt on the given decode calls (1-based), like a Ctrl-C landing there."""

    def __init__(self, fail_on: set[int]) -> None:
        self.fail_on, self.calls = fail_on, 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        if self.calls in self.fail_on:
            raise KeyboardInterrupt
        return super().decode(ids, skip_special_tokens)


def test_interrupt_in_the_stop_string_check_is_undone(model):
    p = prompts(33, [10])[0]
    params = [
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop=["QQQ"]),
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=5),
    ]
    ref = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, tokenizer=CharTokenizer())
    want = [o.token_ids for o in ref.generate([p, p], params, use_tqdm=False)]
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, tokenizer=FlakyTokenizer({3, 7}))
    for i, q in enumerate(params):
        engine.add_request(p, q, request_id=str(i))
    got, interrupts = {}, 0
    while engine.has_unfinished():
        try:
            got.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        except KeyboardInterrupt:
            interrupts += 1
    assert interrupts == 2 and [got["0"], got["1"]] == want
    check_freed(engine)


class SparseTokenizer(CharTokenizer):
    """Three of every four ids decode to nothing (like byte-level pieces of one character)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x41 + i % 26) for i in ids if i % 4 == 0)


def test_stop_string_spread_over_empty_tokens(model):
    tok = SparseTokenizer()
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, tokenizer=tok)
    p = prompts(34, [12])[0]
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=9)
    full = engine.generate([p], params, use_tqdm=False)[0].outputs[0]
    # A 2-character stop string whose characters come from tokens 4+ apart (3+ empty tokens
    # between them): a fixed window of len(stop) + 2 tokens would never see both.
    where = [t for t, i in enumerate(full.token_ids) if i % 4 == 0]  # tokens that make a character
    j = next(
        j
        for j in range(len(where) - 1)
        if where[j + 1] - where[j] >= 4 and full.text.find(full.text[j : j + 2]) == j
    )
    stop = full.text[j : j + 2]
    first = next(t for t in range(1, 41) if stop in tok.decode(full.token_ids[:t]))
    hit = engine.generate([p], dataclasses.replace(params, stop=[stop]), use_tqdm=False)[0]
    assert hit.outputs[0].finish_reason == "stop"
    assert hit.token_ids == full.token_ids[:first]
    assert hit.outputs[0].text == full.text[: full.text.find(stop)]


def test_streamed_text_never_shows_a_stop_string_start(model):
    tok = CharTokenizer()
    engine = Engine(model, num_blocks=32, block_size=BLOCK_SIZE, tokenizer=tok)
    p = prompts(35, [11])[0]
    text = engine.generate([p], greedy(max_new=20), use_tqdm=False)[0].outputs[0].text
    k = next(i for i in range(3, 16) if text.find(text[i : i + 3]) == i)
    engine.add_request(p, greedy(max_new=20, stop=[text[k : k + 3]]))
    streamed = []
    while engine.has_unfinished():
        streamed += [o.outputs[0].text for o in engine.step()]
    assert streamed[-1] == text[:k]
    # Without the hold-back, the steps that generated text[k] and text[k + 1] would show them.
    assert all(text[:k].startswith(t) for t in streamed), streamed
    check_freed(engine)
