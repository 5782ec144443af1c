"""Patches and their evaluations, one or a sweep of rows, with the base loaded once and every patch
applied in place and undone (docs/design.md §15).

Axes (:data:`AXES`):

- ``layers``: each block alone, and all but each block;
- ``kinds``: each module kind alone (and ``attn``, ``mlp``), and all but each;
- ``cells``: each (block, kind) alone — the layer × kind map of recovered gain;
- ``heads``: each query head alone (see ``heads:`` in :mod:`analysis.behaviour.patch`);
- ``rank``: the subset's update at rank k = 1, 2, 4, … and full (each SVD computed once);
- ``alpha``: α = 0, 0.25, … 2 on the subset;
- ``density``: each selector's top 1 … 100% beside a random mask of the same density.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from analysis.behaviour.patch import GROUPS, Pair, Patcher, Selection, selected_count
from analysis.checkpoints.structure import KINDS

AXES = ("layers", "kinds", "cells", "heads", "rank", "alpha", "density")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _kinds(pair: Pair) -> list[str]:
    have = {k for k in pair.kind.values()}
    return [k for k in KINDS if k in have]


def ranks(pair: Pair, sel: Selection) -> list[int | None]:
    """1, 2, 4, … below the largest rank a selected block matrix can have, then None (full)."""
    top = max((min(pair.shapes[k]) for k in sel if pair.layer[k] is not None and len(pair.shapes[k]) == 2), default=1)
    out, k = [], 1
    while k < top:
        out.append(k)
        k *= 2
    return out + [None]


def rows_of(axis: str, pair: Pair, base_sel: Selection, *, selectors=(), masks=None) -> list[dict]:
    """The rows of a sweep: each ``{"label", "group", "selection", "alpha", "rank", "tag"}``."""
    L = range(pair.num_layers)
    everything = {k: True for k in pair.shapes}
    rows: list[dict] = []
    if axis == "layers":
        for i in L:
            rows.append({"label": f"layer {i}", "group": "alone", "layer": i,
                         "selection": {k: True for k, la in pair.layer.items() if la == i}})
        for i in L:
            rows.append({"label": f"all but layer {i}", "group": "all but", "layer": i,
                         "selection": {k: True for k, la in pair.layer.items() if la != i}})
    elif axis == "kinds":
        kinds = _kinds(pair)
        names = [(k, (k,)) for k in kinds] + [(g, ks) for g, ks in GROUPS.items() if any(x in kinds for x in ks)]
        for name, ks in names:
            rows.append({"label": name, "group": "alone", "kind": name,
                         "selection": {k: True for k, kind in pair.kind.items() if kind in ks}})
        for name, ks in names:
            rows.append({"label": f"all but {name}", "group": "all but", "kind": name,
                         "selection": {k: True for k, kind in pair.kind.items() if kind not in ks}})
    elif axis == "cells":
        for i in L:
            for kind in _kinds(pair):
                sel = {k: True for k in pair.shapes if pair.layer[k] == i and pair.kind[k] == kind}
                if sel:
                    rows.append({"label": f"layer {i} {kind}", "group": "cell", "layer": i, "kind": kind,
                                 "selection": sel})
    elif axis == "heads":
        from analysis.behaviour.patch import heads_selection

        H = pair.tuned.arch.num_heads or 0
        for i in L:
            for h in range(H):
                rows.append({"label": f"head {i}.{h}", "group": "head", "layer": i, "head": h,
                             "selection": heads_selection(pair, ((i, h),), "--sweep heads")})
    elif axis == "rank":
        for r in ranks(pair, base_sel):
            rows.append({"label": "full" if r is None else f"rank {r}", "group": "rank", "rank": r,
                         "selection": base_sel, "tag": "subset"})
    elif axis == "alpha":
        for a in ALPHAS:
            rows.append({"label": f"α = {a:g}", "group": "alpha", "alpha": a, "selection": base_sel})
    elif axis == "density":
        for name, by_density in (masks or {}).items():
            for d, sel in by_density.items():
                rows.append({"label": f"{name} {d:.0%}", "group": name, "density": d, "selection": sel})
    else:
        raise ValueError(axis)
    del everything
    return rows


def run_rows(patcher: Patcher, evaluator, rows: list[dict], *, progress: Callable | None = None) -> list[dict]:
    """Each row patched in place, scored, undone; its metrics and recovered gains."""
    out = []
    for n, r in enumerate(rows):
        t0 = time.perf_counter()
        patcher.apply(r["selection"], alpha=r.get("alpha", 1.0), rank=r.get("rank"), tag=r.get("tag"))
        t_patch = time.perf_counter() - t0
        metrics = evaluator.score()
        patcher.undo()
        rec = evaluator.recovered(metrics)
        row = {k: v for k, v in r.items() if k not in ("selection", "tag")}
        row.update(selected=selected_count(patcher.pair, r["selection"]), metrics=metrics,
                   recovered=rec.get(evaluator.primary), recovered_by_metric=rec,
                   seconds=time.perf_counter() - t0, patch_seconds=t_patch)
        out.append(row)
        if progress:
            progress(n + 1, len(rows), r["label"])
    return out


def density_masks(pair: Pair, model, selectors: list[str], batches, *, seed: int = 0) -> dict[str, dict]:
    """Each selector's top-d masks of the base (scores computed once) and a random selector's, at
    :data:`DENSITIES`."""
    from analysis.behaviour.patch import mask_selection
    from analysis.importance.scores import compute_scores, scores_to_mask
    from analysis.importance.selectors import get_selector

    out: dict[str, dict] = {}
    for name in list(dict.fromkeys([*selectors, "random"])):
        entry = get_selector(name)
        scores = compute_scores(model, name, batches if entry.needs_data else None, granularity="element", seed=seed)
        out[name] = {d: mask_selection(pair, scores_to_mask(scores, d), f"--sweep density ({name})")
                     for d in DENSITIES}
    return out


def layer_agreement(model, selectors: list[str], batches, measured: dict[int, float], *,
                    estimated: dict[int, float] | None = None, seed: int = 0) -> list[dict]:
    """Does importance find what matters, per layer: each selector's per-layer score (its element scores
    of the base summed over each block, :func:`analysis.importance.scores.aggregate`) against the measured
    effect of patching that layer alone (``measured``: layer -> recovered gain), as a Spearman ρ; the
    weight-space IG's per-layer estimate (``estimated``) beside them."""
    import torch

    from analysis.importance.evaluation import spearman_rho
    from analysis.importance.scores import aggregate, compute_scores
    from analysis.importance.selectors import get_selector

    import math

    def rho(a, b):
        r = spearman_rho(a, b) if len(layers) > 1 else None
        return None if r is None or not math.isfinite(r) else r  # a constant side has no rank correlation

    layers = sorted(L for L, v in measured.items() if v is not None)
    effect = torch.tensor([measured[L] for L in layers], dtype=torch.float64)
    rows = []
    for name in selectors:
        entry = get_selector(name)
        s = compute_scores(model, name, batches if entry.needs_data else None, granularity="element", seed=seed)
        per = aggregate(s, "layer").values.double()
        scores = [float(per[L]) for L in layers]
        rows.append({"selector": name, "per_layer": scores,
                     "spearman": rho(torch.tensor(scores, dtype=torch.float64), effect)})
    if estimated:
        est = [estimated.get(L, 0.0) for L in layers]
        rows.append({"selector": "weight IG (estimated)", "per_layer": est,
                     "spearman": rho(torch.tensor(est, dtype=torch.float64), effect)})
    return [{"layers": layers, "measured": [measured[L] for L in layers], **r} for r in rows]
