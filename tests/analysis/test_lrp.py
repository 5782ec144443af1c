"""LRP rules (analysis/attribution/lrp.py): hand-computed LRP-ε, conservation per family, exact restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis.attribution.methods import attribute, embeddings, encode, logit_of, target_logits
from analysis.families.demo_task import make_tokenizer
from analysis.attribution.lrp import LRPError, epsilon_forward, identity_forward, instance_forwards, lrp_rules
from conftest import tiny_gpt2, tiny_llama

PROMPT, TARGET = "Q:12+07\nA:", "19"


def _hand_net():
    """x = [1, 2]; h = relu(W1 x) = relu([-1, 4]) = [0, 4]; y = W2 h = 3·0 + 1·4 = 4."""
    lin1, lin2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        lin2.weight.copy_(torch.tensor([[3.0, 1.0]]))
    return nn.Sequential(lin1, nn.ReLU(), lin2)


@pytest.mark.parametrize("eps, expected", [
    # ε = 1: R_h2 = 4·1/(4+1)·4 = 3.2, R_h1 = 0 (h1 = 0); through ReLU unchanged; at the input
    # z2 = 4: R_x1 = 1·2/(4+1)·3.2 = 1.28, R_x2 = 2·1/(4+1)·3.2 = 1.28 (z1 = −1 carries no relevance)
    (1.0, [1.28, 1.28]),
    # ε = 0 is gradient × input: R_x = x ⊙ W1ᵀ(relu' ⊙ W2ᵀ) = [1·2·1, 2·1·1] = [2, 2], Σ = y = 4
    (0.0, [2.0, 2.0]),
])
def test_lrp_epsilon_by_hand(eps, expected):
    net = _hand_net()
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    lin1, relu, lin2 = net
    with instance_forwards([(lin1, epsilon_forward(lin1, eps)), (relu, identity_forward(relu)),
                            (lin2, epsilon_forward(lin2, eps))]):
        y = net(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    assert float(y.detach()) == 4.0
    assert (x * g)[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert all("forward" not in m.__dict__ for m in net)  # restored


def test_identity_rule_passes_relevance_through_an_activation():
    act = nn.SiLU()
    x = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    with instance_forwards([(act, identity_forward(act))]):
        y = act(x)
        (g,) = torch.autograd.grad((y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum(), x)
    assert torch.equal(y, torch.nn.functional.silu(x))  # the value is the activation's, exactly
    # relevance in = relevance out, element by element: x·g = silu(x)·w
    assert (x * g).tolist() == pytest.approx(
        (torch.nn.functional.silu(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist())


def test_cp_lrp_conserves_on_a_gqa_llama():
    model = tiny_llama(vocab=21, seed=3)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    r = attribute(model, make_tokenizer(), PROMPT, TARGET, "lrp-cp", with_faithfulness=False)
    assert r.conservation_error < 1e-4
    assert r.relevance_sum == pytest.approx(r.target_logit, rel=1e-4)
    # AttnLRP and plain gradient × input do not conserve through the softmax
    attn = attribute(model, make_tokenizer(), PROMPT, TARGET, "lrp-attn", with_faithfulness=False)
    ixg = attribute(model, make_tokenizer(), PROMPT, TARGET, "ixg", with_faithfulness=False)
    assert attn.conservation_error > 1e-3 and ixg.conservation_error > 1e-3


def bert_masked_lm():
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france", "is", "paris",
             "rome", "italy", "a", "city"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(1)
    model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, vocab_size=len(words),
                                       max_position_embeddings=64)).eval()
    with torch.no_grad():  # give the biases real values: the bound below must account for them
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model, tok


def _gpt2_with_biases():
    model = tiny_gpt2(seed=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _qwen2_with_biases():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=21)).eval()
    with torch.no_grad():  # Qwen2's q/k/v projections have biases
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    assert any(n.endswith("v_proj.bias") for n, _ in model.named_parameters())
    return model


def _position_modules(model):
    if model.config.model_type == "qwen2":
        return []  # rotary positions act inside attention, on q and k: nothing is added to the stream
    if model.config.model_type == "gpt2":
        return [model.transformer.wpe]
    e = model.bert.embeddings
    return [e.position_embeddings, e.token_type_embeddings]


@pytest.mark.parametrize("family", ["gpt2", "bert", "qwen2"])
def test_cp_lrp_bound_with_biases_and_position_embeddings(family):
    """GPT-2 and BERT add position (and token-type) embeddings and biases outside the input
    embeddings (Qwen2: biases of q, k and v). Under CP-LRP the modified network is linear in (token embeddings, position
    embeddings, biases) jointly, so Σ R_tokens + Σ R_positions + Σ b·∂f/∂b = target logit exactly;
    the conservation error reported over the token embeddings alone is therefore
    |Σ R_positions + Σ R_biases| / |logit| — the bound we state, checked here to 1e-4."""
    if family in ("gpt2", "qwen2"):
        model, tok = (_gpt2_with_biases() if family == "gpt2" else _qwen2_with_biases()), make_tokenizer()
        ex = encode(tok, PROMPT, TARGET)
        prompt, target = PROMPT, TARGET
    else:
        model, tok = bert_masked_lm()
        prompt, target = "the capital of france is", "paris"
        ex = encode(tok, prompt, target, masked_lm=True)
    embeds, _ = embeddings(model, ex)
    embeds.requires_grad_(True)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    captured = []
    handles = [m.register_forward_hook(lambda m, a, out: captured.append(out)) for m in _position_modules(model)]
    try:
        with lrp_rules(model, "cp"):
            f = logit_of(target_logits(model, ex, inputs_embeds=embeds), ex)[0]
            grads = torch.autograd.grad(f, [embeds, *captured, *biases], allow_unused=True)  # BERT's pooler: unused
    finally:
        for h in handles:
            h.remove()
    r_tok = float((embeds * grads[0]).detach().sum())
    r_pos = sum(float((c * g).detach().sum()) for c, g in zip(captured, grads[1:1 + len(captured)]))
    r_bias = sum(float((b * g).detach().sum()) for b, g in zip(biases, grads[1 + len(captured):]) if g is not None)
    logit = float(f.detach())
    assert abs(r_tok + r_pos + r_bias - logit) / abs(logit) < 1e-4
    res = attribute(model, tok, prompt, target, "lrp-cp", with_faithfulness=False)
    assert res.relevance_sum == pytest.approx(r_tok, rel=1e-4, abs=1e-6)
    assert res.conservation_error == pytest.approx(abs(r_pos + r_bias) / abs(logit), rel=1e-3)
    assert abs(r_pos + r_bias) > 1e-3  # the bound is not vacuous: these models do put relevance there


def _plain_pass(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids).logits
    out[0, -1].logsumexp(-1).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("variant", ["cp", "attn"])
@pytest.mark.parametrize("make", [lambda: tiny_llama(vocab=21), tiny_gpt2, lambda: _qwen2_with_biases(),
                                  lambda: bert_masked_lm()[0]], ids=["llama", "gpt2", "qwen2", "bert"])
def test_model_is_bit_identical_after_the_rules(make, variant):
    model = make()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    before, grads_before = _plain_pass(model, ids)
    with lrp_rules(model, variant, epsilon=1e-6):
        inside = model(ids).logits.detach()
        assert model.config._attn_implementation.startswith("subnetscope-lrp")
    with pytest.raises(RuntimeError, match="boom"):  # an exception inside restores too
        with lrp_rules(model, variant):
            raise RuntimeError("boom")
    after, grads_after = _plain_pass(model, ids)
    assert torch.allclose(inside, before, atol=1e-5)  # the rules change gradients, not values
    assert torch.equal(before, after)
    assert grads_before.keys() == grads_after.keys()
    assert all(torch.equal(grads_before[k], grads_after[k]) for k in grads_before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == impl
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not model.training


def test_rules_apply_to_one_instance_only():
    a, b = tiny_llama(vocab=21, seed=0), tiny_llama(vocab=21, seed=0)
    ids = torch.tensor([[1, 5, 6, 7]])
    with lrp_rules(a, "cp"):
        assert b.config._attn_implementation != a.config._attn_implementation
        assert not any("forward" in m.__dict__ for m in b.modules())
        emb = b.get_input_embeddings()(ids).detach().requires_grad_(True)
        (g_inside,) = torch.autograd.grad(b(inputs_embeds=emb).logits[0, -1, 3], emb)
    (g_outside,) = torch.autograd.grad(b(inputs_embeds=emb).logits[0, -1, 3], emb)
    assert torch.equal(g_inside, g_outside)  # b kept its plain gradients while a had the rules


def test_per_head_relevance_sums_to_the_output_projection():
    """Σ over heads of the per-head relevance = the relevance at o_proj's input = the relevance at
    its output (o_proj has no bias in Llama), layer by layer, computed independently here."""
    from analysis.importance.selectors.base import modules_of_kind

    model, tok = tiny_llama(vocab=21, seed=4), make_tokenizer()
    res = attribute(model, tok, PROMPT, TARGET, "lrp-cp", with_faithfulness=False)
    ex = encode(tok, PROMPT, TARGET)
    embeds, _ = embeddings(model, ex)
    embeds.requires_grad_(True)
    o_proj = {L: m for L, (m, _, _) in modules_of_kind(model, "o").items()}
    ins, outs = {}, {}
    def keep(L):
        def hook(module, args, output):
            ins[L], outs[L] = args[0], output
        return hook

    handles = [m.register_forward_hook(keep(L)) for L, m in o_proj.items()]
    try:
        with lrp_rules(model, "cp"):
            f = logit_of(target_logits(model, ex, inputs_embeds=embeds), ex)[0]
            layers = sorted(ins)
            grads = torch.autograd.grad(f, [ins[L] for L in layers] + [outs[L] for L in layers])
    finally:
        for h in handles:
            h.remove()
    assert len(res.heads) == len(layers) and all(len(row) == model.config.num_attention_heads for row in res.heads)
    for i, L in enumerate(layers):
        r_in = float((ins[L] * grads[i]).detach().sum())
        r_out = float((outs[L] * grads[len(layers) + i]).detach().sum())
        assert sum(res.heads[L]) == pytest.approx(r_in, rel=1e-5, abs=1e-7)
        assert r_in == pytest.approx(r_out, rel=1e-4, abs=1e-6)


def test_unsupported_models_and_variants_say_so():
    with pytest.raises(LRPError, match="unknown LRP variant"):
        with lrp_rules(tiny_llama(), "z"):
            pass
    with pytest.raises(LRPError, match="defined for llama"):
        with lrp_rules(nn.Linear(2, 2)):
            pass
    with pytest.raises(LRPError, match="finite"):
        with lrp_rules(tiny_llama(), "cp", epsilon=-1):
            pass


def test_lrp_selector_is_weight_times_modified_gradient():
    """The `lrp` selector's score of an element = |Σ_batches W ⊙ ∂f/∂W| under the rules, f = Σ of the
    true next token's logit over the labelled positions — recomputed here for two parameters."""
    from analysis.importance.selectors import SELECTORS

    model = tiny_llama(vocab=21, seed=9)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 9, 8, 7, 6, 5, 4]])
    labels = ids.clone()
    labels[1, :3] = -100
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    scores = SELECTORS["lrp"].fn(model, batches, variant="attn")
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    with lrp_rules(model, "attn"):
        logits = model(input_ids=ids).logits
        keep = labels[:, 1:] != -100
        f = logits[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0][keep].sum()
        grads = torch.autograd.grad(f, [params[n] for n in names])
    for n, g in zip(names, grads):
        assert torch.allclose(scores.values[n], (params[n].detach() * g).abs(), rtol=1e-4, atol=1e-7)
    assert scores.info["variant"] == "attn" and all(p.grad is None for p in model.parameters())


def test_uniform_rule_keeps_the_value_and_divides_the_gradient():
    from analysis.attribution.lrp import scale_grad

    x = torch.randn(1000, dtype=torch.float32, requires_grad=True) * 1e3
    x.retain_grad()
    y = scale_grad(x, 4)
    assert torch.equal(y, x)  # bit for bit
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))
    with pytest.raises(ValueError, match="power of two"):
        scale_grad(x, 3)
