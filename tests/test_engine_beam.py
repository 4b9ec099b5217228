"""Beam search in kv_paged.Engine (BeamSearchParams, Engine.beam_search): beams are the engine's
sequences, a step's new beams fork their parents (copy-on-write), pruned beams are freed.

Outputs must equal transformers' eager beam search on every tiny architecture, and stay equal under
preemption, a small token budget, other requests in the same batches, and failed or interrupted
steps; every block is freed at the end.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_engine import (
    BLOCK_SIZE,
    FailOnCall,
    check_freed,
    hf_greedy,
    prompts,
    run_to_end,
    tiny_llama,
)

from kv_paged import BeamSearchParams, Engine, SamplingParams
from kv_paged.integrations import hf

ARCHS = sorted(hf.TINY_ARCHS)
NEW = 8
# (beam_width, length_penalty, early_stopping, num_return_sequences, with an eos token)
CASES = [(2, 1.0, False, 1, False), (3, 0.5, True, 2, True), (4, 2.0, "never", 4, True)]


def hf_beams(eager, prompt: list[int], params: BeamSearchParams, eos: int | None) -> list:
    """transformers' beam search: [(output tokens, sequences_score)] best first."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = eager.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=params.beam_width,
            max_new_tokens=params.max_new_tokens,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            num_return_sequences=params.num_return_sequences,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=-1 if eos is not None else 0,
            return_dict_in_generate=True,
            output_scores=True,
        )
    hyps = []
    for row, score in zip(out.sequences, out.sequences_scores.tolist()):
        toks = row[len(prompt) :].tolist()
        if -1 in toks:  # padding after a hypothesis that ended early (pad -1: never a token)
            toks = toks[: toks.index(-1)]
        hyps.append((toks, score))
    return hyps


def assert_beams_equal(outs, refs) -> None:
    for out, ref in zip(outs, refs, strict=True):
        assert out.finished and out.error is None
        assert [c.token_ids for c in out.outputs] == [toks for toks, _ in ref]
        for c, (_, score) in zip(out.outputs, ref):
            assert abs(c.score - score) <= 1e-4


def _eos_for(eager, prompt: list[int]) -> int:
    """A token eager's beams emit early, so some hypotheses end with it."""
    hyps = hf_beams(eager, prompt, BeamSearchParams(beam_width=3, max_new_tokens=NEW), None)
    return hyps[0][0][2]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"beams{c[0]}-lp{c[1]}-es{c[2]}")
@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_equals_transformers(arch: str, case: tuple) -> None:
    width, lp, early, num_return, with_eos = case
    model = hf.tiny_model(arch)
    eager = hf.tiny_model(arch, attn_implementation="eager")
    ps = prompts(200, [9, 14])
    eos = _eos_for(eager, ps[0]) if with_eos else None
    model.generation_config.eos_token_id = eos
    params = BeamSearchParams(
        beam_width=width,
        max_new_tokens=NEW,
        length_penalty=lp,
        early_stopping=early,
        num_return_sequences=num_return,
    )
    refs = [hf_beams(eager, p, params, eos) for p in ps]
    with Engine(model, num_blocks=128, block_size=BLOCK_SIZE) as engine:
        outs = engine.beam_search(ps, params, use_tqdm=False)
        assert_beams_equal(outs, refs)
        if with_eos:
            reasons = {c.finish_reason for o in outs for c in o.outputs}
            assert reasons <= {"stop", "length"}
        check_freed(engine)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def eager():
    return tiny_llama()


PARAMS = BeamSearchParams(beam_width=4, max_new_tokens=12, num_return_sequences=2)


@pytest.mark.parametrize("num_blocks", [6, 9])
def test_small_pool_and_budget_same_beams(model, eager, num_blocks):
    """A pool too small for every beam at once (preemption; with 6 blocks, beams that computed
    their row are sent back while the rest of their group runs) and a token budget below the beam
    count (a group's rows split over steps): same hypotheses."""
    ps = prompts(210, [21, 6, 13])
    refs = [hf_beams(eager, p, PARAMS, None) for p in ps]
    engine = Engine(model, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_batched_tokens=3)
    outs = engine.beam_search(ps, PARAMS, use_tqdm=False)
    assert_beams_equal(outs, refs)
    assert engine.scheduler.num_preemptions > 0
    check_freed(engine)


