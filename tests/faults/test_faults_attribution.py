"""Attribution: absurd IG sizes are refused before anything is allocated,
a prompt longer than the model reads is refused before a continuation is generated, a target the
tokenizer cannot encode is refused instead of being explained as <unk>, and the option checks
argparse used to make (a usage block, then an error) are one line; an IG whose budget ends before
it converges says so (exit 0, a warning and ``converged: false`` in the JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import demo_like
from fault_corpus import Case, params, run_case


def _ckpt(tmp: Path, name: str = "ck", tokenizer=None, **kw) -> Path:
    from analysis.families.demo_task import make_tokenizer

    d = tmp / name
    if not d.exists():
        demo_like(**kw).save_pretrained(d)
        (tokenizer or make_tokenizer()).save_pretrained(d)
    return d


def _whitespace_tokenizer():
    """A word-level tokenizer without special tokens around the text: a blank prompt has no tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from analysis.families.demo_task import CHARS, SPECIALS

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _attr(tmp: Path, *args, ckpt=None) -> list:
    return ["attribute", ckpt or _ckpt(tmp), "--json", tmp / "a.json", "--quiet", *args]


def _no_json(tmp, out, err):
    assert not (tmp / "a.json").exists(), "a JSON was written for a refused input"


def _not_converged(tmp, out, err):
    d = json.loads((tmp / "a.json").read_text())
    assert d["converged"] is False and d["steps_used"] == 192 and d["step_budget"] == 192
    assert d["completeness_target"] == 0.01 and d["info"]["ig"]["score_error"] > 0.01  # measured, too large
    assert "warning:" in err and "did not converge within its budget of 192 steps" in err


def _converged(tmp, out, err):
    d = json.loads((tmp / "a.json").read_text())
    assert d["converged"] is True and d["completeness_error"] <= 0.01
    assert 64 < d["steps_used"] <= 4096 and d["step_budget"] == 4096 and d["steps"] <= d["steps_used"]
    assert "warning" not in err


def _unknown_prompt_warned(tmp, out, err):
    d = json.loads((tmp / "a.json").read_text())
    assert d["info"]["unknown"] == ["x", "y"] and d["tokens"][2:4] == ["<unk>", "<unk>"]
    assert "warning:" in err and "'x', 'y'" in err and "unknown token" in err


def _prompt_90k(tmp):
    return _attr(tmp, "--prompt", "1" * 90_000, "--method", "ig")  # no --target: a continuation would be generated


CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

