"""The paper's subnetwork experiment (arXiv 2505.11711 §4) on the demo family: rerun the demo's RL
training from SFT with only the elements SFT → rl-seed1 changed, against a random mask of about
the same size and against the full run (which is rl-seed1 itself, reproduced bit for bit)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from analysis.finetune.compare import update_distance
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.run import run_finetune

pytestmark = pytest.mark.slow


def test_subnetwork_run_recovers_the_full_run(demo, tmp_path):
    rl = dict(checkpoint=str(demo / "sft"), task="demo-rl", steps=50, lr=1e-5, batch_size=16, seed=1, eval_every=50)
    full = run_finetune(FinetuneConfig(full=True, **rl), tmp_path / "full")
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(demo / "rl-seed1" / "model.safetensors")
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in b)  # the demo's own RL run
    sub = run_finetune(FinetuneConfig(diff=[str(demo / "sft"), str(demo / "rl-seed1")], **rl), tmp_path / "diff")
    density = sub["trainable"] / sum(v.numel() for k, v in b.items() if ".layers." in k and v.dim() == 2)
    rand = run_finetune(FinetuneConfig(random=min(1.0, density), **rl), tmp_path / "rand")
    assert sub["outside_mask_changed"] == 0 and rand["outside_mask_changed"] == 0
    d_sub = update_distance(demo / "sft", tmp_path / "diff" / "model", demo / "rl-seed1")
    d_rand = update_distance(demo / "sft", tmp_path / "rand" / "model", demo / "rl-seed1")
    assert d_sub["identical_fraction"] > d_rand["identical_fraction"] + 0.1
    assert d_sub["cosine"] > d_rand["cosine"] + 0.2
    assert full["status"] == sub["status"] == rand["status"] == "finished"
