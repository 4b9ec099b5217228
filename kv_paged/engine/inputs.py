"""Checks of what a user hands Engine.add_request: the prompt (token ids or a string), the params,
and whether the request can ever run on this engine.

Design decision: every refusal here happens before the request exists, with a message naming the
argument, except a request too big for the pool or the model: it is accepted and reported by the
next step() as finished with `error`, so a batch of prompts never fails because of one of them.
"""

from __future__ import annotations

import torch

from kv_paged.beam_search import BeamSearchParams
from kv_paged.engine.request import Request
from kv_paged.engine.sampling import SamplingParams


def prompt_list(prompts, params) -> tuple[list, list]:
    """generate()'s arguments as (prompts, params) lists of equal length. prompts: a list of
    prompts, or one prompt on its own (a string, a flat token-id list, a 1-D tensor); params: one
    SamplingParams / BeamSearchParams / None for all, or one per prompt."""
    if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
        prompts = [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        prompts = [prompts]
    if params is None or isinstance(params, (SamplingParams, BeamSearchParams)):
        return prompts, [params] * len(prompts)
    params_list = list(params)
    if len(params_list) != len(prompts):
        raise ValueError(f"generate: {len(params_list)} SamplingParams for {len(prompts)} prompts")
    return prompts, params_list


def resolve_params(
    params, tokenizer, vocab_size: int | None
) -> tuple[SamplingParams, BeamSearchParams | None]:
    """add_request's params as (the scheduler's SamplingParams, the BeamSearchParams or None):
    None is SamplingParams(); beam search runs one greedy sequence per beam. Refuses what this
    engine cannot honour (stop strings without a tokenizer, more logprobs than the vocabulary)."""
    params = params if params is not None else SamplingParams()
    beam_params = params if isinstance(params, BeamSearchParams) else None
    if beam_params is not None:
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
    if params.stop and tokenizer is None:
        raise ValueError("add_request: SamplingParams.stop needs Engine(..., tokenizer=...)")
    if params.logprobs is not None and vocab_size and params.logprobs > vocab_size:
        raise ValueError(
            f"add_request: SamplingParams.logprobs = {params.logprobs} exceeds the vocabulary "
            f"({vocab_size} tokens)"
        )
    return params, beam_params


def encode_prompt(prompt, tokenizer, vocab_size: int | None) -> list[int]:
    """prompt (a str with a tokenizer, a 1-D integer tensor, or a sequence of integer ids) as a
    list of Python ints in [0, vocab_size). Bools and floats are refused, never truncated."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError(
                "add_request: prompt is a string but the Engine has no tokenizer; pass token ids "
                "or Engine(..., tokenizer=...)"
            )
        token_ids = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise ValueError(
                f"add_request: a tensor prompt must be 1-D token ids, got shape {tuple(prompt.shape)}"
            )
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
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
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(
                f"add_request: prompt token {t} is not in [0, vocab_size={vocab_size})"
            )
    return token_ids


def why_impossible(
    req: Request, max_model_len: int, block_size: int, num_blocks: int, max_num_seqs: int
) -> str | None:
    """Why req can never run (too long for the model, more KV than the whole pool, more sequences
    than max_num_seqs), or None."""
    p, m = len(req.prompt_token_ids), req.params.max_new_tokens
    if p + m > max_model_len:
        return (
            f"request {req.request_id}: prompt ({p} tokens) + max_new_tokens ({m}) = {p + m} "
            f"exceeds the model's max positions (max_position_embeddings = {max_model_len})"
        )
    # The last generated token is never fed back, so a sample holds at most p + m - 1 tokens of KV.
    need = -(-(p + m - 1) // block_size)
    if need > num_blocks:
        return (
            f"request {req.request_id}: prompt ({p} tokens) + max_new_tokens ({m}) needs {need} "
            f"KV blocks of {block_size} tokens but the whole pool has {num_blocks}; raise "
            "num_blocks / kv_memory"
        )
    if req.max_seqs > max_num_seqs:
        what = "beam_width" if req.beam is not None else "n"
        return (
            f"request {req.request_id}: {what} = {req.max_seqs} exceeds max_num_seqs = "
            f"{max_num_seqs}"
        )
    return None
