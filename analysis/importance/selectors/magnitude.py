"""Magnitude: |W|, the oldest importance score (Han et al., *Learning both Weights and Connections
for Efficient Neural Networks*, NeurIPS 2015). Data-free."""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, make_scores, parameters, scoring


def score(model, batches=None, *, seed: int = 0, progress=None) -> Scores:
    """Scores every element by its absolute value.

    Args:
        model (nn.Module): the model (read only).
        batches: ignored (data-free).
        seed (int): ignored (deterministic).
    Returns:
        Scores: ``element`` granularity, ``|W|`` per parameter, shaped like it.
    """
    with scoring(model), torch.no_grad():
        values = {n: p.abs() for n, p in parameters(model).items()}
    return make_scores("magnitude", "element", values, model)
