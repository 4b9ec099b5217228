"""Beam search for one request, reproducing transformers' ``GenerationMixin._beam_search``
(decoder-only, batch 1, plain log_softmax, no logits processors) token for token and score for score.

Design decision: the engine owns the model and the KV cache; this module only sees the last-position
log-probabilities of each running beam and answers which (parent beam, token) pairs live on. It replays
transformers' tensor ops on a batch of one, in the same order and in float32, so torch.topk ties break
the same way; only the token lists are kept as Python lists.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_NEG = -1.0e9  # transformers' "minus infinity": masked candidates and empty finished slots


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class BeamSearchParams:
    """How to beam-search one request (transformers' generate names and meanings).

    beam_width: beams kept per step (transformers' num_beams), >= 1. Note generate() with num_beams=1
      runs greedy search instead; this class always runs the beam search algorithm.
    max_new_tokens: tokens to generate at most (>= 1); the eos token counts.
    length_penalty: a finished hypothesis scores sum(logprobs) / generated_len ** length_penalty.
    early_stopping: True (stop once beam_width hypotheses finished), False (stop when the best running
      beam, penalised at its current length, cannot beat the worst finished one) or "never" (as False,
      but penalised at max_new_tokens when length_penalty > 0).
    num_return_sequences: hypotheses returned by results(), 1 <= n <= beam_width.
    ignore_eos: eos is an ordinary token; beams only finish at max_new_tokens.
    """

    beam_width: int
    max_new_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(
                f"BeamSearchParams: beam_width must be an int >= 1, got {self.beam_width!r}"
            )
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"BeamSearchParams: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"
            )
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"BeamSearchParams: length_penalty must be a finite float, got {lp!r}")
        es = self.early_stopping
        if not (es is True or es is False or (isinstance(es, str) and es == "never")):
            raise ValueError(
                f"BeamSearchParams: early_stopping must be True, False or 'never', got {es!r}"
            )
        n = self.num_return_sequences
        if not _is_int(n) or not 1 <= n <= self.beam_width:
            raise ValueError(
                f"BeamSearchParams: num_return_sequences must be an int in [1, beam_width="
                f"{self.beam_width}], got {n!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(
                f"BeamSearchParams: ignore_eos must be a bool, got {self.ignore_eos!r}"
            )


class BeamSearch:
    """The beam search state of one request.

    running: the output tokens (prompt excluded) of each running beam; starts as [[]] (the prompt
      alone) and holds beam_width beams after the first step, [] once done.
    Drive it with step() until done, then read results().
    """

    def __init__(self, params: BeamSearchParams, eos_token_ids: Sequence[int] = ()) -> None:
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"BeamSearch: params must be a BeamSearchParams, got {params!r}")
        eos = () if params.ignore_eos else tuple(eos_token_ids)
        if not all(_is_int(t) and t >= 0 for t in eos):
            raise ValueError(f"BeamSearch: eos_token_ids must be ints >= 0, got {eos_token_ids!r}")
        self.params = params
        # Duplicates count, as in transformers (n_eos_tokens = eos_token_id.shape[0]).
        self.eos_token_ids: tuple[int, ...] = eos
        nb = params.beam_width
        # Enough candidates that beam_width of them survive even if the best ones all end in eos.
        self._beams_to_keep = max(2, 1 + len(eos)) * nb
        self.running: list[list[int]] = [[]]
        self.num_steps = 0  # tokens generated so far (transformers' cur_len - decoder_prompt_len)
        # transformers' state with its batch dimension of 1.
        self._running_scores = torch.full((1, nb), _NEG, dtype=torch.float32)
        self._running_scores[0, 0] = 0.0  # only the first of the num_beams identical copies is live
        self._finished: list[list[int]] = [[] for _ in range(nb)]
        self._finished_scores = torch.full((1, nb), _NEG, dtype=torch.float32)
        self._is_finished = torch.zeros((1, nb), dtype=torch.bool)
        self._improvable = torch.ones(
            (1, 1), dtype=torch.bool
        )  # is_early_stop_heuristic_unsatisfied
        self._done = False

    def snapshot(self) -> BeamSearch:
        """A copy to restore if the step that follows is undone. Shallow is enough: step() never
        changes a list or tensor of the state in place, it rebinds the attributes."""
        return copy.copy(self)

    @property
    def done(self) -> bool:
        """True once transformers' loop would stop; step() must not be called any more."""
        return self._done

    def step(self, logprobs: torch.Tensor) -> list[int]:
        """Advance by one token.

        logprobs: float [len(self.running), vocab], log_softmax of each running beam's last logits
          (computed in float32 here whatever its dtype; its device is used for the tensor ops).
        Returns parents: for each new running beam i, the index of the old running beam it continues
        (its new token is self.running[i][-1]); [] when this step finished the search (running is
        then [] too).
        """
        if self._done:
            raise RuntimeError("BeamSearch.step: the search is done; read results()")
        rows = len(self.running)
        if (
            not isinstance(logprobs, torch.Tensor)
            or logprobs.dim() != 2
            or logprobs.shape[0] != rows
            or not logprobs.is_floating_point()
        ):
            got = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs)
            raise ValueError(
                f"BeamSearch.step: logprobs must be a float tensor of shape [len(running)={rows}, "
                f"vocab], got {got}"
            )
        p = self.params
        nb, k, vocab = p.beam_width, self._beams_to_keep, logprobs.shape[1]
        if nb * vocab < k:
            raise ValueError(
                f"BeamSearch.step: vocab={vocab} is too small: beam_width * vocab must be >= {k}"
            )
        dev = logprobs.device
        log_probs = logprobs.detach().to(torch.float32)
        first = self.num_steps == 0
        beams = [[] for _ in range(nb)] if first else self.running
        if first:  # transformers runs num_beams identical copies of the prompt
            log_probs = log_probs.expand(nb, vocab)
        running_scores = self._running_scores.to(dev)
        finished_scores = self._finished_scores.to(dev)
        is_finished = self._is_finished.to(dev)
        improvable = self._improvable.to(dev)

        # b. accumulated log-probabilities of all num_beams * vocab continuations
        acc = (log_probs.reshape(1, nb, vocab) + running_scores[:, :, None]).reshape(1, -1)
        # c. top-K continuations
        topk_lp, topk_idx = torch.topk(acc, k=k)
        topk_beam = topk_idx // vocab
        topk_tok = topk_idx % vocab
        # d. stopping criteria: max length (every candidate at once) or an eos token
        gen_len = self.num_steps + 1  # tokens in each candidate = cur_len + 1 - decoder_prompt_len
        hits = torch.full((1, k), gen_len >= p.max_new_tokens, dtype=torch.bool, device=dev)
        if self.eos_token_ids:
            hits = hits | torch.isin(topk_tok, torch.tensor(self.eos_token_ids, device=dev))
        # e. next running beams: the best num_beams candidates that did not stop
        topk_running_lp = topk_lp + hits.to(torch.float32) * _NEG
        next_idx = torch.topk(topk_running_lp, k=nb)[1]
        running_scores = torch.take_along_dim(topk_running_lp, next_idx, dim=1)
        # f. finished hypotheses: only stopped candidates among the top num_beams may enter
        top_mask = torch.arange(k, device=dev) < nb
        just_finished = hits & top_mask[None, :]
        fin_lp = topk_lp / (gen_len**p.length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (p.early_stopping is True)
        fin_lp += full.to(torch.float32) * _NEG
        fin_lp += (~improvable).to(torch.float32) * _NEG
        fin_lp += (~just_finished) * _NEG
        merged_scores = torch.cat((finished_scores, fin_lp), dim=1)
        merged_is_finished = torch.cat((is_finished, just_finished), dim=1)
        keep = torch.topk(merged_scores, k=nb)[1]
        finished_scores = torch.take_along_dim(merged_scores, keep, dim=1)
        is_finished = torch.take_along_dim(merged_is_finished, keep, dim=1)

        # g. stopping condition of the whole search
        self.num_steps = gen_len
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_len = p.max_new_tokens
        else:
            best_len = gen_len
        best_running = running_scores[:, :1] / (best_len**p.length_penalty)
        worst_finished = torch.where(
            is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], _NEG
        )
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        all_finished = bool(torch.all(is_finished))
        self._done = not (
            bool(torch.any(improvable))
            and not (all_finished and p.early_stopping is True)
            and not bool(torch.all(hits))
        )

        cand_beam, cand_tok = topk_beam[0].tolist(), topk_tok[0].tolist()
        cands = [beams[b] + [t] for b, t in zip(cand_beam, cand_tok)]
        merged = self._finished + cands
        self._finished = [merged[i] for i in keep[0].tolist()]
        self._finished_scores, self._is_finished = finished_scores, is_finished
        self._running_scores, self._improvable = running_scores, improvable
        if self._done:
            self.running = []
            return []
        nxt = next_idx[0].tolist()
        self.running = [cands[i] for i in nxt]
        return [0 if first else cand_beam[i] for i in nxt]

    def results(self) -> list[tuple[list[int], float]]:
        """Best first, num_return_sequences of (output tokens, score): transformers' sequences (prompt
        and padding stripped) and sequences_scores once done; the best hypotheses so far before.
        With a vocabulary too small to give beam_width live continuations at the first step, some
        hypotheses descend from transformers' -1e9-scored copies of the prompt and score about
        -1e9 / length, as they do in transformers; a slot never filled reads ([], -1e9)."""
        n = self.params.num_return_sequences
        scores = self._finished_scores[0, :n].tolist()
        return [(list(self._finished[i]), float(scores[i])) for i in range(n)]


def continuations(parents: Sequence[int], num_old: int) -> tuple[list[bool], list[int]]:
    """How new rows continue old ones (new row i continues old row parents[i]): the first
    continuation of an old row keeps its sequence and later ones fork it (forks[i] True); old rows
    nobody continues are dropped. Returns (forks, dropped old rows). Shared by the Engine's beams
    and PagedCache's reorder_cache, which both turn this into BlockManager forks and frees."""
    seen: set[int] = set()
    forks = []
    for p in parents:
        forks.append(p in seen)
        seen.add(p)
    return forks, [i for i in range(num_old) if i not in seen]