CASES = [
    # 5a: absurd sizes, refused before numpy's leggauss allocates an n x n matrix
    Case("attr-steps-absurd", lambda t: _attr(t, "--prompt", "12+35=", "--target", "4", "--method", "ig",
                                              "--steps", "1000000000"),
         says=("--steps 1000000000", "1 to 4,096", "Gauss-Legendre"), check=_no_json),
    Case("attr-steps-zero", lambda t: _attr(t, "--prompt", "12+35=", "--target", "4", "--method", "ig",
                                            "--steps", "0"), says=("--steps 0", "1 to 4,096"), check=_no_json),
    Case("attr-steps-negative", lambda t: _attr(t, "--prompt", "12+35=", "--target", "4", "--method", "ig",
                                                "--steps=-5"), says=("--steps -5", "1 to 4,096"), check=_no_json),
    Case("attr-steps-not-a-number", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ig",
                                                    "--steps", "many"),
         says=("--steps 'many'", "not a whole number"), check=_no_json),
    Case("attr-budget-absurd", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ig",
                                               "--step-budget", "1000000000000"),
         says=("--step-budget 1000000000000", "192 to 65,536"), check=_no_json),
    Case("attr-budget-below-one-round", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ig",
                                                        "--step-budget", "10"), says=("--step-budget 10", "192 to"),
         check=_no_json),
    Case("attr-batch-absurd", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ablation",
                                              "--batch", "1000000000"), says=("--batch 1000000000", "65,536"),
         check=_no_json),
    Case("attr-batch-zero", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ig", "--batch", "0"),
         says=("--batch 0", "1 to"), check=_no_json),
    # "the same kinds": an unknown method, devices, a different architecture to compare with
    Case("attr-method-unknown", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "shap"),
         says=("--method 'shap'", "unknown", "ig, saliency, ixg, ablation, lrp-cp, lrp-attn"), check=_no_json),
    Case("attr-device-cuda-without-cuda", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ixg",
                                                          "--device", "cuda"),
         says=("cuda", "not available"), check=_no_json, marks=(CUDA,)),
    Case("attr-device-unknown", lambda t: _attr(t, "--prompt", "1", "--target", "4", "--method", "ixg",
                                                "--device", "tpu"), says=("unknown device 'tpu'",), check=_no_json),
    Case("attr-compare-other-architecture",
         lambda t: _attr(t, "--prompt", "12+35=", "--target", "4", "--method", "lrp-cp",
                         "--compare", _ckpt(t, "three-layers", layers=3)),
         says=("three-layers", "different architecture", "num_layers 3 vs 2"), check=_no_json),
    # 8: a prompt longer than the model reads, before any continuation is generated
    Case("attr-prompt-90k-no-target", _prompt_90k, says=("90,001 tokens", "reads at most 32"), check=_no_json),
    Case("attr-prompt-too-long-with-target", lambda t: _attr(t, "--prompt", "1" * 40, "--target", "4",
                                                             "--method", "lrp-cp"),
         says=("41 tokens", "reads at most 32"), check=_no_json),
    Case("attr-prompt-million-chars", lambda t: _attr(t, "--prompt", "1" * 1_000_001, "--method", "ixg"),
         says=("1,000,001 characters", "at most 1,000,000"), check=_no_json),
    Case("attr-prompt-and-target-too-long", lambda t: _attr(t, "--prompt", "1" * 28, "--target", "2" * 6,
                                                            "--method", "ixg"),
         says=("34 tokens", "reads at most 32"), check=_no_json),
    # 8: a target the tokenizer cannot encode is refused, not explained as three <unk>
    Case("attr-target-unknown-chars", lambda t: _attr(t, "--prompt", "12+35=", "--target", "€€€",
                                                      "--method", "ig"),
         says=("'€€€'", "'€'", "does not know", "<unk>"), check=_no_json),
    Case("attr-target-partly-unknown", lambda t: _attr(t, "--prompt", "12+35=", "--target", "4 7",
                                                       "--method", "lrp-attn"), says=("' '", "does not know"),
         check=_no_json),
    Case("attr-prompt-unknown-chars-warned", lambda t: _attr(t, "--prompt", "1xy2", "--target", "3",
                                                             "--method", "ixg"),
         rc=0, says=("does not know",), check=_unknown_prompt_warned),
    # empty prompts, a prompt of no tokens, a prompt of only special tokens
    Case("attr-prompt-empty-no-target", lambda t: _attr(t, "--prompt", "", "--method", "ig"),
         says=("the prompt is empty",), check=_no_json),
    Case("attr-target-empty", lambda t: _attr(t, "--prompt", "1", "--target", "", "--method", "lrp-cp"),
         says=("the target is empty",), check=_no_json),
    Case("attr-prompt-no-tokens", lambda t: _attr(t, "--prompt", "   ", "--method", "ixg",
                                                  ckpt=_ckpt(t, "ws", tokenizer=_whitespace_tokenizer())),
         says=("the prompt '   ' has no tokens",), check=_no_json),
    Case("attr-prompt-only-special", lambda t: _attr(t, "--prompt", "<bos>", "--target", "1", "--method", "ig"),
         says=("no tokens besides special ones",), check=_no_json),
    # 7: the adaptive IG converges, or says that its budget ended first
    Case("attr-ig-auto-converges", lambda t: _attr(t, "--prompt", "12+35=", "--target", "4", "--method", "ig",
                                                   "--no-faithfulness", ckpt=_ckpt(t, "init", reset=True)),
         rc=0, says=("converged at 0.01", "evaluated of a budget of 4096"), check=_converged),
    Case("attr-ig-budget-ends-first", lambda t: _attr(t, "--prompt", "12+35=", "--target", "4", "--method", "ig",
                                                      "--step-budget", "192", "--no-faithfulness",
                                                      ckpt=_ckpt(t, "init", reset=True)),
         rc=0, says=("NOT converged",), check=_not_converged),
]


@pytest.mark.parametrize("case", params(CASES))
def test_fault(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
