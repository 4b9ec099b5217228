"""Beam search through a PagedCache: transformers' own beam search (generate(num_beams=k)) over
kv_paged blocks, where the batch expansion and reorder_cache become BlockManager forks and frees.

Outputs must equal transformers' eager beam search with its default cache on every tiny
architecture; the prompt's blocks are held once however many beams read them; bad reorders are
refused with the cache unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_models import _ids, _left_pad, cache_kw

from kv_paged.integrations import hf

ARCHS = sorted(hf.TINY_ARCHS)
BLOCK_SIZE = 4
# (num_beams, length_penalty, early_stopping, num_return_sequences, eos: None or "from output")
BEAM_CASES = [
    (2, 1.0, False, 1, None),
    (3, 0.5, True, 2, "from output"),
    (4, 2.0, "never", 4, "from output"),
]


def _prompts(seed: int, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _left_pad([_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lens)])


def _beam_kwargs(num_beams, length_penalty, early_stopping, num_return, eos) -> dict:
    return {
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "num_return_sequences": num_return,
        "max_new_tokens": 9,
        "do_sample": False,
        "eos_token_id": eos,
        "pad_token_id": 0,
        "return_dict_in_generate": True,
        "output_scores": True,
    }


def _assert_same_beams(ours, ref) -> None:
    assert torch.equal(ours.sequences, ref.sequences)
    assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= 1e-4


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: f"beams{c[0]}-lp{c[1]}-es{c[2]}")
@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_equals_eager(arch: str, case: tuple) -> None:
    model = hf.tiny_model(arch)
    eager = hf.tiny_model(arch, attn_implementation="eager")
    ids, mask = _prompts(70, [11, 6])
    num_beams, lp, early, num_return, eos = case
    if eos is not None:  # a token eager's beams emit, so some hypotheses finish early
        with torch.no_grad():
            probe = eager.generate(ids, attention_mask=mask, **_beam_kwargs(*case[:4], None))
        eos = int(probe.sequences[0, ids.shape[1] + 2])
    kw = _beam_kwargs(num_beams, lp, early, num_return, eos)
    cache = hf.PagedCache.for_model(model, num_blocks=128, block_size=BLOCK_SIZE)
    with torch.no_grad():
        ref = eager.generate(ids, attention_mask=mask, **kw)
        ours = model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw)
    _assert_same_beams(ours, ref)
    cache.block_manager.check_invariants()
    cache.reset()
    assert cache.block_manager.stats()["blocks_in_use"] == 0


def test_beams_share_the_prompt_blocks() -> None:
    """The k expanded copies of a prompt are forks: its blocks are held once, written once; later
    only beams' own blocks (and copies of shared partial last blocks) are added."""
    model = hf.tiny_model("llama")
    eager = hf.tiny_model("llama", attn_implementation="eager")
    lens, num_beams, new = [22, 13], 4, 9
    ids, mask = _prompts(80, lens)
    cache = hf.PagedCache.for_model(model, num_blocks=256, block_size=BLOCK_SIZE)
    in_use: list[int] = []
    handle = model.register_forward_hook(
        lambda *_: in_use.append(cache.block_manager.stats()["blocks_in_use"])
    )
    kw = _beam_kwargs(num_beams, 1.0, False, 1, None) | {"max_new_tokens": new}
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw)
        ref = eager.generate(ids, attention_mask=mask, **kw)
    handle.remove()
    _assert_same_beams(ours, ref)
    prompt_blocks = sum(math.ceil(n / BLOCK_SIZE) for n in lens)
    assert in_use[0] == prompt_blocks  # not num_beams * prompt_blocks
    # Afterwards each beam holds at most its own tokens' blocks plus a partial one.
    own = math.ceil(new / BLOCK_SIZE) + 1
    assert max(in_use) <= prompt_blocks + len(lens) * num_beams * own
    full_copies = num_beams * sum(math.ceil((n + new) / BLOCK_SIZE) for n in lens)
    assert max(in_use) < full_copies
    assert cache.block_manager.stats()["cow_copies"] > 0
    cache.block_manager.check_invariants()


