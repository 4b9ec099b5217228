"""`python -m kv_paged demo`: a chatbot workload served by kv_paged.Engine, with a metrics table and
a PNG of KV memory in use over time (paged + shared vs a contiguous max-length reservation).

Design decision: every user shares one system prompt and comes back for a second turn (previous
prompt + reply + new text) as soon as the first reply finishes, so the run exercises continuous
batching, prefix caching across requests and across turns, and paged memory in one workload. Replies
end at a stop token or max_new_tokens, so their lengths are long-tailed like real chat.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time

import torch

# The embedded default: a small Llama built in code with random weights (no download).
DEMO_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def build_demo_model(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """LlamaForCausalLM with DEMO_CONFIG and random weights (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**DEMO_CONFIG, attn_implementation="eager")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def chat_workload(num_users: int, system_len: int, vocab: int, seed: int, tokenizer=None):
    """(system prompt ids, per-user first message ids, per-user second message ids)."""
    rng = random.Random(seed)
    if tokenizer is not None:
        system = tokenizer(
            "You are a helpful assistant for a hardware store. Answer briefly, politely, and only "
            "about the store's products, opening hours, delivery and returns. " * 4
        )["input_ids"]
        topics = [
            "drills",
            "paint",
            "ladders",
            "delivery",
            "returns",
            "opening hours",
            "garden tools",
            "lamps",
        ]
        ask = lambda i, t: tokenizer(
            f"\nUser {i}: what can you tell me about {t}?\nAssistant:", add_special_tokens=False
        )["input_ids"]
        first = [ask(i, rng.choice(topics)) for i in range(num_users)]
        second = [ask(i, rng.choice(topics)) for i in range(num_users)]
        return list(system), first, second
    special = 8  # keep the lowest ids (pad, bos, eos-like) out of the text
    text = lambda n: [rng.randrange(special, vocab) for _ in range(n)]
    system = text(system_len)
    first = [text(rng.randint(12, 48)) for _ in range(num_users)]
    second = [text(rng.randint(12, 48)) for _ in range(num_users)]
    return system, first, second


def run_chat(
    engine, system, first, second, params, use_tqdm: bool = True, arrivals_per_step: int = 4
):
    """Serves turn 1 of every user (arrivals_per_step new users per engine step), and each user's
    turn 2 as soon as their turn 1 finishes.
    Turn 2 continues the first sample. Returns {(user, turn): RequestOutput}."""
    from kv_paged.metrics import progress_bar

    engine.reset_metrics()
    results = {}
    prompts = {}
    arrivals = list(enumerate(first))
    # Every 4th user asks for two alternative replies (n = 2: forked blocks, copy-on-write).
    params_n2 = dataclasses.replace(params, n=2)
    params_for = lambda u: params_n2 if u % 4 == 3 else params
    bar = progress_bar(2 * len(first), use_tqdm)
    while arrivals or engine.has_unfinished():
        # Users arrive a few per step: the first one's prefill puts the system prompt in the prefix
        # cache, so later users compute only their own text.
        k = 1 if len(arrivals) == len(first) else arrivals_per_step
        for u, msg in arrivals[:k]:
            prompts[(u, 1)] = system + msg
            engine.add_request(prompts[(u, 1)], params_for(u), request_id=f"user{u}-turn1")
        del arrivals[:k]
        for out in engine.step():
            if not out.finished:
                continue
            user, turn = out.request_id.removeprefix("user").split("-turn")
            key = (int(user), int(turn))
            results[key] = out
            if bar is not None:
                bar.update(1)
            if key[1] == 1 and out.error is None:
                reply = out.outputs[0].token_ids
                if engine.tokenizer is not None:  # as a chat app does: the reply's text, re-encoded
                    text = out.outputs[0].text  # (cut before a stop string, no special tokens)
                    reply = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
                prompts[(key[0], 2)] = prompts[key] + reply + second[key[0]]
                engine.add_request(
                    prompts[(key[0], 2)], params_for(key[0]), request_id=f"user{key[0]}-turn2"
                )
    if bar is not None:
        bar.close()
    engine.metrics().end = time.perf_counter()
    return results


def plot_memory(metrics, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = metrics.bytes_per_block / 2**20
    contiguous = [t / metrics.block_size * mib for t in metrics.contiguous_tokens]
    unshared = [b * mib for b in metrics.blocks_unshared]
    shared = [b * mib for b in metrics.blocks_in_use]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        metrics.t,
        contiguous,
        label="contiguous reservation (prompt + max_new_tokens per sample)",
        color="tab:red",
    )
    ax.plot(metrics.t, unshared, label="paged, no sharing", color="tab:orange", linestyle="--")
    ax.plot(metrics.t, shared, label="kv_paged: paged + shared (blocks in use)", color="tab:blue")
    ax.axhline(metrics.num_blocks * mib, color="gray", linestyle=":", label="KV pool")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV cache memory (MiB)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kv_paged demo", description=__doc__)
    parser.add_argument(
        "--model",
        default=None,
        help="local HF checkpoint directory (default: embedded random-weight Llama)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument(
        "--system-len", type=int, default=160, help="system prompt tokens (embedded model)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default="kv_paged_demo.png",
        help="where the PNG goes (benchmarks/results/demo_kv_memory.png is a recorded run)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )

    import kv_paged
    from kv_paged.engine import Engine
    from kv_paged.sampling import SamplingParams

    tokenizer = None
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except Exception:  # a checkpoint without a tokenizer still runs on token ids
            tokenizer = None
        name = os.path.basename(os.path.normpath(args.model))
    else:
        model = build_demo_model(args.device, dtype, args.seed)
        name = "embedded random-weight Llama"
    vocab = model.config.get_text_config().vocab_size
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"kv_paged {kv_paged.__version__} demo: {name} ({nparams / 1e6:.1f}M parameters, {dtype}, {args.device})"
    )

    system, first, second = chat_workload(args.users, args.system_len, vocab, args.seed, tokenizer)
    # Replies end at one of 1/32 of the vocabulary (a long-tailed length, like real chat) or at
    # max_new_tokens; a real checkpoint stops at its own eos, or when it starts the next user turn.
    stop_ids = None if tokenizer is not None else list(range(8, vocab, 32))
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=args.seed,
        stop_token_ids=stop_ids,
        stop=["\nUser"] if tokenizer is not None else None,
    )
    engine = Engine(
        model, num_blocks=args.num_blocks, block_size=args.block_size, tokenizer=tokenizer
    )
    print(
        f"workload: {args.users} users x 2 turns, shared system prompt of {len(system)} tokens, "
        f"max_new_tokens {args.max_new_tokens}; KV pool {engine.num_blocks} blocks of {args.block_size} tokens"
    )
    results = run_chat(engine, system, first, second, params, use_tqdm=not args.no_progress)
    m = engine.metrics()
    errors = [r for r in results.values() if r.error]
    print()
    print(m.table())
    if errors:
        print(f"{len(errors)} requests failed, e.g.: {errors[0].error}")
    if tokenizer is not None and (0, 2) in results:
        print(f"\nuser 0, turn 2 reply: {results[(0, 2)].outputs[0].text!r}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_memory(m, args.out, f"KV memory, {args.users}-user chat, 2 turns ({name})")
    print(f"\nwrote the KV-memory plot to {os.path.abspath(args.out)}")
    stats = engine.block_manager.stats()
    if stats["blocks_in_use"] != 0:
        print(f"warning: {stats['blocks_in_use']} blocks still in use after the run")
        return 1
    return 0
