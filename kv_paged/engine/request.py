"""The Engine's units of work: a Request (one prompt, its parameters, its n samples or beams), its
Sequences (prompt + output tokens, how many have KV in the pool), and the Scheduler's per-step batch.

Design decision: these are plain records. The Scheduler alone moves sequences between states and
talks to the BlockManager; the Engine reads them to build outputs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kv_paged.beam_search import BeamSearch
from kv_paged.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int
    stop_ids: frozenset[int]
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: children exist once the prompt is computed
    cache_salt: str | None = None  # prefix-cache tenant: the BlockManager's extra_key
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    # time.perf_counter() stamps: added, first token of any sample sampled, last sample finished.
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    # Beam search (BeamSearchParams): the selection state, the live beams in its order, and each
    # beam's next-token log-probabilities [vocab] once computed (a step needs every beam's).
    beam: BeamSearch | None = None
    beams: list[Sequence] = field(default_factory=list)
    beam_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.error is not None or (
            self.forked and all(s.status is SeqStatus.FINISHED for s in self.seqs)
        )

    @property
    def max_seqs(self) -> int:
        """Sequence slots the request may need at once, held from admission on: beam_width for
        beam search, n for an n > 1 request that has not forked yet, else 1."""
        if self.beam is not None:
            return self.beam.params.beam_width
        return self.params.n if not self.forked else 1


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + output
    generator: torch.Generator
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in the pool
    num_in_manager: int = 0  # tokens the block manager holds slots for
    finish_reason: str | None = None
    num_preemptions: int = 0
    # SamplingParams.logprobs: one {token id: logprob} per generated token, and their sum.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def idle(self) -> bool:
        """A beam whose next-token row is computed, waiting for the rest of its group."""
        return self.seq_id in self.request.beam_rows

    @property
    def is_decode(self) -> bool:
        """The newest token (sampled last step) is the only one left; it has no slot yet."""
        return (
            self.num_in_manager == len(self.token_ids) - 1
            and self.num_computed == self.num_in_manager
        )


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # positions [start, end) are computed this step
    end: int

    @property
    def samples(self) -> bool:
        return self.end == len(self.seq.token_ids)


@dataclass
class ScheduledBatch:
    entries: list[ScheduledSeq]  # decode rows first, then prefill chunks
    slot_mapping: torch.Tensor  # int64 [T]: every entry's new positions' slots, in entry order
    block_tables: torch.Tensor | None  # int32 [len(entries), max_blocks], -1 padded; None if empty
    copies: torch.Tensor  # int64 [n, 2] copy-on-write (src, dst) block pairs to apply first
    num_prefill_tokens: int
    num_decode_tokens: int
    preempted: list[Sequence]
