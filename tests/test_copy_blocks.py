"""copy_blocks (copy-on-write pairs for every layer) and swap_blocks (block copies between pools on
any devices) against Python index copies; bad pairs are refused before anything is written."""

import pytest
import torch

from kv_paged import ops

from conftest import DEVICES, DTYPES


def random_pools(num_layers, num_blocks, bs, kvh, d, dtype, device, gen, fused):
    ks, vs = [], []
    for _ in range(num_layers):
        if fused:
            pool = torch.randn(num_blocks, 2, bs, kvh, d, generator=gen).to(dtype).to(device)
            ks.append(pool[:, 0])
            vs.append(pool[:, 1])
        else:
            ks.append(torch.randn(num_blocks, bs, kvh, d, generator=gen).to(dtype).to(device))
            vs.append(torch.randn(num_blocks, bs, kvh, d, generator=gen).to(dtype).to(device))
    return ks, vs


def cow_pairs(num_blocks, n, gen):
    """n (src, dst) pairs, sources may repeat, destinations distinct and never sources."""
    perm = torch.randperm(num_blocks, generator=gen)
    srcs, dsts = perm[: num_blocks - n], perm[num_blocks - n :]
    src = srcs[torch.randint(len(srcs), (n,), generator=gen)]
    return torch.stack([src, dsts], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, fused", [(1, False), (16, True), (32, False), (8, True)])
def test_copy_blocks(device, dtype, block_size, fused, gen):
    ks, vs = random_pools(3, 12, block_size, 2, 64, dtype, device, gen, fused)
    mapping = cow_pairs(12, 5, gen)
    k_ref = [k.clone() for k in ks]
    v_ref = [v.clone() for v in vs]
    for s, d in mapping.tolist():
        for layer in range(3):
            k_ref[layer][d] = k_ref[layer][s]
            v_ref[layer][d] = v_ref[layer][s]
    ops.copy_blocks(ks, vs, mapping.to(device) if device != "cpu" else mapping)
    for layer in range(3):
        assert torch.equal(ks[layer], k_ref[layer]) and torch.equal(vs[layer], v_ref[layer])


def test_copy_blocks_empty(gen):
    ks, vs = random_pools(2, 4, 4, 1, 8, torch.float32, "cpu", gen, False)
    before = [k.clone() for k in ks]
    ops.copy_blocks(ks, vs, torch.zeros(0, 2, dtype=torch.long))
    ops.copy_blocks([], [], torch.tensor([[0, 1]]))
    assert all(torch.equal(a, b) for a, b in zip(ks, before))


@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1, 2]])), "block_mapping", id="mapping-shape"
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1]], dtype=torch.int32)),
            "block_mapping",
            id="mapping-int32",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1], [9, 2]])),
            r"block_mapping\[1, 0\]",
            id="src-out-of-range",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1], [2, -1]])),
            r"block_mapping\[1, 1\]",
            id="dst-negative",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1], [2, 1]])),
            "more than once",
            id="dst-repeated",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1], [1, 2]])),
            "both a source and a destination",
            id="dst-is-src",
        ),
        pytest.param(lambda a: a.update(vs=a["vs"][:1]), "v_caches", id="list-lengths"),
        pytest.param(
            lambda a: a["vs"].__setitem__(1, a["vs"][1][:, :2]), r"v_caches\[1\]", id="layer-shape"
        ),
        pytest.param(
            lambda a: a["ks"].__setitem__(1, a["ks"][1].half()), r"k_caches\[1\]", id="layer-dtype"
        ),
        pytest.param(lambda a: a["ks"].__setitem__(0, a["ks"][0][0]), r"k_caches\[0\]", id="rank"),
        # Block ids name blocks of one pool: a layer with fewer blocks (the mapping still in its
        # range) is a caller bug, and the CUDA launch once sized every layer from layer 0.
        pytest.param(
            lambda a: (
                a["ks"].__setitem__(1, a["ks"][1][:3]),
                a["vs"].__setitem__(1, a["vs"][1][:3]),
            ),
            r"k_caches\[1\]: 3 blocks, but k_caches\[0\] has 4",
            id="layer-num-blocks",
        ),
    ],
)
def test_copy_blocks_bad_input(mutate, match, gen):
    ks, vs = random_pools(2, 4, 4, 1, 8, torch.float32, "cpu", gen, False)
    before = [t.clone() for t in ks + vs]
    a = dict(ks=list(ks), vs=list(vs), m=torch.tensor([[0, 1], [0, 2]]))
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        ops.copy_blocks(a["ks"], a["vs"], a["m"])
    assert all(torch.equal(t, b) for t, b in zip(ks + vs, before))  # nothing copied


SWAP_DEVICES = [("cpu", "cpu")] + (
    [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")] if torch.cuda.is_available() else []
)


@pytest.mark.parametrize("src_device, dst_device", SWAP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_swap_blocks(src_device, dst_device, dtype, strided, gen):
    src_ks, _ = random_pools(1, 6, 16, 2, 32, dtype, src_device, gen, strided)
    dst_ks, _ = random_pools(1, 9, 16, 2, 32, dtype, dst_device, gen, strided)
    src, dst = src_ks[0], dst_ks[0]
    mapping = torch.tensor([[5, 0], [0, 8], [5, 3], [2, 2]])
    ref = dst.cpu().clone()
    for s, d in mapping.tolist():
        ref[d] = src[s].cpu()
    ops.swap_blocks(src, dst, mapping)
    assert torch.equal(dst.cpu(), ref)


@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(lambda a: a.update(dst=a["dst"].half()), "dst", id="dtype"),
        pytest.param(lambda a: a.update(dst=a["dst"][:, :2]), "dst", id="block-shape"),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[6, 0]])),
            r"block_mapping\[0, 0\]",
            id="src-out-of-range",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 9]])),
            r"block_mapping\[0, 1\]",
            id="dst-out-of-range",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1], [2, 1]])),
            "more than once",
            id="dst-repeated",
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([0, 1])), "block_mapping", id="mapping-rank"
        ),
        pytest.param(
            lambda a: a.update(m=torch.tensor([[0, 1]], dtype=torch.int32)),
            "block_mapping",
            id="mapping-int32",
        ),
    ],
)
def test_swap_blocks_bad_input(mutate, match, gen):
    src = torch.randn(6, 4, 2, 8, generator=gen)
    dst = torch.zeros(9, 4, 2, 8)
    a = dict(src=src, dst=dst, m=torch.tensor([[0, 1], [3, 4]]))
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        ops.swap_blocks(a["src"], a["dst"], a["m"])
    assert dst.eq(0).all()


def test_opcheck(gen):
    ks, vs = random_pools(2, 5, 4, 2, 8, torch.float32, "cpu", gen, False)
    torch.library.opcheck(
        torch.ops.kv_paged.copy_blocks.default, (ks, vs, torch.tensor([[0, 3], [0, 4]]))
    )
    src, dst = torch.randn(4, 4, 2, 8, generator=gen), torch.zeros(6, 4, 2, 8)
    torch.library.opcheck(
        torch.ops.kv_paged.swap_blocks.default, (src, dst, torch.tensor([[1, 5], [3, 0]]))
    )
