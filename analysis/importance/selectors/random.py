"""Random scores: the chance baseline every other selector is compared with. Seeded, data-free."""

from __future__ import annotations

import torch

from analysis.definitions import GRANULARITIES
from analysis.importance.selectors.base import (Scores, SelectorError, architecture, make_scores, num_layers,
                                                parameters, row_axis, scoring)



def score(model, batches=None, *, seed: int = 0, progress=None, granularity: str = "element") -> Scores:
    """Uniform random scores in [0, 1) from a ``torch.Generator`` seeded with ``seed``.

    A top-k budget on them is a uniformly random subnetwork of the requested size (ties have
    probability zero).

    Args:
        model (nn.Module): the model (read only).
        batches: ignored (data-free).
        seed (int): generator seed; the same seed gives the same scores. Default: 0.
        granularity (str): ``element`` (one score per parameter element), ``row`` (per output row
            of each 2-D parameter), ``head`` ``# [layers, heads]``, ``channel``
            ``# [layers, channels]`` or ``layer`` ``# [layers]``. Default: ``element``.
    Returns:
        Scores: at ``granularity``.
    """
    if granularity not in GRANULARITIES:
        raise SelectorError(f"random: unknown granularity {granularity!r}; one of {', '.join(GRANULARITIES)}")
    gen = torch.Generator().manual_seed(seed)
    arch = architecture(model)
    with scoring(model):
        params = parameters(model)
        if granularity == "element":
            values = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
        elif granularity == "row":
            values = {n: torch.rand(p.shape[row_axis(n, arch)], generator=gen)
                      for n, p in params.items() if p.dim() == 2}
        else:
            layers = num_layers(arch, params)
            units = {"head": arch.num_heads, "channel": arch.intermediate_size, "layer": None}[granularity]
            if granularity != "layer" and not units:
                raise SelectorError(f"random: the model's config gives no {granularity} count")
            values = torch.rand((layers,) if units is None else (layers, units), generator=gen)
    return make_scores("random", granularity, values, model, seed=seed)
