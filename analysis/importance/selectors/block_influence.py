"""Block influence BI_ℓ = 1 − E_tokens[cos(h_in, h_out)] of each transformer block.

ShortGPT (Men et al., *ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect*, arXiv 2403.03853) removes the blocks of lowest BI; layer-wise quantization (Dumitru et
al., *Layer-Wise Quantization*, arXiv 2406.17415) gives more bits to blocks of higher BI. A block
that barely turns its residual-stream input has BI ≈ 0. h_in and h_out are the hidden states
entering and leaving the block (forward hooks on the blocks), averaged over every real token.

Cost: one no-grad forward per calibration batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from analysis.importance.selectors.base import (Scores, SelectorError, architecture, block_modules, collect_activations,
                                                make_scores, num_layers, parameters, scoring)


def score(model, batches, *, seed: int = 0, progress=None) -> Scores:
    """Block influence of every transformer block.

    Args:
        model (nn.Module): the model (read only).
        batches (list[Batch]): calibration batches.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "block_influence")`` per batch.
    Returns:
        Scores: ``layer`` granularity, ``# [layers]``, in [0, 2].
    """
    blocks = block_modules(model)
    if not blocks:
        raise SelectorError(f"block_influence: no transformer blocks found in {type(model).__name__}")
    cos_sum: dict[int, float] = {}
    count: dict[int, int] = {}

    def on_io(layer, x_in, x_out):
        cos = F.cosine_similarity(x_in, x_out, dim=-1)  # [tokens]
        cos_sum[layer] = cos_sum.get(layer, 0.0) + float(cos.double().sum())
        count[layer] = count.get(layer, 0) + cos.numel()

    with scoring(model):
        collect_activations(model, batches, blocks, on_io, progress=progress, what="block_influence")
    values = torch.zeros(num_layers(architecture(model), parameters(model)))
    for layer, total in cos_sum.items():
        values[layer] = 1.0 - total / max(count[layer], 1)
    return make_scores("block_influence", "layer", values, model)
