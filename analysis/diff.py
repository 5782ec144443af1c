"""Update sparsity of a fine-tune against its base, in one streaming pass.

Definitions (shared/DESIGN.md §3, after Mukherjee et al., *Reinforcement Learning Finetunes
Small Subnetworks in Large Language Models*, arXiv 2505.11711, §2.2): element i is
*unchanged at tolerance τ* iff its two stored values are bit-identical or |θ¹ᵢ − θ⁰ᵢ| ≤ τ
(difference in float32 after upcasting; NaN is never ≤ τ); update sparsity = unchanged / n,
density = 1 − sparsity. A histogram of |Δ| per tensor over a log grid makes the sparsity at
every grid tolerance a lookup; the changed count at the requested τ is exact for any τ.

Tensors are read one pair at a time (memory-mapped), so memory is bounded by a few tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from analysis.checkpoints import Alignment, Checkpoint, align, iter_aligned, open_checkpoint
from analysis.errors import SubnetscopeError
from analysis.structure import KINDS, Architecture, unit_slices
from kernels.diff_stats import EDGES, DiffStats, diff_stats

SCHEMA = "subnetscope.diff/1"
PAPER_TOL = 1e-5
SWEEP_TOLS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def tolerance_grid() -> list[float]:
    """Every tolerance whose sparsity is a lookup: 0 and the log grid 1e-10 .. 1."""
    return [0.0, *EDGES.tolist()]


@dataclass
class TensorDiff:
    """One aligned tensor pair."""

    key: str  # prefix-normalized name
    name: str  # name in the tuned checkpoint
    shape: tuple[int, ...]  # compared shape (shared rows for a resized vocabulary)
    dtype: str  # stored dtype of the base
    layer: int | None
    kind: str
    stats: DiffStats
    rank: int | None = None  # rank of ΔW (2-D only, when asked)

    @property
    def numel(self) -> int:
        return self.stats.numel

    @property
    def changed(self) -> int:
        return self.stats.changed


@dataclass
class DiffResult:
    """Per-tensor statistics of base vs tuned and their aggregates."""

    base: str
    tuned: str
    tol: float
    arch: Architecture
    tensors: list[TensorDiff]
    skipped: list[dict]  # [{name, reason}]
    resized: list[dict] = field(default_factory=list)

    # ---- headline numbers
    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def changed_params(self) -> int:
        return sum(t.changed for t in self.tensors)

    @property
    def update_sparsity(self) -> float:
        n = self.total_params
        return (n - self.changed_params) / n if n else float("nan")

    def sweep(self, tols=None) -> list[dict]:
        """Sparsity at each grid tolerance (default: every grid point and 0)."""
        tols = tolerance_grid() if tols is None else tols
        n = self.total_params
        out = []
        for tol in tols:
            unchanged = sum(t.stats.unchanged_at(tol) for t in self.tensors)
            out.append({"tolerance": float(tol), "unchanged": unchanged, "update_sparsity": unchanged / n})
        return out

    # ---- aggregates
    def by_layer(self) -> list[dict]:
        """Per transformer block: element-weighted sparsity (counts) and, as the paper's
        script does, the unweighted mean of per-tensor sparsities."""
        groups: dict = {}
        for t in self.tensors:
            if t.layer is not None:
                groups.setdefault(t.layer, []).append(t)
        return [_agg({"layer": L}, ts) for L, ts in sorted(groups.items())]

    def by_kind(self) -> list[dict]:
        groups: dict = {}
        for t in self.tensors:
            groups.setdefault(t.kind, []).append(t)
        return [_agg({"kind": k}, groups[k]) for k in KINDS if k in groups]

    def by_layer_kind(self) -> list[dict]:
        groups: dict = {}
        for t in self.tensors:
            groups.setdefault((t.layer, t.kind), []).append(t)
        return [_agg({"layer": L, "kind": k}, ts) for (L, k), ts in
                sorted(groups.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, KINDS.index(kv[0][1])))]

    def by_unit(self) -> list[dict]:
        """Changed counts per attention head (GQA: k/v per kv head) and per MLP channel, at τ.

        Returns one row per (layer, component): {layer, unit ("head" | "kv_head" |
        "channel"), component (q k v o gate up down), numel (elements per unit), changed
        ([count per unit])} — arrays, so a 7B model's 350k channels stay compact."""
        rows = []
        for t in self.tensors:
            if t.layer is None or t.stats.row_changed is None:
                continue
            for sl in unit_slices(t.kind, t.shape, self.arch):
                per_line = t.stats.row_changed if sl.axis == 0 else t.stats.col_changed
                seg = per_line[sl.start: sl.start + sl.size * sl.count].reshape(sl.count, sl.size).sum(1)
                rows.append({"layer": t.layer, "unit": sl.unit, "component": sl.component,
                             "numel": sl.size * t.shape[1 - sl.axis], "changed": seg.astype(int).tolist()})
        return rows

    def absorption(self) -> list[dict]:
        """Unchanged elements by |θ⁰| binade (IEEE exponent field of the float32 upcast, the
        stored field for bf16) with the bf16 half-ulp of that binade (= 2^(e−127−8)): where the
        half-ulp exceeds a typical update, bf16 storage absorbs it (RL's Razor, arXiv 2509.04259 §6)."""
        total = np.zeros(256, np.int64)
        changed = np.zeros(256, np.int64)
        for t in self.tensors:
            total += t.stats.exp_total
            changed += t.stats.exp_changed
        rows = []
        for e in np.nonzero(total)[0]:
            e = int(e)
            lo = 0.0 if e == 0 else 2.0 ** (e - 127)
            rows.append({"exponent": e, "abs_base_low": lo, "bf16_half_ulp": 2.0 ** (max(e, 1) - 135),
                         "numel": int(total[e]), "unchanged": int(total[e] - changed[e]),
                         "unchanged_fraction": float((total[e] - changed[e]) / total[e])})
        return rows

    def delta_histogram(self) -> dict:
        """|Δ| over the grid for all tensors: identical, zero, nonfinite and per-bin counts."""
        hist = sum((t.stats.hist for t in self.tensors), np.zeros_like(self.tensors[0].stats.hist))
        return {"edges": EDGES.tolist(), "counts": hist.tolist(),
                "identical": sum(t.stats.identical for t in self.tensors),
                "zero": sum(t.stats.zero for t in self.tensors),
                "nonfinite": sum(t.stats.nonfinite for t in self.tensors)}

    def to_json(self) -> dict:
        """The CLI contract (schema subnetscope.diff/1); counts are exact integers."""
        return {
            "schema": SCHEMA,
            "base": self.base,
            "tuned": self.tuned,
            "tolerance": self.tol,
            "total_params": self.total_params,
            "changed_params": self.changed_params,
            "update_sparsity": self.update_sparsity,
            "density": 1 - self.update_sparsity,
            "tolerance_sweep": [{"tolerance": r["tolerance"], "update_sparsity": r["update_sparsity"],
                                 "unchanged": r["unchanged"]} for r in self.sweep()],
            "tensors": [{
                "name": t.name, "key": t.key, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel,
                "changed": t.changed, "update_sparsity": 1 - t.changed / t.numel if t.numel else None,
                "layer": t.layer, "kind": t.kind, "identical": t.stats.identical,
                "nonfinite": t.stats.nonfinite, "delta_fro": math.sqrt(t.stats.sum_sq_delta),
                "base_fro": _finite(math.sqrt(t.stats.sum_sq_base)) if t.stats.sum_sq_base >= 0 else None,
                "max_abs_delta": t.stats.max_abs_delta,
                **({"rank": t.rank, "rank_fraction": t.rank / min(t.shape)} if t.rank is not None else {}),
            } for t in self.tensors],
            "layers": self.by_layer(),
            "kinds": self.by_kind(),
            "layer_kinds": self.by_layer_kind(),
            "units": self.by_unit(),
            "delta_histogram": self.delta_histogram(),
            "absorption": self.absorption(),
            "skipped": self.skipped,
            "resized": self.resized,
        }


