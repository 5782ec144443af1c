"""Each selector's formula against a value computed independently, by hand or by an explicit loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from selector_fixtures import PLANTED_ABOVE, PLANTED_BELOW, K, demo_batches, planted_pair
from torch import nn

from analysis.importance.scores import global_topk
from analysis.sparsity.masks import save_mask
from analysis.importance.selectors import SELECTORS
from analysis.importance.selectors.lisa import capped_probabilities

RTOL, ATOL = 1e-4, 1e-9


class Toy(nn.Module):
    """Embedding (3 tokens × 2) -> Linear(2 -> 2) -> Linear(2 -> 2), weights set by hand."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 2)
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
            self.a.weight.copy_(torch.tensor([[0.5, -3.0], [2.0, -0.2]]))
            self.b.weight.copy_(torch.tensor([[-1.5, 0.05], [0.9, -2.5]]))

    def forward(self, input_ids, attention_mask=None):
        return self.b(self.a(self.emb(input_ids)))


def _grads(model, batch):
    """Gradient of HF's own ``labels=`` loss on one batch, by name."""
    params = dict(model.named_parameters())
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _sequences(batches):
    """Every sequence alone, padding removed: the per-sample reference."""
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][row].sum())
            yield {k: v[row:row + 1, :n] for k, v in b.items()}


@pytest.fixture(scope="module")
def batches():
    return demo_batches(samples=6, batch_size=3)


def test_magnitude_topk_matches_torch_topk_on_a_hand_list():
    toy = Toy()
    scores = SELECTORS["magnitude"].fn(toy)
    mask = global_topk(scores, 0.4, scope="all")  # 14 elements -> round(5.6) = 6
    hand = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 4.0,  # emb
                         0.5, -3.0, 2.0, -0.2,  # a
                         -1.5, 0.05, 0.9, -2.5])  # b
    expected = torch.zeros(hand.numel(), dtype=torch.bool)
    expected[torch.topk(hand.abs(), 6).indices] = True
    got = torch.cat([mask[n].reshape(-1) for n in ("emb.weight", "a.weight", "b.weight")])
    assert int(got.sum()) == 6
    assert torch.equal(got, expected)  # |4|, |-3|, |3|, |-2.5|, |2| and |2| (no tie at the cut)


def test_magnitude_topk_matches_torch_topk_on_tiny_llama():
    model = tiny_llama()
    scores = SELECTORS["magnitude"].fn(model)
    mask = global_topk(scores, 0.1)
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
    flat = torch.cat([dict(model.named_parameters())[n].detach().abs().reshape(-1) for n in names])
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.topk(flat, round(0.1 * flat.numel())).indices] = True
    assert torch.equal(torch.cat([mask[n].reshape(-1) for n in names]), expected)
    assert not any(mask[n].any() for n in mask if n not in names)  # embeddings, norms, lm_head out of scope


def test_smallest_magnitude_is_minus_magnitude():
    model = tiny_llama()
    small = SELECTORS["smallest_magnitude"].fn(model).values
    for n, p in model.named_parameters():
        assert torch.equal(small[n], -p.detach().abs())


def test_wanda_on_a_hand_built_linear_layer():
    toy = Toy()
    # two batches (statistics accumulate); the padded sequence contributes only its first token (2)
    batches = [{"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.tensor([[1, 1, 1]])},
               {"input_ids": torch.tensor([[2, 2, 0]]), "attention_mask": torch.tensor([[1, 0, 0]])}]
    values = SELECTORS["wanda"].fn(toy, batches).values
    # inputs of `a` over real tokens: rows (1,0), (0,2), (3,4), (3,4)
    x_norm = torch.tensor([math.sqrt(1 + 0 + 9 + 9), math.sqrt(0 + 4 + 16 + 16)])  # sqrt(19), 6
    assert torch.allclose(values["a.weight"], toy.a.weight.detach().abs() * x_norm[None, :])
    # inputs of `b` are a's outputs: computed here by hand from a's weights
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [3.0, 4.0]]) @ toy.a.weight.detach().T
    assert torch.allclose(values["b.weight"], toy.b.weight.detach().abs() * h.norm(dim=0)[None, :])
    # the embedding is a linear layer on one-hot inputs: token counts 1, 1, 2
    counts = torch.tensor([1.0, 1.0, 2.0]).sqrt()
    assert torch.allclose(values["emb.weight"], toy.emb.weight.detach().abs() * counts[:, None])


def test_taylor_is_weight_times_mean_gradient(batches):
    model = tiny_llama()
    per_batch = [_grads(model, b) for b in batches]
    values = SELECTORS["taylor"].fn(model, batches).values
    for n, p in model.named_parameters():
        g = sum(gb[n] for gb in per_batch) / len(per_batch)
        assert torch.allclose(values[n], (p.detach() * g).abs(), rtol=RTOL, atol=ATOL), n


def test_gblm_l2_and_fisher_from_per_sample_gradients(batches):
    model = tiny_llama()
    per_sample = [_grads(model, s) for s in _sequences(batches)]
    assert len(per_sample) == 6
    fisher = SELECTORS["fisher"].fn(model, batches).values
    gblm = SELECTORS["taylor"].fn(model, batches, gradient="l2", micro_batch=1).values
    for n, p in model.named_parameters():
        mean_sq = sum(g[n].square() for g in per_sample) / len(per_sample)
        assert torch.allclose(fisher[n], mean_sq, rtol=RTOL, atol=ATOL * 1e-3), n
        assert torch.allclose(gblm[n], p.detach().abs() * mean_sq.sqrt(), rtol=RTOL, atol=ATOL), n


