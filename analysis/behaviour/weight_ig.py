"""Which part of the update carries the change, estimated: integrated gradients in weight space along
the straight path θ⁰ → θ¹ (docs/design.md §15),

    A_j = Δ_j · ∫₀¹ ∂m/∂θ_j (θ⁰ + s·Δ) ds,   Σ_j A_j = m(θ¹) − m(θ⁰),

by Gauss–Legendre quadrature (numpy's ``leggauss`` on [0, 1]), doubling the nodes until the parts sum
to the measured difference within the target (the conservation error is reported either way). The
metric is differentiable: m(θ) = −KL(p_tuned ‖ p_θ) averaged over every position of the prompts
(``kl:FILE``: m(θ¹) = 0), or m(θ) = −loss (``lm:FILE``). Captum's IG attributes to inputs, not to
weights, so the path integral is written here.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from analysis.behaviour.patch import PatchError

TARGET = 1e-3  # relative conservation error
MAX_NODES = 64


def _metric_fn(evaluator, spec):
    """m(model) as a differentiable scalar for one ``kl`` or ``lm`` evaluation."""
    from analysis.behaviour.kl import batches, encode, forward_log_probs, pad_id

    model = evaluator.model
    if spec.what == "kl":
        prompts = evaluator.prompts_of(spec.text)
        ref = evaluator.tuned_log_probs(spec.text)
        ids = encode(evaluator.tokenizer, prompts)
        groups = batches(ids, model.config.get_text_config().vocab_size)
        pad = pad_id(evaluator.tokenizer)
        n = sum(len(x) for x in ids)

        def m():
            total = 0.0
            for g in groups:
                for i, lp in zip(g, forward_log_probs(model, ids, g, pad)):
                    p1 = ref[i].to(lp.device).exp()
                    kl = (p1 * (ref[i].to(lp.device) - lp)).sum()
                    total = total + kl
            return -total / n
        return m
    if spec.what == "lm":
        data = evaluator.lm_batches(spec.text)

        def m():
            dev = next(model.parameters()).device
            total, count = 0.0, 0
            for b in data:
                logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                               use_cache=False).logits.float()
                labels = b["labels"].to(dev)[:, 1:]
                total = total + torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                                  ignore_index=-100, reduction="sum")
                count += int((labels != -100).sum())
            return -total / max(count, 1)
        return m
    raise PatchError(f"--attribute needs a differentiable first --eval (kl:FILE or lm:FILE), not {spec.text}")


def weight_ig(patcher, evaluator, *, target: float = TARGET, progress=None) -> dict:
    """The attribution of m(θ¹) − m(θ⁰) to every aligned tensor, summed per layer, kind and layer × kind.

    Returns:
        dict: ``metric``, ``total`` (Σ A), ``measured`` (m(θ¹) − m(θ⁰)), ``conservation_error``
        (|total − measured| / |measured|), ``nodes``, ``by_tensor``, ``by_layer``, ``by_kind``, ``by_cell``.
    """
    spec = evaluator.specs[0]
    metric = _metric_fn(evaluator, spec)
    pair, model = patcher.pair, patcher.model
    patcher.undo()
    keys = [k for k in pair.shapes if k in patcher.params]
    theta0 = {k: patcher.params[k].detach().clone() for k in keys}
    delta = {}
    for k in keys:
        t0, t1 = pair.theta(k)
        delta[k] = (t1.float() - t0.float()).to(theta0[k].device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [patcher.params[k] for k in keys]
    with torch.no_grad():
        m1 = None
        for k in keys:
            patcher.params[k].copy_(theta0[k] + delta[k])
        m1 = float(metric())
        for k in keys:
            patcher.params[k].copy_(theta0[k])
        m0 = float(metric())
    measured = m1 - m0
    cache: dict[float, dict] = {}  # node -> gradient (tensors), reused when the rule grows

    def grads_at(s: float) -> dict:
        if s not in cache:
            with torch.no_grad():
                for k in keys:
                    patcher.params[k].copy_(theta0[k] + s * delta[k])
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            metric().backward()
            cache[s] = {k: patcher.params[k].grad.detach().clone() for k in keys}
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return cache[s]

    n, err, attr = 2, math.inf, {}
    try:
        while True:
            x, w = np.polynomial.legendre.leggauss(n)
            s_nodes, weights = (x + 1) / 2, w / 2
            acc = {k: torch.zeros_like(theta0[k]) for k in keys}
            for i, (s, wt) in enumerate(zip(s_nodes, weights)):
                g = grads_at(float(s))
                for k in keys:
                    acc[k].add_(g[k], alpha=float(wt))
                if progress:
                    progress(i + 1, n, f"weight IG, {n} nodes")
            cache.clear()  # Gauss–Legendre rules of different n share no nodes
            attr = {k: float((delta[k] * acc[k]).double().sum()) for k in keys}
            total = sum(attr.values())
            err = abs(total - measured) / abs(measured) if measured else (0.0 if total == 0 else math.inf)
            if err <= target or n >= MAX_NODES:
                break
            n *= 2
    finally:
        with torch.no_grad():
            for k in keys:
                patcher.params[k].copy_(theta0[k])
        for p in model.parameters():
            p.requires_grad_(False)
    by_layer, by_kind, by_cell = defaultdict(float), defaultdict(float), defaultdict(float)
    for k, a in attr.items():
        L, kind = pair.layer[k], pair.kind[k]
        by_layer["other" if L is None else L] += a
        by_kind[kind] += a
        if L is not None:
            by_cell[(L, kind)] += a
    return {"metric": spec.primary, "measured": measured, "total": sum(attr.values()), "conservation_error": err,
            "converged": err <= target, "nodes": n, "target": target,
            "by_tensor": [{"name": k, "layer": pair.layer[k], "kind": pair.kind[k], "attribution": a}
                          for k, a in attr.items()],
            "by_layer": [{"layer": L, "attribution": a, "share": a / measured if measured else None}
                         for L, a in by_layer.items()],
            "by_kind": [{"kind": k, "attribution": a, "share": a / measured if measured else None}
                        for k, a in by_kind.items()],
            "by_cell": [{"layer": L, "kind": k, "attribution": a, "share": a / measured if measured else None}
                        for (L, k), a in by_cell.items()]}
