"""Parameter relevance by Layer-wise Relevance Propagation (Achtibat et al., *AttnLRP*, ICML 2024;
its parameter relevance is what LRP-based pruning ranks: Yeom et al., *Pruning by Explaining*,
Pattern Recognition 2021; Hatefi et al., *Pruning By Explaining Revisited*, 2025).

Inside :func:`analysis.attribution.lrp.lrp_rules` the relevance of a weight for an output is
``W ⊙ ∇W f`` with the modified gradient. Here f is the sum, over every labelled position of the
calibration batches, of the logit of the true next token (teacher-forced); the score of each
element is |Σ_batches W ⊙ ∇W f|. Cost: one forward+backward per calibration batch.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import (Scores, SelectorError, device_of, forward, make_scores, parameters,
                                                prepare, scoring)

VARIANTS = ("cp", "attn")


def score(model, batches, *, seed: int = 0, progress=None, variant: str = "cp") -> Scores:
    """LRP relevance of every parameter for the next-token logits of the calibration data.

    Args:
        model (nn.Module): a Llama / Qwen2 / Mistral / GPT-2 causal LM (read only; the rules are
            undone on exit).
        batches (list[Batch]): calibration batches.
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done, total, "lrp")`` per batch.
        variant (str): ``cp`` (CP-LRP) or ``attn`` (AttnLRP). Default: ``cp``.
    Returns:
        Scores: ``element`` granularity, shaped like each parameter.
    """
    from analysis.attribution.lrp import lrp_rules

    if variant not in VARIANTS:
        raise SelectorError(f"lrp: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    batches = list(batches or ())
    if not batches:
        raise SelectorError("lrp needs calibration data (no batches given)")
    with scoring(model, grad=True), lrp_rules(model, variant):
        params = {n: p for n, p in parameters(model).items() if p.is_floating_point()}
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        dev, steps = device_of(model), 0
        for i, raw in enumerate(batches):
            batch = prepare(raw, dev)
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            if bool(keep.any()):
                logits = getattr(forward(model, batch), "logits", None)
                if logits is None:
                    raise SelectorError(f"lrp: {type(model).__name__} has no language-modelling head")
                picked = logits[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0]
                grads = torch.autograd.grad(picked[keep].sum(), list(params.values()), allow_unused=True)
                for (n, p), g in zip(params.items(), grads):
                    if g is not None:
                        acc[n] += (p.detach() * g).float()
                steps += 1
            if progress is not None:
                progress(i + 1, len(batches), "lrp")
        values = {n: a.abs() for n, a in acc.items()}
    return make_scores("lrp", "element", values, model, variant=variant, steps=steps)
