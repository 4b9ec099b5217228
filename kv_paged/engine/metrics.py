"""Per-run metrics of kv_paged.Engine and the KV-memory timeline the demo plots.

Design decision: throughput follows vLLM's convention (tokens over the run's wall time, so prefill
and decode rates add up to what a user sees), and the memory baseline is the contiguous
reservation a max-length cache makes: each live sample reserves prompt + max_new_tokens slots.
Memory stays bounded however long a run: the timeline is downsampled (peaks and means stay exact)
and latency percentiles come from a fixed-size uniform sample of the requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from kv_paged.engine.request import ScheduledBatch, Sequence
    from kv_paged.engine.scheduler import StepOutcome
    from kv_paged.engine.step import StepResult

MAX_TIMELINE_POINTS = 2048  # then every other point is dropped and the sampling stride doubles
MAX_LATENCY_SAMPLES = 10_000  # per-request TTFT / TPOT kept for percentiles (reservoir sample)


@dataclass
class EngineMetrics:
    num_blocks: int
    block_size: int
    bytes_per_block: int  # KV bytes of one block over every layer (K and V)
    start: float
    end: float | None = None
    num_requests: int = 0
    num_finished: int = 0
    steps: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0  # decode rows run through the model
    generated_tokens: int = 0  # tokens sampled (the first one of each sample comes from a prefill)
    prefix_queried_tokens: int = 0  # tokens looked up in the prefix cache at admission
    prefix_hit_tokens: int = 0  # of those, served from cached blocks
    preemptions: int = 0
    forks: int = 0
    cow_copies: int = 0
    forward_time: float = 0.0
    # The BlockManager's (prefix_queried_tokens, prefix_hit_tokens) when the run started: its stats
    # are the one home of those counters, the run's figures are differences from this.
    prefix_base: tuple[int, int] = (0, 0)
    # Per finished request: seconds from add_request to its first token, and mean seconds per
    # output token after the first (vLLM's TTFT and TPOT; TPOT only for requests of >= 2 tokens):
    # a uniform sample of at most MAX_LATENCY_SAMPLES of them, and exact sums and counts.
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    # Timeline, one point per `stride` steps: seconds since start, blocks referenced (paged +
    # shared), blocks a paged cache without sharing would hold, and slots a contiguous max-length
    # reservation holds.
    t: list[float] = field(default_factory=list)
    blocks_in_use: list[int] = field(default_factory=list)
    blocks_unshared: list[int] = field(default_factory=list)
    contiguous_tokens: list[int] = field(default_factory=list)
    stride: int = 1
    # Exact over every step: counts, sums and peaks of the timeline's series.
    _records: int = 0
    _sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _peaks: list[int] = field(default_factory=lambda: [0, 0, 0])
    _latency: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # sums, counts
    _rng: random.Random = field(default_factory=lambda: random.Random(0))
    _last_t: float = 0.0

    def record_step(
        self,
        batch: ScheduledBatch,
        result: StepResult,
        outcome: StepOutcome,
        stats: dict[str, int],
        running: list[Sequence],
        max_model_len: int,
    ) -> None:
        """One engine step's figures, and one point of the memory timeline. stats: the
        BlockManager's after the step; running: the scheduler's running sequences."""
        self.steps += 1
        self.prefix_queried_tokens = stats["prefix_queried_tokens"] - self.prefix_base[0]
        self.prefix_hit_tokens = stats["prefix_hit_tokens"] - self.prefix_base[1]
        self.prefill_tokens += batch.num_prefill_tokens
        self.decode_tokens += batch.num_decode_tokens
        self.generated_tokens += len(result.tokens) + len(result.beam_rows)
        self.cow_copies += int(batch.copies.shape[0])
        self.forks += outcome.forks
        self.forward_time += result.forward_time
        bs = self.block_size
        self.record(
            t=result.done_time - self.start,
            blocks_in_use=stats["blocks_in_use"],
            blocks_unshared=sum(-(-s.num_in_manager // bs) for s in running),
            contiguous_tokens=sum(
                min(s.prompt_len + s.request.params.max_new_tokens, max_model_len) for s in running
            ),
        )

    def record(
        self, t: float, blocks_in_use: int, blocks_unshared: int, contiguous_tokens: int
    ) -> None:
        if blocks_in_use > self.num_blocks:
            raise AssertionError(
                f"blocks in use {blocks_in_use} exceed the pool of {self.num_blocks}"
            )
        values = (blocks_in_use, blocks_unshared, contiguous_tokens)
        for i, v in enumerate(values):
            self._sums[i] += v
            self._peaks[i] = max(self._peaks[i], v)
        self._records += 1
        self._last_t = t
        if (self._records - 1) % self.stride:
            return
        self.t.append(t)
        self.blocks_in_use.append(blocks_in_use)
        self.blocks_unshared.append(blocks_unshared)
        self.contiguous_tokens.append(contiguous_tokens)
        if len(self.t) > MAX_TIMELINE_POINTS:
            for series in (
                self.t,
                self.blocks_in_use,
                self.blocks_unshared,
                self.contiguous_tokens,
            ):
                del series[1::2]
            self.stride *= 2

    def record_request(self, ttft: float, decode_time: float, num_tokens: int) -> None:
        self._keep(self.ttft, ttft, 0)
        if num_tokens >= 2:
            self._keep(self.tpot, decode_time / (num_tokens - 1), 1)

    def _keep(self, sample: list[float], value: float, which: int) -> None:
        """Adds value to the exact sum and to the uniform sample (reservoir sampling)."""
        self._latency[which] += value
        self._latency[2 + which] += 1
        seen = int(self._latency[2 + which])
        if len(sample) < MAX_LATENCY_SAMPLES:
            sample.append(value)
        else:
            slot = self._rng.randrange(seen)
            if slot < MAX_LATENCY_SAMPLES:
                sample[slot] = value

    @property
    def elapsed(self) -> float:
        return max(
            (self.end if self.end is not None else self.start + self._last_t) - self.start,
            1e-9,
        )

    def summary(self) -> dict[str, float]:
        peak, peak_unshared, peak_contig_tokens = self._peaks
        peak_contig = peak_contig_tokens / self.block_size
        steps = max(self._records, 1)
        ttft_sum, tpot_sum, ttft_n, tpot_n = self._latency
        return {
            "requests": self.num_finished,
            "steps": self.steps,
            "elapsed_s": self.elapsed,
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_tok_per_s": self.prefill_tokens / self.elapsed,
            "decode_tok_per_s": self.generated_tokens / self.elapsed,
            "pool_blocks": self.num_blocks,
            "peak_blocks_paged_shared": peak,
            "peak_blocks_paged_unshared": peak_unshared,
            "peak_blocks_contiguous": peak_contig,
            "mean_blocks_paged_shared": self._sums[0] / steps,
            "mean_blocks_contiguous": self._sums[2] / steps / self.block_size,
            "prefix_hit_rate": self.prefix_hit_tokens / self.prefix_queried_tokens
            if self.prefix_queried_tokens
            else 0.0,
            "ttft_mean_s": ttft_sum / ttft_n if ttft_n else 0.0,
            "ttft_p99_s": _percentile(self.ttft, 0.99),
            "tpot_mean_s": tpot_sum / tpot_n if tpot_n else 0.0,
            "preemptions": self.preemptions,
            "forks": self.forks,
            "cow_copies": self.cow_copies,
        }

    def table(self) -> str:
        s = self.summary()
        mib = self.bytes_per_block / 2**20
        saved = (
            1 - s["mean_blocks_paged_shared"] / s["mean_blocks_contiguous"]
            if s["mean_blocks_contiguous"]
            else 0.0
        )
        rows = [
            ("requests finished", f"{s['requests']}"),
            ("engine steps (forwards)", f"{s['steps']}"),
            ("wall time", f"{s['elapsed_s']:.2f} s"),
            ("prefill tokens computed", f"{s['prefill_tokens']:,}"),
            ("tokens generated", f"{s['generated_tokens']:,}"),
            ("prefill throughput", f"{s['prefill_tok_per_s']:,.0f} tok/s"),
            ("decode throughput", f"{s['decode_tok_per_s']:,.0f} tok/s"),
            (
                "time to first token",
                f"mean {1e3 * s['ttft_mean_s']:,.1f} ms, p99 {1e3 * s['ttft_p99_s']:,.1f} ms",
            ),
            ("time per output token", f"mean {1e3 * s['tpot_mean_s']:,.2f} ms"),
            (
                "KV pool",
                f"{self.num_blocks} blocks x {self.block_size} tokens ({self.num_blocks * mib:,.1f} MiB)",
            ),
            (
                "peak KV blocks: paged + shared",
                f"{s['peak_blocks_paged_shared']} ({s['peak_blocks_paged_shared'] * mib:,.1f} MiB)",
            ),
            ("peak KV blocks: paged, no sharing", f"{s['peak_blocks_paged_unshared']}"),
            (
                "peak KV: contiguous reservation",
                f"{s['peak_blocks_contiguous']:,.1f} block-equivalents ({s['peak_blocks_contiguous'] * mib:,.1f} MiB)",
            ),
            ("mean KV saved vs contiguous", f"{100 * saved:.1f}%"),
            (
                "prefix-cache hit rate",
                f"{100 * s['prefix_hit_rate']:.1f}% of {self.prefix_queried_tokens:,} admitted tokens",
            ),
            ("preemptions", f"{s['preemptions']}"),
            ("forks (n > 1)", f"{s['forks']}"),
            ("copy-on-write block copies", f"{s['cow_copies']}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _percentile(xs: list[float], q: float) -> float:
    """The q-quantile of xs by the nearest-rank method (0.0 for no data)."""
    if not xs:
        return 0.0
    ordered = sorted(xs)
    rank = math.ceil(q * len(ordered) - 1e-9)  # 1-based; the epsilon absorbs float error in q * n
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over `total` requests, or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="kv_paged", unit="req", dynamic_ncols=True)
