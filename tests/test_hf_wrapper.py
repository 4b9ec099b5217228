"""The forward wrapper that PagedCache.for_model attaches: the cache under the keyword the installed
transformers reads, and a wrapped model that still deep-copies and pickles like any module."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_models import _ids, cache_kw

from kv_paged.integrations import hf

BLOCK_SIZE = 4


def test_cache_keyword_of_the_installed_transformers() -> None:
    """transformers >= 5.24 reads `cache=` (and the deprecated `past_key_values=`); older ones read
    only `past_key_values=`: a PagedCache under `cache=` there would be ignored by the model (it
    would run uncached, with wrong positions), so it is refused."""
    model = hf.tiny_model("llama")
    eager = hf.tiny_model("llama", attn_implementation="eager")
    ids = _ids(1, 6, seed=1)
    with torch.no_grad():
        ref = eager(ids).logits
        for name in ("cache", "past_key_values"):
            cache = hf.PagedCache.for_model(model, num_blocks=16, block_size=BLOCK_SIZE)
            if name in hf.cache.ACCEPTED_CACHE_KWARGS:
                with warnings.catch_warnings():  # past_key_values= is deprecated from 5.24 on
                    warnings.simplefilter("ignore", FutureWarning)
                    out = model(ids, **{name: cache}).logits
                assert (out - ref).abs().max() <= 1e-5
                assert cache.get_seq_length() == 6
            else:
                with pytest.raises(TypeError, match=f"takes the cache as {hf.CACHE_KWARG}="):
                    model(ids, **{name: cache})


def test_wrapped_model_deep_copies() -> None:
    """A deep copy of an attached model runs its own weights through its own wrapper."""
    model = hf.tiny_model("llama")
    hf.PagedCache.for_model(model, num_blocks=16, block_size=BLOCK_SIZE)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
        ids = _ids(1, 5, seed=2)
        cache = hf.PagedCache.for_model(clone, num_blocks=16, block_size=BLOCK_SIZE)
        with_cache = clone(ids, **cache_kw(cache)).logits
        plain = clone(ids).logits
        original = model(ids).logits
    assert (with_cache - plain).abs().max() <= 1e-5
    assert (plain - original).abs().max() > 1e-2  # the clone's weights, not the original's
    assert clone.forward.module is clone and clone.model.forward.module is clone.model


def test_wrapped_model_pickles() -> None:
    model = hf.tiny_model("llama")
    hf.PagedCache.for_model(model, num_blocks=16, block_size=BLOCK_SIZE)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = _ids(1, 5, seed=3)
    with torch.no_grad():
        cache = hf.PagedCache.for_model(loaded, num_blocks=16, block_size=BLOCK_SIZE)
        assert (loaded(ids, **cache_kw(cache)).logits - model(ids).logits).abs().max() <= 1e-5


def test_attach_is_idempotent() -> None:
    model = hf.tiny_model("llama")
    hf.attach(model)
    wrapper = model.__dict__["forward"]
    hf.attach(model)
    assert model.__dict__["forward"] is wrapper