def test_beams_after_add_prompts_reuse_the_prefix() -> None:
    model = hf.tiny_model("qwen3")
    eager = hf.tiny_model("qwen3", attn_implementation="eager")
    first, first_mask = _prompts(90, [10, 15])
    kw = _beam_kwargs(3, 1.0, False, 2, None)
    cache = hf.PagedCache.for_model(model, num_blocks=256, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model.generate(first, attention_mask=first_mask, **cache_kw(cache), **kw)
    cache.reset()
    # The same prompts, each extended: their leading full blocks come from the prefix cache.
    rows = [first[i][first_mask[i].bool()] for i in range(2)]
    ids, mask = _left_pad([torch.cat([r, _ids(1, 5, seed=95 + i)[0]]) for i, r in enumerate(rows)])
    assert cache.add_prompts(ids, mask) > 0
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=mask, **cache_kw(cache), **kw)
        ref = eager.generate(ids, attention_mask=mask, **kw)
    _assert_same_beams(ours, ref)
    cache.block_manager.check_invariants()


def test_select_and_repeat_rows_in_a_hand_loop() -> None:
    """batch_repeat_interleave and batch_select_indices reshape the batch by forks and frees; the
    next forward's logits equal eager on the reshaped inputs."""
    model = hf.tiny_model("mistral")
    eager = hf.tiny_model("mistral", attn_implementation="eager")
    prompt = _ids(2, 7, seed=100)
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model(prompt, **cache_kw(cache))
        cache.batch_repeat_interleave(2)  # rows: p0 p0 p1 p1
        step = _ids(4, 1, seed=101)
        got = model(step, **cache_kw(cache)).logits
        full = torch.cat([prompt.repeat_interleave(2, dim=0), step], dim=1)
        assert (got[:, -1] - eager(full).logits[:, -1]).abs().max() <= 1e-5
        cache.batch_select_indices(torch.tensor([3, 0, 0]))
        step2 = _ids(3, 1, seed=102)
        got = model(step2, **cache_kw(cache)).logits
        full2 = torch.cat([full[[3, 0, 0]], step2], dim=1)
        assert (got[:, -1] - eager(full2).logits[:, -1]).abs().max() <= 1e-5
    cache.block_manager.check_invariants()
    assert cache.block_manager.stats()["num_seqs"] == 3


def test_bad_reorders_are_refused_unchanged() -> None:
    model = hf.tiny_model("llama")
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="no batch"):
        cache.reorder_cache(torch.tensor([0]))
    with torch.no_grad():
        model(_ids(3, 6, seed=110), **cache_kw(cache))
    before = (cache.seq_ids, cache.block_manager.stats())
    for bad, match in [
        (torch.tensor([0, 1]), "one entry per row"),
        (torch.tensor([0, 1, 3]), r"\[0, 3\)"),
        (torch.tensor([0, -1, 1]), r"\[0, 3\)"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
        (torch.zeros(3, 1, dtype=torch.long), "1-D"),
    ]:
        with pytest.raises(ValueError, match=match):
            cache.reorder_cache(bad)
        assert (cache.seq_ids, cache.block_manager.stats()) == before
    with pytest.raises(ValueError, match="repeats"):
        cache.batch_repeat_interleave(0)
    cache.reorder_cache(torch.tensor([2, 2, 0]))  # still usable, and the reorder took
    assert len(set(cache.seq_ids)) == 3 and cache.seq_ids[2] == before[0][0]
    cache.block_manager.check_invariants()


def test_unsupported_generation_modes_raise_clearly() -> None:
    """Assisted decoding needs crop(); inputs_embeds give no token ids to hash: both refused."""
    model = hf.tiny_model("llama")
    cache = hf.PagedCache.for_model(model, num_blocks=64, block_size=BLOCK_SIZE)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(2)
    with torch.no_grad(), pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 64), **cache_kw(cache))