def test_sensitivity_follows_adalora_recurrence(batches):
    model = tiny_llama()
    per_batch = [_grads(model, b) for b in batches]
    values = SELECTORS["sensitivity"].fn(model, batches, beta1=0.7, beta2=0.6).values
    for n, p in model.named_parameters():
        ipt = unc = torch.zeros_like(p)
        for g in per_batch:
            now = (p.detach() * g[n]).abs()
            ipt = 0.7 * ipt + 0.3 * now
            unc = 0.6 * unc + 0.4 * (now - ipt).abs()
        assert torch.allclose(values[n], ipt * unc, rtol=1e-3, atol=1e-12), n


def test_head_importance_equals_per_sequence_head_gradients(batches):
    """|∂L/∂ξ_h| = |Σ_t ⟨x_{t,h}, ∂L/∂x_{t,h}⟩| at ξ = 1, x the o_proj input, per sequence."""
    model = tiny_llama()
    H, hd = 4, 16
    expected = torch.zeros(2, H, dtype=torch.float64)
    for seq in _sequences(batches):
        inputs: dict[int, torch.Tensor] = {}
        handles = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, L=L, store=inputs: store.__setitem__(L, a[0])) for L, layer in enumerate(model.model.layers)]
        try:
            loss = model(**seq).loss
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(loss, [inputs[0], inputs[1]])
        for L in range(2):
            per_head = (inputs[L] * grads[L]).reshape(-1, H, hd).sum((0, 2))  # [heads]
            expected[L] += per_head.abs().double()
    raw = SELECTORS["head_importance"].fn(model, batches, normalize=False).values
    assert torch.allclose(raw.double(), expected, rtol=1e-4)
    normalized = SELECTORS["head_importance"].fn(model, batches).values
    assert torch.allclose(normalized.double(), expected / expected.norm(dim=1, keepdim=True), rtol=1e-4)


def test_fluctuation_is_input_variance_times_squared_column_norm(batches):
    model = tiny_llama()
    captured = {("down", 0): [], ("down", 1): [], ("o", 0): [], ("o", 1): []}
    handles = []
    for L, layer in enumerate(model.model.layers):
        for kind, mod in (("down", layer.mlp.down_proj), ("o", layer.self_attn.o_proj)):
            handles.append(mod.register_forward_pre_hook(lambda m, a, key=(kind, L): captured[key].append(a[0])))
    try:
        with torch.no_grad():
            for b in batches:
                valid = b["attention_mask"].bool()
                before = {k: len(v) for k, v in captured.items()}
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                for k, v in captured.items():
                    v[before[k]] = v[before[k]][valid]
    finally:
        for h in handles:
            h.remove()
    channels = SELECTORS["fluctuation"].fn(model, batches).values
    heads = SELECTORS["fluctuation"].fn(model, batches, granularity="head").values
    for L, layer in enumerate(model.model.layers):
        x = torch.cat(captured[("down", L)]).double()
        ref = x.var(0) * layer.mlp.down_proj.weight.detach().double().square().sum(0)
        assert torch.allclose(channels[L].double(), ref, rtol=1e-5)
        x = torch.cat(captured[("o", L)]).double()
        ref = (x.var(0) * layer.self_attn.o_proj.weight.detach().double().square().sum(0)).reshape(4, 16).sum(1)
        assert torch.allclose(heads[L].double(), ref, rtol=1e-5)


def test_block_influence_of_the_first_block(batches):
    model = tiny_llama()
    values = SELECTORS["block_influence"].fn(model, batches).values
    cos, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       output_hidden_states=True).hidden_states
            valid = b["attention_mask"].bool()
            c = F.cosine_similarity(hs[0][valid], hs[1][valid], dim=-1)
            cos, count = cos + float(c.double().sum()), count + c.numel()
    assert values[0].item() == pytest.approx(1 - cos / count, rel=1e-5)
    assert 0 < values[1].item() < 2


def test_lisa_probabilities():
    model = tiny_llama()
    assert torch.allclose(SELECTORS["lisa"].fn(model, active_layers=1).values, torch.tensor([0.5, 0.5]))
    norm = SELECTORS["lisa"].fn(model, mode="weight_norm", active_layers=1).values
    sq = [sum(float(p.detach().double().square().sum()) for n, p in model.named_parameters()
              if f".layers.{L}." in n) for L in range(2)]
    w = torch.tensor(sq).sqrt()
    assert torch.allclose(norm, (w / w.sum()).float())
    # capped at 1, the excess spread over the others: [1, 1, 8] for 2 blocks -> [0.5, 0.5, 1]
    p = capped_probabilities(torch.tensor([1.0, 1.0, 8.0], dtype=torch.float64), 2)
    assert torch.allclose(p, torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))


def test_diff_selector_finds_the_planted_changes(tmp_path):
    base, tuned = planted_pair(tmp_path)
    model = tiny_llama()
    scores = SELECTORS["diff"].fn(model, base=str(base), tuned=str(tuned))
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for name, idx in PLANTED_ABOVE:
        expected[name][idx] = 1.0
    for n, want in expected.items():
        assert torch.equal(scores.values[n], want), n
    assert scores.info["missing"] == []
    # at τ = 0 the 1e-7 change shows too
    exact = SELECTORS["diff"].fn(model, base=str(base), tuned=str(tuned), tol=0.0)
    (name, idx), = PLANTED_BELOW
    assert name == K and exact.values[K][idx] == 1.0
    assert sum(int(v.sum()) for v in exact.values.values()) == len(PLANTED_ABOVE) + 1
    # the same subnetwork from a mask file
    path = save_mask(tmp_path / "m.safetensors", {n: v.bool() for n, v in scores.values.items()})
    from_file = SELECTORS["diff"].fn(model, mask=str(path))
    assert all(torch.equal(from_file.values[n], scores.values[n]) for n in expected)
