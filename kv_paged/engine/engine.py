"""kv_paged.Engine: continuous batching of many requests over one paged KV pool, inside the user's
own Python process, with the user's HuggingFace model.

Design decision: one packed varlen forward per step. Every scheduled sequence contributes a slice of
positions (a prefill chunk or one decode row) to input_ids [1, T] with explicit position_ids; the
"kv_paged" attention reads each sequence's KV through its block table, and logits are computed only
at the rows that sample. A step is schedule -> run -> postprocess: the Scheduler (scheduler.py)
decides the slices and alone drives the BlockManager; run_step (step.py) runs the forward and the
sampler, which draws from per-sequence generators (sampling.py), so outputs never depend on
batching; Scheduler.postprocess applies the result.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq

import torch

from kv_paged.beam_search import BeamSearch, BeamSearchParams
from kv_paged.block_manager import BlockManager
from kv_paged.engine.inputs import encode_prompt, prompt_list, resolve_params, why_impossible
from kv_paged.engine.metrics import EngineMetrics, progress_bar
from kv_paged.engine.model_runner import ModelRunner, default_kv_memory, kv_bytes_per_block
from kv_paged.engine.outputs import OutputProcessor, RequestOutput
from kv_paged.engine.request import Request, SeqStatus
from kv_paged.engine.sampling import SamplingParams
from kv_paged.engine.scheduler import Scheduler
from kv_paged.engine.step import StepPlan, run_step
from kv_paged.engine.tensor_parallel import TensorParallelGroup

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


class Engine:
    """Serves many generation requests over one paged KV pool with a HuggingFace causal LM.

    model: a transformers causal LM (its attention is switched to "kv_paged" until close()).
    num_blocks: KV pool size in blocks; None sizes it from kv_memory.
    kv_memory: pool budget in bytes; None = a fraction of free device memory (model_runner.py's
      default_kv_memory); never more than max_num_seqs full-length sequences need.
    max_num_batched_tokens: tokens per forward (prefill chunks + decode rows); None = 2048.
    tokenizer: optional; lets prompts be strings and fills CompletionOutput.text.
    cascade_attention: when running sequences share leading KV blocks (a common system prompt),
      attend to the shared blocks once per group (kv_paged.cascade); False = plain paged attention
      (same outputs up to float rounding).
    tp_timeout: under tensor parallelism (a model sharded by transformers' tensor-parallel plan,
      under torchrun), seconds a rank waits for a control message from rank 0; None = the default
      process group's timeout. Construct the Engine on every rank: rank 0 (the driver) schedules
      and samples; the others run its steps inside generate() or run_worker()
      (engine/tensor_parallel.py).
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
        cascade_attention: bool = True,
        tp_timeout: float | None = None,
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
        # Under tensor parallelism every rank needs the same pool size: the smallest allowed.
        self._tp = TensorParallelGroup.of(model, tp_timeout)
        if self._tp is not None:
            num_blocks = self._tp.agree_min(num_blocks)
        self.num_blocks = num_blocks
        self.block_manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching
        )
        # close() gives the model back with the attention it came with.
        self._model_attn = getattr(model.config, "_attn_implementation", None)
        self.runner = ModelRunner(model, num_blocks, block_size, cascade=bool(cascade_attention))
        self.closed = False
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs,
            max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
            self.max_model_len,
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
        self._check_driver("add_request")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"add_request: cache_salt must be a str or None, got {cache_salt!r}")
        params, beam_params = resolve_params(params, self.tokenizer, self.vocab_size)
        token_ids = encode_prompt(prompt, self.tokenizer, self.vocab_size)
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
        if beam_params is not None:
            req.beam = BeamSearch(beam_params, self.eos_token_ids)
        self.scheduler.create_sequences(req)
        self._requests[request_id] = req
        self._metrics.num_requests += 1
        req.error = why_impossible(
            req, self.max_model_len, self.block_size, self.num_blocks, self.scheduler.max_num_seqs
        )
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
        implementation it had; the engine cannot be used afterwards. `with Engine(...) as e:` calls it.
        Under tensor parallelism every rank calls it: rank 0's tells the others' to return."""
        if self.closed:
            return
        tp = self._tp
        if tp is not None and tp.failure is None:
            if tp.is_driver:
                try:
                    tp.send("close")
                except BaseException as e:  # a rank is gone: closed here all the same
                    self._close_local()
                    raise tp.fail(e)
            else:
                try:
                    tp.serve(self.runner, ("close",))
                finally:
                    self._close_local()
                return
        self._close_local()

    def _close_local(self) -> None:
        """close() on this rank only: no message to the other ranks."""
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
            why = self._tp.failure if self._tp is not None else None
            raise RuntimeError(
                f"{what}: the Engine is closed"
                + (f" (its tensor-parallel group broke: {why})" if why else "")
            )

    def _check_driver(self, what: str) -> None:
        if self._tp is not None and not self._tp.is_driver:
            raise RuntimeError(
                f"{what}: this is tensor-parallel rank {self._tp.rank}; only rank "
                f"{self._tp.driver} adds requests and steps. Call generate() on every rank "
                "together, or run_worker() here while rank 0 uses add_request() / step()"
            )

    def run_worker(self) -> None:
        """Tensor parallelism, ranks other than 0: runs rank 0's steps (whatever it calls: step(),
        generate()) until rank 0 closes its Engine, then closes this one."""
        self._check_open("run_worker")
        if self._tp is None or self._tp.is_driver:
            raise RuntimeError("run_worker: only tensor-parallel ranks other than 0 serve steps")
        self.close()

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
        self._check_driver("step")
        touched: dict[str, Request] = {r.request_id: r for r in self._pending_outputs}
        if self.scheduler.has_unfinished():
            batch = self.scheduler.schedule()
            self._metrics.preemptions += len(batch.preempted)
            if batch.entries:
                try:
                    result = run_step(self._forward, batch, StepPlan.of(batch), self.tokenizer)
                except BaseException:  # undone: the batch's sequences recompute later
                    self.scheduler.requeue(batch.entries)
                    if self._tp is not None and self._tp.failure is not None:
                        self._close_local()  # the group is out of step: this engine is done
                    raise
                outcome = self.scheduler.postprocess(batch, result)
                self._metrics.record_step(
                    batch,
                    result,
                    outcome,
                    self.block_manager.stats(),
                    self.scheduler.running,
                    self.max_model_len,
                )
                if outcome.failure is not None:  # this step's outputs go out with the next step
                    self._pending_outputs.extend(r for r in outcome.touched if r.finished)
                    raise outcome.failure
                for req in outcome.touched:
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

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """The step's forward: this process's model, or every rank's under tensor parallelism."""
        if self._tp is not None:
            return self._tp.drive(self.runner, plan)
        return self.runner.forward(*plan.args())

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
        Under tensor parallelism every rank calls it; rank 0's prompts are the ones served, and
        the other ranks run its steps and return [] (or raise what rank 0's call raised).
        """
        tp = self._tp
        if tp is None:
            return self._generate(prompts, params, use_tqdm, cache_salt)
        self._check_open("generate")
        if tp.is_driver:
            return tp.lead(lambda: self._generate(prompts, params, use_tqdm, cache_salt))
        try:
            tp.follow(self.runner)
        finally:
            if tp.failure is not None or tp.driver_closed:
                self._close_local()
        return []

    def _generate(self, prompts, params, use_tqdm: bool, cache_salt) -> list[RequestOutput]:
        """generate() in this process: rank 0's under tensor parallelism."""
        prompts, params_list = prompt_list(prompts, params)
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
        self._metrics = EngineMetrics(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            bytes_per_block=self.bytes_per_block,
            start=time.perf_counter(),
            prefix_base=(stats["prefix_queried_tokens"], stats["prefix_hit_tokens"]),
        )
