"""Head importance by the head-mask gradient (Michel et al., *Are Sixteen Heads Really Better than
One?*, NeurIPS 2019, §4.1).

Each head's attention output is multiplied by a mask variable ξ_h = 1 (a forward pre-hook on the
output projection's input, which is the concatenation of the query heads' outputs; the forward is
unchanged), and I_h = Σ_x |∂L(x)/∂ξ_h| over calibration sequences x. Per-sequence gradients are
free: every sequence gets its own ξ ``# [batch, heads]`` and the loss is the sum of the per-sequence
losses. With ``normalize=True`` (the paper's default) the scores of each layer are divided by
their ℓ2 norm. GQA: the output projection's input is per query head, so scores are per query
head; a kv head serves the query heads of its group.

Cost: one forward+backward per calibration batch; the backward computes no weight gradients.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import (Scores, SelectorError, architecture, hooks, loss_steps, make_scores,
                                                modules_of_kind, num_layers, parameters, scoring)


def score(model, batches, *, seed: int = 0, progress=None, normalize: bool = True) -> Scores:
    """Head-mask gradient importance of every query head.

    Args:
        model (nn.Module): a model with a language-modelling head (read only).
        batches (list[Batch]): calibration batches.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "head_importance")`` per batch.
        normalize (bool): divide each layer's scores by their ℓ2 norm. Default: True.
    Returns:
        Scores: ``head`` granularity, ``# [layers, heads]``.
    """
    arch = architecture(model)
    o_proj = modules_of_kind(model, "o")
    H, hd = arch.num_heads, arch.head_dim
    if not o_proj or not H or not hd:
        raise SelectorError("head_importance: no attention output projections or head count found")
    gates: dict[int, torch.Tensor] = {}

    def gate(layer):
        def pre(module, args, kwargs):
            x = args[0]  # [batch, pos, heads * head_dim]
            xi = torch.ones(x.shape[0], H, dtype=x.dtype, device=x.device, requires_grad=True)
            gates[layer] = xi
            x = (x.unflatten(-1, (H, hd)) * xi[:, None, :, None]).flatten(-2)
            return (x, *args[1:]), kwargs
        return pre

    importance = torch.zeros(num_layers(arch, parameters(model)), H, dtype=torch.float64)
    with scoring(model), hooks(pre=[(m, gate(L)) for L, (m, _, _) in o_proj.items()]):
        for _, losses in loss_steps(model, batches, per_sequence=True, progress=progress,
                                    what="head_importance"):
            layers = sorted(gates)
            grads = torch.autograd.grad(losses.sum(), [gates[L] for L in layers])
            for L, g in zip(layers, grads):
                importance[L] += g.abs().sum(0).double().cpu()  # Σ over sequences of |∂L_x/∂ξ|
            gates.clear()
    if normalize:
        importance = importance / importance.norm(dim=1, keepdim=True).clamp(min=1e-20)
    return make_scores("head_importance", "head", importance, model, normalize=normalize)
