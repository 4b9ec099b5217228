"""SamplingParams and the per-sequence sampler of kv_paged.Engine.

Design decision: every sequence owns a torch.Generator seeded from (request seed, sample index) and
draws exactly one sample per generated token, so its tokens do not depend on which other requests
share the batch, on chunked prefill, or on preemption and recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

_SEED_MASK = (1 << 63) - 1
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    """How to generate one request (the vLLM names and meanings).

    max_new_tokens: tokens to generate per sample (>= 1).
    temperature: 0 = greedy (argmax); > 0 divides the logits before softmax. Below SAMPLING_EPS
      (1e-5) it is greedy too, as in vLLM: dividing by it overflows to a one-hot distribution.
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1 = off).
    top_k: keep the k most likely tokens (None, 0 or -1 = off).
    n: independent samples of the same prompt; they share the prompt's KV blocks (copy-on-write).
    seed: the request's seed; None draws one from torch's global generator at add_request time
      (so torch.manual_seed makes a run reproducible).
    stop_token_ids: a sample finishes (finish_reason "stop") after generating any of these; the stop
      token is kept in the output, as transformers' generate keeps eos.
    ignore_eos: by default the model's generation_config.eos_token_id also stops a sample.
    logprobs: None = off; k >= 0 = with every generated token, its log-probability and those of
      the k most likely tokens, under the model's raw distribution (log_softmax of the logits,
      before temperature / top_k / top_p, as vLLM reports them).
    stop: strings that finish a sample (finish_reason "stop") as soon as its decoded text contains
      one; the text is cut before it, the tokens keep the one that completed it (needs the
      Engine's tokenizer).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    stop: Sequence[str] | None = None
    logprobs: int | None = None
    _stop_set: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(
                f"SamplingParams: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not 0.0 <= self.temperature < float("inf")
        ):
            raise ValueError(
                f"SamplingParams: temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1
        ):
            raise ValueError(
                f"SamplingParams: top_k must be None, -1 or 0 (off) or an int >= 1, got {self.top_k!r}"
            )
        if self.top_k == -1:  # vLLM's spelling of "off"
            self.top_k = None
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams: n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"SamplingParams: seed must be None or an int, got {self.seed!r}")
        stops = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(
                f"SamplingParams: stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}"
            )
        self._stop_set = frozenset(stops)
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or self.logprobs < 0
        ):
            raise ValueError(
                f"SamplingParams: logprobs must be None or an int >= 0, got {self.logprobs!r}"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (
            not all(isinstance(x, str) and x for x in self.stop) or not self.stop
        ):
            raise ValueError(
                f"SamplingParams: stop must be None, a non-empty string or a list of them, got {self.stop!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def stop_set(self, eos_token_ids: Sequence[int] = ()) -> frozenset[int]:
        return self._stop_set if self.ignore_eos else self._stop_set | frozenset(eos_token_ids)


def make_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample `index` of a request seeded with `seed` (CPU: results match across devices)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + index) & _SEED_MASK)
    return g


