"""LISA's layer sampling probabilities (Pan et al., *LISA: Layerwise Importance Sampling for
Memory-Efficient Large Language Model Fine-Tuning*, NeurIPS 2024).

LISA keeps embeddings and the head trainable and, every K steps, unfreezes γ of the L blocks.
``mode="uniform"`` is the paper's algorithm: every block is active with probability γ/L.
``mode="weight_norm"``: probabilities proportional to each block's weight norm ‖θ_ℓ‖₂ (the layer
norm skew that motivated LISA), scaled to sum to γ and capped at 1 (the excess redistributed
over the other blocks). The score of a block is its probability of being trained in a period.
Data-free.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import (Scores, SelectorError, architecture, make_scores, num_layers,
                                                parameters, scoring)
from analysis.checkpoints.structure import tensor_role

MODES = ("uniform", "weight_norm")


def score(model, batches=None, *, seed: int = 0, progress=None, mode: str = "uniform",
          active_layers: int = 2) -> Scores:
    """Per-block sampling probabilities of LISA.

    Args:
        model (nn.Module): the model (read only).
        batches: ignored (data-free).
        seed (int): ignored (the probabilities are deterministic).
        mode (str): ``uniform`` or ``weight_norm``. Default: ``uniform``.
        active_layers (int): γ, blocks unfrozen per period. Default: 2 (the paper's).
    Returns:
        Scores: ``layer`` granularity, ``# [layers]``, each in [0, 1], summing to min(γ, L).
    """
    if mode not in MODES:
        raise SelectorError(f"lisa: mode must be one of {', '.join(MODES)}, got {mode!r}")
    arch = architecture(model)
    with scoring(model), torch.no_grad():
        params = parameters(model)
        L = num_layers(arch, params)
        if not (isinstance(active_layers, int) and 1 <= active_layers):
            raise SelectorError(f"lisa: active_layers must be an integer ≥ 1, got {active_layers!r}")
        gamma = min(active_layers, L)
        if mode == "uniform":
            weights = torch.ones(L, dtype=torch.float64)
        else:
            sq = torch.zeros(L, dtype=torch.float64)
            for n, p in params.items():
                layer = tensor_role(n, arch.family).layer
                if layer is not None:
                    sq[layer] += float(p.double().square().sum())
            weights = sq.sqrt()
    return make_scores("lisa", "layer", capped_probabilities(weights, gamma), model, mode=mode,
                       active_layers=gamma)


def capped_probabilities(weights: torch.Tensor, total: float) -> torch.Tensor:
    """Probabilities ∝ ``weights`` summing to ``total``, none above 1 (water-filling).

    Args:
        weights (Tensor): ``# [layers]`` non-negative.
        total (float): the sum wanted, at most ``len(weights)``.
    Returns:
        Tensor: ``# [layers]`` float64.
    """
    p = torch.zeros_like(weights)
    free = torch.ones_like(weights, dtype=torch.bool)
    left = float(total)
    while left > 1e-12 and free.any():
        w = torch.where(free, weights, torch.zeros_like(weights))
        share = w / w.sum() * left if w.sum() > 0 else free.double() / free.sum() * left
        over = free & (p + share > 1)
        if not over.any():
            return p + share
        left -= float((1 - p[over]).sum())
        p[over] = 1.0
        free &= ~over
    return p
