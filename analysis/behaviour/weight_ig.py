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


def _metric_parts(evaluator, spec):
    """m(model) as a list of callables, one per batch, each returning its differentiable share of m (the
    shares sum to m): a backward per batch keeps one batch's activations alive, never all of them."""
    from analysis.behaviour.kl import batches, encode, forward_log_probs, pad_id

    model = evaluator.model
    if spec.what == "kl":
        prompts = evaluator.prompts_of(spec.text)
        ref = evaluator.tuned_log_probs(spec.text)
        ids = encode(evaluator.tokenizer, prompts)
        groups = batches(ids, model.config.get_text_config().vocab_size)
        pad = pad_id(evaluator.tokenizer)
        n = sum(len(x) for x in ids)

        def part(g):
            def m():
                total = 0.0
                for i, lp in zip(g, forward_log_probs(model, ids, g, pad)):
                    r = ref[i].to(lp.device)
                    total = total + (r.exp() * (r - lp)).sum()
                return -total / n
            return m
        return [part(g) for g in groups]
    if spec.what == "lm":
        data = evaluator.lm_batches(spec.text)
        count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)

        def part(b):
            def m():
                dev = next(model.parameters()).device
                logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                               use_cache=False).logits.float()
                labels = b["labels"].to(dev)[:, 1:]
                return -torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                          reduction="sum") / max(count, 1)
            return m
        return [part(b) for b in data]
    raise PatchError(f"--attribute needs a differentiable first --eval (kl:FILE or lm:FILE), not {spec.text}")


def weight_ig(patcher, evaluator, *, target: float = TARGET, progress=None) -> dict:
    """The attribution of m(θ¹) − m(θ⁰) to every aligned tensor, summed per layer, kind and layer × kind.

    The model must hold float32 weights (the path θ⁰ + s·Δ is not rounded to a stored dtype); it is
    θ⁰ again afterwards, with every parameter's ``requires_grad`` as it was.

    Returns:
        dict: ``metric``, ``total`` (Σ A), ``measured`` (m(θ¹) − m(θ⁰)), ``conservation_error``
        (|total − measured| / |measured|; None when the tune did not move m), ``nodes``, ``by_tensor``,
        ``by_layer``, ``by_kind``, ``by_cell``.
    """
    spec = evaluator.specs[0]
    parts = _metric_parts(evaluator, spec)
    pair, model = patcher.pair, patcher.model
    patcher.undo()
    keys = [k for k in pair.shapes if k in patcher.params]
    params = [patcher.params[k] for k in keys]
    if any(p.dtype != torch.float32 for p in params):
        raise PatchError("--attribute runs the path θ⁰ + s·Δ in float32: load the base in float32 (the CPU default)")
    theta0 = {k: patcher.params[k].detach().clone() for k in keys}
    delta = {}
    for k in keys:
        t0, t1 = pair.theta(k)
        delta[k] = (t1.float() - t0.float()).to(theta0[k].device)
    grad_was = {id(p): p.requires_grad for p in model.parameters()}

    def at(s: float) -> None:
        with torch.no_grad():
            for k in keys:
                patcher.params[k].copy_(theta0[k] + s * delta[k])

    def value() -> float:
        with torch.no_grad():
            return float(sum(float(m()) for m in parts))

    n, err, attr = 2, math.inf, {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        at(1.0)
        m1 = value()
        at(0.0)
        m0 = value()
        measured = m1 - m0
        for p in params:
            p.requires_grad_(True)
        while True:
            x, w = np.polynomial.legendre.leggauss(n)
            acc = {k: torch.zeros_like(theta0[k]) for k in keys}
            for i, (s, wt) in enumerate(zip((x + 1) / 2, w / 2)):
                at(float(s))
                for p in params:
                    p.grad = None
                for m in parts:  # one backward per batch: the gradients add up in .grad
                    m().backward()
                for k, p in zip(keys, params):
                    if p.grad is not None:  # a parameter the metric never reaches has no gradient
                        acc[k].add_(p.grad, alpha=float(wt))
                if progress:
                    progress(i + 1, n, f"weight IG, {n} nodes")
            attr = {k: float((delta[k] * acc[k]).double().sum()) for k in keys}
            total = sum(attr.values())
            err = abs(total - measured) / abs(measured) if measured else None
            if err is None or err <= target or n >= MAX_NODES:
                break
            n *= 2
    finally:
        at(0.0)
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(grad_was.get(id(p), False))
    by_layer, by_kind, by_cell = defaultdict(float), defaultdict(float), defaultdict(float)
    for k, a in attr.items():
        L, kind = pair.layer[k], pair.kind[k]
        by_layer["other" if L is None else L] += a
        by_kind[kind] += a
        if L is not None:
            by_cell[(L, kind)] += a
    return {"metric": spec.primary, "measured": measured, "total": sum(attr.values()), "conservation_error": err,
            "converged": err is not None and err <= target, "nodes": n, "target": target,
            "by_tensor": [{"name": k, "layer": pair.layer[k], "kind": pair.kind[k], "attribution": a}
                          for k, a in attr.items()],
            "by_layer": [{"layer": L, "attribution": a, "share": a / measured if measured else None}
                         for L, a in by_layer.items()],
            "by_kind": [{"kind": k, "attribution": a, "share": a / measured if measured else None}
                        for k, a in by_kind.items()],
            "by_cell": [{"layer": L, "kind": k, "attribution": a, "share": a / measured if measured else None}
                        for (L, k), a in by_cell.items()]}
