"""How good a selector is (docs/design.md §6): agreement between selectors, predictive power for
the elements a real fine-tune changed, and stability across calibration sets.

Pure math on vectors first (:func:`average_ranks`, :func:`spearman_rho`, :func:`auroc`,
:func:`roc_curve`, :func:`precision_at_k`), tested against hand-computed values; then the same on
:class:`~analysis.importance.selectors.Scores` over a scope. Scores of different granularities are compared
at element level (:func:`~analysis.importance.scores.expand`, uncovered elements tied at the bottom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analysis.errors import quoted
from analysis.importance.scores import (ImportanceError, check_density, compute_scores, expand, flatten, scope_names,
                                        topk_flags)
from analysis.sparsity.masks import Mask
from analysis.importance.selectors import Scores
from analysis.importance.selectors.base import align_names
from analysis.definitions import PAPER_TOL

ROC_POINTS = 512


# ----------------------------------------------------------------------------- vectors

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a vector, ties given the average of the ranks they span (float64 ``# [n]``)."""
    x = x.reshape(-1)
    if bool(torch.isnan(x).any()):
        raise ImportanceError("scores contain NaN; ranks are not defined")
    values, order = torch.sort(x, stable=True)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = counts.cumsum(0).double()  # last rank of each tie group
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = avg.repeat_interleave(counts)
    return ranks


