"""Wanda: |W_ij| · ‖X_j‖₂ (Sun et al., *A Simple and Effective Pruning Approach for Large Language
Models*, ICLR 2024).

‖X_j‖₂ is the ℓ2 norm of input feature j of a linear layer over every real calibration token
(padding excluded), read by forward hooks on every ``nn.Linear`` / ``Conv1D``. Embeddings are a
linear layer on one-hot token inputs, so the same formula gives |E_vi| · √(count of token v).
When the output head is tied to the embedding, the two contributions are added. Biases and norms
have no input-weighted form: they are left unscored (``info["unscored"]``).

Cost: one no-grad forward per calibration batch.
"""

from __future__ import annotations

import torch
from torch import nn

from analysis.importance.selectors.base import (Scores, collect_activations, linear_modules, make_scores, parameters,
                                                scoring)


def score(model, batches, *, seed: int = 0, progress=None) -> Scores:
    """Wanda scores of every linear and embedding weight.

    Args:
        model (nn.Module): the model (read only).
        batches (list[Batch]): calibration batches.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "wanda")`` per batch.
    Returns:
        Scores: ``element`` granularity; ``|W| ⊙ ‖X‖₂`` broadcast along the output axis.
    """
    params = parameters(model)
    linears = linear_modules(model)
    names = {id(p): n for n, p in params.items()}
    embeddings = {m_name: (m, names[id(m.weight)]) for m_name, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and id(m.weight) in names}
    sumsq: dict[str, torch.Tensor] = {}

    def on_io(key, x, _):
        if key in embeddings:  # x: token ids [tokens]
            m = embeddings[key][0]
            x = torch.bincount(x.reshape(-1), minlength=m.num_embeddings).float()
            sumsq[key] = sumsq.get(key, 0) + x  # one-hot inputs: squared norm = count
        else:  # x: [tokens, in]
            sumsq[key] = sumsq.get(key, 0) + x.pow(2).sum(0)

    watched = {k: m for k, (m, _, _) in linears.items()} | {k: m for k, (m, _) in embeddings.items()}
    with scoring(model):
        collect_activations(model, batches, watched, on_io, progress=progress, what="wanda")
        values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, (_, pname, in_axis) in linears.items():
                if key in sumsq:
                    norm = sumsq[key].sqrt()
                    w = params[pname].abs()
                    s = w * (norm[None, :] if in_axis == 1 else norm[:, None])
                    values[pname] = values[pname] + s if pname in values else s
            for key, (_, pname) in embeddings.items():
                if key in sumsq:
                    s = params[pname].abs() * sumsq[key].sqrt()[:, None]
                    values[pname] = values[pname] + s if pname in values else s
    unscored = [n for n in params if n not in values]
    return make_scores("wanda", "element", values, model, unscored=unscored)