# Rows without top_k look for their top_p nucleus among this many most likely tokens first and
# sort the whole vocabulary only when the nucleus is larger (rare with real models' peaked logits).
TOP_P_CANDIDATES = 1024


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token per row.

    logits: [B, vocab] (any float dtype, any device); params, generators: length B.
    Greedy rows take argmax. The others, in float32 on the logits' device: temperature, then
    - no top_k and no top_p: invert the CDF of softmax over the vocabulary, no sort;
    - otherwise: the row's top candidates in descending order (top_k of them, or TOP_P_CANDIDATES
      for a top_p-only row, or the whole sorted vocabulary when its nucleus is bigger than that),
      keep the top_p nucleus and invert its CDF.
    Each inversion uses one uniform drawn from the row's own CPU generator, so a row's token depends
    only on its logits and its generator, never on the other rows. One host sync, plus one per
    top_p candidate width (to find nuclei that outgrew their candidates).
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"sample: logits must be [B, vocab] with B = len(params) = len(generators), got "
            f"{tuple(logits.shape)}, {len(params)}, {len(generators)}"
        )
    tokens = logits.argmax(dim=-1)  # [B]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens.tolist()
    device, vocab = logits.device, logits.shape[1]
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(device)  # [R]
    temps = torch.tensor([params[i].temperature for i in rows], device=device)  # [R]
    x = logits[rows].float() / temps[:, None]  # [R, vocab]
    picked = torch.empty(len(rows), dtype=torch.int64, device=device)  # [R] token ids

    # Each row's candidate width depends on its own parameters only, and rows of equal width share
    # one topk call, so a row's token (tie order included) never depends on the other rows.
    plain: list[int] = []
    groups: dict[int, list[int]] = {}  # width -> rows
    for r, i in enumerate(rows):
        p = params[i]
        if p.top_k and p.top_k < vocab:
            groups.setdefault(p.top_k, []).append(r)
        elif p.top_p < 1.0:
            groups.setdefault(min(vocab, TOP_P_CANDIDATES), []).append(r)
        else:
            plain.append(r)
    if plain:
        picked[plain] = _invert_cdf(torch.softmax(x[plain], dim=-1), u[plain])
    has_top_k = torch.tensor(
        [bool(params[i].top_k) and params[i].top_k < vocab for i in rows], device=device
    )  # [R]
    top_p = torch.tensor([params[i].top_p for i in rows], device=device)  # [R]
    full = groups.pop(vocab, [])
    for width, group in groups.items():
        tok, covered = _sample_truncated(x[group], u[group], width, has_top_k[group], top_p[group])
        picked[group] = tok
        full += [r for r, ok in zip(group, covered.tolist()) if not ok]
    if full:  # top_p-only rows whose nucleus outgrew their candidates: the whole sorted vocabulary
        picked[full] = _sample_truncated(x[full], u[full], vocab, has_top_k[full], top_p[full])[0]
    tokens[rows] = picked
    return tokens.tolist()


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], num_top: Sequence[int]
) -> list[dict[int, float]]:
    """Log-probabilities under log_softmax(logits) in float32, one dict per row: the chosen token's
    and those of the row's num_top[i] most likely tokens, token id -> logprob (vLLM's Logprob map).

    logits: [R, vocab] raw model logits; tokens, num_top: length R. One host sync.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [R, vocab]
    index = torch.tensor(tokens, dtype=torch.int64, device=logits.device)[:, None]  # [R, 1]
    chosen = logp.gather(1, index)[:, 0]  # [R]
    k = max(num_top, default=0)
    top_lp, top_ids = torch.topk(logp, k, dim=-1) if k else (chosen[:, None], index)  # [R, k]
    chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
    out = []
    for r, token in enumerate(tokens):
        entry = dict(zip(top_ids[r][: num_top[r]], top_lp[r][: num_top[r]]))
        entry[token] = chosen[r]
        out.append(entry)
    return out


def _sample_truncated(
    x: torch.Tensor,
    u: torch.Tensor,
    width: int,
    has_top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [R, vocab] tempered logits; u: [R] uniforms; width: candidates per row (the rows' top_k,
    or a top_p search width); has_top_k, top_p: [R]. Returns (tokens [R], covered [R] bool):
    covered is False for a top_p-only row whose nucleus reaches past its candidates (redo it with
    width = vocab)."""
    values, order = torch.topk(x, width, dim=-1, sorted=True)  # [R, width] descending
    # top_k renormalises over its k tokens; top_p alone needs probabilities over the whole vocabulary.
    log_z = torch.where(
        has_top_k, torch.logsumexp(values, dim=-1), torch.logsumexp(x, dim=-1)
    )  # [R]
    probs = torch.exp(values - log_z[:, None])  # [R, k]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    covered = has_top_k | (probs.sum(dim=-1) >= top_p)
    # Keep a token while the mass before it is below top_p: the top token always survives.
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    pick = _invert_cdf(probs, u)  # [R] ranks
    return order.gather(1, pick[:, None])[:, 0], covered


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: [R, n] non-negative (unnormalised is fine); u: [R] in [0, 1). Returns [R] indices
    j with cdf[j - 1] <= u * total < cdf[j], never an index of zero probability."""
    cdf = torch.cumsum(probs, dim=-1)  # [R, n]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # [R]
    # Rounding can land past the last token with probability > 0: clamp to it.
    n = probs.shape[1]
    last = n - 1 - torch.argmax(torch.flip(probs > 0, dims=[1]).to(torch.uint8), dim=-1)
    return torch.minimum(pick, last)
