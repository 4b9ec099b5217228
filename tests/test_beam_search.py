"""kv_paged/beam_search.py against transformers' beam search (model.generate, num_beams=k) on a tiny
random Llama: replaying generate's own per-step log-probabilities must give bit-identical hypotheses
and scores, and an engine-like driver (one uncached forward per step on the running beams) the same
tokens and scores within 1e-4. The module is loaded by path: it needs neither kv_paged nor its
compiled extension."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.generation.utils import GenerationMixin  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "kv_paged" / "beam_search.py"
_spec = importlib.util.spec_from_file_location("_kv_paged_beam_search", _PATH)
bs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bs  # dataclasses looks the module up while building BeamSearchParams
_spec.loader.exec_module(bs)
BeamSearch, BeamSearchParams = bs.BeamSearch, bs.BeamSearchParams


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The model is tiny: one intra-op thread is as fast, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PAD = 1  # non-zero: generate pads with `pad_token_id or eos_token_id[0]`


def make_model(vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaky logits (std ~2), so near-ties between candidates are unlikely
        model.lm_head.weight.mul_(12.0)
    model.generation_config.eos_token_id = None  # eos only when a case passes one
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def likely_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation of the prompt: tokens the model likes, so beams hit them early as eos."""
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=PAD,
        )
    return out[0, prompt.shape[1] :].tolist()


def hf_beam_search(model, prompt: torch.Tensor, p: BeamSearchParams, eos: list[int] | None):
    """generate()'s hypotheses as (output tokens, sequences_score), and its per-step log-probs."""
    # num_beams=1 makes generate() run greedy search: ask for _beam_search itself instead
    kwargs = {} if p.beam_width > 1 else {"custom_generate": GenerationMixin._beam_search}
    if eos is not None:
        kwargs["eos_token_id"] = eos
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),  # a prompt token equal to PAD is not padding
            num_beams=p.beam_width,
            do_sample=False,
            max_new_tokens=p.max_new_tokens,
            length_penalty=p.length_penalty,
            early_stopping=p.early_stopping,
            num_return_sequences=p.num_return_sequences,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
    fill = (PAD or eos[0]) if eos is not None else -1
    plen, hyps = prompt.shape[1], []
    for i in range(p.num_return_sequences):
        n = int((out.beam_indices[i] != -1).sum())
        row = out.sequences[i, plen:].tolist()
        assert all(t == fill for t in row[n:]), (row, n, fill)
        hyps.append((row[:n], float(out.sequences_scores[i])))
    return hyps, out.scores


def run_replay(p, eos, prompt_len, scores) -> list[tuple[list[int], float]]:
    """Drive BeamSearch with generate's own log-probabilities (one row per running beam)."""
    search = BeamSearch(p, eos)
    for step, lp in enumerate(scores):
        assert not search.done
        assert lp.shape[0] == p.beam_width
        search.step(lp[:1] if step == 0 else lp)  # step 0: num_beams identical rows, one is live
    assert search.done and search.running == []
    return search.results()


def run_model(model, prompt: list[int], p, eos) -> tuple[list[tuple[list[int], float]], int]:
    """The engine's view: one uncached forward per step on the batch of running beams."""
    search = BeamSearch(p, eos)
    steps = 0
    while not search.done:
        old = search.running
        ids = torch.tensor([prompt + r for r in old])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :].float()
        parents = search.step(torch.log_softmax(logits, dim=-1))
        steps += 1
        if search.done:
            assert parents == [] and search.running == []
        else:
            assert len(search.running) == len(parents) == p.beam_width
            for beam, parent in zip(search.running, parents):
                assert beam[:-1] == old[parent]  # continues its parent by exactly one token
    return search.results(), steps


# (beam_width, max_new_tokens, length_penalty, early_stopping, num_return_sequences, prompt_len,
#  eos: "likely" = one token the model likes, "two" = two of them, None = ignore_eos, vocab, seed)
CASES = [
    (1, 8, 1.0, False, 1, 5, "likely", 64, 0),
    (1, 9, 2.0, "never", 1, 7, "likely", 64, 1),
    (1, 5, 0.0, True, 1, 3, None, 64, 2),
    (2, 10, 1.0, False, 2, 3, "likely", 64, 3),
    (2, 7, 0.0, True, 1, 9, "two", 64, 4),
    (2, 1, 1.0, False, 2, 5, "likely", 64, 5),
    (3, 12, 2.0, "never", 3, 5, "likely", 64, 6),
    (3, 6, -0.5, False, 2, 11, "likely", 64, 7),
    (3, 9, 1.0, True, 3, 1, None, 64, 8),
    (3, 6, 2.0, "never", 3, 3, "two", 6, 9),
    (3, 8, 2.0, True, 2, 5, "likely", 64, 50),
    (4, 10, 0.0, "never", 4, 7, "likely", 64, 10),
    (4, 8, 2.0, False, 3, 5, "two", 64, 11),
    (4, 11, -0.5, "never", 1, 3, "likely", 64, 12),
    (4, 6, 1.0, True, 2, 13, "likely", 64, 13),
    (4, 7, 1.0, False, 4, 5, "likely", 4, 14),
    (4, 3, 2.0, "never", 4, 3, "two", 3, 35),
    (4, 2, 1.0, False, 4, 3, "likely", 2, 30),
    (8, 8, 1.0, False, 5, 9, "likely", 64, 15),
]


