"""What kv_paged.Engine returns: one RequestOutput per request and step, holding one
CompletionOutput per sample (vLLM's names and fields where they mean the same thing).

Design decision: outputs are plain snapshots (copied token lists), so a caller may keep them while
the engine goes on; new_token_ids carries the delta since the request's previous output (streaming).
"""

from __future__ import annotations

from dataclasses import dataclass


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
