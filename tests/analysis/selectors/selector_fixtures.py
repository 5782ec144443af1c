"""Shared builders for the selector tests: calibration batches and a planted diff pair."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama
from safetensors.torch import save_file

from analysis.importance.calibration import calibration_batches
from analysis.families.demo_task import make_tokenizer

UP = "model.layers.0.mlp.up_proj.weight"  # [96, 64]
Q = "model.layers.1.self_attn.q_proj.weight"  # [64, 64]
K = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]
PLANTED_ABOVE = [(UP, (3, 5)), (UP, (90, 0)), (Q, (0, 0))]  # changed by 0.1
PLANTED_BELOW = [(K, (1, 2))]  # changed by 1e-7: only at τ = 0


def demo_batches(samples: int = 6, batch_size: int = 3, offset: int = 0):
    """Demo-task batches; the character tokenizer's 21 ids fit the tiny Llama's 50-token vocabulary."""
    return calibration_batches("demo", make_tokenizer(), samples=samples, seq_len=24, batch_size=batch_size,
                               offset=offset)


def planted_pair(root: Path) -> tuple[Path, Path]:
    """base = tiny_llama(); tuned = base with PLANTED_ABOVE (+0.1) and PLANTED_BELOW (+1e-7) changes."""
    model = tiny_llama()
    base, tuned = root / "base", root / "tuned"
    model.save_pretrained(base)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name, idx in PLANTED_ABOVE:
        sd[name][idx] += 0.1
    for name, idx in PLANTED_BELOW:
        sd[name][idx] += 1e-7
    tuned.mkdir()
    save_file(sd, tuned / "model.safetensors")
    model.config.to_json_file(tuned / "config.json")
    return base, tuned


def no_hooks_left(model: torch.nn.Module) -> bool:
    """True when no module holds a forward, forward-pre, backward or backward-pre hook."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())
