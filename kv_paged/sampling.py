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


@dataclass
class SamplingParams:
    """How to generate one request (the vLLM names and meanings).

    max_new_tokens: tokens to generate per sample (>= 1).
    temperature: 0 = greedy (argmax); > 0 divides the logits before softmax.
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1 = off).
    top_k: keep the k most likely tokens (0 or None = off).
    n: independent samples of the same prompt; they share the prompt's KV blocks (copy-on-write).
    seed: the request's seed; None draws one from torch's global generator at add_request time
      (so torch.manual_seed makes a run reproducible).
    stop_token_ids: a sample finishes (finish_reason "stop") after generating any of these; the stop
      token is kept in the output, as transformers' generate keeps eos.
    ignore_eos: by default the model's generation_config.eos_token_id also stops a sample.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
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
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0.0:
            raise ValueError(
                f"SamplingParams: temperature must be a number >= 0, got {self.temperature!r}"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(
                f"SamplingParams: top_k must be None or an int >= 0, got {self.top_k!r}"
            )
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_set(self, eos_token_ids: Sequence[int] = ()) -> frozenset[int]:
        return self._stop_set if self.ignore_eos else self._stop_set | frozenset(eos_token_ids)


def make_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample `index` of a request seeded with `seed` (CPU: results match across devices)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + index) & _SEED_MASK)
    return g


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token per row.

    logits: [B, vocab] (any float dtype, any device); params, generators: length B.
    Greedy rows take argmax. The others, in float32 on the CPU and vectorised: sort each row once,
    keep its top_k, softmax, keep the top_p nucleus, then invert the CDF at one uniform drawn from
    the row's own generator, so a row's token depends only on its logits and its generator.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"sample: logits must be [B, vocab] with B = len(params) = len(generators), got "
            f"{tuple(logits.shape)}, {len(params)}, {len(generators)}"
        )
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    vocab = logits.shape[1]
    sub = logits[rows].float().cpu()  # [R, vocab]
    temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32)  # [R]
    top_k = torch.tensor([params[i].top_k or vocab for i in rows]).clamp_(max=vocab)  # [R]
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32)  # [R]
    sorted_logits, order = torch.sort(sub / temps[:, None], dim=-1, descending=True)  # [R, vocab]
    rank = torch.arange(vocab)[None, :]  # [1, vocab]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # [R, vocab], descending
    # Keep a token while the mass before it is below top_p: the top token always survives.
    probs = probs.masked_fill((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None], 0.0)
    cdf = torch.cumsum(probs, dim=-1)  # [R, vocab]
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows])  # [R]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # [R]
    # Rounding can land past the last kept token: clamp to it.
    pick = torch.minimum(pick, (probs > 0).sum(dim=-1) - 1)
    tokens = order.gather(1, pick[:, None])[:, 0].tolist()
    for r, i in enumerate(rows):
        out[i] = tokens[r]
    return out