def _finite(x: float):
    return x if math.isfinite(x) else None


def _agg(head: dict, ts: list[TensorDiff]) -> dict:
    n = sum(t.numel for t in ts)
    c = sum(t.changed for t in ts)
    mean = sum(1 - t.changed / t.numel for t in ts if t.numel) / len(ts)
    return {**head, "numel": n, "changed": c, "update_sparsity": (n - c) / n if n else None,
            "update_sparsity_unweighted": mean, "tensors": len(ts)}


# ------------------------------------------------------------------ the pass

def diff_checkpoints(base: str | Checkpoint, tuned: str | Checkpoint, *, tol: float = PAPER_TOL,
                     rank: bool = False, device: str = "cpu",
                     progress: Callable[[int, int, str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     on_mask: Callable[[str, torch.Tensor], None] | None = None) -> DiffResult:
    """Streams aligned tensor pairs of base and tuned and measures what changed.

    Args:
        base (str or Checkpoint): θ⁰.
        tuned (str or Checkpoint): θ¹, a fine-tune of base.
        tol (float): τ ≥ 0 for the exact changed counts. Default: 1e-5 (the paper's).
        rank (bool): also compute rank(ΔW) of 2-D tensors (costly). Default: False.
        device (str): "cpu" or "cuda"; tensors are moved there one at a time. Default: "cpu".
        progress (callable, optional): called as progress(done_elements, total_elements, name).
        should_stop (callable, optional): polled between tensors; True cancels with an error.
        on_mask (callable, optional): receives (tuned name, bool changed mask) per tensor.
    Returns:
        DiffResult
    """
    if not (tol >= 0 and math.isfinite(tol)):
        raise SubnetscopeError(f"tolerance must be a finite number ≥ 0, got {tol}")
    b = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    t = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
    al: Alignment = align([b, t])
    skipped = [{"name": m["key"], "reason": f"missing in {'tuned' if m['missing_in'] == [1] else 'base'}"}
               for m in al.missing]
    skipped += [{"name": m["key"], "reason": f"shape {m['shapes'][0]} vs {m['shapes'][1]}"} for m in al.mismatched]
    total = al.compared_params
    done = 0
    out = []
    for at, (x, y) in iter_aligned(al, [b, t]):
        if should_stop is not None and should_stop():
            raise SubnetscopeError("diff cancelled")
        if not (x.is_floating_point() and y.is_floating_point()):
            skipped.append({"name": at.key, "reason": f"not floating point ({x.dtype}, {y.dtype})"})
            continue
        if device != "cpu":
            x, y = x.to(device), y.to(device)
        st = diff_stats(x, y, tol)
        r = None
        if rank and x.dim() == 2:
            r = int(torch.linalg.matrix_rank(y.float() - x.float()))
        if on_mask is not None:
            on_mask(at.names[1], changed_mask(x, y, tol).cpu())
        out.append(TensorDiff(at.key, at.names[1], at.compare_shape, str(x.dtype).replace("torch.", ""),
                              at.layer, at.kind, st, r))
        done += at.numel
        if progress is not None:
            progress(done, total, at.key)
    return DiffResult(str(b.ref), str(t.ref), float(tol), b.arch, out, skipped, al.resized)


def changed_mask(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> torch.Tensor:
    """Bool mask of elements changed at τ (not bit-identical and not |Δ| ≤ τ; NaN is changed)."""
    from kernels.diff_stats import _bits, f32_floor

    same = _bits(base) == _bits(tuned)
    d = (tuned.float() - base.float()).abs()
    return ~(same.reshape(base.shape) | (d <= float(f32_floor(tol))))
