"""kv_paged.engine.sampling: SamplingParams validation and the vectorised per-row sampler against
explicit per-row references (top_k / top_p / temperature), with seeded generators."""

from __future__ import annotations

import pytest
import torch

from kv_paged.engine import sampling
from kv_paged.engine.sampling import SamplingParams, make_generator, sample

VOCAB = 50


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """float64, one row at a time: temperature, top_k, softmax, top_p nucleus, renormalise."""
    x = row.double() / p.temperature
    if p.top_k:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    sp, order = torch.sort(probs, descending=True)
    keep = (torch.cumsum(sp, 0) - sp) < p.top_p
    sp = sp * keep
    out = torch.zeros_like(probs).scatter_(0, order, sp)
    return out / out.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.5),
    ],
)
@pytest.mark.parametrize("candidates", [sampling.TOP_P_CANDIDATES, 2])
def test_sampled_frequencies_match_reference(params, candidates, monkeypatch):
    # candidates=2: a top_p-only nucleus is bigger than the candidate set, so the full-sort pass runs.
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(0)
    row = torch.randn(VOCAB, generator=g) * 2  # distinct values: no ties at the top_k edge
    n = 6000
    gens = [make_generator(123, i) for i in range(n)]
    tokens = sample(row.expand(n, VOCAB), [params] * n, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double() / n
    ref = reference_probs(row, params)
    if params.top_p < 1 and not params.top_k and candidates == 2:
        assert (ref > 0).sum() > candidates, "the nucleus must outgrow the candidates here"
    assert (freq[ref == 0] == 0).all(), "a filtered-out token was sampled"
    # 5 sigma of a binomial proportion, per token.
    tol = 5 * torch.sqrt(ref * (1 - ref) / n) + 1e-9
    assert ((freq - ref).abs() <= tol).all(), (freq - ref).abs().max()


@pytest.mark.parametrize("candidates", [sampling.TOP_P_CANDIDATES, 2])
def test_rows_are_independent_of_the_batch(candidates, monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, VOCAB, generator=g)
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p)
        for t, k, p in [
            (0.0, None, 1.0),
            (1.0, 7, 0.9),
            (0.7, None, 0.3),
            (1.0, None, 1.0),
            (0.0, 3, 0.5),
            (2.0, 2, 1.0),
        ]
    ]
    together = sample(logits, params, [make_generator(9, i) for i in range(6)])
    alone = [sample(logits[i : i + 1], [params[i]], [make_generator(9, i)])[0] for i in range(6)]
    assert together == alone
    assert together[0] == int(logits[0].argmax()) and together[4] == int(logits[4].argmax())
    # top_k=1 and a tiny top_p are greedy whatever the temperature.
    for p in (
        SamplingParams(temperature=5.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-6),
    ):
        assert (
            sample(logits, [p] * 6, [make_generator(0, i) for i in range(6)])
            == logits.argmax(-1).tolist()
        )


def test_bad_input():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(3, VOCAB), [SamplingParams()] * 2, [make_generator(0, 0)] * 2)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=True)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=1.5)


def test_masked_vocabulary_is_never_sampled():
    # -inf logits (a padded or banned vocabulary tail) get probability 0 on every path.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, VOCAB, generator=g)
    logits[:, 40:] = float("-inf")
    params = [
        SamplingParams(temperature=3.0),
        SamplingParams(temperature=3.0, top_k=45),
        SamplingParams(temperature=3.0, top_p=0.999),
        SamplingParams(temperature=3.0, top_k=48, top_p=0.999),
    ]
    for seed in range(200):
        tokens = sample(logits, params, [make_generator(seed, i) for i in range(4)])
        assert max(tokens) < 40, tokens


def test_top_k_wider_than_the_top_p_candidates():
    # top_k = 2000 on near-uniform logits over 4096 tokens: about half the draws must come from
    # ranks 1024..1999 (a top_k capped at the top_p candidate width would never reach them).
    vocab, n = 4096, 4000
    g = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=g) * 1e-3
    rank_of = torch.empty(vocab, dtype=torch.int64)
    rank_of[torch.argsort(row, descending=True)] = torch.arange(vocab)
    params = SamplingParams(temperature=1.0, top_k=2000)
    tokens = sample(row.expand(n, vocab), [params] * n, [make_generator(5, i) for i in range(n)])
    ranks = rank_of[torch.tensor(tokens)]
    assert ranks.max() < 2000
    assert 0.4 < (ranks >= 1024).double().mean() < 0.6


def test_ties_do_not_depend_on_the_batch():
    # bf16 logits have many exact ties; a row's token must not change with the rows beside it.
    vocab = 32000
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, vocab, generator=g) * 2).bfloat16()
    params = [
        SamplingParams(temperature=1.0, top_k=50),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=3000),
    ]
    for seed in range(30):
        alone = [
            sample(logits[i : i + 1], [params[i]], [make_generator(seed, i)])[0] for i in range(3)
        ]
        together = sample(logits, params, [make_generator(seed, i) for i in range(3)])
        assert together == alone


def test_top_k_minus_one_is_off():
    assert SamplingParams(top_k=-1).top_k is None
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
