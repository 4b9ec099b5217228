"""kv_paged.Engine: continuous batching of many requests over one paged KV pool, inside the user's
own Python process, with the user's HuggingFace model.

Design decision: one packed varlen forward per step. Every scheduled sequence contributes a slice of
positions (a prefill chunk or one decode row) to input_ids [1, T] with explicit position_ids; the
"kv_paged" attention reads each sequence's KV through its block table, and logits are computed only
at the rows that sample. The scheduler (kv_paged/scheduler.py) decides the slices; the sampler
(kv_paged/sampling.py) draws from per-sequence generators, so outputs never depend on batching.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq

import torch

from kv_paged.beam_search import BeamSearch, BeamSearchParams
from kv_paged.block_manager import BlockManager
from kv_paged.metrics import EngineMetrics, progress_bar
from kv_paged.model_runner import ModelRunner, default_kv_memory, kv_bytes_per_block
from kv_paged.outputs import OutputProcessor, RequestOutput, hit_stop_string
from kv_paged.sampling import SamplingParams, make_generator, sample, token_logprobs
from kv_paged.scheduler import Request, ScheduledBatch, Scheduler, SeqStatus, Sequence

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


class Engine:
    """Serves many generation requests over one paged KV pool with a HuggingFace causal LM.

    model: a transformers causal LM (its attention is switched to "kv_paged" until close()).
    num_blocks: KV pool size in blocks; None sizes it from kv_memory.
    kv_memory: pool budget in bytes; None = a fraction of free device memory (model_runner.py's
      default_kv_memory); never more than max_num_seqs full-length sequences need.
    max_num_batched_tokens: tokens per forward (prefill chunks + decode rows); None = 2048.
    tokenizer: optional; lets prompts be strings and fills CompletionOutput.text.
    """

    def __init__(
        self,
        model,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        kv_memory: int | None = None,
        tokenizer=None,
    ) -> None:
        for name, value, low in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Engine: {name} must be an int >= {low}, got {value!r}")
        for name, value in (
            ("num_blocks", num_blocks),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("kv_memory", kv_memory),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"Engine: {name} must be None or an int >= 1, got {value!r}")
        if num_blocks is not None and kv_memory is not None:
            raise ValueError("Engine: pass num_blocks or kv_memory, not both")

        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.max_model_len = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.block_size = block_size
        self.bytes_per_block = kv_bytes_per_block(model, block_size)
        if num_blocks is None:
            budget = kv_memory if kv_memory is not None else default_kv_memory(self.device)
            cap = max_num_seqs * -(-min(self.max_model_len, 1 << 20) // block_size)
            num_blocks = max(1, min(budget // self.bytes_per_block, cap))
        self.num_blocks = num_blocks
        self.block_manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching
        )
        # close() gives the model back with the attention it came with.
        self._model_attn = getattr(model.config, "_attn_implementation", None)
        self.runner = ModelRunner(model, num_blocks, block_size)
        self.closed = False
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs,
            max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
        )
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_ids: tuple[int, ...] = (
            tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        )
        self.vocab_size = int(getattr(config, "vocab_size", 0)) or None

        self._requests: dict[str, Request] = {}
        # Requests finished outside a step (refused at add_request, aborted): reported next step.
        self._pending_outputs: list[Request] = []
        self._outputs = OutputProcessor(tokenizer)
        self._seq_ids = itertools.count()
        self._request_counter = itertools.count()
        self._metrics: EngineMetrics | None = None

    # ---- public API ------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | BeamSearchParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queues a request; returns its id. A request that can never fit is reported by the next
        step() as finished with `error` set (the others are unaffected).

        params: SamplingParams (sampling / greedy, n samples) or BeamSearchParams (beam search,
        as transformers' generate(num_beams=...); its output is reported once, when finished).
        cache_salt: the request's prefix-cache tenant (vLLM's cache_salt): it shares cached KV
        blocks only with requests of the same salt. Without one, every request can hit every
        other's cached prefixes, and its num_cached_tokens tells whether another request sent
        the same leading blocks (a timing-free way to test a guess of another user's prompt).
        """
        self._check_open("add_request")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"add_request: cache_salt must be a str or None, got {cache_salt!r}")
        params = params if params is not None else SamplingParams()
        beam_params = params if isinstance(params, BeamSearchParams) else None
        if beam_params is not None:  # the scheduler's view: one greedy sequence per beam
            params = SamplingParams(
                max_new_tokens=beam_params.max_new_tokens,
                temperature=0.0,
                ignore_eos=beam_params.ignore_eos,
            )
        if not isinstance(params, SamplingParams):
            raise TypeError(
                "add_request: params must be SamplingParams or BeamSearchParams, got "
                f"{type(params).__name__}"
            )
        token_ids = self._encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("add_request: SamplingParams.stop needs Engine(..., tokenizer=...)")
        if params.logprobs is not None and self.vocab_size and params.logprobs > self.vocab_size:
            raise ValueError(
                f"add_request: SamplingParams.logprobs = {params.logprobs} exceeds the vocabulary "
                f"({self.vocab_size} tokens)"
            )
        if request_id is None:  # never one a caller chose: skip ids in use
            request_id = str(next(self._request_counter))
            while request_id in self._requests:
                request_id = str(next(self._request_counter))
        request_id = str(request_id)
        if request_id in self._requests:
            raise ValueError(f"add_request: request_id {request_id!r} is already in use")
        if self._metrics is None or not self.has_unfinished():
            self.reset_metrics()
        seed = (
            params.seed if params.seed is not None else int(torch.randint(0, 1 << 62, (1,)).item())
        )
        req = Request(
            request_id,
            token_ids,
            params,
            seed,
            arrival=len(self._requests),
            stop_ids=params.stop_set(self.eos_token_ids),
            arrival_time=time.perf_counter(),
            cache_salt=cache_salt,
        )
        req.forked = params.n == 1
        for i in range(params.n):
            req.seqs.append(
                Sequence(next(self._seq_ids), req, i, list(token_ids), make_generator(seed, i))
            )
        if beam_params is not None:
            req.beam = BeamSearch(beam_params, self.eos_token_ids)
            req.beams = [req.seqs[0]]
        self._requests[request_id] = req
        self._metrics.num_requests += 1
        req.error = self._why_impossible(req)
        if req.error is not None:
            for seq in req.seqs:
                seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"
            self._pending_outputs.append(req)
        else:
            self.scheduler.add(req.seqs[0])
        return request_id

    @property
    def tokenizer(self):
        """Encodes string prompts and decodes outputs' text; None = token ids only."""
        return self._outputs.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._outputs.tokenizer = tokenizer

    def close(self) -> None:
        """Aborts what is unfinished, frees the KV pool and switches the model back to the attention
        implementation it had; the engine cannot be used afterwards. `with Engine(...) as e:` calls it."""
        if self.closed:
            return
        for req in self._requests.values():
            self.scheduler.abort_request(req)
        self._pending_outputs.clear()
        self._requests.clear()
        self.runner = None  # the only reference to the pool
        if self._model_attn is not None:
            self.model.set_attn_implementation(self._model_attn)
        self.closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"{what}: the Engine is closed")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs)

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks; the next step() reports it (finish_reason "abort").
        Returns False, and does nothing, for an id that is unknown or already finished (a
        streaming client may abort what just finished, as in vLLM)."""
        req = self._requests.get(str(request_id))
        if req is None or req.finished:
            return False
        self.scheduler.abort_request(req)
        req.forked = True  # an aborted n > 1 request never forks: report its samples as they are
        self._pending_outputs.append(req)
        return True

    def _discard(self, request_id: str) -> None:
        """Drops a request without a trace: blocks freed, no output will ever mention it."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort_request(req)
        self._pending_outputs = [r for r in self._pending_outputs if r is not req]
        self._outputs.forget(req)

    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step and one forward; returns the requests that got new tokens
        (or finished) in this step, in their current state (new_token_ids holds the delta)."""
        return self._step(final_only=False)

    def _step(self, final_only: bool) -> list[RequestOutput]:
        """step(); final_only: build outputs of finished requests only (generate() needs no
        others, and building B outputs with their token lists every step is O(B * length))."""
        self._check_open("step")
        touched: dict[str, Request] = {r.request_id: r for r in self._pending_outputs}
        if self.scheduler.has_unfinished():
            batch = self.scheduler.schedule()
            if batch.entries:
                for req in self._execute(batch):
                    touched[req.request_id] = req
        self._pending_outputs.clear()
        outputs = []
        pending = list(touched.values())
        done = 0
        try:
            for r in pending:
                if r.finished and r.finished_time is None:
                    r.finished_time = time.perf_counter()
                if r.finished or not final_only:
                    outputs.append(self._build_output(r))
                if r.finished:
                    self._record_finished(r)
                    self._outputs.forget(r)
                    self._requests.pop(r.request_id, None)
                done += 1
        except BaseException:  # an interrupt: the next step reports what this one did not
            self._pending_outputs.extend(r for r in pending[done:] if r.finished)
            raise
        return outputs

    def _build_output(self, req: Request) -> RequestOutput:
        """The request's output; if building it fails (the tokenizer is user code), the request
        finishes with that error instead of taking the step down with it."""
        try:
            return self._outputs.build(req)
        except Exception as e:
            req.error = f"request {req.request_id}: building its output failed: {e!r}"
            self.scheduler.abort_request(req)
            return self._outputs.build(req)

    def _record_finished(self, req: Request) -> None:
        """Metrics of a finished request, once its output is built (req.finished_time is set)."""
        self._metrics.num_finished += 1
        aborted = any(s.finish_reason == "abort" for s in req.seqs)
        if req.error is None and req.first_token_time is not None and not aborted:
            self._metrics.record_request(
                req.first_token_time - req.arrival_time,
                req.finished_time - req.first_token_time,
                max(len(s.token_ids) - s.prompt_len for s in req.seqs),
            )

    def generate(
        self,
        prompts: str | Seq[int] | Iterable[str | Seq[int]],
        params: SamplingParams
        | BeamSearchParams
        | Seq[SamplingParams | BeamSearchParams]
        | None = None,
        use_tqdm: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generates every prompt to completion; outputs in prompt order. Metrics: self.metrics().

        prompts: a list of prompts (token-id lists, 1-D tensors, or strings with a tokenizer); one
          prompt on its own (a string, a flat token-id list, a 1-D tensor) is a list of one.
        params: one SamplingParams or BeamSearchParams for all, or one per prompt; None =
          SamplingParams().
        cache_salt: the prefix-cache tenant of these requests (see add_request).
        """
        if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            prompts = [prompts]
        if params is None or isinstance(params, (SamplingParams, BeamSearchParams)):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"generate: {len(params_list)} SamplingParams for {len(prompts)} prompts"
                )
        if self.has_unfinished():
            raise RuntimeError(
                f"generate: {len(self._requests)} requests added with add_request() are unfinished; "
                "run step() until has_unfinished() is False (or abort them) first"
            )
        self.reset_metrics()
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        bar = None
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.add_request(p, sp, cache_salt=cache_salt))
            wanted = set(ids)
            bar = progress_bar(len(ids), use_tqdm)
            while self.has_unfinished():
                for out in self._step(final_only=True):
                    if out.request_id in wanted:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    m = self._metrics
                    elapsed = max(time.perf_counter() - m.start, 1e-9)
                    bar.set_postfix_str(
                        f"prefill {m.prefill_tokens / elapsed:,.0f} tok/s, decode {m.decode_tokens / elapsed:,.0f} tok/s",
                        refresh=False,
                    )
        except BaseException:
            # A bad prompt or an interrupt leaves no orphans that a later call would silently serve.
            for rid in ids:
                self._discard(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        self._metrics.end = time.perf_counter()
        return [results[i] for i in ids]

    def beam_search(
        self,
        prompts: str | Seq[int] | Iterable[str | Seq[int]],
        params: BeamSearchParams,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Beam search over every prompt (vLLM's LLM.beam_search): generate() with BeamSearchParams.
        Each output holds params.num_return_sequences hypotheses, best first, with their `score`.
        Beams share KV blocks: a step's new beams fork their parents (copy-on-write)."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(
                f"beam_search: params must be BeamSearchParams, got {type(params).__name__}"
            )
        return self.generate(prompts, params, use_tqdm)

    def metrics(self) -> EngineMetrics:
        """Metrics of the current (or last) run: since generate() started, or since the engine
        went from idle to busy under the step API."""
        if self._metrics is None:
            self.reset_metrics()
        return self._metrics

    # ---- internals -------------------------------------------------------------------------------

    def reset_metrics(self) -> None:
        """Starts a new metrics run (generate() does this itself)."""
        stats = self.block_manager.stats()  # the one home of the prefix-cache counters
        self._prefix_base = (stats["prefix_queried_tokens"], stats["prefix_hit_tokens"])
        self._metrics = EngineMetrics(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            bytes_per_block=self.bytes_per_block,
            start=time.perf_counter(),
        )

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError(
                    "add_request: prompt is a string but the Engine has no tokenizer; pass token ids or Engine(..., tokenizer=...)"
                )
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(
                    f"add_request: a tensor prompt must be 1-D token ids, got shape {tuple(prompt.shape)}"
                )
            if (
                prompt.dtype.is_floating_point
                or prompt.dtype.is_complex
                or prompt.dtype == torch.bool
            ):
                raise ValueError(
                    f"add_request: a tensor prompt must hold integer token ids, got dtype {prompt.dtype}"
                )
            token_ids = prompt.tolist()
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise ValueError("add_request: prompt is empty (at least one token is needed)")
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not hasattr(t, "__index__"):  # floats have no __index__
                raise ValueError(f"add_request: prompt token {t!r} is not an integer token id")
            t = token_ids[i] = t.__index__()  # numpy / torch integer scalars
            if t < 0 or (self.vocab_size is not None and t >= self.vocab_size):
                raise ValueError(
                    f"add_request: prompt token {t} is not in [0, vocab_size={self.vocab_size})"
                )
        return token_ids

    def _why_impossible(self, req: Request) -> str | None:
        p, m = len(req.prompt_token_ids), req.params.max_new_tokens
        if p + m > self.max_model_len:
            return (
                f"request {req.request_id}: prompt ({p} tokens) + max_new_tokens ({m}) = {p + m} exceeds the "
                f"model's max positions (max_position_embeddings = {self.max_model_len})"
            )
        # The last generated token is never fed back, so a sample holds at most p + m - 1 tokens of KV.
        need = -(-(p + m - 1) // self.block_size)
        if need > self.num_blocks:
            return (
                f"request {req.request_id}: prompt ({p} tokens) + max_new_tokens ({m}) needs {need} KV blocks "
                f"of {self.block_size} tokens but the whole pool has {self.num_blocks}; raise num_blocks / kv_memory"
            )
        if req.max_seqs > self.scheduler.max_num_seqs:
            what = "beam_width" if req.beam is not None else "n"
            return f"request {req.request_id}: {what} = {req.max_seqs} exceeds max_num_seqs = {self.scheduler.max_num_seqs}"
        return None

    def _execute(self, batch: ScheduledBatch) -> list[Request]:
        m = self._metrics
        m.preemptions += len(batch.preempted)
        entries = batch.entries
        sampling_rows = [i for i, e in enumerate(entries) if e.samples]
        # Rows to sample: one per sequence, except an unforked n > 1 request, which samples all n
        # of its sequences from the prompt's logits row (each with its own generator).
        # A beam search request's rows are not sampled: their log-probabilities go to its search.
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
        # Everything that can fail runs first, inside the try, before any state changes: if the
        # forward, the sampler or the tokenizer raises (out of memory, a model error, Ctrl-C), the
        # step is undone and its sequences recompute later. After it comes only bookkeeping.
        drawing = [s for s in row_seqs if not s.request.params.greedy]  # greedy rows draw nothing
        generator_states = [s.generator.get_state() for s in drawing]
        beam_undo: list[tuple[Request, BeamSearch]] = []  # searches as they were before this step
        beam_steps: list[tuple[Request, list[int]]] = []
        failed: dict[Request, str] = {}
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward(
                [e.seq.token_ids[e.start : e.end] for e in entries],
                [e.start for e in entries],
                batch.slot_mapping,
                batch.block_tables,
                batch.copies,
                sampling_rows,
            )  # [len(sampling_rows), vocab]
            failed = self._non_finite_requests(logits, entries, sampling_rows)
            if failed:  # their rows are not sampled; the requests finish with an error below
                row_index, row_seqs = _drop(failed, row_index, row_seqs)
                beam_index, beam_seqs = _drop(failed, beam_index, beam_seqs)
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
            logprobs = (
                token_logprobs(
                    logits[[row_index[j] for j in want]],
                    [tokens[j] for j in want],
                    [row_seqs[j].request.params.logprobs for j in want],
                )
                if want
                else []
            )
            # The tokenizer is user code too: decide stop strings before changing any state.
            stop_hits = [
                bool(seq.request.params.stop)
                and hit_stop_string(
                    self.tokenizer, seq.token_ids, seq.prompt_len, token, seq.request.params.stop
                )
                for seq, token in zip(row_seqs, tokens)
            ]
            beam_logprobs = (
                torch.log_softmax(logits[beam_index].float(), dim=-1) if beam_seqs else None
            )
            # Last: it changes searches (beam_undo restores them).
            beam_steps = self._select_beams(beam_seqs, beam_logprobs, beam_undo)
        except BaseException:
            for s, state in zip(drawing, generator_states):
                s.generator.set_state(state)
            for req, before in beam_undo:
                req.beam = before
            self.scheduler.requeue(entries)
            raise
        self.scheduler.mark_computed(batch)
        for j, entry in zip(want, logprobs):
            seq = row_seqs[j]
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[tokens[j]]

        # Fork before any sample can finish (and free) its parent: children share every block.
        for seq in row_seqs:
            req = seq.request
            if not req.forked and seq.index > 0:
                self.scheduler.fork(req.seqs[0], seq)
                m.forks += 1
        touched: dict[str, Request] = {}
        for req, why in failed.items():
            req.error = why
            self.scheduler.abort_request(req)
            touched[req.request_id] = req
        t1 = time.perf_counter()
        for seq, row in zip(beam_seqs, beam_logprobs if beam_seqs else []):
            seq.request.beam_rows[seq.seq_id] = row
            if seq.request.first_token_time is None:
                seq.request.first_token_time = t1
        for seq, token, stop_hit in zip(row_seqs, tokens, stop_hits):
            req = seq.request
            req.forked = True
            if req.first_token_time is None:
                req.first_token_time = t1
            seq.token_ids.append(token)
            touched[req.request_id] = req
            out_len = len(seq.token_ids) - seq.prompt_len
            if token in req.stop_ids or stop_hit:
                self.scheduler.finish(seq, "stop")
            elif out_len >= req.params.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
                self.scheduler.finish(seq, "length")

        m.steps += 1
        stats = self.block_manager.stats()
        m.prefix_queried_tokens = stats["prefix_queried_tokens"] - self._prefix_base[0]
        m.prefix_hit_tokens = stats["prefix_hit_tokens"] - self._prefix_base[1]
        m.prefill_tokens += batch.num_prefill_tokens
        m.decode_tokens += batch.num_decode_tokens
        m.generated_tokens += len(tokens) + len(beam_seqs)
        m.cow_copies += int(batch.copies.shape[0])
        m.forward_time += t1 - t0
        running = self.scheduler.running
        bs = self.block_size
        m.record(
            t=t1 - m.start,
            blocks_in_use=stats["blocks_in_use"],
            blocks_unshared=sum(-(-s.num_in_manager // bs) for s in running),
            contiguous_tokens=sum(
                min(s.prompt_len + s.request.params.max_new_tokens, self.max_model_len)
                for s in running
            ),
        )
        # Last, as each can fail on its own (an interrupt fails that request alone): the beams of
        # each search that stepped fork and free. A failure is raised once all are done, and this
        # step's outputs are reported by the next step.
        failure: BaseException | None = None
        for req, parents in beam_steps:
            try:
                m.forks += self._advance_beams(req, parents)
            except BaseException as e:
                failure = failure or e
            if req.finished:
                touched[req.request_id] = req
        if failure is not None:
            self._pending_outputs.extend(r for r in touched.values() if r.finished)
            raise failure
        return list(touched.values())

    def _non_finite_requests(
        self, logits: torch.Tensor, entries: list, sampling_rows: list[int]
    ) -> dict[Request, str]:
        """Requests whose logits row holds NaN or +inf, or no finite value (nothing to sample):
        request -> why. logits: [len(sampling_rows), vocab]. One reduction (a row's max is NaN,
        +inf or -inf exactly then) and one host sync."""
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
        self,
        seqs: list[Sequence],
        logprobs: torch.Tensor | None,
        undo: list[tuple[Request, BeamSearch]],
    ) -> list[tuple[Request, list[int]]]:
        """Runs a beam search step for each request whose live beams all have their next-token
        log-probabilities with this step's rows (seqs: the beam rows, logprobs [len(seqs), vocab]).
        Returns (request, parents) per request stepped. Changes only request.beam, after putting
        its snapshot in `undo` (the caller's, so an interrupt here still finds it)."""
        new = {seq.seq_id: row for seq, row in zip(seqs, logprobs if seqs else [])}
        stepped = []
        for req in dict.fromkeys(seq.request for seq in seqs):
            rows = [new.get(s.seq_id, req.beam_rows.get(s.seq_id)) for s in req.beams]
            if any(row is None for row in rows):
                continue  # some beams wait for the token budget or recompute after preemption
            undo.append((req, req.beam.snapshot()))
            stepped.append((req, req.beam.step(torch.stack(rows))))
        return stepped

    def _advance_beams(self, req: Request, parents: list[int]) -> int:
        """After a beam search step: new beam i continues old beam parents[i] with the token the
        search chose (Scheduler.advance_beams forks and frees). Returns the forks made. An
        interrupt in the middle fails this request alone (reported with `error`), never the
        engine."""
        tokens = [beam[-1] for beam in req.beam.running]
        try:
            return self.scheduler.advance_beams(req, parents, tokens, self._new_beam)
        except BaseException as e:
            req.error = f"request {req.request_id}: beam search step failed ({type(e).__name__})"
            self.scheduler.abort_request(req)
            self._pending_outputs.append(req)
            raise

    def _new_beam(self, parent: Sequence) -> Sequence:
        """A Sequence for a beam forked from parent (same tokens so far, its own id)."""
        req = parent.request
        return Sequence(
            next(self._seq_ids),
            req,
            len(req.seqs),
            list(parent.token_ids),
            make_generator(req.seed, len(req.seqs)),
        )


def _drop(failed: dict[Request, str], index: list[int], seqs: list[Sequence]):
    """index, seqs without the rows of failed requests."""
    kept = [(i, s) for i, s in zip(index, seqs) if s.request not in failed]
    return [i for i, _ in kept], [s for _, s in kept]
