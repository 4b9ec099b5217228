"""What kv_paged.Engine returns: one RequestOutput per request and step, holding one
CompletionOutput per sample (vLLM's names and fields where they mean the same thing), and the
OutputProcessor that builds them (streaming deltas, detokenized text, stop strings).

Design decision: outputs are plain snapshots (copied token lists), so a caller may keep them while
the engine goes on; new_token_ids carries the delta since the request's previous output (streaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kv_paged.engine.request import Request, Sequence


@dataclass
class CompletionOutput:
    """One of a request's n samples. new_token_ids: tokens generated since the previous step output."""

    index: int
    token_ids: list[int]
    new_token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    text: str | None = None
    # SamplingParams.logprobs set: per generated token {token id: logprob} (the chosen token and
    # the top ones), and the chosen tokens' summed logprob.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    # Beam search: the hypothesis' score, its summed logprobs / length ** length_penalty
    # (transformers' sequences_scores); outputs come best first.
    score: float | None = None


@dataclass
class RequestMetrics:
    """Latency of one request, in seconds (time.perf_counter() stamps, as vLLM's RequestMetrics)."""

    arrival_time: float
    first_token_time: float | None  # None until the first token of any sample is sampled
    finished_time: float | None  # None until every sample finished

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # why the request could not be served (it then has no outputs)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    metrics: RequestMetrics | None = None

    @property
    def token_ids(self) -> list[int]:
        """The first sample's tokens (the only one when n = 1)."""
        return self.outputs[0].token_ids if self.outputs else []


class OutputProcessor:
    """Builds RequestOutputs; remembers how much of each sample was already streamed.

    tokenizer: optional (anything with decode(ids, skip_special_tokens=...)); fills the text.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._emitted: dict[int, int] = {}  # seq_id -> output tokens already in an output

    def build(self, req: Request) -> RequestOutput:
        outs = []
        if req.error is None and req.beam is not None:
            outs = self._beam_outputs(req)
        elif req.error is None:
            for seq in req.seqs if req.forked else req.seqs[:1]:
                toks = seq.output_token_ids
                done = self._emitted.get(seq.seq_id, 0)
                self._emitted[seq.seq_id] = len(toks)
                with_logprobs = req.params.logprobs is not None
                outs.append(
                    CompletionOutput(
                        index=seq.index,
                        token_ids=list(toks),
                        new_token_ids=list(toks[done:]),
                        finish_reason=seq.finish_reason,
                        text=self._text(seq) if self.tokenizer is not None else None,
                        logprobs=list(seq.logprobs) if with_logprobs else None,
                        cumulative_logprob=seq.cumulative_logprob if with_logprobs else None,
                    )
                )
        return RequestOutput(
            req.request_id,
            list(req.prompt_token_ids),
            outs,
            req.finished,
            req.error,
            req.num_cached_tokens,
            RequestMetrics(req.arrival_time, req.first_token_time, req.finished_time),
        )

    def _beam_outputs(self, req: Request) -> list[CompletionOutput]:
        """The search's best hypotheses once it is done (finish_reason "stop" when one ends in an
        eos token, else "length"); the live beams, unscored, if it was aborted before."""
        beam = req.beam
        if not beam.done:
            hyps = [(toks, None) for toks in beam.running if toks]
        else:
            hyps = beam.results()
        outs = []
        for i, (toks, score) in enumerate(hyps):
            if score is None:
                reason = req.beams[0].finish_reason if req.beams else None
            else:
                reason = "stop" if toks and toks[-1] in beam.eos_token_ids else "length"
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
            cumulative = None
            if score is not None and toks:
                cumulative = score * len(toks) ** beam.params.length_penalty
            outs.append(
                CompletionOutput(
                    index=i,
                    token_ids=list(toks),
                    new_token_ids=list(toks),
                    finish_reason=reason,
                    text=text,
                    cumulative_logprob=cumulative,
                    score=score,
                )
            )
        return outs

    def forget(self, req: Request) -> None:
        """The request finished: drop its streaming state."""
        for seq in req.seqs:
            self._emitted.pop(seq.seq_id, None)

    def _text(self, seq: Sequence) -> str:
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        stops = seq.request.params.stop
        if not stops:
            return text
        if seq.finish_reason == "stop":
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
            return text[:cut]
        if seq.finish_reason is None:
            # Still running: hold back a tail that may be the start of a stop string, so streamed
            # text never shows what the final text will not (vLLM does the same).
            held = max(
                (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
            return text[: len(text) - held]
        return text


def hit_stop_string(
    tokenizer: Any, token_ids: list[int], prompt_len: int, new_token: int, stops: list[str]
) -> bool:
    """Whether appending new_token to a sample (token_ids = prompt + output so far) completes one of
    its stop strings.

    The text before new_token cannot hold a stop string (the sample would have stopped then), so it
    is enough to look at the tail that ends with new_token, as long as the tail's text is longer
    than the longest stop string. Starts with len(stop) + 2 tokens and doubles while the text is too
    short (byte-level tokens of CJK or emoji, skipped special tokens): O(1) per token in practice,
    neither copying nor decoding the whole output each time.
    """
    longest = max(map(len, stops))
    num_output = len(token_ids) - prompt_len
    window = longest + 2
    while True:
        tail = token_ids[len(token_ids) - min(window - 1, num_output) :] + [new_token]
        text = tokenizer.decode(tail, skip_special_tokens=True)
        # One character more than the longest stop string: the tail may start inside a character.
        if len(text) > longest or window > num_output:
            return any(stop in text for stop in stops)
        window *= 2
