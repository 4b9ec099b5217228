"""Where an Engine step's time goes on a real model: one profile of decode steps and one of a
prefill step, split into model math (matmuls: projections, MLP, lm_head), kv_paged's attention ops,
the model's other torch ops (norms, RoPE, activations, residual adds), the engine's own Python
(schedule, metadata, postprocess) and the model's Python between ops.

Method: SmolLM2-135M-Instruct (or --model PATH) under kv_paged.Engine; --batch chat prompts are
prefilled, then --steps decode steps run under torch.profiler (one step of warm-up first). Op
self-times come from the profiler; "engine Python" is the time inside the engine's regions
(record_function labels around schedule / run_step / postprocess) minus the ops inside them, and
"model Python" the forward's wall time minus all ops it ran. Fractions are of the steps' wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def category(name: str) -> str:
    if name.startswith("kv_paged::"):
        return "kv_paged attention ops"
    if name in MATMUL_OPS:
        return "model math (matmuls)"
    return "other torch ops (norms, RoPE, activations, adds, sampling)"


@contextlib.contextmanager
def labelled_engine(engine):
    """Wraps the engine's schedule / run_step / postprocess in record_function regions."""
    import kv_paged.engine.engine as engine_module

    sched, post, run = (
        engine.scheduler.schedule,
        engine.scheduler.postprocess,
        engine_module.run_step,
    )

    def wrap(fn, label):
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)

        return inner

    engine.scheduler.schedule = wrap(sched, "engine.schedule")
    engine.scheduler.postprocess = wrap(post, "engine.postprocess")
    engine_module.run_step = wrap(run, "engine.run_step")
    forward = engine.runner.model.forward
    engine.runner.model.forward = wrap(forward, "model.forward")
    try:
        yield
    finally:
        engine.scheduler.schedule, engine.scheduler.postprocess = sched, post
        engine_module.run_step = run
        engine.runner.model.forward = forward


def breakdown(prof, wall: float) -> list[tuple[str, float]]:
    """(category, seconds) of the profiled steps; see the module docstring."""
    events = prof.events()
    ops = [e for e in events if e.name.startswith(("aten::", "kv_paged::"))]
    top_ops = []  # ops not nested in another op: self time would double count otherwise
    for e in ops:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "kv_paged::")):
            parent = parent.cpu_parent
        if parent is None:
            top_ops.append(e)
    total = defaultdict(float)
    for e in top_ops:
        total[category(e.name)] += e.cpu_time_total / 1e6
    region = lambda name: sum(e.cpu_time_total for e in events if e.name == name) / 1e6

    def ops_inside(name: str) -> float:
        t = 0.0
        for e in top_ops:
            p = e.cpu_parent
            while p is not None and p.name != name:
                p = p.cpu_parent
            if p is not None:
                t += e.cpu_time_total / 1e6
        return t

    forward = region("model.forward")
    model_python = forward - ops_inside("model.forward")
    engine_regions = sum(
        region(n) for n in ("engine.schedule", "engine.run_step", "engine.postprocess")
    )
    engine_python = (
        engine_regions
        - forward
        - sum(ops_inside(n) for n in ("engine.schedule", "engine.postprocess"))
        - (ops_inside("engine.run_step") - ops_inside("model.forward"))
    )
    rows = sorted(total.items(), key=lambda kv: -kv[1])
    rows += [("model Python between ops", model_python), ("engine Python", engine_python)]
    rows.append(("unaccounted (outside the regions)", wall - sum(t for _, t in rows)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=12, help="also print the N slowest ops")
    args = p.parse_args()

    from benchmarks.bench_e2e import load_real_model, make_chat_requests
    from kv_paged.engine import Engine, SamplingParams

    ns = argparse.Namespace(model=args.model, dtype="float32", device="cpu", requests=args.batch,
                            seed=0, min_new=64, max_new=64)  # fmt: skip
    model, tokenizer = load_real_model(ns)
    requests = make_chat_requests(ns, tokenizer)
    engine = Engine(model, max_num_batched_tokens=16384)
    params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    for prompt, _ in requests:
        engine.add_request(prompt, params)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, batch {args.batch}"
    )
    for phase, steps in (("prefill", 1), ("decode", args.steps)):
        if phase == "decode":
            engine.step()  # warm-up decode step
        with labelled_engine(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - t0
        rows = breakdown(prof, wall)
        print(f"\n{phase}: {steps} step(s), {wall / steps * 1e3:.1f} ms per step")
        print("| where | ms per step | share |\n|---|---|---|")
        for name, t in rows:
            print(f"| {name} | {t / steps * 1e3:.1f} | {t / wall:.0%} |")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
