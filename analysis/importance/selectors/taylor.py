"""First-order Taylor importance |W ⊙ ∇W L| over calibration batches.

- ``gradient="mean"``: |W ⊙ ḡ| with ḡ the mean of the batch gradients, i.e. the gradient of the
  mean calibration loss: the first-order estimate of the loss change when a weight is zeroed
  (Molchanov et al., *Importance Estimation for Neural Network Pruning*, CVPR 2019; LLM-Pruner,
  Ma et al., NeurIPS 2023, element-wise).
- ``gradient="l2"``: |W| ⊙ √(mean_b g_b²), GBLM-Pruner's normalized gradient (Das et al., *Beyond
  Size: How Gradients Shape Pruning Decisions in Large Language Models*, arXiv 2311.04902): the ℓ2
  norm of the gradients across calibration samples (divided by √steps, which does not change a
  ranking), so gradients of opposite sign do not cancel. GBLM-Pruner takes one sequence per
  gradient: pass ``micro_batch=1`` for exactly that (one forward+backward per sequence).
- ``gradient="l1"``: |W| ⊙ mean_b |g_b| (GBLM-Pruner's ℓ1 variant).

Cost: one forward+backward per calibration batch (per micro-batch when ``micro_batch`` is set).
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, SelectorError, gradient_steps, make_scores, parameters, scoring

MODES = ("mean", "l1", "l2")


def score(model, batches, *, seed: int = 0, progress=None, gradient: str = "mean",
          micro_batch: int | None = None) -> Scores:
    """Gradient × weight scores of every parameter.

    Args:
        model (nn.Module): a model with a language-modelling head (read only).
        batches (list[Batch]): calibration batches.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "taylor")`` per batch.
        gradient (str): ``mean``, ``l1`` or ``l2`` (see the module docstring). Default: ``mean``.
        micro_batch (int, optional): sequences per gradient. Default: None (whole batches).
    Returns:
        Scores: ``element`` granularity, shaped like each parameter.
    """
    if gradient not in MODES:
        raise SelectorError(f"taylor: gradient must be one of {', '.join(MODES)}, got {gradient!r}")
    with scoring(model, grad=True):
        params = parameters(model)
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        steps = 0
        for grads in gradient_steps(model, batches, params, micro_batch=micro_batch,
                                    progress=progress, what="taylor"):
            steps += 1
            for n, g in grads.items():
                g = g.float()
                acc[n] += g if gradient == "mean" else g.abs() if gradient == "l1" else g * g
        with torch.no_grad():
            values = {}
            for n, p in params.items():
                a = acc[n] / max(steps, 1)
                if gradient == "l2":
                    a = a.sqrt()
                values[n] = (p.float() * a).abs()
    return make_scores("taylor", "element", values, model, gradient=gradient, micro_batch=micro_batch,
                       steps=steps)
