"""Attribution (analysis/attribution/methods.py): completeness, the captum wiring, perturbation curves,
base against fine-tune, and the ``attribute`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from analysis.attribution.methods import (METHODS, AttributionError, Example, attribute, compare, embeddings, encode,
                                          faithfulness, head_weight_change, logit_of, logprob_of, target_logits,
                                          unknown_characters)
from analysis.families.demo_task import make_tokenizer
from conftest import ROOT, demo_like, tiny_gpt2, tiny_llama

PROMPT, TARGET = "Q:12+07\nA:", "19"


@pytest.mark.parametrize("make", [lambda: tiny_llama(vocab=21, seed=5), tiny_gpt2], ids=["llama", "gpt2"])
def test_ig_completeness(make):
    r = attribute(make(), make_tokenizer(), PROMPT, TARGET, "ig", steps=50, with_faithfulness=False)
    assert r.completeness_error < 1e-2
    # the reported error is the formula on the reported numbers
    assert sum(r.scores) - r.baseline_difference == pytest.approx(r.convergence_delta, abs=1e-5)
    assert r.completeness_error == pytest.approx(abs(r.convergence_delta) / abs(r.baseline_difference))
    assert r.scores[0] == 0.0  # <bos> is special: its baseline is itself, so IG gives it nothing


def test_ig_on_the_trained_demo_reports_its_error(demo):
    from analysis.checkpoints.models import load_model

    model, tok = load_model(demo / "sft", device="cpu")
    # from the <pad> baseline log p rises steeply near α = 0 (−20 → −4 within the first 2.5% of the
    # path), so a few steps leave a large error, and a uniform Gauss-Legendre rule needs thousands of
    # steps to close it (how many depends on the trained weights: the demo is built on each machine)
    few = attribute(model, tok, PROMPT, TARGET, "ig", steps=8, with_faithfulness=False)
    fine = attribute(model, tok, PROMPT, TARGET, "ig", steps=4096, batch=512, with_faithfulness=False)
    assert fine.baseline_difference == pytest.approx(few.baseline_difference, rel=1e-6)
    assert few.completeness_error > 0.1 and few.converged is False and few.step_budget is None
    assert fine.completeness_error < few.completeness_error / 10
    # the default refines the segments of the path near α = 0: converged in fewer than half the uniform
    # rule's steps, with the same scores
    auto = attribute(model, tok, PROMPT, TARGET, "ig", with_faithfulness=False)
    assert auto.converged and auto.completeness_error < 1e-2 and auto.steps_used < 2048 and auto.step_budget == 4096
    # closer to complete than the uniform rule, unless both are at float32's rounding of the sum (the demo
    # is built per machine: on some the uniform rule also reaches ~2e-7)
    assert auto.completeness_error < max(fine.completeness_error, 1e-6)
    assert auto.info["ig"]["shortest_segment"] < 0.01  # where the integrand is
    l1 = sum(abs(a - b) for a, b in zip(auto.scores, fine.scores)) / sum(map(abs, fine.scores))
    assert l1 < 2e-2


def test_ig_converges_on_a_random_init_demo_model():
    """a random-init demo-architecture Llama (hidden 32, torch's default init: the
    pad row, IG's baseline, is zero and the other rows have norm ~6) — 50 Gauss-Legendre steps miss
    more than the whole f(x) − f(x′); the adaptive rule converges, and its scores are a 1000-step
    rule's."""
    model, tok = demo_like(hidden=32, reset=True), make_tokenizer()
    fixed = attribute(model, tok, "12+35=", "4", "ig", steps=50, with_faithfulness=False)
    assert fixed.baseline_difference == pytest.approx(-0.1819, abs=1e-3)
    assert fixed.completeness_error > 1 and not fixed.converged
    ref = attribute(model, tok, "12+35=", "4", "ig", steps=1000, batch=1000, with_faithfulness=False)
    assert ref.completeness_error < 1e-5
    auto = attribute(model, tok, "12+35=", "4", "ig", with_faithfulness=False)
    assert auto.converged and auto.completeness_error < 1e-2 and auto.info["ig"]["score_error"] < 1e-2
    assert auto.steps_used <= 1000 and auto.steps <= auto.steps_used
    assert sum(auto.scores) - auto.baseline_difference == pytest.approx(auto.convergence_delta, abs=1e-6)
    l1 = sum(abs(a - b) for a, b in zip(auto.scores, ref.scores)) / sum(map(abs, ref.scores))
    assert l1 < 1e-3
    # a budget that ends first is reported, not hidden
    short = attribute(model, tok, "12+35=", "4", "ig", budget=192, with_faithfulness=False)
    assert short.steps_used == 192 and short.converged is False and short.info["ig"]["score_error"] > 1e-2


def test_smooth_paths_stop_after_one_check():
    """The suite's tiny models: the first 4 segments and their halves (64 + 128 steps) suffice."""
    r = attribute(tiny_llama(vocab=21, seed=5), make_tokenizer(), PROMPT, TARGET, "ig", with_faithfulness=False)
    assert r.converged and r.steps_used == 192 and r.steps == 128 and r.completeness_error < 1e-4


def test_prompt_length_is_checked_before_a_continuation_is_generated():
    model, tok = demo_like(), make_tokenizer()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(AttributionError, match="the prompt is 41 tokens; the model reads at most 32"):
        attribute(model, tok, "1" * 40, None, "ixg")  # no target: the greedy continuation is never run
    with pytest.raises(AttributionError, match="1,000,001 characters"):
        attribute(model, tok, "1" * 1_000_001, None, "ixg")
    assert calls == []
    # a 31-token prompt leaves room for a 2-token continuation only: prompt + target[:-1] fit 32
    r = attribute(model, tok, "1" * 30, None, "ixg", with_faithfulness=False)
    assert len(r.target_tokens) <= 2 and len(r.tokens) + len(r.target_tokens) - 1 <= 32


def test_unknown_characters():
    tok = make_tokenizer()
    assert unknown_characters(tok, "12+x€x") == ["x", "€"]
    assert unknown_characters(tok, "12<unk>") == []  # the literal unk token is not unknown
    with pytest.raises(AttributionError, match=r"'€€€' holds characters the tokenizer does not know \('€'\)"):
        encode(tok, PROMPT, "€€€")
    ex = encode(tok, "Q:1?", "2")
    assert ex.unknown == ["?"] and ex.tokens[-1] == "<unk>"


def test_encode_causal_and_masked():
    tok = make_tokenizer()
    ex = encode(tok, PROMPT, TARGET)
    # <bos> Q : 1 2 + 0 7 \n A : then the target's first token as input; logits at 10 and 11 score "1", "9"
    assert ex.n_prompt == 11 and len(ex.ids) == 12
    assert ex.tokens[:3] == ["<bos>", "Q", ":"] and ex.target_tokens == ["1", "9"]
    assert ex.target_positions == [10, 11] and ex.features == list(range(1, 11))
    assert ex.baseline_id == tok.pad_token_id
    for prompt, target, msg in (("", "1", "prompt is empty"), ("Q", "", "target is empty")):
        with pytest.raises(AttributionError, match=msg):
            encode(tok, prompt, target)
    with pytest.raises(AttributionError, match="no tokens besides special"):
        encode(tok, "<bos>", "1")
    with pytest.raises(AttributionError, match="tokenizer"):
        encode(None, PROMPT, TARGET)
    with pytest.raises(AttributionError, match="mask token"):
        encode(tok, PROMPT, TARGET, masked_lm=True)


def test_ixg_is_captums_input_x_gradient():
    from captum.attr import InputXGradient

    model, tok = tiny_llama(vocab=21, seed=6), make_tokenizer()
    ex = encode(tok, PROMPT, TARGET)
    embeds, _ = embeddings(model, ex)
    ref = InputXGradient(lambda e: logit_of(target_logits(model, ex, inputs_embeds=e), ex)).attribute(
        embeds.requires_grad_(True)).sum(-1)[0, :ex.n_prompt]
    r = attribute(model, tok, PROMPT, TARGET, "ixg", with_faithfulness=False)
    assert r.scores == pytest.approx(ref.tolist(), rel=1e-5, abs=1e-7)


def test_ablation_is_the_drop_when_one_token_is_replaced():
    model, tok = tiny_llama(vocab=21, seed=7), make_tokenizer()
    ex = encode(tok, PROMPT, TARGET)
    r = attribute(model, tok, PROMPT, TARGET, "ablation", batch=3, with_faithfulness=False)

    def logprob(ids):
        with torch.no_grad():
            return float(logprob_of(target_logits(model, ex, input_ids=torch.tensor([ids])), ex)[0])

    full = logprob(ex.ids)
    for i in (1, 5, 10):
        ids = list(ex.ids)
        ids[i] = ex.baseline_id
        assert r.scores[i] == pytest.approx(full - logprob(ids), abs=1e-5)
    assert r.scores[0] == 0.0  # <bos> is never ablated


def test_faithfulness_curves_by_hand():
    """Scores that rank position 2 first, then 1: MoRF removes 2 then 1, LeRF 1 then 2."""
    model, tok = tiny_llama(vocab=21, seed=8), make_tokenizer()
    ex = encode(tok, "Q:1", "2")
    assert ex.features == [1, 2, 3]
    scores = [0.0, 0.5, 0.9, -1.0]
    f = faithfulness(model, ex, scores)
    assert f["order"] == [2, 1, 3]

    def drop(removed):
        ids = list(ex.ids)
        for i in removed:
            ids[i] = ex.baseline_id
        with torch.no_grad():
            def lp(x):
                return float(logprob_of(target_logits(model, ex, input_ids=torch.tensor([x])), ex)[0])

            return lp(ex.ids) - lp(ids)

    assert f["morf"] == pytest.approx([0.0, drop([2]), drop([2, 1]), drop([2, 1, 3])], abs=1e-5)
    assert f["lerf"] == pytest.approx([0.0, drop([3]), drop([3, 1]), drop([3, 1, 2])], abs=1e-5)
    assert f["abpc"] == pytest.approx(sum(m - le for m, le in zip(f["morf"], f["lerf"])) / 4, abs=1e-9)


def test_every_method_runs_with_its_check(demo):
    from analysis.checkpoints.models import load_model

    model, tok = load_model(demo / "sft", device="cpu")
    for method in METHODS:
        r = attribute(model, tok, PROMPT, TARGET, method, steps=8)
        assert len(r.scores) == len(r.tokens) == 11 and all(map(torch.isfinite, torch.tensor(r.scores)))
        assert len(r.faithfulness["morf"]) == len(r.faithfulness["lerf"]) == 11  # 10 features + none removed
        if method == "ig":
            assert r.completeness_error is not None
        if method in ("ixg", "lrp-cp", "lrp-attn"):
            assert r.conservation_error is not None
            assert len(r.layers) == len(r.layer_tokens) == len(r.heads) == 4
            assert all(len(row) == 4 for row in r.heads)
        if method == "lrp-cp":
            assert r.conservation_error < 1e-4  # the demo is a bias-free Llama
        json.dumps(r.to_json(), allow_nan=False)


def test_compare_base_and_finetune(demo):
    from analysis.checkpoints.models import load_model

    a = attribute(*load_model(demo / "base", device="cpu"), PROMPT, TARGET, "lrp-cp", with_faithfulness=False)
    b = attribute(*load_model(demo / "sft", device="cpu"), PROMPT, TARGET, "lrp-cp", with_faithfulness=False)
    d = compare(a, b, top=3)
    assert d["scores"] == pytest.approx([y - x for x, y in zip(a.scores, b.scores)])
    assert d["target_logit"] == pytest.approx(b.target_logit - a.target_logit)
    moved = d["heads_moved"]
    assert len(moved) == 3 and abs(moved[0]["delta"]) >= abs(moved[1]["delta"]) >= abs(moved[2]["delta"])
    L, h = moved[0]["layer"], moved[0]["head"]
    assert moved[0]["delta"] == pytest.approx(b.heads[L][h] - a.heads[L][h])
    other = attribute(*load_model(demo / "sft", device="cpu"), PROMPT, TARGET, "ixg", with_faithfulness=False)
    with pytest.raises(AttributionError, match="cannot compare"):
        compare(a, other)
    shifted = attribute(*load_model(demo / "sft", device="cpu"), "Q:1", TARGET, "lrp-cp", with_faithfulness=False)
    with pytest.raises(AttributionError, match="tokenize"):
        compare(a, shifted)


def test_head_weight_change_matches_the_diff(demo):
    from analysis.sparsity.diff import diff_checkpoints

    rows = head_weight_change(demo / "base", demo / "rl-seed1")
    assert len(rows) == 4 * 4  # 4 layers x 4 query heads
    assert [r["fraction"] for r in rows] == sorted((r["fraction"] for r in rows), reverse=True)
    # per layer, the query heads' counts add up to the q/k/v/o changes the diff counts (k/v counted
    # once per query head of the group: 2 query heads per kv head in the demo)
    res = diff_checkpoints(demo / "base", demo / "rl-seed1")
    for L in range(4):
        expected = 0
        for u in res.by_unit():
            if u["layer"] == L and u["unit"] in ("head", "kv_head"):
                expected += sum(u["changed"]) * (2 if u["unit"] == "kv_head" else 1)
        assert sum(r["changed"] for r in rows if r["layer"] == L) == expected


@pytest.mark.slow
def test_smollm2_paris_puts_most_relevance_on_france(smollm2):
    """On SmolLM2-135M-Instruct, "The capital of France is" -> " Paris". Measured: every method
    (and ablation, the ground truth of removal: 28.9 nats for " is", 8.6 for " France") puts the
    most relevance on " is", the position the prediction is read from; among the tokens before it
    AttnLRP and ablation rank " France" first. CP-LRP without a BOS token puts most of the logit
    on the first token (the attention sink) and is then unfaithful on this prompt."""
    from analysis.checkpoints.models import load_model

    model, tok = load_model(smollm2, device="cpu")
    results = {m: attribute(model, tok, "The capital of France is", " Paris", m) for m in ("lrp-attn", "ablation",
                                                                                           "lrp-cp")}
    for method in ("lrp-attn", "ablation"):
        r = results[method]
        assert r.tokens == ["The", " capital", " of", " France", " is"]
        before = r.scores[:-1]
        assert r.tokens[before.index(max(before))] == " France", (method, r.scores)
        assert r.faithfulness["abpc"] > 0
    assert results["lrp-cp"].conservation_error < 1e-4  # no biases, no position embeddings
    assert 0.3 < results["lrp-attn"].conservation_error < 1.0  # AttnLRP loses part of the logit in the softmax


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_attribute_and_compare(demo, tmp_path):
    out = tmp_path / "a.json"
    p = _cli("attribute", str(demo / "base"), "--prompt", PROMPT, "--target", TARGET, "--method", "lrp-attn",
             "--compare", str(demo / "rl-seed1"), "--json", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    for key in ("method", "tokens", "scores", "target", "target_logit", "conservation_error", "layers", "heads"):
        assert key in d
    assert d["method"] == "lrp-attn" and d["target"] == TARGET and len(d["scores"]) == len(d["tokens"]) == 11
    assert d["compare"]["checkpoint"] == str(demo / "rl-seed1") and d["compare"]["target"] == TARGET
    assert len(d["compare"]["difference"]["scores"]) == 11
    assert "conservation error" in p.stdout

    out2 = tmp_path / "ig.json"
    p = _cli("attribute", str(demo / "sft"), "--prompt", PROMPT, "--method", "ig", "--steps", "16",
             "--no-faithfulness", "--json", str(out2), "--quiet")
    assert p.returncode == 0, p.stderr
    d = json.loads(out2.read_text())
    assert d["steps"] == 16 and d["completeness_error"] is not None and d["faithfulness"] is None
    assert d["target"]  # the SFT model's greedy answer


def test_cli_refuses_to_overwrite_the_checkpoint(demo):
    cfg = demo / "sft" / "config.json"
    before = cfg.read_bytes()
    p = _cli("attribute", str(demo / "sft"), "--prompt", PROMPT, "--target", "1", "--method", "ixg",
             "--json", str(cfg), "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert cfg.read_bytes() == before


def test_cli_model_without_tokenizer(tmp_path):
    d = tmp_path / "llama"
    tiny_llama().save_pretrained(d)
    p = _cli("attribute", str(d), "--prompt", "x", "--target", "y", "--method", "ixg",
             "--json", str(tmp_path / "a.json"), "--quiet")
    assert p.returncode == 2 and "tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_unknown_method_and_bad_steps():
    model, tok = tiny_llama(vocab=21), make_tokenizer()
    with pytest.raises(AttributionError, match="reads at most 64"):
        attribute(tiny_gpt2(), tok, "Q:" + "1" * 70, TARGET, "ixg")  # n_positions 64
    with pytest.raises(AttributionError, match="unknown attribution method"):
        attribute(model, tok, PROMPT, TARGET, "shap")
    for steps in (0, -1, 4097, 10 ** 9, 2.5, True):
        with pytest.raises(AttributionError, match=f"--steps {steps!r}: IG takes 1 to 4,096 steps"):
            attribute(model, tok, PROMPT, TARGET, "ig", steps=steps)
    for budget in (63, 191, 65537, 10 ** 12):  # 191: too few to measure a scores error
        with pytest.raises(AttributionError, match=f"--step-budget {budget}: give a whole number from 192 to 65,536"):
            attribute(model, tok, PROMPT, TARGET, "ig", budget=budget)
    with pytest.raises(AttributionError, match="--batch 0"):
        attribute(model, tok, PROMPT, TARGET, "ablation", batch=0)


def test_example_is_plain_data():
    ex = encode(make_tokenizer(), PROMPT, TARGET)
    assert isinstance(ex, Example) and json.dumps(ex.__dict__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on the device machine")
def test_cuda_matches_cpu(demo):
    from analysis.checkpoints.models import load_model

    for method in METHODS:
        cpu = attribute(*load_model(demo / "sft", device="cpu"), PROMPT, TARGET, method, steps=16)
        gpu = attribute(*load_model(demo / "sft", device="cuda"), PROMPT, TARGET, method, steps=16)
        assert gpu.device.startswith("cuda")
        assert gpu.scores == pytest.approx(cpu.scores, rel=1e-3, abs=1e-3)
