"""Smoothed sensitivity with uncertainty (AdaLoRA: Zhang et al., *Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning*, ICLR 2023, Eq. 8–10; PST: Li et al., *Parameter-Efficient
Sparsity for Large Language Models Fine-Tuning*, IJCAI 2022).

Over calibration batches t = 1..T, with I_t = |W ⊙ g_t| the sensitivity of batch t:

    Ī_t = β₁ Ī_{t−1} + (1 − β₁) I_t                 (smoothed sensitivity)
    Ū_t = β₂ Ū_{t−1} + (1 − β₂) |I_t − Ī_t|         (its uncertainty)
    score = Ī_T · Ū_T

from zero state, in PEFT's ``RankAllocator.update_ipt`` order. A weight scores high when it is
sensitive and its sensitivity varies across batches. Cost: one forward+backward per batch.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, SelectorError, gradient_steps, make_scores, parameters, scoring


def score(model, batches, *, seed: int = 0, progress=None, beta1: float = 0.85,
          beta2: float = 0.85) -> Scores:
    """AdaLoRA / PST sensitivity of every parameter.

    Args:
        model (nn.Module): a model with a language-modelling head (read only).
        batches (list[Batch]): calibration batches, in order (the EMAs depend on it).
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "sensitivity")`` per batch.
        beta1 (float): EMA factor of the sensitivity. Default: 0.85 (AdaLoRA's).
        beta2 (float): EMA factor of the uncertainty. Default: 0.85 (AdaLoRA's).
    Returns:
        Scores: ``element`` granularity, Ī·Ū shaped like each parameter.
    """
    for b in (beta1, beta2):
        if not 0.0 <= b < 1.0:
            raise SelectorError(f"sensitivity: beta1 and beta2 must be in [0, 1), got {b}")
    with scoring(model, grad=True):
        params = parameters(model)
        ipt = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        unc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        steps = 0
        for grads in gradient_steps(model, batches, params, progress=progress, what="sensitivity"):
            steps += 1
            for n, g in grads.items():
                # in place, one temporary per parameter: the elementwise work is several passes
                # over every parameter per batch, comparable to the backward itself on a CPU
                now = torch.mul(params[n].detach(), g).abs_().float()
                ipt[n].lerp_(now, 1 - beta1)  # β₁ Ī + (1 − β₁) I
                unc[n].lerp_(now.sub_(ipt[n]).abs_(), 1 - beta2)  # β₂ Ū + (1 − β₂) |I − Ī|
        values = {n: ipt[n] * unc[n] for n in params}
    return make_scores("sensitivity", "element", values, model, beta1=beta1, beta2=beta2, steps=steps)
