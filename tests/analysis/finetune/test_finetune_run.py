"""A masked fine-tuning run on the demo: the run directory, the inside-mask check, cancel, errors."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from analysis.__main__ import main
from analysis.finetune.config import FinetuneConfig, FinetuneConfigError
from analysis.finetune.run import run_finetune


def test_random_mask_run_directory(demo, tmp_path):
    out = tmp_path / "run"
    s = run_finetune(FinetuneConfig(checkpoint=str(demo / "sft"), random=0.05, steps=4, eval_every=2,
                                    batch_size=8, lr=1e-3), out)
    assert s["status"] == "finished" and s["steps_done"] == 4
    assert s["outside_mask_changed"] == 0
    blocks = sum(v.numel() for k, v in load_file(demo / "sft" / "model.safetensors").items()
                 if ".layers." in k and v.dim() == 2)
    assert s["trainable"] == round(0.05 * blocks)
    assert s["optimizer_state_bytes"] == 20 * s["trainable"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "trainable"} <= set(rows[0])
    assert "accuracy" in rows[1] and "accuracy" not in rows[0]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    before, after = load_file(demo / "sft" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}  # bf16 kept
    assert sum(int((before[k] != after[k]).sum()) for k in before) > 0


def test_sparse_and_reference_modes_agree(demo, tmp_path):
    outs = {}
    for opt in ("sparse", "reference"):
        outs[opt] = tmp_path / opt
        run_finetune(FinetuneConfig(checkpoint=str(demo / "sft"), diff=[str(demo / "sft"), str(demo / "rl-seed1")],
                                    steps=3, eval_every=3, batch_size=8, lr=1e-3, optimizer=opt), outs[opt])
    a, b = (load_file(outs[o] / "model" / "model.safetensors") for o in ("sparse", "reference"))
    assert all((a[k] == b[k]).all() for k in a)


def test_cancel_keeps_metrics(demo, tmp_path):
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    s = run_finetune(FinetuneConfig(checkpoint=str(demo / "sft"), full=True, steps=10, batch_size=4), out,
                     should_stop=stop)
    assert s["status"] == "cancelled" and s["steps_done"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert s["outside_mask_changed"] is None  # a full fine-tune has no mask


def test_config_errors(demo, tmp_path, capsys):
    with pytest.raises(FinetuneConfigError, match="exactly one of"):
        FinetuneConfig(checkpoint="x", full=True, random=0.1)
    with pytest.raises(FinetuneConfigError, match="steps must be"):
        FinetuneConfig(checkpoint="x", full=True, steps=0)
    assert main(["finetune", str(demo / "sft"), "--mask", str(tmp_path / "none.safetensors"), "--steps", "1",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no such mask file" in capsys.readouterr().err
    assert main(["finetune", str(demo / "sft"), "--out", str(tmp_path / "r")]) == 2  # no mask source
    assert "choose exactly one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:  # two sources: argparse's own usage error
        main(["finetune", str(demo / "sft"), "--full", "--random", "0.1", "--out", str(tmp_path / "r")])
    assert ei.value.code == 2
    assert main(["finetune", str(demo / "sft"), "--selector", "magnitude", "--out", str(tmp_path / "r")]) == 2
    assert "--selector needs --density" in capsys.readouterr().err
    assert main(["finetune", str(demo / "sft"), "--task", "lm", "--full", "--out", str(tmp_path / "r")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(FinetuneConfigError, match="does not apply to ID3"):
        FinetuneConfig(checkpoint="x", id3=0.05, schedule="lisa")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"checkpoint": str(demo / "sft"), "full": True, "steps": "3"}))
    assert main(["finetune", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "steps must be int, got '3'" in capsys.readouterr().err
    assert main(["finetune", str(demo / "sft"), "--full", "--batch-size", "99999", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert "more than the demo task's" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model").exists()  # nothing half-written


def test_lora_and_compare_runs(demo, tmp_path):
    from analysis.finetune.compare import RunError, compare_runs, update_distance

    common = dict(checkpoint=str(demo / "sft"), steps=3, eval_every=3, batch_size=8, lr=1e-3)
    full, lora, diff = tmp_path / "full", tmp_path / "lora", tmp_path / "diff"
    run_finetune(FinetuneConfig(full=True, **common), full)
    s = run_finetune(FinetuneConfig(lora=2, **common), lora)
    assert s["status"] == "finished" and 0 < s["trainable"] < 20_000  # LoRA factors only
    run_finetune(FinetuneConfig(diff=[str(demo / "sft"), str(demo / "rl-seed1")], **common), diff)
    # a run against itself: every element identical, cosine 1
    self_dist = update_distance(demo / "sft", full / "model", full / "model")
    assert self_dist["identical_fraction"] == 1.0 and self_dist["cosine"] == pytest.approx(1.0)
    out = tmp_path / "cmp.json"
    assert main(["compare-runs", str(full), str(lora), str(diff), "--reference", str(full), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    rows = {r["run"]: r for r in d["runs"]}
    assert rows[str(diff)]["outside_mask_changed"] == 0
    assert 0 <= rows[str(diff)]["to_reference_identical_fraction"] < 1
    assert -1 <= rows[str(lora)]["to_reference_cosine"] <= 1
    assert "to_reference_cosine" not in rows[str(full)]
    assert [r["step"] for r in d["curves"][str(lora)]] == [1, 2, 3]
    with pytest.raises(RunError, match="not a run directory"):
        compare_runs([tmp_path])
