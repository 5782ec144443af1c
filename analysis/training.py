"""Training basics shared by the demo build, the fine-tuning lab, the selectors and the benchmarks:
the next-token loss and the learning-rate schedules, defined once."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position without a loss (prompt, padding), as in Hugging Face


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position ``t``'s logits predict label ``t + 1``.

    Args:
        logits (Tensor): ``# [batch, pos, vocab]``; computed in float32 whatever their dtype.
        labels (Tensor): ``# [batch, pos]`` token ids, :data:`IGNORE` where there is no loss
            (the first position never has one: nothing predicts it).
        reduction (str): ``mean`` over the labelled tokens (as HF's ``labels=`` loss), ``sum``,
            or ``sequence``: one mean per sequence ``# [batch]`` (0 for a sequence without labels).

    Returns:
        Tensor: the loss (scalar, or ``# [batch]`` for ``sequence``).
    """
    shifted = labels[:, 1:]  # [batch, pos-1]
    flat = logits[:, :-1].flatten(0, 1).float()  # [batch·(pos-1), vocab]
    if reduction in ("mean", "sum"):
        return F.cross_entropy(flat, shifted.flatten(), ignore_index=IGNORE, reduction=reduction)
    if reduction != "sequence":
        raise ValueError(f"reduction must be mean, sum or sequence, got {reduction!r}")
    tokens = F.cross_entropy(flat, shifted.flatten(), ignore_index=IGNORE, reduction="none").view_as(shifted)
    return tokens.sum(1) / (shifted != IGNORE).sum(1).clamp(min=1)


def schedule_factor(name: str, *, steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate multiplier of 1-based step ``s`` (``s`` = 1 is the first update).

    Args:
        name (str): ``constant``, ``linear`` (to 0 at ``steps``) or ``cosine`` (to 0 at ``steps``).
        steps (int): the steps of the whole run.
        warmup_steps (int): linear warm-up ``s / warmup_steps`` over the first steps. Default: 0.

    Returns:
        Callable[[int], float]: ``factor(s)``, in [0, 1].
    """
    if name not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be constant, linear or cosine, got {name!r}")

    def factor(s: int) -> float:
        if warmup_steps and s <= warmup_steps:
            return s / warmup_steps
        if name == "constant":
            return 1.0
        frac = (s - 1 - warmup_steps) / max(1, steps - warmup_steps)  # 0 at the first step after warm-up
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1 - frac

    return factor


def scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` driving ``factor`` by 1-based step: after ``k`` calls of ``step()`` the
    optimizer's learning rate is ``base_lr · factor(k + 1)``, the rate of the next update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: factor(k + 1))
