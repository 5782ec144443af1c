"""Overlap of the subnetworks changed by two or more fine-tunes of one base.

Definitions (docs/design.md §4; Mukherjee et al., arXiv 2505.11711, §5 and App. E): for
runs a, b with changed sets I_a, I_b and densities d_k = |I_k| / n (sparsity s_k = 1 − d_k):
o1 = |I_a ∩ I_b| / |I_a|, o2 = |I_a ∩ I_b| / |I_b|, Jaccard = |I_a ∩ I_b| / |I_a ∪ I_b|;
the paper's random baseline o1_random = d_b, o2_random = d_a, Jaccard_random =
d_a·d_b / (d_a + d_b − d_a·d_b); and the magnitude-matched baseline, random subnetworks of
the same sizes drawn within each stratum s = (tensor, IEEE exponent field of θ⁰):
E|I_a ∩ I_b| = Σ_s n_s·d_as·d_bs = Σ_s c_as·c_bs / n_s, exact, no sampling.
The consensus histogram counts elements changed by exactly k of the N runs, k = 0..N.
All in one streaming pass over the aligned tensors: per tensor one fused kernel
(:func:`kernels.diff_stats.overlap_counts`) reads the base and every fine-tune once and counts the
elements by (stratum, change code), bit k of the code set when run k changed the element; every
count above is a sum over that table. More than ``MAX_CODED_RUNS`` runs are counted pair by pair.

Dtypes as in analysis.sparsity.diff: floating-point tensors (fp8 included) are changed at τ, integer /
bool / packed tensors when their stored bits differ (their elements form one stratum per
tensor: an integer code has no IEEE exponent); complex tensors and tensors stored differently
across the runs are skipped with the reason. ``by_compare`` gives the elements of each kind
(``{"tolerance": {"numel"}, "exact_bits": {"numel"}}``, as in the diff JSON).

Undefined ratios are None, never a division by zero: o1 when run a changed nothing at τ
(|I_a| = 0), o2 likewise for b, Jaccard when neither did; every pair row carries a ``note``
saying which and why (None when all are defined). A set of runs with nothing comparable (every
aligned tensor skipped or empty) is a one-line SubnetscopeError.

Runs as vectors, in the same pass (docs/design.md §16; the task-vector analyses of model merging:
fusion_bench's task-vector cosine, TIES's sign election, arXiv 2306.01708): with Δ_k = θ_k − θ⁰ over
the floating-point elements whose values are finite in θ⁰ and both runs, the cosine of runs a and b is
⟨Δ_a, Δ_b⟩ / (‖Δ_a‖ ‖Δ_b‖) in float64 (None when either update is zero); the sign agreement is the
fraction of the elements both changed at τ where sign Δ_a = sign Δ_b (chance 0.5; None when they share
no changed element); per tensor, each run's relative update norm ‖Δ_k‖ / ‖θ⁰‖ (None when θ⁰ is zero).
Integer / packed tensors have codes, not coordinates, and stay out of the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np
import torch

from analysis.checkpoints import Checkpoint, align, open_checkpoint
from analysis.definitions import PAPER_TOL
from analysis.errors import SubnetscopeError
from analysis.checkpoints.tensor_map import map_aligned
from kernels.diff_stats import (EXACT_BITS, MAX_CODED_RUNS, TOLERANCE, Incomparable, changed_mask, comparison,
                                overlap_counts, vector_sums)

SCHEMA = "subnetscope.overlap/1"


@dataclass
class _Acc:
    """Counts for one group of elements (all, a layer, a module kind)."""

    n_runs: int
    numel: int = 0
    changed: np.ndarray = None  # [N] |I_k|
    inter: np.ndarray = None  # [N, N] |I_a ∩ I_b|
    matched: np.ndarray = None  # [N, N] Σ_s c_as c_bs / n_s
    dots: np.ndarray = None  # [N, N] ⟨Δ_a, Δ_b⟩ (float64)
    agree: np.ndarray = None  # [N, N] both changed at τ with the same sign
    both: np.ndarray = None  # [N, N] both changed at τ, among the vector (floating) elements

    def __post_init__(self):
        N = self.n_runs
        self.changed = np.zeros(N, np.int64)
        self.inter = np.zeros((N, N), np.int64)
        self.matched = np.zeros((N, N), np.float64)
        self.dots = np.zeros((N, N), np.float64)
        self.agree = np.zeros((N, N), np.int64)
        self.both = np.zeros((N, N), np.int64)

    def vectors(self, a: int, b: int) -> dict:
        """Cosine and sign agreement of runs a and b over this group (None where undefined)."""
        na, nb = self.dots[a, a], self.dots[b, b]
        cos = float(self.dots[a, b] / np.sqrt(na * nb)) if na > 0 and nb > 0 else None
        return {"cosine": cos, "sign_agreement": _div(int(self.agree[a, b]), int(self.both[a, b])),
                "sign_agreement_random": 0.5}


@dataclass
class OverlapResult:
    base: str
    tuned: list[str]
    tol: float
    total: _Acc
    layers: dict[int, _Acc]
    kinds: dict[str, _Acc]
    consensus: list[int]  # [N+1]: elements changed by exactly k runs
    skipped: list[dict] = field(default_factory=list)
    exact_bits_numel: int = 0  # elements (of total.numel) compared by exact bits
    norms: list[dict] = field(default_factory=list)  # per tensor: name, relative ‖Δ_k‖ / ‖θ⁰‖ per run

    def pairs(self, acc: _Acc | None = None) -> list[dict]:
        """Every pair (a < b) with the paper's fields and the magnitude-matched baseline.

        Ratios that are undefined are None (o1 / o1_matched when run a changed nothing, o2 /
        o2_matched when b did, Jaccard and its baseline when neither did, every ratio for a
        group with no elements) and ``note`` says why (None when everything is defined)."""
        acc = acc or self.total
        n, out = acc.numel, []
        for a in range(acc.n_runs):
            for b in range(a + 1, acc.n_runs):
                ca, cb, i = int(acc.changed[a]), int(acc.changed[b]), int(acc.inter[a, b])
                da, db = _div(ca, n), _div(cb, n)
                union = ca + cb - i
                m = float(acc.matched[a, b])
                out.append({
                    "a": a, "b": b, "sparsity_a": _sub1(da), "sparsity_b": _sub1(db),
                    "changed_a": ca, "changed_b": cb, "intersection": i,
                    "o1": _div(i, ca), "o2": _div(i, cb),
                    "o1_random": db, "o2_random": da,
                    "o1_matched": _div(m, ca), "o2_matched": _div(m, cb),
                    "jaccard": _div(i, union),
                    "jaccard_random": None if n == 0 else _div(da * db, da + db - da * db),
                    "note": self._note(a, b, ca, cb, n),
                    "runs": [a, b], **acc.vectors(a, b),
                })
                if acc is self.total:
                    out[-1]["by_layer"] = [{"layer": L, **g.vectors(a, b)} for L, g in sorted(self.layers.items())]
                    out[-1]["by_kind"] = [{"kind": k, **g.vectors(a, b)} for k, g in self.kinds.items()]
        return out

    def _note(self, a: int, b: int, ca: int, cb: int, n: int) -> str | None:
        at = f"at τ = {self.tol:g}"
        if n == 0:
            return "no elements compared in this group: every ratio is undefined"
        if ca == 0 and cb == 0:
            return f"neither run {a} nor run {b} changed anything {at}: o1, o2 and Jaccard are undefined"
        if ca == 0:
            return f"run {a} changed nothing {at}: o1 = |I_a ∩ I_b| / |I_a| is undefined"
        if cb == 0:
            return f"run {b} changed nothing {at}: o2 = |I_a ∩ I_b| / |I_b| is undefined"
        return None

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "base": self.base,
            "tuned": self.tuned,
            "tolerance": self.tol,
            "total_params": self.total.numel,
            "by_compare": {TOLERANCE: {"numel": self.total.numel - self.exact_bits_numel},
                           EXACT_BITS: {"numel": self.exact_bits_numel}},
            "pairs": self.pairs(),
            "consensus": self.consensus,
            "layers": [{"layer": L, "numel": acc.numel, "pairs": self.pairs(acc)}
                       for L, acc in sorted(self.layers.items())],
            "kinds": [{"kind": k, "numel": acc.numel, "pairs": self.pairs(acc)} for k, acc in self.kinds.items()],
            "relative_norms": self.norms,
            "skipped": self.skipped,
        }


def _div(x, y):
    return x / y if y else None


def _sub1(x):
    return None if x is None else 1 - x


def overlap(base: str | Checkpoint, tuned: list[str | Checkpoint], *, tol: float = PAPER_TOL,
            progress: Callable[[int, int, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None, ray: str | None = None) -> OverlapResult:
    """Measures how the changed subnetworks of N ≥ 2 fine-tunes of one base overlap.

    Args:
        base: θ⁰ (path, hub id or Checkpoint).
        tuned: the fine-tunes (at least two).
        tol (float): τ of "changed". Default: ``PAPER_TOL``.
        progress (callable, optional): progress(done_elements, total_elements, name).
        should_stop (callable, optional): polled between tensors; True cancels.
        ray (str, optional): run as Ray tasks, one per shard file of the base (``""``: RAY_ADDRESS or
            a local Ray; else a cluster's address). Default: None (here).
    Returns:
        OverlapResult
    Raises:
        SubnetscopeError: fewer than two fine-tunes, unreadable checkpoints, or nothing to
            compare (every aligned tensor skipped or empty).
    """
    if len(tuned) < 2:
        raise SubnetscopeError("overlap needs at least two fine-tunes of the same base")
    cks = [c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in [base, *tuned]]
    al = align(cks)
    N = len(tuned)
    total, layers, kinds = _Acc(N), {}, {}
    consensus = np.zeros(N + 1, np.int64)
    skipped = [{"name": m["key"], "reason": "missing in " + ", ".join(str(i) for i in m["missing_in"])}
               for m in al.missing]
    skipped += [{"name": m["key"], "reason": "shapes " + str(m["shapes"])} for m in al.mismatched]
    done = exact = 0
    norms: list[dict] = []
    for at, res in map_aligned(cks, al, _overlap_tensor, float(tol), ray=ray, should_stop=should_stop,
                               what="overlap"):
        if isinstance(res, str):  # incomparable dtypes: the reason
            skipped.append({"name": at.key, "reason": res})
            continue
        n, changed, inter, matched, cons, is_exact, vec = res
        if is_exact:
            exact += n
        consensus += cons
        groups = [total, layers.setdefault(at.layer, _Acc(N)) if at.layer is not None else None,
                  kinds.setdefault(at.kind, _Acc(N))]
        for acc in groups:
            if acc is None:
                continue
            acc.numel += n
            acc.changed += changed
            acc.inter += inter
            acc.matched += matched
            if vec is not None:
                acc.dots += vec[0]
                acc.agree += vec[2]
                acc.both += vec[3]
        if vec is not None:
            b2 = vec[1]
            norms.append({"name": at.key, "relative": [float(np.sqrt(vec[0][k, k] / b2)) if b2 > 0 else None
                                                       for k in range(N)]})
        done += at.numel
        if progress is not None:
            progress(done, al.compared_params, at.key)
    res = OverlapResult(str(cks[0].ref), [str(c.ref) for c in cks[1:]], float(tol), total, layers, kinds,
                        consensus.tolist(), skipped, exact, norms)
    if total.numel == 0:
        first = f" (first skipped: {skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""
        raise SubnetscopeError(f"nothing to compare: of {len(al.tensors)} tensor(s) aligned across {res.base} and "
                               f"{N} fine-tunes, none has elements of a comparable dtype{first}")
    return res


def _overlap_tensor(at, values, tol: float):
    """One aligned tensor's counts (:func:`_tensor_counts`) and whether it was compared by exact bits,
    or the reason it cannot be compared (module level: Ray tasks run it where the files are)."""
    x, ys = values[0], values[1:]
    try:
        kinds_of = {comparison(x.dtype, y.dtype) for y in ys}
    except Incomparable as e:
        return str(e)
    exact = EXACT_BITS in kinds_of
    return (*_tensor_counts(x, ys, tol, exact), exact, None if exact else vector_sums(x, ys, tol))


def _tensor_counts(x: torch.Tensor, ys: list[torch.Tensor], tol: float, exact: bool):
    """One tensor's (elements, |I_k| [N], |I_a ∩ I_b| [N, N], Σ_s c_as c_bs / n_s [N, N],
    consensus [N+1]) from the fused kernel's counts by (stratum, code)."""
    N = len(ys)
    if N > MAX_CODED_RUNS:
        return _pairwise_counts(x, ys, tol, exact)
    counts = overlap_counts(x, ys, tol)  # [256, 2^N]
    bits = (np.arange(1 << N)[:, None] >> np.arange(N)) & 1  # [2^N, N]: run k changed under code
    by_code = counts.sum(0)  # [2^N]
    c_s = counts @ bits  # [256, N]: changed elements per stratum and run
    n_s = counts.sum(1).astype(np.float64)
    matched = (c_s.T / np.where(n_s > 0, n_s, 1)) @ c_s  # Σ_s c_as c_bs / n_s
    inter = bits.T @ (by_code[:, None] * bits)
    consensus = np.bincount(bits.sum(1), weights=by_code, minlength=N + 1).astype(np.int64)
    return int(by_code.sum()), c_s.sum(0), inter, matched, consensus


def _pairwise_counts(x: torch.Tensor, ys: list[torch.Tensor], tol: float, exact: bool):
    """The same counts from N boolean masks, pair by pair (for more runs than codes allow)."""
    N = len(ys)
    masks = torch.stack([changed_mask(x, y, tol).reshape(-1) for y in ys])  # [N, n]
    if exact:  # integer codes: the tensor is one stratum
        exps = torch.zeros(masks.shape[1], dtype=torch.long)
    else:
        exps = ((x.detach().float().reshape(-1).view(torch.int32) >> 23) & 0xFF).long()
    n_s = torch.bincount(exps, minlength=256).double()
    c_s = torch.stack([torch.bincount(exps[m], minlength=256) for m in masks]).double()  # [N, 256]
    matched = ((c_s / torch.where(n_s > 0, n_s, 1)) @ c_s.T).numpy()
    inter = np.zeros((N, N), np.int64)
    for a in range(N):
        for b in range(a, N):
            inter[a, b] = inter[b, a] = int((masks[a] & masks[b]).sum())
    consensus = np.bincount(masks.sum(0).numpy(), minlength=N + 1)
    return masks.shape[1], masks.sum(1).numpy(), inter, matched, consensus
