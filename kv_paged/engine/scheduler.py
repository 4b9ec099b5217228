"""Continuous-batching scheduler of kv_paged.Engine: waiting / running queues over one BlockManager,
the only caller of that BlockManager (allocate, append, fork, mark computed, free).

Design decision: a sequence's tokens are prompt + output, and `num_computed` of them have their KV
in the pool; every step computes a slice [num_computed, end) of each scheduled sequence (a prefill
chunk, or the one newest token for a decode row), all packed into one forward. Preemption frees a
sequence's blocks and resets num_computed to 0, so recompute is just a longer prefill (cheap with
prefix caching) and the output cannot change.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import torch

from kv_paged.beam_search import continuations
from kv_paged.cache import blocks_needed
from kv_paged.engine.request import Request, ScheduledBatch, ScheduledSeq, SeqStatus, Sequence
from kv_paged.engine.sampling import make_generator
from kv_paged.engine.step import StepResult


@dataclass
class StepOutcome:
    """What Scheduler.postprocess did with a step's result."""

    touched: list[Request]  # requests that got tokens or finished, each once
    forks: int  # sequences forked (n > 1 samples, beams)
    # A beam search step that failed (an interrupt): its request finished with an error; the
    # Engine raises this once the step is recorded.
    failure: BaseException | None = None