@pytest.mark.parametrize(
    "beam_width,max_new,lp,es,nrs,prompt_len,eos_mode,vocab,seed",
    CASES,
    ids=[f"k{c[0]}-m{c[1]}-lp{c[2]}-es{c[3]}-n{c[4]}-{c[6]}-v{c[7]}" for c in CASES],
)
def test_matches_transformers(beam_width, max_new, lp, es, nrs, prompt_len, eos_mode, vocab, seed):
    model = make_model(vocab, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    greedy = likely_tokens(model, prompt, 4)
    if eos_mode is None:
        eos = None
    else:
        if eos_mode == "likely":
            eos = [greedy[2]]
        else:
            eos = [greedy[1], greedy[3] if greedy[3] != greedy[1] else (greedy[1] + 1) % vocab]
    p = BeamSearchParams(beam_width, max_new, lp, es, nrs, ignore_eos=eos is None)
    expected, scores = hf_beam_search(model, prompt, p, eos)
    assert len(expected) == nrs

    # ignore_eos: the module must ignore the eos ids it is given (generate was given none)
    eos_ids = eos if eos is not None else [greedy[2]]
    replayed = run_replay(p, eos_ids, prompt_len, scores)
    assert [t for t, _ in replayed] == [t for t, _ in expected]
    assert [s for _, s in replayed] == [s for _, s in expected]  # same float32 ops: bit-identical

    got, steps = run_model(model, prompt[0].tolist(), p, eos_ids)
    assert steps == len(scores)
    assert [t for t, _ in got] == [t for t, _ in expected]
    torch.testing.assert_close(
        torch.tensor([s for _, s in got]),
        torch.tensor([s for _, s in expected]),
        atol=1e-4,
        rtol=1e-6,
    )
    if eos is None:
        assert all(len(t) == max_new for t, _ in got)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"beam_width": 0}, "beam_width"),
        ({"beam_width": True}, "beam_width"),
        ({"beam_width": 2, "max_new_tokens": 0}, "max_new_tokens"),
        ({"beam_width": 2, "max_new_tokens": 3.0}, "max_new_tokens"),
        ({"beam_width": 2, "length_penalty": float("nan")}, "length_penalty"),
        ({"beam_width": 2, "length_penalty": "1"}, "length_penalty"),
        ({"beam_width": 2, "early_stopping": "always"}, "early_stopping"),
        ({"beam_width": 2, "early_stopping": 1}, "early_stopping"),
        ({"beam_width": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"beam_width": 2, "num_return_sequences": 0}, "num_return_sequences"),
        ({"beam_width": 2, "ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_params_validation_names_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        BeamSearchParams(**kwargs)


def test_params_accept_valid_values():
    for es in (True, False, "never"):
        p = BeamSearchParams(3, max_new_tokens=1, length_penalty=-2, early_stopping=es)
        assert p.early_stopping == es and p.num_return_sequences == 1


def test_step_rejects_bad_logprobs():
    gen = torch.Generator().manual_seed(0)
    search = BeamSearch(BeamSearchParams(2, max_new_tokens=4), eos_token_ids=[5])
    lp = torch.log_softmax(torch.randn(1, 16, generator=gen), dim=-1)
    for bad in (lp.expand(2, 16), lp[0], lp.to(torch.int64), lp.tolist(), lp[:, :1]):
        with pytest.raises(ValueError, match="logprobs|vocab"):
            search.step(bad)
    assert search.running == [[]] and search.num_steps == 0  # nothing changed
    parents = search.step(lp)
    assert parents == [0, 0] and len(search.running) == 2
    with pytest.raises(ValueError, match=r"len\(running\)=2"):
        search.step(lp)
    # without eos transformers still keeps 2 * beam_width candidates: torch.topk needs that many
    with pytest.raises(ValueError, match="vocab"):
        BeamSearch(BeamSearchParams(2, ignore_eos=True), [5]).step(torch.zeros(1, 1))


def test_step_after_done_raises_and_eos_ids_validated():
    search = BeamSearch(BeamSearchParams(2, max_new_tokens=1), eos_token_ids=[0])
    assert search.step(torch.log_softmax(torch.zeros(1, 8), dim=-1)) == []
    assert search.done and len(search.results()) == 1
    with pytest.raises(RuntimeError, match="done"):
        search.step(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="eos_token_ids"):
        BeamSearch(BeamSearchParams(2), eos_token_ids=[-1])
