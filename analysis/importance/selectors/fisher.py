"""Diagonal empirical Fisher information E[g²] of every parameter.

F_i = mean over samples s of (∂L_s/∂θ_i)², with per-sample gradients: the importance of Selective
Synaptic Dampening (Foster et al., *Fast Machine Unlearning Without Retraining Through Selective
Synaptic Dampening*, AAAI 2024) and of the Fisher mask of sparse fine-tuning (Sung et al.,
*Training Neural Networks with Fixed Sparse Masks*, NeurIPS 2021); EWC's diagonal Fisher.

Per-sample gradients come from **micro-batches of one sequence** (exact, works for every
architecture, memory of one gradient; ``torch.func`` vmap was not used because HF forwards branch
on data and a vmapped gradient holds batch × model floats). Cost: one forward+backward of a single
sequence per sample, i.e. B small passes per calibration batch of B sequences — about the FLOPs of
one batched forward+backward, but less parallel (several times slower on a small model).
``micro_batch=m`` trades exactness for speed: the mean of squared micro-batch gradients.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, SelectorError, gradient_steps, make_scores, parameters, scoring


def score(model, batches, *, seed: int = 0, progress=None, micro_batch: int = 1) -> Scores:
    """Diagonal Fisher of every parameter.

    Args:
        model (nn.Module): a model with a language-modelling head (read only).
        batches (list[Batch]): calibration batches; each sequence with at least one labelled
            token is one sample.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "fisher")`` per batch.
        micro_batch (int): sequences per gradient; 1 is the per-sample Fisher. Default: 1.
    Returns:
        Scores: ``element`` granularity, mean of squared gradients, shaped like each parameter.
    """
    if not (isinstance(micro_batch, int) and micro_batch >= 1):
        raise SelectorError(f"fisher: micro_batch must be an integer ≥ 1, got {micro_batch!r}")
    with scoring(model, grad=True):
        params = parameters(model)
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        samples = 0
        for grads in gradient_steps(model, batches, params, micro_batch=micro_batch,
                                    progress=progress, what="fisher"):
            samples += 1
            for n, g in grads.items():
                acc[n] += g.float().square()
        values = {n: a / max(samples, 1) for n, a in acc.items()}
    return make_scores("fisher", "element", values, model, micro_batch=micro_batch, samples=samples)
