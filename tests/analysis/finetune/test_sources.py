"""Mask sources, schedules, the lm task and resume of a run directory, on the demo model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from analysis.finetune.config import FinetuneConfig
from analysis.finetune.run import resume_finetune, run_finetune
from analysis.sparsity.masks import load_mask, save_mask


def _common(demo, **kw):
    return dict(checkpoint=str(demo / "sft"), steps=4, eval_every=4, batch_size=4, lr=1e-3, reward_samples=0) | kw


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _changed(demo, run) -> dict[str, torch.Tensor]:
    a, b = load_file(demo / "sft" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    return {k: a[k] != b[k] for k in a}


def test_selector_masks_element_and_structured(demo, tmp_path):
    s = run_finetune(FinetuneConfig(selector="magnitude", density=0.05, **_common(demo)), tmp_path / "mag")
    blocks = sum(v.numel() for k, v in load_file(demo / "sft" / "model.safetensors").items()
                 if ".layers." in k and v.dim() == 2)
    assert s["trainable"] == round(0.05 * blocks) and s["outside_mask_changed"] == 0
    # structured: 2 of the 16 heads (4 layers x 4 query heads), whole heads and their kv heads
    s = run_finetune(FinetuneConfig(selector="head_importance", density=0.125, granularity="head",
                                    **_common(demo)), tmp_path / "heads")
    assert s["outside_mask_changed"] == 0
    changed = _changed(demo, tmp_path / "heads")
    touched = {k for k, v in changed.items() if v.any()}
    assert touched and all(".self_attn." in k for k in touched)
    q = [k for k in touched if "q_proj" in k]
    rows = sum(int(changed[k].any(1).sum()) for k in q)
    assert rows <= 2 * 16  # at most 2 heads of head_dim 16 changed rows in q


def test_mask_file_algebra(demo, tmp_path):
    shapes = {k: v.shape for k, v in load_file(demo / "sft" / "model.safetensors").items()}
    name = "model.layers.1.mlp.up_proj.weight"
    a = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
    b = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
    a[name][:10] = True   # rows 0..9
    b[name][5:20] = True  # rows 5..19
    save_mask(tmp_path / "a.safetensors", a)
    save_mask(tmp_path / "b.safetensors", b)
    files = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    cols = shapes[name][1]
    for combine, rows in (("intersect", 5), ("union", 20), ("minus", 5), ("consensus:2", 5), ("consensus:1", 20)):
        s = run_finetune(FinetuneConfig(mask=files, mask_combine=combine, steps=1, **{
            k: v for k, v in _common(demo).items() if k != "steps"}), tmp_path / combine)
        assert s["trainable"] == rows * cols, combine
        assert s["outside_mask_changed"] == 0
    changed = _changed(demo, tmp_path / "minus")[name]
    assert not changed[5:].any()  # a \ b: rows 0..4 only


def test_lisa_trains_only_sampled_blocks(demo, tmp_path):
    out = tmp_path / "lisa"
    s = run_finetune(FinetuneConfig(full=True, schedule="lisa", lisa_layers=1, lisa_interval=2,
                                    **_common(demo, steps=4, lr=1e-2)), out)
    rows = _rows(out)
    assert [len(r["lisa_layers"]) for r in rows] == [1, 1, 1, 1]
    assert rows[0]["lisa_layers"] == rows[1]["lisa_layers"] and rows[2]["lisa_layers"] == rows[3]["lisa_layers"]
    sampled = {rows[0]["lisa_layers"][0], rows[2]["lisa_layers"][0]}
    changed = _changed(demo, out)
    moved = {int(k.split(".")[2]) for k, v in changed.items() if ".layers." in k and v.any()}
    assert moved == sampled
    assert changed["lm_head.weight"].any()  # outside the blocks: always trained, as LISA does
    assert s["status"] == "finished"


def test_id3_grows_the_mask_linearly(demo, tmp_path):
    out = tmp_path / "id3"
    s = run_finetune(FinetuneConfig(id3=0.02, **_common(demo, steps=4)), out)
    blocks = sum(v.numel() for k, v in load_file(demo / "sft" / "model.safetensors").items()
                 if ".layers." in k and v.dim() == 2)
    budget = round(0.02 * blocks)
    assert [r["trainable"] for r in _rows(out)] == [round(budget * t / 4) for t in (1, 2, 3, 4)]
    assert s["trainable"] == budget
    mask = load_mask(out / "mask.safetensors")
    assert sum(int(m.sum()) for m in mask.values()) == budget
    assert s["outside_mask_changed"] == 0  # checked against the grown mask


def test_lm_task_on_a_text_file(demo, tmp_path):
    data = tmp_path / "sums.txt"
    data.write_text("".join(f"{a}+{b}={a + b}\n" for a in range(10) for b in range(10)))
    out = tmp_path / "lm"
    s = run_finetune(FinetuneConfig(checkpoint=str(demo / "base"), task="lm", data=str(data), random=0.2,
                                    steps=6, eval_every=3, batch_size=8, lr=3e-3, eval_samples=20), out)
    rows = _rows(out)
    assert s["metric"] == "perplexity" and s["outside_mask_changed"] == 0
    for r in (rows[2], rows[5]):
        assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert rows[5]["eval_loss"] < rows[2]["eval_loss"] < s["initial"]["eval_loss"]  # it learns the held-out sums


@pytest.mark.parametrize("source", [{"random": 0.05}, {"full": True}, {"id3": 0.02}])
def test_resume_continues_exactly(demo, tmp_path, source):
    common = _common(demo, steps=6, eval_every=3, save_every=2)
    straight = tmp_path / "straight"
    run_finetune(FinetuneConfig(**source, **common), straight)
    cut = tmp_path / "cut"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    s = run_finetune(FinetuneConfig(**source, **common), cut, should_stop=stop)
    assert s["status"] == "cancelled" and s["steps_done"] == 3
    assert json.loads((cut / "state" / "meta.json").read_text())["step"] == 3  # saved at the cancel
    s = resume_finetune(cut)
    assert s["status"] == "finished" and s["steps_done"] == 6
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(straight), _rows(cut)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert not (cut / "state").exists()  # a finished run needs no state


def test_crash_keeps_metrics_records_the_error_and_resumes(demo, tmp_path, monkeypatch):
    from analysis.finetune import tasks

    common = _common(demo, steps=5, eval_every=5, save_every=1)
    straight = tmp_path / "straight"
    run_finetune(FinetuneConfig(random=0.05, **common), straight)
    real = tasks.DemoSFT.loss
    calls = {"n": 0}

    def flaky(self, model):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(self, model)

    monkeypatch.setattr(tasks.DemoSFT, "loss", flaky)
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_finetune(FinetuneConfig(random=0.05, **common), out)
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"] == "RuntimeError: disk on fire"
    assert [r["step"] for r in _rows(out)] == [1, 2]  # every metric written before the crash
    assert not (out / "model").exists()
    monkeypatch.setattr(tasks.DemoSFT, "loss", real)
    from analysis.finetune.compare import RunError

    with pytest.raises(RunError, match="2 steps are done already"):
        resume_finetune(out, steps=2)
    import os

    (out / "summary.json").write_text(json.dumps({**s, "status": "running", "pid": os.getpid()}))
    with pytest.raises(RunError, match="still training"):
        resume_finetune(out)
    (out / "summary.json").write_text(json.dumps(s))
    resume_finetune(out)  # from the state saved after step 2
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_schedules(demo, tmp_path):
    import math as m

    for sched in ("linear", "cosine"):
        out = tmp_path / sched
        run_finetune(FinetuneConfig(full=True, lr_schedule=sched, warmup_steps=2,
                                    **_common(demo, steps=6, lr=1e-3)), out)
        lrs = [r["lr"] for r in _rows(out)]
        decay = ([1 - k / 4 for k in range(4)] if sched == "linear"
                 else [0.5 * (1 + m.cos(m.pi * k / 4)) for k in range(4)])
        assert lrs == pytest.approx([5e-4, 1e-3] + [1e-3 * d for d in decay])


def test_mixed_dtype_checkpoint_keeps_untrained_elements_bit_for_bit(demo, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from analysis.finetune.config import FinetuneConfigError

    mixed = tmp_path / "mixed"
    shutil.copytree(demo / "sft", mixed)
    tensors = load_file(demo / "sft" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k in [k for k in tensors if k.endswith("norm.weight")]:  # fp32 values bf16 cannot hold
        tensors[k] = tensors[k].float() + torch.rand(tensors[k].shape, generator=g) * 1e-4
    save_file(tensors, mixed / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    s = run_finetune(FinetuneConfig(checkpoint=str(mixed), random=0.05, **{
        k: v for k, v in _common(demo, steps=2).items() if k != "checkpoint"}), out)
    assert s["outside_mask_changed"] == 0
    after = load_file(out / "model" / "model.safetensors")
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in tensors.items()}
    assert all(torch.equal(after[k], tensors[k]) for k in tensors if k.endswith("norm.weight"))
    with pytest.raises(FinetuneConfigError, match="would round every element"):
        run_finetune(FinetuneConfig(checkpoint=str(mixed), random=0.05, dtype="bfloat16", steps=1), tmp_path / "bf")
    assert not (tmp_path / "bf").exists()


def test_a_new_run_in_a_used_directory_starts_clean(demo, tmp_path):
    out = tmp_path / "run"
    run_finetune(FinetuneConfig(id3=0.02, **_common(demo, steps=3)), out)
    assert (out / "mask.safetensors").is_file()
    run_finetune(FinetuneConfig(full=True, **_common(demo, steps=2)), out)
    assert [r["step"] for r in _rows(out)] == [1, 2]  # not 1, 2, 3, 1, 2
    assert not (out / "mask.safetensors").exists()


def test_random_mask_covers_the_blocks_of_a_gpt2(tmp_path):
    """The blocks' scope is the selectors' (analysis.importance.scores.in_scope), not a Llama name pattern."""
    from conftest import tiny_gpt2

    ck = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(ck)
    blocks = [k for k, v in load_file(ck / "model.safetensors").items()
              if k.split(".")[-2] in ("c_attn", "c_proj", "c_fc") and v.dim() == 2]
    n = sum(v.numel() for k, v in load_file(ck / "model.safetensors").items() if k in blocks)
    s = run_finetune(FinetuneConfig(checkpoint=str(ck), random=0.1, steps=2, batch_size=4, eval_every=2,
                                    reward_samples=0), tmp_path / "run")
    assert n > 0 and s["trainable"] == round(0.1 * n)
    assert s["outside_mask_changed"] == 0