def spearman_rho(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (NaN when one side is constant)."""
    if x.numel() != y.numel():
        raise ImportanceError(f"cannot correlate {x.numel()} scores with {y.numel()}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact area under the ROC curve by the Mann–Whitney U statistic.

    AUROC = (Σ ranks of positives − P(P+1)/2) / (P·N) with average ranks, i.e. the probability
    that a random positive outscores a random negative, ties counting one half.

    Args:
        scores (Tensor): ``# [n]``.
        labels (BoolTensor): ``# [n]``, True = positive (e.g. changed).
    Returns:
        float: in [0, 1]; NaN when there are no positives or no negatives.
    """
    labels = labels.reshape(-1).bool()
    P = int(labels.sum())
    N = labels.numel() - P
    if P == 0 or N == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return (float(ranks[labels].sum()) - P * (P + 1) / 2) / (P * N)


def roc_curve(scores: torch.Tensor, labels: torch.Tensor, *, max_points: int = ROC_POINTS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """ROC curve points, one per distinct score threshold, from (0, 0) to (1, 1).

    Its trapezoid area equals :func:`auroc` before downsampling; downsampling keeps evenly spaced
    points (always the first and last) for plotting.

    Returns:
        tuple[Tensor, Tensor]: false and true positive rates, float64 ``# [points]``.
    """
    labels = labels.reshape(-1).bool()
    P = int(labels.sum())
    N = labels.numel() - P
    values, order = torch.sort(scores.reshape(-1), descending=True, stable=True)
    hits = labels[order].double()
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = counts.cumsum(0) - 1  # last index of each threshold group
    tp = hits.cumsum(0)[ends]
    fp = (1 - hits).cumsum(0)[ends]
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fp / max(N, 1)])
    tpr = torch.cat([zero, tp / max(P, 1)])
    if fpr.numel() > max_points:
        keep = torch.linspace(0, fpr.numel() - 1, max_points).round().long().unique()
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int | None = None) -> float:
    """Fraction of positives among the k top-scored (ties by position); k = number of positives
    by default, where precision@k equals recall@k."""
    labels = labels.reshape(-1).bool()
    k = int(labels.sum()) if k is None else k
    if k == 0:
        return float("nan")
    return int((topk_flags(scores.reshape(-1), k) & labels).sum()) / k


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean vectors (1.0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


# ----------------------------------------------------------------------------- scores

def _paired(a: Scores, b: Scores, scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat score vectors over the same units (element level when granularities differ)."""
    if a.shapes != b.shapes:
        raise ImportanceError(f"{a.selector} and {b.selector} scored different models")
    if a.granularity != b.granularity:
        a, b = expand(a, fill=float("-inf"), scope=scope), expand(b, fill=float("-inf"), scope=scope)
    return flatten(a, scope), flatten(b, scope)


def spearman(a: Scores, b: Scores, *, scope: str = "blocks", max_elements: int | None = None,
             seed: int = 0) -> float:
    """Spearman rank correlation of two selectors' scores over the scope.

    Args:
        max_elements (int, optional): correlate a seeded uniform sample of this many positions
            (for very large models). Default: None (all, exact).
    """
    x, y = _paired(a, b, scope)
    if max_elements is not None and x.numel() > max_elements:
        idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:max_elements]
        x, y = x[idx], y[idx]
    return spearman_rho(x, y)


def topk_jaccard(a: Scores, b: Scores, density: float, *, scope: str = "blocks") -> float:
    """Jaccard of the two global top-k selections at a density (k = round(density · n))."""
    x, y = _paired(a, b, scope)
    k = round(check_density(density) * x.numel())
    return jaccard(topk_flags(x, k), topk_flags(y, k))


@dataclass
class Agreement:
    """Pairwise agreement of selectors over one scope."""

    names: list[str]
    spearman: torch.Tensor  # [selectors, selectors], float64, 1 on the diagonal
    jaccard: torch.Tensor  # [selectors, selectors], top-k Jaccard at ``density``
    density: float
    scope: str

    def to_dict(self) -> dict:
        return {"names": self.names, "density": self.density, "scope": self.scope,
                "spearman": _jsonable(self.spearman), "jaccard": _jsonable(self.jaccard)}


def agreement(scores: dict[str, Scores], density: float, *, scope: str = "blocks",
              max_elements: int | None = None) -> Agreement:
    """Agreement matrix: Spearman correlation and top-k Jaccard for every pair of selectors.

    Args:
        scores (dict[str, Scores]): label -> scores of one model.
        density (float): the top-k density of the Jaccard.
    """
    names = list(scores)
    n = len(names)
    rho = torch.eye(n, dtype=torch.float64)
    jac = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = scores[names[i]], scores[names[j]]
            rho[i, j] = rho[j, i] = spearman(a, b, scope=scope, max_elements=max_elements)
            jac[i, j] = jac[j, i] = topk_jaccard(a, b, density, scope=scope)
    return Agreement(names, rho, jac, float(density), scope)


@dataclass
class Prediction:
    """How well one selector's scores predict the elements a fine-tune changed."""

    selector: str
    n: int  # elements in scope
    k: int  # changed elements in scope; precision@k selects this many
    precision_at_k: float | None  # None when k = 0 (nothing to select)
    base_rate: float  # k / n: the expected precision@k of a random selector
    auroc: float | None  # exact (Mann–Whitney); 0.5 = chance; None with no positives or no negatives
    fpr: torch.Tensor  # [points] ROC curve, downsampled for plotting
    tpr: torch.Tensor  # [points]
    note: str | None = None  # why a value is None

    def to_dict(self) -> dict:
        return {"selector": self.selector, "n": self.n, "k": self.k, "precision_at_k": _num(self.precision_at_k),
                "base_rate": self.base_rate, "auroc": _num(self.auroc),
                "roc": {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist()}, "note": self.note}


def predictive_power(scores: Scores, changed: Mask, *, scope: str = "blocks",
                     max_points: int = ROC_POINTS) -> Prediction:
    """Precision@k and AUROC of a selector against a diff mask (the changed elements).

    Args:
        scores (Scores): any granularity (non-element scores are broadcast to their elements;
            elements no unit covers rank last, tied).
        changed (Mask): name -> BoolTensor of changed elements, e.g. from ``diff_checkpoints``'
            ``on_mask`` or :func:`analysis.sparsity.masks.load_mask`; names are matched after prefix
            normalization.
        scope (str): ``blocks`` or ``all``. Default: ``blocks``.
    Returns:
        Prediction: when the fine-tune changed nothing in scope (k = 0) precision@k and AUROC
        are None; when it changed every element AUROC is None (no negatives); ``note`` says which.
    Raises:
        ImportanceError: a mask that does not cover the scope, or a scope with no elements.
    """
    element = expand(scores, fill=float("-inf"), scope=scope)
    names = scope_names(element, scope)
    matched, missing, _ = align_names(changed, names)
    if missing:
        raise ImportanceError(f"the diff mask has no entry for {missing[0]} ({len(missing)} in scope)")
    by_name = {t: s for s, t in matched.items()}
    labels = []
    for n in names:
        m = changed[by_name[n]]
        if tuple(m.shape) != tuple(element.values[n].shape):
            raise ImportanceError(f"the diff mask's {by_name[n]} has shape {tuple(m.shape)}, "
                                  f"the scores' {tuple(element.values[n].shape)}")
        labels.append(m.reshape(-1).bool())
    y = torch.cat(labels)
    x = flatten(element, scope)
    n, k = x.numel(), int(y.sum())
    if n == 0:
        raise ImportanceError(f"nothing to compare: the scope {scope!r} holds no elements")
    note = None
    if k == 0:
        note = "the fine-tune changed no element in scope: precision@k and AUROC are undefined"
    elif k == n:
        note = "the fine-tune changed every element in scope: AUROC is undefined (no unchanged elements)"
    fpr, tpr = roc_curve(x, y, max_points=max_points)
    return Prediction(scores.selector, n, k, _num(precision_at_k(x, y, k)), k / n, _num(auroc(x, y)), fpr, tpr,
                      note)


def stability(model, selector: str, batches_a, batches_b, *, density: float, scope: str = "blocks",
              granularity: str | None = None, seed: int = 0, scores_a: Scores | None = None,
              progress=None, **options) -> float:
    """Top-k Jaccard of one selector's selections from two (disjoint) calibration sets.

    Args:
        batches_a, batches_b (list[Batch]): e.g. ``calibration_batches(..., offset=0)`` and
            ``offset=samples``.
        density (float): top-k density.
        scores_a (Scores, optional): the scores on ``batches_a`` when already computed. Default: None.
        progress (Callable, optional): ``progress(done, total, name)`` of the scoring.
        **options: selector options.
    Returns:
        float: 1.0 = the same selection from both sets.
    """
    a = scores_a if scores_a is not None else compute_scores(model, selector, batches_a, granularity=granularity,
                                                             seed=seed, progress=progress, **options)
    b = compute_scores(model, selector, batches_b, granularity=granularity, seed=seed, progress=progress, **options)
    return topk_jaccard(a, b, density, scope=scope)


def check_selectors(names: list[str], against_diff=None) -> dict:
    """name -> registry entry of each selector to evaluate, checked before any model is loaded.

    Raises:
        SelectorError / ImportanceError: an unknown, empty or repeated name (each selector is
            evaluated once: a repeat would be a second row of the same scores), none at all, or
            ``diff`` without the fine-tune it reads.
    """
    from analysis.importance.selectors import get_selector

    if not names:
        raise ImportanceError("--selectors needs at least one selector name")
    for i, n in enumerate(names):
        if not n:
            raise ImportanceError(f"selector list {quoted(','.join(names))}: item {i + 1} is empty")
        if n in names[:i]:
            raise ImportanceError(f"selector list {quoted(','.join(names))}: {quoted(n)} is listed twice; name each "
                                  "selector once")
    entries = {n: get_selector(n) for n in names}
    if "diff" in entries and not against_diff:
        raise ImportanceError("the diff selector needs --against-diff BASE TUNED")
    return entries


def evaluate_selectors(model, names: list[str], *, batches=None, held_out=None, density: float,
                       scope: str = "blocks", seed: int = 0, against_diff: tuple[str, str] | None = None,
                       tol: float = PAPER_TOL, progress_for=None) -> dict:
    """Scores a model with several selectors and says how good they are (docs/design.md §6).

    Args:
        model (nn.Module): the checkpoint the selectors score.
        names (list[str]): selector names; ``diff`` (the changed elements themselves, an oracle row
            beside the predictors) needs ``against_diff``.
        batches (list[Batch], optional): calibration data of the selectors that need it.
        held_out (list[Batch], optional): a disjoint calibration set: with it, each data selector's
            stability (top-k Jaccard of its selections from the two sets).
        density (float): the top-k density of the Jaccard and of precision@k.
        against_diff (tuple[str, str], optional): ``(BASE, TUNED)``, the fine-tune whose changed
            elements (at ``tol``) each selector should predict.
        progress_for (Callable[[str], Progress], optional): a progress callback per selector name.

    Returns:
        dict: ``agreement`` (Spearman and top-k Jaccard matrices; None for one selector),
        ``stability`` (name -> Jaccard, or None), and with ``against_diff``, ``prediction`` (per
        selector: precision@k, its chance level, AUROC, ROC curve).

    Raises:
        ImportanceError: no selector named, or ``diff`` without ``against_diff``.
    """
    from analysis.sparsity.diff import diff_checkpoints

    entries = check_selectors(names, against_diff)
    scores, stable = {}, {}
    for n, e in entries.items():
        prog = progress_for(n) if progress_for else None
        try:
            opts = {"base": against_diff[0], "tuned": against_diff[1], "tol": tol} if n == "diff" else {}
            scores[n] = compute_scores(model, n, batches if e.needs_data else None, seed=seed, progress=prog, **opts)
            if held_out and e.needs_data:
                stable[n] = stability(model, n, batches, held_out, density=density, scope=scope, seed=seed,
                                      scores_a=scores[n], progress=prog)
        finally:
            if prog is not None and hasattr(prog, "close"):
                prog.close()
    out = {"agreement": agreement(scores, density, scope=scope).to_dict() if len(names) > 1 else None,
           "stability": stable or None}
    if against_diff:
        changed = {}
        diff_checkpoints(against_diff[0], against_diff[1], tol=tol, on_mask=changed.__setitem__)
        out["against_diff"] = {"base": against_diff[0], "tuned": against_diff[1], "tol": tol}
        out["prediction"] = [predictive_power(scores[n], changed, scope=scope).to_dict() for n in names]
    return out


def _num(x: float | None):
    return None if x is None or math.isnan(x) else x  # NaN -> null in JSON


def _jsonable(t: torch.Tensor) -> list:
    return [[_num(float(v)) for v in row] for row in t]
