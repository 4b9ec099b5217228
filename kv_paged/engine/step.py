"""The fallible half of an Engine step: the forward, the NaN/inf check, sampling, log-probabilities,
stop strings and beam selection, for one ScheduledBatch.

Design decision: run_step changes nothing the engine keeps except sampler generators and beam
searches, and restores both if anything raises (a model error, out of memory, a tokenizer error,
Ctrl-C); the caller then requeues the batch. What it returns is applied by Scheduler.postprocess,
which only does bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kv_paged.beam_search import BeamSearch
from kv_paged.engine.outputs import hit_stop_string
from kv_paged.engine.request import Request, ScheduledBatch, Sequence
from kv_paged.engine.sampling import sample, token_logprobs


@dataclass
class StepPlan:
    """The inputs of one step's forward, ModelRunner.forward's arguments: every sequence's new
    tokens and first position, the slot mapping, block tables, copy-on-write pairs and the rows
    that sample. Under tensor parallelism the driver sends it to every rank."""

    token_chunks: list[list[int]]
    starts: list[int]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    copies: torch.Tensor
    sampling_rows: list[int]

    @classmethod
    def of(cls, batch: ScheduledBatch) -> StepPlan:
        entries = batch.entries
        return cls(
            token_chunks=[e.seq.token_ids[e.start : e.end] for e in entries],
            starts=[e.start for e in entries],
            slot_mapping=batch.slot_mapping,
            block_tables=batch.block_tables,
            copies=batch.copies,
            sampling_rows=[i for i, e in enumerate(entries) if e.samples],
        )

    def args(self) -> tuple:
        return (
            self.token_chunks,
            self.starts,
            self.slot_mapping,
            self.block_tables,
            self.copies,
            self.sampling_rows,
        )


@dataclass
class StepResult:
    """What one step produced, not yet applied to any sequence."""

    # Sampled rows: sequence, its new token, whether a stop string ends it there.
    seqs: list[Sequence] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stop_hits: list[bool] = field(default_factory=list)
    # SamplingParams.logprobs: (sequence, its new token, {token id: logprob}).
    logprobs: list[tuple[Sequence, int, dict[int, float]]] = field(default_factory=list)
    # Beam search rows: each beam's next-token log-probabilities [vocab], and the searches that
    # stepped (request, parents: new beam i continues old beam parents[i]).
    beam_rows: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)
    beam_steps: list[tuple[Request, list[int]]] = field(default_factory=list)
    # Requests whose logits held NaN or inf: request -> why (they finish with that error).
    failed: dict[Request, str] = field(default_factory=dict)
    forward_time: float = 0.0  # seconds of forward and sampling
    done_time: float = 0.0  # time.perf_counter() once sampling finished: first-token stamps


def run_step(forward, batch: ScheduledBatch, plan: StepPlan, tokenizer) -> StepResult:
    """Runs batch's forward and samples every row that samples. forward(plan) returns the logits
    of plan's sampling rows (ModelRunner.forward, or the tensor-parallel driver's). Raises
    whatever the forward, the sampler or the tokenizer raise, with generators and beam searches
    as they were before the call."""
    entries = batch.entries
    sampling_rows = plan.sampling_rows
    # Rows to sample: one per sequence, except an unforked n > 1 request, which samples all n of
    # its sequences from the prompt's logits row (each with its own generator). A beam search
    # request's rows are not sampled: their log-probabilities go to its search.
    row_index, row_seqs, beam_index, beam_seqs = [], [], [], []
    for r, i in enumerate(sampling_rows):
        seq = entries[i].seq
        req = seq.request
        if req.beam is not None:
            beam_index.append(r)
            beam_seqs.append(seq)
            continue
        group = req.seqs if not req.forked else [seq]
        row_index += [r] * len(group)
        row_seqs += group
    drawing = [s for s in row_seqs if not s.request.params.greedy]  # greedy rows draw nothing
    generator_states = [s.generator.get_state() for s in drawing]
    beam_undo: list[tuple[Request, BeamSearch]] = []  # searches as they were before this step
    result = StepResult()
    t0 = time.perf_counter()
    try:
        logits = forward(plan)  # [len(sampling_rows), vocab]
        result.failed = _non_finite_requests(logits, entries, sampling_rows)
        if result.failed:  # their rows are not sampled
            row_index, row_seqs = _drop(result.failed, row_index, row_seqs)
            beam_index, beam_seqs = _drop(result.failed, beam_index, beam_seqs)
        tokens = (
            sample(
                logits[row_index],
                [s.request.params for s in row_seqs],
                [s.generator for s in row_seqs],
            )
            if row_seqs
            else []
        )
        want = [j for j, seq in enumerate(row_seqs) if seq.request.params.logprobs is not None]
        if want:
            entries_lp = token_logprobs(
                logits[[row_index[j] for j in want]],
                [tokens[j] for j in want],
                [row_seqs[j].request.params.logprobs for j in want],
            )
            result.logprobs = [(row_seqs[j], tokens[j], e) for j, e in zip(want, entries_lp)]
        # The tokenizer is user code too: stop strings are decided here, before any state changes.
        result.stop_hits = [
            bool(seq.request.params.stop)
            and hit_stop_string(
                tokenizer, seq.token_ids, seq.prompt_len, token, seq.request.params.stop
            )
            for seq, token in zip(row_seqs, tokens)
        ]
        result.seqs, result.tokens = row_seqs, tokens
        if beam_seqs:
            rows = torch.log_softmax(logits[beam_index].float(), dim=-1)
            result.beam_rows = list(zip(beam_seqs, rows))
            # Last: it changes searches (beam_undo restores them).
            result.beam_steps = _select_beams(result.beam_rows, beam_undo)
    except BaseException:
        for s, state in zip(drawing, generator_states):
            s.generator.set_state(state)
        for req, before in beam_undo:
            req.beam = before
        raise
    result.done_time = time.perf_counter()
    result.forward_time = result.done_time - t0
    return result


def _non_finite_requests(
    logits: torch.Tensor, entries: list, sampling_rows: list[int]
) -> dict[Request, str]:
    """Requests whose logits row holds NaN or +inf, or no finite value (nothing to sample):
    request -> why. logits: [len(sampling_rows), vocab]. One reduction (a row's max is NaN, +inf
    or -inf exactly then) and one host sync."""
    if logits.numel() == 0:
        return {}
    bad = ~torch.isfinite(logits.max(dim=-1).values)
    failed = {}
    for r in bad.nonzero().flatten().tolist():
        req = entries[sampling_rows[r]].seq.request
        failed[req] = (
            f"request {req.request_id}: the model's logits hold NaN or inf (nothing to sample "
            "from); the request was stopped"
        )
    return failed


def _select_beams(
    beam_rows: list[tuple[Sequence, torch.Tensor]], undo: list[tuple[Request, BeamSearch]]
) -> list[tuple[Request, list[int]]]:
    """Runs a beam search step for each request whose live beams all have their next-token
    log-probabilities, from this step's rows or earlier ones. Returns (request, parents) per
    request stepped. Changes only request.beam, after putting its snapshot in `undo` (the
    caller's, so an interrupt here still finds it)."""
    new = {seq.seq_id: row for seq, row in beam_rows}
    stepped = []
    for req in dict.fromkeys(seq.request for seq, _ in beam_rows):
        rows = [new.get(s.seq_id, req.beam_rows.get(s.seq_id)) for s in req.beams]
        if any(row is None for row in rows):
            continue  # some beams wait for the token budget or recompute after preemption
        undo.append((req, req.beam.snapshot()))
        stepped.append((req, req.beam.step(torch.stack(rows))))
    return stepped


def _drop(failed: dict[Request, str], index: list[int], seqs: list[Sequence]):
    """index, seqs without the rows of failed requests."""
    kept = [(i, s) for i, s in zip(index, seqs) if s.request not in failed]
    return [i for i, _ in kept], [s for _, s in kept]
