"""The sparse masked AdamW: exact (bit-identical to the gradient-masking reference in fp32),
nothing outside the mask ever moves, memory ∝ density, small updates survive bf16 weights."""

from __future__ import annotations

import pytest
import torch

from analysis.finetune.sparse_adamw import (MaskedOptimizerError, SparseMaskedAdamW, full_adamw_state_bytes,
                                            masked_reference_step)
from conftest import tiny_llama


def _mask(model, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random mask over the 2-D matrices inside the blocks (other parameters not trained)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()
            if ".layers." in n and p.dim() == 2}


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (4, 12), generator=g) for _ in range(n)]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _train(model, batches, mode: str, mask, lr=1e-3, nan_outside=False):
    params = dict(model.named_parameters())
    if mode == "sparse":
        opt = SparseMaskedAdamW(params, mask, lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    for ids in batches:
        opt.zero_grad()
        _loss(model, ids).backward()
        if nan_outside:  # a NaN gradient on an element the mask excludes must not leak
            for n, m in mask.items():
                params[n].grad.view(-1)[(~m).view(-1).nonzero()[0]] = float("nan")
        if mode == "sparse":
            opt.step()
        else:
            masked_reference_step(opt, params, mask)
    return opt


@pytest.mark.parametrize("nan_outside", [False, True])
def test_sparse_equals_reference_and_stays_inside_mask(nan_outside):
    start = tiny_llama(seed=0)
    init = {n: p.detach().clone() for n, p in start.named_parameters()}
    mask = _mask(start, 0.05)
    a, b = tiny_llama(seed=0).train(), tiny_llama(seed=0).train()
    _train(a, _batches(5), "sparse", mask, nan_outside=nan_outside)
    _train(b, _batches(5), "reference", mask, nan_outside=nan_outside)
    moved = 0
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n  # bit-identical in fp32
        assert torch.isfinite(pa).all(), n
        m = mask.get(n, torch.zeros_like(pa, dtype=torch.bool))
        assert torch.equal(pa[~m], init[n][~m]), n  # every element outside the mask: bit-identical
        moved += int((pa != init[n]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())  # and the masked ones did train


def test_mul_would_leak_nan():
    """Why masked_fill_: NaN · 0 = NaN."""
    g = torch.tensor([1.0, float("nan")])
    keep = torch.tensor([True, False])
    assert torch.isnan(g.clone().mul_(keep)).any()
    assert not torch.isnan(g.clone().masked_fill_(~keep, 0.0)).any()


def test_state_memory_is_proportional_to_density():
    model = tiny_llama()
    params = dict(model.named_parameters())
    full = full_adamw_state_bytes(params)
    for density in (0.01, 0.05, 0.2):
        opt = SparseMaskedAdamW(params, _mask(model, density))
        n = sum(p.numel() for p in params.values())
        assert opt.state_bytes() == 20 * opt.trainable  # 3 × 4 B (fp32 master, 2 moments) + 8 B int64 index
        assert opt.state_bytes() <= 3 * (opt.trainable / n) * full


def test_fp32_master_keeps_updates_bf16_would_round_away():
    torch.manual_seed(0)
    ref = tiny_llama(seed=0).to(torch.bfloat16)
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    mask = _mask(ref, 0.2)
    sparse, plain = tiny_llama(seed=0).to(torch.bfloat16).train(), tiny_llama(seed=0).to(torch.bfloat16).train()
    _train(sparse, _batches(30), "sparse", mask, lr=1e-5)
    _train(plain, _batches(30), "reference", mask, lr=1e-5)  # AdamW directly on bf16 weights

    def changed(model):
        return sum(int((p != init[n]).sum()) for n, p in model.named_parameters())

    assert changed(sparse) > 2 * changed(plain)


def test_resume_from_state_dict_is_exact():
    mask = _mask(tiny_llama(), 0.1)
    straight = tiny_llama(seed=0).train()
    _train(straight, _batches(6), "sparse", mask)
    resumed = tiny_llama(seed=0).train()
    opt = _train(resumed, _batches(6)[:3], "sparse", mask)
    state = opt.state_dict()
    params = dict(resumed.named_parameters())
    opt2 = SparseMaskedAdamW(params, mask)
    opt2.load_state_dict(state)
    for ids in _batches(6)[3:]:
        opt2.zero_grad()
        _loss(resumed, ids).backward()
        opt2.step()
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_masks():
    model = tiny_llama()
    params = dict(model.named_parameters())
    with pytest.raises(MaskedOptimizerError, match="the model does not have"):
        SparseMaskedAdamW(params, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(MaskedOptimizerError, match=r"has shape \(3,\)"):
        SparseMaskedAdamW(params, {name: torch.ones(3, dtype=torch.bool)})
