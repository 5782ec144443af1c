"""The SmolLM2 fine-tune family (analysis/families/real_family.py) on a reduced budget: 2 SFT steps and one RL
step per seed from the real converted model, evaluated on 8 held-out problems; an interrupted build
resumes from its finished stages; the CLI's flags."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from analysis.__main__ import main
from analysis.families.demo import DemoError
from analysis.sparsity.diff import diff_checkpoints
from analysis.families.real_family import MODEL_NAMES, build_real_family, family_refs

pytestmark = pytest.mark.slow


def test_reduced_family_resumes_after_an_interruption(smollm2, tmp_path):
    out = tmp_path / "fam"
    calls = {"n": 0}

    def stop_in_rl_seed2():  # sft: 2 steps, rl-seed1: 1 step, then cancel the first step of rl-seed2
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(DemoError, match="cancelled"):
        build_real_family(out, source=smollm2, scale=0.02, eval_problems=4, progress=False,
                          should_stop=stop_in_rl_seed2)
    partial = tmp_path / "fam.partial"
    assert not out.exists()
    assert {p.name for p in partial.iterdir() if (p / "stage.json").is_file()} == {"base", "sft", "rl-seed1"}
    sft_bytes = (partial / "sft" / "model.safetensors").read_bytes()
    build_real_family(out, source=smollm2, scale=0.02, eval_problems=4, progress=False)
    assert not partial.exists()
    assert (out / "sft" / "model.safetensors").read_bytes() == sft_bytes  # not retrained
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "subnetscope.real-family/1" and list(m["models"]) == list(MODEL_NAMES)
    assert [m["models"][n]["parent"] for n in MODEL_NAMES] == [None, "base", "sft", "sft"]
    assert [len(m["models"][n]["curve"]) for n in MODEL_NAMES[1:]] == [2, 1, 1]
    for n in MODEL_NAMES:
        e = m["models"][n]
        assert e["n"] == 4 and e["ci95"][0] <= e["accuracy"] <= e["ci95"][1]
        with safe_open(out / n / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # one RL step at lr 2e-6 stays under bf16's step for most weights; two SFT steps at 5e-5 do not
    sft = diff_checkpoints(out / "base", out / "sft")
    rl = diff_checkpoints(out / "sft", out / "rl-seed1")
    assert rl.update_sparsity > 0.9 and rl.changed_params < sft.changed_params / 5
    assert set(family_refs(out)) == {f"smollm2/{n}" for n in MODEL_NAMES}


def test_cli_flags(tmp_path, capsys):
    assert main(["demo", "--finetunes", "--out", str(tmp_path / "x")]) == 2
    assert "use it with --real" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a family")
    assert main(["demo", "--real", "--finetunes", "--out", str(tmp_path / "mine"), "--quiet"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a family"  # never replaced
