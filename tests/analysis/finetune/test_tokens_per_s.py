"""tokens_per_s counts the tokens a step actually trained on: demo-rl's prompts and sampled
completions (it once assumed 8 prompt tokens where there are 11), summed over processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.families import demo_task as demo_mod
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.distributed import Distributed
from analysis.finetune.run import run_finetune
from analysis.finetune.tasks import make_task
from analysis.checkpoints.models import load_model

PROMPT = 1 + len("Q:12+07\nA:")  # <bos> and 10 characters: every demo prompt has 11 tokens


@pytest.fixture
def fixed_completions(monkeypatch):
    """Every sampled completion is "19" <eos> <pad> <pad>: 3 tokens trained on, 2 of padding."""
    tok = demo_mod.make_tokenizer()
    row = tok.convert_tokens_to_ids(list("19")) + [demo_mod.EOS] + [demo_mod.PAD] * (demo_mod.MAX_ANSWER - 3)

    def generate(model, prompts, *, generator=None):
        return torch.tensor([row] * prompts.shape[0], device=prompts.device)

    monkeypatch.setattr(demo_mod, "generate", generate)
    return 3


def test_demo_rl_counts_prompt_and_completion_tokens(demo, fixed_completions):
    config = FinetuneConfig(checkpoint=str(demo / "sft"), task="demo-rl", full=True, batch_size=2, steps=1)
    model, tok = load_model(demo / "sft", device="cpu")
    task = make_task(config, tok, Distributed(), torch.device("cpu"))
    model.train()
    loss, tokens, extra = task.loss(model)
    assert loss.requires_grad and "reward" in extra
    sequences = 2 * demo_mod.RL_GROUP  # 2 prompts, 8 samples each
    assert tokens == sequences * (PROMPT + fixed_completions) == 224  # not 16 × (MAX_ANSWER + 8) = 208


def test_run_reports_the_tokens_of_a_step(demo, tmp_path, fixed_completions):
    out = tmp_path / "rl"
    run_finetune(FinetuneConfig(checkpoint=str(demo / "sft"), task="demo-rl", random=0.05, batch_size=2, steps=2,
                                eval_every=100, reward_samples=0), out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * demo_mod.RL_GROUP * (PROMPT + 3), rel=1e-9)


@pytest.mark.multiprocess
def test_two_processes_sum_their_tokens(demo, tmp_path):
    """Each rank trains on its slice of the global batch, whose token counts differ: the step's
    count is their sum (it was rank 0's count times the number of processes)."""
    bs, seed = 8, 3
    batch = random.Random(seed).sample(demo_mod.qa_examples("train"), bs)  # the task's first global batch
    per_example = [len(p) + len(a) + 2 for p, a in batch]  # <bos> prompt answer <eos>
    assert sum(per_example[0::2]) != sum(per_example[1::2])  # the slices differ, so ×2 would be wrong
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "two"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "analysis", "finetune",
                        str(demo / "sft"), "--full", "--steps", "1", "--batch-size", str(bs), "--seed", str(seed),
                        "--eval-every", "100", "--reward-samples", "0", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["tokens_per_s"] * row["step_s"] == pytest.approx(sum(per_example), rel=1e-9)