class Scheduler:
    """Admits, chunks and preempts sequences, and applies what each step sampled (postprocess);
    the Engine runs the forward and samples (kv_paged/engine/step.py).

    max_model_len: a sequence finishes ("length") when it holds this many tokens.
    """

    def __init__(
        self,
        block_manager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        watermark: float = 0.01,
    ):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self._seq_ids = itertools.count()
        # Blocks kept free at admission so fresh decodes do not immediately preempt (vLLM's watermark).
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0

    def create_sequences(self, req: Request) -> None:
        """req's sequences: its n samples (the ones past the first fork from it once the prompt is
        computed), or the first beam of a beam search (req.beam set)."""
        req.forked = req.params.n == 1
        for i in range(1 if req.beam is not None else req.params.n):
            req.seqs.append(self._new_sequence(req, list(req.prompt_token_ids)))
        if req.beam is not None:
            req.beams = [req.seqs[0]]

    def _new_sequence(self, req: Request, token_ids: list[int]) -> Sequence:
        index = len(req.seqs)
        return Sequence(next(self._seq_ids), req, index, token_ids, make_generator(req.seed, index))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _send_back(self, seq: Sequence) -> None:
        """seq loses its blocks and goes to the front of the queue, to be recomputed from scratch."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_in_manager = 0
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._send_back(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def requeue(self, entries: list[ScheduledSeq]) -> None:
        """Undoes a step whose forward or sampling failed: each entry's sequence forgets the
        blocks marked computed at scheduling (their K/V may never have been written), loses its
        blocks and goes back to the front of the queue, in order, to be recomputed (not counted
        as a preemption)."""
        for e in entries:
            if self.bm.has_seq(e.seq.seq_id):
                self.bm.forget_computed(e.seq.seq_id, e.start)
        for e in reversed(entries):
            self._send_back(e.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child (a copy of parent's tokens) continues parent: it shares parent's blocks when parent
        is resident (copy-on-write on the first append into a shared partial block), else it
        waits beside parent to be computed. Runs right after parent's row sampled."""
        if parent.status is SeqStatus.RUNNING:
            self.bm.fork(parent.seq_id, child.seq_id)
            child.num_computed, child.num_in_manager = parent.num_computed, parent.num_in_manager
            child.status = SeqStatus.RUNNING
            at = self.running.index(parent) + 1  # after parent's earlier children: admission order
            while at < len(self.running) and self.running[at].request is parent.request:
                at += 1
            self.running.insert(at, child)
        else:
            child.status = SeqStatus.WAITING
            child.num_computed = child.num_in_manager = 0
            at = self.waiting.index(parent) + 1 if parent in self.waiting else 0
            while at < len(self.waiting) and self.waiting[at].request is parent.request:
                at += 1
            self.waiting.insert(at, child)

    def abort_request(self, request: Request) -> None:
        for seq in request.seqs:
            if seq in self.waiting:
                self.waiting.remove(seq)
            if seq.status is not SeqStatus.FINISHED:
                self.finish(seq, "abort")

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        entries: list[ScheduledSeq] = []
        slot_parts: list[torch.Tensor] = []  # in entry order

        # 1) Decode rows of running sequences, oldest first, one token each.
        decodes = [seq for seq in self.running if seq.is_decode][:budget]
        if len(decodes) <= self.bm.num_free_blocks:
            # Each append takes at most one block (a new one, or a copy-on-write copy), so all fit:
            # one batched call instead of two per sequence.
            preempted: list[Sequence] = []
            if decodes:
                slot_parts.append(
                    self.bm.append_slots(
                        [seq.seq_id for seq in decodes], [seq.token_ids[-1] for seq in decodes]
                    )
                )
        else:
            decodes, preempted, slots = self._append_preempting(decodes)
            slot_parts.append(torch.tensor(slots, dtype=torch.int64))
        for seq in decodes:
            seq.num_in_manager += 1
            pos = len(seq.token_ids) - 1
            entries.append(ScheduledSeq(seq, pos, pos + 1))
        budget -= len(decodes)
        scheduled = {seq.seq_id for seq in decodes}

        # 2) The next chunk of each running sequence still in prefill, oldest first.
        prefill = 0
        for seq in self.running:
            if budget == 0:
                break
            if seq.seq_id in scheduled or seq.is_decode:
                continue  # decode rows that did not fit the token budget wait for the next step
            if seq.idle:
                continue
            chunk = min(len(seq.token_ids) - seq.num_computed, budget)
            start = seq.num_computed
            self._add_prefill(entries, slot_parts, seq, start, start + chunk)
            prefill += chunk
            budget -= chunk

        # 3) Admit waiting sequences while blocks, sequence slots and token budget last; never right
        # after a preemption (the pool is full, admitting would only thrash).
        # An n > 1 or beam search request holds its sequence slots from admission on (Request.max_seqs),
        # although its samples or beams only fork once the prompt is computed.
        live: dict[Request, int] = {}
        for seq in self.running:
            live[seq.request] = live.get(seq.request, 0) + 1
        occupied = sum(max(n, req.max_seqs) for req, n in live.items())
        held_back = preempted  # sequences that lost their blocks this step (none are re-admitted)
        if not entries and not preempted:
            preempted = self._make_room_for_waiting()
        while budget > 0 and not held_back:
            seq = next((s for s in self.waiting if not s.idle), None)
            if seq is None:
                break
            req = seq.request
            have = live.get(req, 0)  # slots the request holds already: max(have, max_seqs)
            width = max(have + 1, req.max_seqs) - (max(have, req.max_seqs) if have else 0)
            if occupied + width > self.max_num_seqs and self.running:
                break
            if not self._fits(seq):
                break
            self.waiting.remove(seq)
            num_tokens = len(seq.token_ids)
            cached = self.bm.allocate(seq.seq_id, seq.token_ids, extra_key=req.cache_salt)
            if seq.num_preemptions == 0 and seq.index == 0:
                req.num_cached_tokens = cached
            seq.num_computed = cached
            seq.num_in_manager = num_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            live[req] = have + 1
            occupied += width
            chunk = min(num_tokens - cached, budget)
            self._add_prefill(entries, slot_parts, seq, cached, cached + chunk)
            prefill += chunk
            budget -= chunk

        slot_mapping = torch.cat(slot_parts) if slot_parts else torch.empty(0, dtype=torch.int64)
        copies = self.bm.take_copies()
        tables = self.bm.block_tables([e.seq.seq_id for e in entries]) if entries else None
        return ScheduledBatch(
            entries, slot_mapping, tables, copies, prefill, len(decodes), preempted
        )

    def _add_prefill(
        self, entries: list, slot_parts: list, seq: Sequence, start: int, end: int
    ) -> None:
        """Schedules positions [start, end) of seq, and marks them computed in the BlockManager
        right away: within the step's forward every layer writes all its K/V before any attention
        reads, so a prompt admitted later in this same step may share the full blocks this chunk
        writes (a burst of users with one system prompt computes it once). requeue() forgets
        them if the step is undone."""
        entries.append(ScheduledSeq(seq, start, end))
        slot_parts.append(self.bm.slot_mapping(seq.seq_id, start, end))
        self.bm.mark_computed([seq.seq_id], [end])

    def mark_computed(self, batch: ScheduledBatch) -> None:
        """The batch's forward succeeded: every entry's tokens up to its end have their K/V in the
        pool (the BlockManager may now serve its full blocks to later prompts)."""
        entries = batch.entries
        self.bm.mark_computed([e.seq.seq_id for e in entries], [e.end for e in entries])
        for e in entries:
            e.seq.num_computed = e.end

    def postprocess(self, batch: ScheduledBatch, result: StepResult) -> StepOutcome:
        """Applies a step whose forward and sampling succeeded: its K/V count as computed, sampled
        tokens are appended, finished sequences freed, n > 1 requests fork, requests whose logits
        were not finite finish with an error, beam searches that stepped fork and free."""
        self.mark_computed(batch)
        for seq, token, entry in result.logprobs:
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[token]
        forks = 0
        # Fork before any sample can finish (and free) its parent: children share every block.
        for seq in result.seqs:
            req = seq.request
            if not req.forked and seq.index > 0:
                self.fork(req.seqs[0], seq)
                forks += 1
        touched: dict[str, Request] = {}
        for req, why in result.failed.items():
            req.error = why
            self.abort_request(req)
            touched[req.request_id] = req
        for seq, row in result.beam_rows:
            seq.request.beam_rows[seq.seq_id] = row
            if seq.request.first_token_time is None:
                seq.request.first_token_time = result.done_time
        for seq, token, stop_hit in zip(result.seqs, result.tokens, result.stop_hits):
            req = seq.request
            req.forked = True
            if req.first_token_time is None:
                req.first_token_time = result.done_time
            seq.token_ids.append(token)
            touched[req.request_id] = req
            if token in req.stop_ids or stop_hit:
                self.finish(seq, "stop")
            elif (
                len(seq.token_ids) - seq.prompt_len >= req.params.max_new_tokens
                or len(seq.token_ids) >= self.max_model_len
            ):
                self.finish(seq, "length")
        # Last, as each can fail on its own (an interrupt fails that request alone).
        failure: BaseException | None = None
        for req, parents in result.beam_steps:
            try:
                forks += self._advance_beams(req, parents)
            except BaseException as e:
                failure = failure or e
            if req.finished:
                touched[req.request_id] = req
        return StepOutcome(list(touched.values()), forks, failure)

    def _advance_beams(self, req: Request, parents: list[int]) -> int:
        """A beam search step of req: new beam i continues old beam parents[i] with the token the
        search chose. A parent's first continuation keeps its sequence, later ones are forks
        (shared blocks, copy-on-write); beams nobody continues are freed; once the search is done
        (parents empty) every beam is. Returns the forks made. An interrupt in the middle
        finishes req with an error (its blocks freed) and is re-raised."""
        try:
            tokens = [beam[-1] for beam in req.beam.running]
            old = req.beams
            req.beam_rows.clear()
            forks, dropped = continuations(parents, len(old))
            children = []
            for p, fork in zip(parents, forks):  # forks before frees: children share the blocks
                child = None
                if fork:
                    child = self._new_sequence(req, list(old[p].token_ids))
                    req.seqs.append(child)
                    self.fork(old[p], child)
                children.append(child)
            for i in dropped:
                self.finish(old[i], "beam")
            new = [child or old[p] for p, child in zip(parents, children)]
            if parents:  # keep the last beams referenced once done: the request reports from them
                req.seqs = [s for s in req.seqs if s.status is not SeqStatus.FINISHED]
            for seq, token in zip(new, tokens):
                seq.token_ids.append(token)
            req.beams = new
            return sum(forks)
        except BaseException as e:
            req.error = f"request {req.request_id}: beam search step failed ({type(e).__name__})"
            self.abort_request(req)
            raise

    def _fits(self, seq: Sequence) -> bool:
        """Whether admitting seq leaves the pool room: its blocks (prefix hits not counted) and,
        while others run, the watermark that keeps fresh decodes from preempting at once."""
        needed = blocks_needed(len(seq.token_ids), self.bm.block_size)
        return self.bm.can_allocate(len(seq.token_ids)) and (
            not self.running or self.bm.num_free_blocks - needed >= self.watermark_blocks
        )

    def _make_room_for_waiting(self) -> list[Sequence]:
        """Nothing was scheduled: every running sequence is an idle beam (computed, waiting for the
        rest of its group), and they may hold the blocks the group's other beams need. Sends idle
        beams back, youngest first, until the first waiting sequence fits; their log-probabilities
        are kept, so only their KV is recomputed if they continue. Returns the ones sent back."""
        head = next((s for s in self.waiting if not s.idle), None)
        idle = [s for s in self.running if s.idle]
        sent_back = []
        while head is not None and idle and not self._fits(head):
            sent_back.append(idle.pop())
            self._preempt(sent_back[-1])
        return sent_back

    def _append_preempting(
        self, decodes: list[Sequence]
    ) -> tuple[list[Sequence], list[Sequence], list[int]]:
        """The slow path when blocks may run out: appends one decode row at a time, oldest first,
        preempting the most recently admitted sequence until the row fits (or it preempts itself).
        Returns (the decode rows still scheduled, the preempted sequences, their slots)."""
        kept: list[Sequence] = []
        preempted: list[Sequence] = []
        slots: list[int] = []
        for seq in decodes:
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted while making room for an older sequence
            while not self.bm.can_append(seq.seq_id):
                victim = self.running[-1]
                assert victim not in kept, "victims are younger than every scheduled sequence"
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            slots.append(self.bm.append_slot(seq.seq_id, seq.token_ids[-1]))
            kept.append(seq)
        return kept, preempted, slots