def test_beams_share_blocks(model, eager):
    """Beams hold the prompt once: peak blocks stay far below beam_width full copies."""
    p = prompts(220, [40])[0]
    engine = Engine(model, num_blocks=256, block_size=BLOCK_SIZE)
    engine.add_request(p, PARAMS)
    peak = 0
    while engine.has_unfinished():
        outs = engine.step()
        peak = max(peak, engine.block_manager.stats()["blocks_in_use"])
    assert_beams_equal(outs, [hf_beams(eager, p, PARAMS, None)])
    full_copies = PARAMS.beam_width * -(-(len(p) + PARAMS.max_new_tokens) // BLOCK_SIZE)
    prompt_blocks = -(-len(p) // BLOCK_SIZE)
    own = -(-PARAMS.max_new_tokens // BLOCK_SIZE) + 1
    assert peak <= prompt_blocks + PARAMS.beam_width * own < full_copies
    m = engine.metrics()
    assert m.forks > 0 and m.cow_copies > 0
    check_freed(engine)


def test_beams_beside_sampled_requests(model, eager):
    """Beam and sampling requests in the same batches: each equals its run alone; a beam request
    is reported once, finished."""
    ps = prompts(230, [11, 7, 16, 9])
    sampling = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, n=2, seed=5)
    alone = Engine(model, num_blocks=128, block_size=BLOCK_SIZE)
    ref_sampled = alone.generate(ps[1::2], sampling, use_tqdm=False)
    alone.close()
    engine = Engine(model, num_blocks=128, block_size=BLOCK_SIZE, max_num_batched_tokens=12)
    for i, p in enumerate(ps):
        engine.add_request(p, PARAMS if i % 2 == 0 else sampling, request_id=str(i))
    seen: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    for i in (0, 2):
        assert len(seen[str(i)]) == 1  # beam requests: no partial outputs
        assert_beams_equal(seen[str(i)], [hf_beams(eager, ps[i], PARAMS, None)])
    for i, ref in zip((1, 3), ref_sampled):
        final = seen[str(i)][-1]
        assert [c.token_ids for c in final.outputs] == [c.token_ids for c in ref.outputs]
    check_freed(engine)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_steps_are_undone(model, eager, error):
    ps = prompts(240, [10, 18])
    refs = [hf_beams(eager, p, PARAMS, None) for p in ps]
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_batched_tokens=8)
    forward = FailOnCall(engine.runner.forward, {3, 7, 8, 15})
    if error is KeyboardInterrupt:

        def interrupting(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            except RuntimeError:
                raise KeyboardInterrupt from None

        engine.runner.forward = interrupting
    else:
        engine.runner.forward = forward
    for i, p in enumerate(ps):
        engine.add_request(p, PARAMS, request_id=str(i))
    finished, failures = run_to_end(engine, catch=(error,))
    assert failures == 4
    assert_beams_equal([finished["0"], finished["1"]], refs)
    check_freed(engine)


def test_abort_and_bad_requests(model):
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=3)
    rid = engine.add_request(
        prompts(250, [12])[0], BeamSearchParams(beam_width=2, max_new_tokens=20)
    )
    for _ in range(4):
        engine.step()
    assert engine.abort(rid)
    (out,) = engine.step()
    assert out.finished and out.outputs and {c.finish_reason for c in out.outputs} == {"abort"}
    wide = engine.add_request([1, 2, 3], BeamSearchParams(beam_width=4))
    (out,) = engine.step()
    assert out.request_id == wide and "beam_width = 4 exceeds max_num_seqs = 3" in out.error
    with pytest.raises(TypeError, match="BeamSearchParams"):
        engine.beam_search([[1, 2]], SamplingParams())
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0)
    check_freed(engine)


@pytest.mark.parametrize("num_blocks", [6, 8])
def test_as_many_seq_slots_as_beams(model, eager, num_blocks):
    """max_num_seqs == beam_width with a pool that sends beams back: a re-admitted beam takes a
    slot its request already holds (a livelock when it was charged a second one)."""
    p = prompts(210, [21])[0]
    engine = Engine(
        model,
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        max_num_seqs=PARAMS.beam_width,
        max_num_batched_tokens=3,
    )
    engine.add_request(p, PARAMS)
    outs = []
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        outs += [o for o in engine.step() if o.finished]
    assert not engine.has_unfinished(), "the engine stopped making progress"
    assert_beams_equal(outs, [hf_beams(eager, p, PARAMS, None)])
    check_freed(engine)


def test_interrupt_in_a_later_search_restores_the_earlier(model, eager, monkeypatch):
    """Two requests' searches step in the same engine step; Ctrl-C in the second one's selection
    must also undo the first one's (it already moved on)."""
    import kv_paged.beam_search as beam_module

    ps = prompts(270, [9, 9])
    refs = [hf_beams(eager, p, PARAMS, None) for p in ps]
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    for i, p in enumerate(ps):
        engine.add_request(p, PARAMS, request_id=str(i))
    step, calls = beam_module.BeamSearch.step, [0]

    def interrupt_fourth(self, logprobs):
        calls[0] += 1
        if calls[0] == 4:  # the second request's search, in the second step both take
            raise KeyboardInterrupt
        return step(self, logprobs)

    monkeypatch.setattr(beam_module.BeamSearch, "step", interrupt_fourth)
    finished, interrupts = run_to_end(engine, catch=(KeyboardInterrupt,))
    assert interrupts == 1
    assert_beams_equal([finished["0"], finished["1"]], refs)
    check_freed(engine)


def test_interrupt_while_advancing_beams_fails_that_request_alone(model, eager, monkeypatch):
    """Ctrl-C after a search stepped, while its beams fork and free: that request finishes with an
    error (its blocks freed); the other request and the engine go on."""
    ps = prompts(280, [12, 10])
    engine = Engine(model, num_blocks=64, block_size=BLOCK_SIZE)
    engine.add_request(ps[0], PARAMS, request_id="beams")
    engine.add_request(
        ps[1], SamplingParams(max_new_tokens=6, temperature=0.0), request_id="greedy"
    )
    fork, calls = engine.scheduler.fork, [0]

    def interrupt_third(parent, child):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return fork(parent, child)

    monkeypatch.setattr(engine.scheduler, "fork", interrupt_third)
    finished, interrupts = run_to_end(engine, catch=(KeyboardInterrupt,))
    assert interrupts == 1
    assert finished["beams"].error and "beam search step failed" in finished["beams"].error
    assert finished["greedy"].error is None
    assert finished["greedy"].outputs[0].token_ids == hf_greedy(eager, ps[1], 6)
    check_freed(engine)
