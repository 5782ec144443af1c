"""Smallest magnitude: −|W|, so that the largest scores are the smallest weights.

SaRA (Hu et al., *SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse
Low-Rank Adaptation*, arXiv 2409.06633) fine-tunes the parameters of smallest absolute value:
they contribute least to the pretrained function, so they are the free ones to re-purpose.
A top-k budget on this score selects them. Data-free.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, make_scores, parameters, scoring


def score(model, batches=None, *, seed: int = 0, progress=None) -> Scores:
    """Scores every element by minus its absolute value.

    Args:
        model (nn.Module): the model (read only).
        batches: ignored (data-free).
        seed (int): ignored (deterministic).
    Returns:
        Scores: ``element`` granularity, ``−|W|`` per parameter, shaped like it.
    """
    with scoring(model), torch.no_grad():
        values = {n: -p.abs() for n, p in parameters(model).items()}
    return make_scores("smallest_magnitude", "element", values, model)
