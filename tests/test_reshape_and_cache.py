"""reshape_and_cache against a Python scatter: every written slot holds exactly its token's row,
every other slot (NaN) is untouched, slot -1 skips the token. key/value are non-contiguous views
of a packed qkv tensor. Grid: seeded pairwise covering design over the axes (checked below)."""

import pytest
import torch

from kv_paged import ops

from conftest import DEVICES, DTYPES, covers_all_pairs, pairwise_grid, set_arg, write_arg

AXES = {
    "head_dim": [64, 80, 96, 128, 256],
    "block_size": [1, 8, 16, 32],
    "num_kv_heads": [8, 4, 1],
    "dtype": DTYPES,
    "kv_fused": [False, True],
}
GRID = pairwise_grid(AXES, seed=7)


def make_pools(num_blocks, bs, kvh, d, dtype, device, fused):
    if fused:
        pool = torch.full((num_blocks, 2, bs, kvh, d), float("nan"), dtype=dtype, device=device)
        return pool[:, 0], pool[:, 1]
    full = lambda: torch.full((num_blocks, bs, kvh, d), float("nan"), dtype=dtype, device=device)  # noqa: E731
    return full(), full()


def make_inputs(num_tokens, kvh, d, dtype, device, gen):
    qkv = torch.randn(num_tokens, 3 * kvh, d, generator=gen).to(dtype).to(device)
    return qkv[:, kvh : 2 * kvh], qkv[:, 2 * kvh :]  # strided views, like a fused QKV projection


def nan_equal(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_grid_is_pairwise():
    assert covers_all_pairs(AXES, GRID)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("point", GRID, ids=lambda p: "-".join(str(v) for v in p.values()))
def test_reshape_and_cache_grid(point, device, gen):
    bs, kvh, d, dtype = (
        point["block_size"],
        point["num_kv_heads"],
        point["head_dim"],
        point["dtype"],
    )
    num_blocks, num_tokens = 7, 13
    k_cache, v_cache = make_pools(num_blocks, bs, kvh, d, dtype, device, point["kv_fused"])
    key, value = make_inputs(num_tokens, kvh, d, dtype, device, gen)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
    slots = torch.cat([slots, torch.full((num_tokens - len(slots),), -1)])
    slots[torch.randperm(num_tokens, generator=gen)[:2]] = -1  # padding tokens
    k_ref, v_ref = k_cache.cpu().clone(), v_cache.cpu().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            k_ref[s // bs, s % bs] = key[t].cpu()
            v_ref[s // bs, s % bs] = value[t].cpu()
    ops.reshape_and_cache(key, value, k_cache, v_cache, slots.to(device))
    assert nan_equal(k_cache.cpu(), k_ref) and nan_equal(v_cache.cpu(), v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_all_padding(device, gen):
    k_cache, v_cache = make_pools(2, 4, 2, 8, torch.float32, device, False)
    key, value = make_inputs(3, 2, 8, torch.float32, device, gen)
    ops.reshape_and_cache(key, value, k_cache, v_cache, torch.full((3,), -1, device=device))
    ops.reshape_and_cache(
        key[:0], value[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.long, device=device)
    )
    assert k_cache.isnan().all() and v_cache.isnan().all()


def _bad_cases():
    def case(name, fn, match):
        return pytest.param(fn, match, id=name)

    return [
        case("key-rank", set_arg("key", lambda a: a["key"].flatten(1)), "key"),
        case("key-dtype", set_arg("key", lambda a: a["key"].half()), "key"),
        case("value-dtype", set_arg("value", lambda a: a["value"].double()), "value"),
        case("kcache-dtype", set_arg("k_cache", lambda a: a["k_cache"].half()), "k_cache"),
        case("kcache-rank", set_arg("k_cache", lambda a: a["k_cache"][0]), "k_cache"),
        case("vcache-shape", set_arg("v_cache", lambda a: a["v_cache"][:1]), "v_cache"),
        case("key-heads", set_arg("key", lambda a: a["key"][:, :1]), "key"),
        case("key-head-dim", set_arg("key", lambda a: a["key"][..., :4]), "key"),
        case("key-head-dim-strided", set_arg("key", lambda a: a["key"][..., ::2]), "key"),
        case("value-shape", set_arg("value", lambda a: a["value"][:2]), "value"),
        case("slot-int32", set_arg("slots", lambda a: a["slots"].int()), "slot_mapping"),
        case("slot-length", set_arg("slots", lambda a: a["slots"][:2]), "slot_mapping"),
        case("slot-too-large", write_arg("slots", 2, 8), "slot_mapping"),
        case("slot-below-minus-one", write_arg("slots", 1, -2), "slot_mapping"),
    ]


@pytest.mark.parametrize("mutate, match", _bad_cases())
def test_bad_input_leaves_caches_untouched(mutate, match, gen):
    k_cache, v_cache = make_pools(2, 4, 2, 8, torch.float32, "cpu", False)
    key, value = make_inputs(3, 2, 8, torch.float32, "cpu", gen)
    a = dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slots=torch.tensor([0, 5, 3]))
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        ops.reshape_and_cache(a["key"], a["value"], a["k_cache"], a["v_cache"], a["slots"])
    assert k_cache.isnan().all() and v_cache.isnan().all()  # no partial write before the error


def test_bad_device(gen):
    key, value = make_inputs(2, 2, 8, torch.float32, "cpu", gen)
    meta = torch.empty(2, 4, 2, 8, device="meta")
    with pytest.raises(RuntimeError, match="k_cache"):
        ops.reshape_and_cache(key, value, meta, meta, torch.tensor([0, 1]))


def test_opcheck(gen):
    k_cache, v_cache = make_pools(3, 4, 2, 8, torch.float32, "cpu", True)
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    key, value = make_inputs(5, 2, 8, torch.float32, "cpu", gen)
    torch.library.opcheck(
        torch.ops.kv_paged.reshape_and_cache.default,
        (key, value, k_cache, v_cache, torch.tensor([0, -1, 11, 4, 7])),
    )
