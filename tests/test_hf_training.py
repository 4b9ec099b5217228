"""Training through attn_implementation="kv_paged": every tiny architecture of
kv_paged.integrations.hf.TINY_ARCHS (float32, CPU) runs a few AdamW steps on a left-padded batch,
once with kv_paged attention (flash_attention forward + its FA2 backward) and once with "eager";
the losses of every step and the gradients of every parameter at every step must agree.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kv_paged.integrations import hf

ARCHS = sorted(hf.TINY_ARCHS)
STEPS = 3
LOSS_ATOL = 2e-5
GRAD_RTOL = 1e-4  # of the parameter's largest eager gradient


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids [3, 16] (lengths 16, 5, 11: longer than the mistral/gemma2 windows), the
    mask, and labels with -100 wherever the prediction would come from a padding position."""
    gen = torch.Generator().manual_seed(0)
    lengths = [16, 5, 11]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(2, 128, (n,), generator=gen)
        mask[i, width - n :] = 1
    labels = ids.masked_fill(mask == 0, -100)
    # The model shifts labels by one: each row's first real token would be predicted from a padding
    # position, whose output is unspecified (eager attends over masked keys, kv_paged gives zeros).
    for i, n in enumerate(lengths):
        labels[i, width - n] = -100
    return ids, mask, labels


def _train(model: torch.nn.Module) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask, labels = _batch()
    losses, grads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return losses, grads


@pytest.mark.parametrize("arch", ARCHS)
def test_training_matches_eager(arch: str) -> None:
    ours_losses, ours_grads = _train(hf.tiny_model(arch))
    ref_losses, ref_grads = _train(hf.tiny_model(arch, attn_implementation="eager"))
    assert all(torch.isfinite(torch.tensor(ours_losses)))
    for step, (a, b) in enumerate(zip(ours_losses, ref_losses)):
        assert abs(a - b) <= LOSS_ATOL, f"{arch} step {step}: loss {a} vs eager {b}"
    for step, (ga, gb) in enumerate(zip(ours_grads, ref_grads)):
        assert ga.keys() == gb.keys()
        for name in gb:
            scale = gb[name].abs().max().item()
            err = (ga[name] - gb[name]).abs().max().item()
            assert err <= GRAD_RTOL * scale + 1e-7, (
                f"{arch} step {step} {name}: max |grad kv_paged - eager| {err:.3g} (max {scale:.3g})"
            )
    # The losses moved: the optimizer steps saw real gradients.
    assert ours_losses[-1] < ours_losses[0]


def test_attention_gets_gradients() -> None:
    """q/k/v projections receive nonzero gradients through kv_paged attention (not a detached op)."""
    model = hf.tiny_model("llama")
    model.train()
    ids, mask, labels = _batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().max() > 0
