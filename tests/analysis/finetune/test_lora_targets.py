"""The LoRA control finds its target modules by module kind in every supported family (Llama,
GPT-2's Conv1D, BERT), and a LoRA fine-tune of a GPT-2 checkpoint trains end to end."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from analysis.__main__ import main
from analysis.checkpoints.structure import lora_targets
from conftest import tiny_bert, tiny_gpt2, tiny_llama

LLAMA = [f"model.layers.{L}.{m}" for L in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
GPT2 = [f"transformer.h.{L}.{m}" for L in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
BERT = [f"encoder.layer.{L}.{m}" for L in range(2) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


@pytest.mark.parametrize("build, expected", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2), (tiny_bert, BERT)],
                         ids=["llama", "gpt2", "bert"])
def test_lora_targets_by_module_kind(build, expected):
    assert lora_targets(build()) == expected


@pytest.mark.parametrize("build, conv1d", [(tiny_llama, False), (tiny_gpt2, True), (tiny_bert, False)],
                         ids=["llama", "gpt2", "bert"])
def test_peft_wraps_every_target(build, conv1d):
    """PEFT accepts the names (no NoMatchingPeftModuleError) and adapts exactly those modules;
    GPT-2's Conv1D gets fan_in_fan_out set, so PEFT has nothing to correct (no warning)."""
    from analysis.finetune.sources import with_lora

    model = build()
    targets = lora_targets(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns when it has to flip fan_in_fan_out
        peft_model = with_lora(model, 4)
    assert peft_model.peft_config["default"].fan_in_fan_out is conv1d
    adapted = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                     for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
    assert adapted == sorted(targets)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_no_targets_is_a_config_error():
    from analysis.finetune.config import FinetuneConfigError
    from analysis.finetune.sources import with_lora

    with pytest.raises(FinetuneConfigError, match="no attention or MLP projection"):
        with_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)


def test_lora_finetune_of_a_gpt2_checkpoint(tmp_path):
    """``finetune --lora`` on GPT-2 (the reported bug: PEFT found no target module): the run
    finishes, and the merged model differs from the start only in the adapted Conv1D weights, each
    by an update of rank at most r (the merged product of the LoRA factors, up to float32 rounding)."""
    from analysis.families.demo import make_tokenizer

    ckpt = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(ckpt)
    make_tokenizer().save_pretrained(ckpt)  # 21 symbols < the model's 40
    data = tmp_path / "sums.txt"
    data.write_text("".join(f"{a}+{b}={a + b}\n" for a in range(10) for b in range(10)))
    out = tmp_path / "run"
    assert main(["finetune", str(ckpt), "--lora", "4", "--task", "lm", "--data", str(data), "--seq-len", "32",
                 "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--eval-samples", "4", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 2
    # rank-4 factors on 8 modules: c_attn 32→96, attn.c_proj 32→32, c_fc 32→128, mlp.c_proj 128→32
    assert summary["trainable"] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {t + ".weight" for t in GPT2}  # every adapted weight moved, nothing else did
    for name in changed:  # rank ≤ 4 up to the float32 rounding of the merged weights
        sv = torch.linalg.svdvals((after[name] - before[name]).double())
        assert sv[0] > 0 and sv[4] < 1e-4 * sv[0], (name, sv[:6])
