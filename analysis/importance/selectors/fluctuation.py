"""Fluctuation metric of FLAP (An et al., *Fluctuation-based Adaptive Structured Pruning for Large
Language Models*, AAAI 2024): for input channel j of an output projection (attention ``o_proj``,
MLP ``down_proj``),

    S_j = Var_tokens(X_j) · ‖W_{:,j}‖₂²

with the sample variance (n − 1) of the channel's input over every real calibration token, kept
with a batched Welford update (float64). A channel whose input barely fluctuates can be replaced
by its mean (FLAP's bias compensation), so it matters little. MLP channel scores are S_j of
``down_proj``'s columns; a head's score is the sum over its head_dim channels of ``o_proj``.
``standardize=True`` z-scores the channels of each layer and module (FLAP's adaptive structure
search, so that scores compare across layers and modules) before summing heads.

Cost: one no-grad forward per calibration batch.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import (Scores, SelectorError, architecture, collect_activations, make_scores,
                                                modules_of_kind, num_layers, parameters, scoring)

GRANULARITIES = ("channel", "head")


def score(model, batches, *, seed: int = 0, progress=None, granularity: str = "channel",
          standardize: bool = False) -> Scores:
    """FLAP fluctuation of MLP channels or attention heads.

    Args:
        model (nn.Module): the model (read only).
        batches (list[Batch]): calibration batches.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "fluctuation")`` per batch.
        granularity (str): ``channel`` ``# [layers, channels]`` (``down_proj`` inputs) or ``head``
            ``# [layers, heads]`` (``o_proj`` inputs). Default: ``channel``.
        standardize (bool): z-score each layer's channels before use. Default: False.
    Returns:
        Scores: at ``granularity``.
    """
    if granularity not in GRANULARITIES:
        raise SelectorError(f"fluctuation: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    arch = architecture(model)
    modules = modules_of_kind(model, "down" if granularity == "channel" else "o")
    if not modules:
        raise SelectorError(f"fluctuation: no {'down' if granularity == 'channel' else 'o'} projections found")
    stats: dict[int, tuple] = {}  # layer -> (n, mean [in], M2 [in]) float64

    def on_io(layer, x, _):
        x = x.double()
        nb, mb = x.shape[0], x.mean(0)
        m2b = (x - mb).square().sum(0)
        if layer not in stats:
            stats[layer] = (nb, mb, m2b)
            return
        na, ma, m2a = stats[layer]
        n = na + nb
        delta = mb - ma
        stats[layer] = (n, ma + delta * nb / n, m2a + m2b + delta.square() * na * nb / n)

    with scoring(model), torch.no_grad():
        collect_activations(model, batches, {L: m for L, (m, _, _) in modules.items()}, on_io,
                            progress=progress, what="fluctuation")
        per_channel = {}
        for L, (m, _, in_axis) in modules.items():
            n, _, m2 = stats[L]
            col_sq = m.weight.double().square().sum(1 - in_axis)  # ‖W_{:,j}‖² per input channel
            s = m2 / max(n - 1, 1) * col_sq
            if standardize:
                s = (s - s.mean()) / s.std().clamp(min=1e-30)
            per_channel[L] = s
    units = arch.intermediate_size if granularity == "channel" else arch.num_heads
    if not units:
        raise SelectorError(f"fluctuation: the model's config gives no {granularity} count")
    values = torch.zeros(num_layers(arch, parameters(model)), units, dtype=torch.float64)
    for L, s in per_channel.items():
        values[L] = s.cpu() if granularity == "channel" else s.cpu().reshape(units, -1).sum(1)
    return make_scores("fluctuation", granularity, values, model, standardize=standardize)
