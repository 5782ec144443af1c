"""Update sparsity of a fine-tune against its base, in one streaming pass.

Definitions (docs/design.md §3, after Mukherjee et al., *Reinforcement Learning Finetunes
Small Subnetworks in Large Language Models*, arXiv 2505.11711, §2.2): element i is
*unchanged at tolerance τ* iff its two stored values are bit-identical or |θ¹ᵢ − θ⁰ᵢ| ≤ τ
(difference in float32 after upcasting; NaN is never ≤ τ); update sparsity = unchanged / n,
density = 1 − sparsity. A histogram of |Δ| per tensor over a log grid makes the sparsity at
every grid tolerance a lookup; the changed count at the requested τ is exact for any τ.

Every stored dtype has a defined answer (kernels.diff_stats has the full rules):

- floating point (fp32, bf16, fp16, fp64, fp8 e4m3 / e5m2): the tolerance rule above, on the
  float32 upcast. fp8 is a float format, so a researcher expects the same "|Δ| ≤ τ" as for bf16
  (its smallest steps, 2e-3 for e4m3 and 1.5e-5 for e5m2, exceed the paper's τ (``PAPER_TOL``), so at
  that τ an fp8 element is unchanged only when bit-identical or ±0). Rows say
  ``"compare": "tolerance"``.
- integer, unsigned and bool (int8 quantized weights, GPTQ / AWQ packed int32 qweight and
  qzeros, masks) and packed float4: changed iff the stored bits differ, at every τ (a tolerance
  means nothing for an int8 step or a packed word). Rows say ``"compare": "exact_bits"``; they
  count in changed / total like any element, their unchanged count is the same at every
  tolerance of the sweep, they have no |Δ| (histogram, norms, max |Δ|, absorption and head /
  channel counts leave them out: a quantized layout need not map to heads), and
  ``by_compare`` splits every total into the two kinds so nobody reads them as float counts.
- complex tensors, and pairs stored differently (int8 vs bf16, int8 vs int32): skipped, the
  reason in ``skipped``.

Zero-size tensors count 0 elements. A pair with nothing to compare (no aligned tensor with a
comparable dtype and at least one element) is a one-line SubnetscopeError, as is an unknown or
unavailable ``device``.

Tensors are read one pair at a time (memory-mapped), so memory is bounded by a few tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np
import torch

from analysis.checkpoints import Alignment, Checkpoint, align, open_checkpoint
from analysis.errors import SubnetscopeError
from analysis.checkpoints.structure import KINDS, Architecture, unit_slices
from analysis.checkpoints.tensor_map import map_aligned
from analysis.definitions import DECADE_TOLS, PAPER_TOL  # noqa: F401 (re-exported)
from kernels.diff_stats import EDGES, EXACT_BITS, N_BINS, TOLERANCE, DiffStats, Incomparable, comparison, diff_stats
from kernels.diff_stats import changed_mask as _changed_mask

SCHEMA = "subnetscope.diff/1"
COMPARES = (TOLERANCE, EXACT_BITS)


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
    # per head-bearing component (q k v o): unchanged counts # [heads, 1 + len(EDGES)] at every grid τ
    head_grid: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.stats.numel

    @property
    def changed(self) -> int:
        return self.stats.changed

    @property
    def compare(self) -> str:
        """``"tolerance"`` (floating point) or ``"exact_bits"`` (integer, bool, packed)."""
        return self.stats.compare


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

    def by_compare(self) -> dict:
        """Tensors, elements and changed elements per kind of comparison:
        ``{"tolerance": {tensors, numel, changed}, "exact_bits": {...}}`` (both keys always)."""
        out = {c: {"tensors": 0, "numel": 0, "changed": 0} for c in COMPARES}
        for t in self.tensors:
            row = out[t.compare]
            row["tensors"] += 1
            row["numel"] += t.numel
            row["changed"] += t.changed
        return out

    def sweep(self, tols=None) -> list[dict]:
        """Sparsity at each grid tolerance (default: every grid point and 0).

        Rows: {tolerance, unchanged, update_sparsity (None when nothing was compared),
        unchanged_exact_bits (the part of ``unchanged`` compared by exact bits: the same at
        every tolerance)}."""
        tols = tolerance_grid() if tols is None else tols
        n = self.total_params
        exact = sum(t.stats.identical for t in self.tensors if t.compare == EXACT_BITS)
        out = []
        for tol in tols:
            unchanged = sum(t.stats.unchanged_at(tol) for t in self.tensors)
            out.append({"tolerance": float(tol), "unchanged": unchanged,
                        "update_sparsity": unchanged / n if n else None, "unchanged_exact_bits": exact})
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
        ([count per unit])} — arrays, so a 7B model's 350k channels stay compact.
        Tensors compared by exact bits are left out (a quantized layout, e.g. GPTQ's packed
        [in/8, out] qweight, need not map to heads), as are tensors with no elements."""
        rows = []
        for t in self.tensors:
            if t.layer is None or t.stats.row_changed is None or t.compare != TOLERANCE or not t.numel:
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
        """|Δ| over the grid for the tensors compared with a tolerance (exact-bit ones have no
        |Δ|): numel, identical, zero, nonfinite and per-bin counts (all 0 when there are none)."""
        ts = [t for t in self.tensors if t.compare == TOLERANCE]
        hist = sum((t.stats.hist for t in ts), np.zeros(N_BINS, np.int64))
        return {"edges": EDGES.tolist(), "counts": hist.tolist(), "numel": sum(t.numel for t in ts),
                "identical": sum(t.stats.identical for t in ts),
                "zero": sum(t.stats.zero for t in ts),
                "nonfinite": sum(t.stats.nonfinite for t in ts)}

    def by_tolerance(self) -> dict:
        """Changed counts at every grid tolerance (``tolerance_grid()``), from the per-tensor |Δ|
        histograms of the one pass: per tensor (in ``tensors`` order), and per layer, kind and
        (layer, kind) — what a page needs to answer any grid τ without reading the weights again
        (:func:`at_tolerance`); ``units``, aligned with ``units``' rows: for a head row the changed
        count of each head at every grid τ (``[τ][head]``), for a channel row None. Channels and
        the absorption view stay at the pass's τ."""
        grid = tolerance_grid()
        per = [[t.numel - t.stats.unchanged_at(g) for g in grid] for t in self.tensors]

        def group(key) -> list[dict]:
            out: dict = {}
            for t, ch in zip(self.tensors, per):
                k = key(t)
                if k is None:
                    continue
                row = out.setdefault(k, {"numel": 0, "changed": [0] * len(grid)})
                row["numel"] += t.numel
                row["changed"] = [a + b for a, b in zip(row["changed"], ch)]
            return [{"key": list(k) if isinstance(k, tuple) else k, **v} for k, v in out.items()]

        units = []  # aligned with by_unit()'s rows: heads at every grid τ, channels None (pass τ only)
        for t in self.tensors:
            if t.layer is None or t.stats.row_changed is None or t.compare != TOLERANCE or not t.numel:
                continue
            for sl in unit_slices(t.kind, t.shape, self.arch):
                g = t.head_grid.get(sl.component) if sl.unit != "channel" else None
                per_unit = sl.size * t.shape[1 - sl.axis]
                units.append(None if g is None else (per_unit - g.T).tolist())
        return {"tolerances": grid, "tensors": per, "units": units,
                "layers": group(lambda t: t.layer),
                "kinds": group(lambda t: t.kind),
                "layer_kinds": group(lambda t: (t.layer, t.kind) if t.layer is not None else None)}

    def to_json(self) -> dict:
        """The CLI contract (schema subnetscope.diff/1); counts are exact integers.

        Besides the totals: ``by_compare`` (tensors / numel / changed per kind of comparison),
        ``compare`` on every tensor row, ``unchanged_exact_bits`` on every sweep row; norms and
        max |Δ| are None for exact-bit rows (and ``base_fro`` when θ⁰ holds inf / NaN)."""
        return {
            "schema": SCHEMA,
            "base": self.base,
            "tuned": self.tuned,
            "tolerance": self.tol,
            "total_params": self.total_params,
            "changed_params": self.changed_params,
            "update_sparsity": _finite(self.update_sparsity),
            "density": _finite(1 - self.update_sparsity),
            "by_compare": self.by_compare(),
            "tolerance_sweep": self.sweep(),
            "tensors": [{
                "name": t.name, "key": t.key, "shape": list(t.shape), "dtype": t.dtype, "compare": t.compare,
                "numel": t.numel, "changed": t.changed,
                "update_sparsity": 1 - t.changed / t.numel if t.numel else None,
                "layer": t.layer, "kind": t.kind, "identical": t.stats.identical,
                "nonfinite": t.stats.nonfinite, "delta_fro": _sqrt(t.stats.sum_sq_delta),
                "base_fro": _sqrt(t.stats.sum_sq_base), "max_abs_delta": _finite(t.stats.max_abs_delta),
                **({"rank": t.rank, "rank_fraction": t.rank / min(t.shape) if min(t.shape) else None}
                   if t.rank is not None else {}),
            } for t in self.tensors],
            "layers": self.by_layer(),
            "kinds": self.by_kind(),
            "layer_kinds": self.by_layer_kind(),
            "units": self.by_unit(),
            "delta_histogram": self.delta_histogram(),
            "absorption": self.absorption(),
            "by_tolerance": self.by_tolerance(),
            "skipped": self.skipped,
            "resized": self.resized,
        }


def _finite(x: float):
    return x if math.isfinite(x) else None


def _sqrt(x: float):
    """√x for a sum of squares; None when undefined (NaN: exact-bit rows, NaN in θ⁰) or inf."""
    return _finite(math.sqrt(x)) if x >= 0 else None


def _agg(head: dict, ts: list[TensorDiff]) -> dict:
    """Counts of a group: update_sparsity weighted by elements, and unweighted over the group's
    tensors that have elements (None when none has); exact_bits_numel says how many of the
    elements were compared by exact bits."""
    n = sum(t.numel for t in ts)
    c = sum(t.changed for t in ts)
    nonempty = [t for t in ts if t.numel]
    mean = sum(1 - t.changed / t.numel for t in nonempty) / len(nonempty) if nonempty else None
    return {**head, "numel": n, "changed": c, "update_sparsity": (n - c) / n if n else None,
            "update_sparsity_unweighted": mean, "tensors": len(ts),
            "exact_bits_numel": sum(t.numel for t in ts if t.compare == EXACT_BITS)}


# ------------------------------------------------------------------ the pass

def check_device(device: str | torch.device | None) -> str:
    """Validates a ``--device`` before any tensor is read.

    Args:
        device (str): ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available).
    Returns:
        str: the device to move tensors to.
    Raises:
        SubnetscopeError: one line, for an unknown device or CUDA where there is none.
    """
    name = str(device if device is not None else "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SubnetscopeError(f"unknown device {device!r} (cpu or cuda)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SubnetscopeError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SubnetscopeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def diff_checkpoints(base: str | Checkpoint, tuned: str | Checkpoint, *, tol: float = PAPER_TOL,
                     rank: bool = False, device: str = "cpu",
                     progress: Callable[[int, int, str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     on_mask: Callable[[str, torch.Tensor], None] | None = None,
                     ray: str | None = None) -> DiffResult:
    """Streams aligned tensor pairs of base and tuned and measures what changed.

    Args:
        base (str or Checkpoint): θ⁰.
        tuned (str or Checkpoint): θ¹, a fine-tune of base.
        tol (float): τ ≥ 0 for the exact changed counts. Default: ``PAPER_TOL`` (the paper's).
        rank (bool): also compute rank(ΔW) of 2-D float tensors with a finite ΔW (costly).
            Default: False.
        device (str): "cpu", "cuda", "cuda:N" or "auto"; tensors are moved there one at a time.
            Checked before anything is read. Default: "cpu".
        progress (callable, optional): called as progress(done_elements, total_elements, name).
        should_stop (callable, optional): polled between tensors; True cancels with an error.
        on_mask (callable, optional): receives (tuned name, bool changed mask on the CPU) per
            compared tensor, from the same pass as the statistics.
        ray (str, optional): run as Ray tasks, one per shard file (:mod:`analysis.checkpoints.tensor_map`):
            ``""`` for ``RAY_ADDRESS`` or a local Ray, or a cluster's address. Default: None (here).
    Returns:
        DiffResult
    Raises:
        SubnetscopeError: a bad tolerance or device, unreadable checkpoints, or nothing to
            compare (every aligned tensor skipped or empty).
    """
    if not (tol >= 0 and math.isfinite(tol)):
        raise SubnetscopeError(f"tolerance must be a finite number ≥ 0, got {tol}")
    device = check_device(device)
    b = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    t = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
    al: Alignment = align([b, t])
    skipped = [{"name": m["key"], "reason": f"missing in {'tuned' if m['missing_in'] == [1] else 'base'}"}
               for m in al.missing]
    skipped += [{"name": m["key"], "reason": f"shape {m['shapes'][0]} vs {m['shapes'][1]}"} for m in al.mismatched]
    total = al.compared_params
    done = 0
    out = []
    incomparable = []
    for at, res in map_aligned([b, t], al, _diff_tensor, float(tol), rank, device, on_mask is not None, b.arch, ray=ray,
                               should_stop=should_stop, what="diff"):
        if isinstance(res, str):  # incomparable dtypes: the reason
            skipped.append({"name": at.key, "reason": res})
            incomparable.append(at.key)
            continue
        td, mask = res
        if on_mask is not None:
            on_mask(at.names[1], mask)
        out.append(td)
        done += at.numel
        if progress is not None:
            progress(done, total, at.key)
    res = DiffResult(str(b.ref), str(t.ref), float(tol), b.arch, out, skipped, al.resized)
    if res.total_params == 0:
        raise SubnetscopeError(_nothing_to_compare(res, len(al.tensors), incomparable))
    return res


def _diff_tensor(at, values, tol: float, rank: bool, device: str, with_mask: bool, arch: Architecture):
    """One aligned pair: (TensorDiff, changed mask on the CPU or None), or the reason it cannot be
    compared (a module-level function: Ray tasks run it where the files are)."""
    x, y = values
    try:
        comparison(x.dtype, y.dtype)
    except Incomparable as e:
        return str(e)
    if device != "cpu":
        x, y = x.to(device), y.to(device)
    return tensor_diff(at, x, y, tol, arch, name=at.names[1], with_mask=with_mask, rank=rank)


def tensor_diff(at, x: torch.Tensor, y: torch.Tensor, tol: float, arch: Architecture, *, name: str,
                with_mask: bool = False, rank: bool = False) -> tuple[TensorDiff, torch.Tensor | None]:
    """The TensorDiff of one comparable aligned pair (and its changed mask on the CPU when asked).
    For a tensor with attention heads the same pass keeps each head's |Δ| histogram: its changed
    count at every grid τ (``head_grid``)."""
    heads = [sl for sl in unit_slices(at.kind, tuple(x.shape), arch) if sl.unit != "channel"] \
        if comparison(x.dtype, y.dtype) == TOLERANCE and at.layer is not None and x.numel() else []
    units = (heads[0].axis, [(sl.start + u * sl.size, sl.start + (u + 1) * sl.size)
                             for sl in heads for u in range(sl.count)]) if heads else None
    if units and units[1][-1][1] > x.shape[units[0]]:  # heads that do not fit the shape: none kept
        heads, units = [], None
    st = diff_stats(x, y, tol, with_mask=with_mask, units=units)
    head_grid, first = {}, 0
    for sl in heads:
        head_grid[sl.component] = st.unit_unchanged[first: first + sl.count]
        first += sl.count
    st.unit_unchanged = None  # kept per component in the TensorDiff
    mask = None
    if with_mask:
        mask = st.mask.cpu()
        st.mask = None  # the result keeps statistics only
    return TensorDiff(at.key, name, at.compare_shape, str(x.dtype).replace("torch.", ""), at.layer, at.kind, st,
                      _rank(x, y) if rank else None, head_grid), mask


def _rank(x: torch.Tensor, y: torch.Tensor) -> int | None:
    """rank(ΔW) of a 2-D float pair; None for other shapes, exact-bit pairs and non-finite ΔW."""
    if x.dim() != 2 or comparison(x.dtype, y.dtype) != TOLERANCE:
        return None
    d = y.double() - x.double() if torch.float64 in (x.dtype, y.dtype) else y.float() - x.float()
    if not bool(torch.isfinite(d).all()):
        return None
    return int(torch.linalg.matrix_rank(d))


def _nothing_to_compare(res: DiffResult, aligned: int, incomparable: list[str]) -> str:
    """The one line for a pair with no element to compare."""
    parts = []
    empty = len(res.tensors)
    if empty:
        parts.append(f"{empty} with no elements")
    if incomparable:
        reason = next(s["reason"] for s in res.skipped if s["name"] == incomparable[0])
        parts.append(f"{len(incomparable)} skipped (first: {incomparable[0]}: {reason})")
    return (f"nothing to compare: {res.tuned} vs {res.base}: of {aligned} aligned tensor(s), "
            + " and ".join(parts))


def changed_mask(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> torch.Tensor:
    """Bool mask of elements changed at τ (not bit-identical and not |Δ| ≤ τ, NaN changed;
    integer / bool pairs: the stored bits differ). The definition is
    :func:`kernels.diff_stats.changed_mask`; this name stays for callers of analysis.sparsity.diff.

    Raises:
        SubnetscopeError: a pair with no defined comparison (complex, different storage).
    """
    try:
        return _changed_mask(base, tuned, tol)
    except Incomparable as e:
        raise SubnetscopeError(str(e)) from None


def grid_position(d: dict, tol: float, what: str) -> tuple[dict, int]:
    """A result JSON's ``by_tolerance`` and the index of ``tol`` in its grid.

    Raises:
        ValueError: τ not on the grid, or a result without ``by_tolerance``.
    """
    bt = d.get("by_tolerance")
    if not bt:
        raise ValueError(f"this {what} result has no per-tolerance counts (written before they existed): rerun it")
    if tol not in bt["tolerances"]:
        raise ValueError(f"tolerance {tol:g} is not on the grid")
    return bt, bt["tolerances"].index(tol)


def at_tolerance(d: dict, tol: float) -> dict:
    """The diff JSON ``d`` re-aggregated at another grid τ from its ``by_tolerance`` arrays: the
    headline counts, ``tensors`` (changed, update_sparsity), ``layers``, ``kinds`` and
    ``layer_kinds`` (their weighted and unweighted sparsity) and the heads in ``units`` — equal to
    a fresh ``diff --tol τ`` for all of these. MLP channels and ``absorption`` keep the pass's τ,
    which ``detail_tolerance`` names.

    Raises:
        ValueError: τ not on the grid, or a JSON without ``by_tolerance``.
    """
    bt, i = grid_position(d, tol, "diff")
    out = {**d, "tolerance": float(tol), "detail_tolerance": d.get("detail_tolerance", d["tolerance"])}
    tensors = []
    for row, ch in zip(d["tensors"], bt["tensors"]):
        c = ch[i]
        tensors.append({**row, "changed": c, "update_sparsity": 1 - c / row["numel"] if row["numel"] else None})
    out["tensors"] = tensors
    n = d["total_params"]
    changed = sum(t["changed"] for t in tensors)
    out.update(changed_params=changed, update_sparsity=(n - changed) / n if n else None,
               density=changed / n if n else None)

    def regroup(rows: list[dict], match) -> list[dict]:
        res = []
        for r in rows:
            members = [t for t in tensors if match(r, t)]
            c = sum(t["changed"] for t in members)
            nonempty = [t for t in members if t["numel"]]
            res.append({**r, "changed": c, "update_sparsity": (r["numel"] - c) / r["numel"] if r["numel"] else None,
                        "update_sparsity_unweighted": (sum(1 - t["changed"] / t["numel"] for t in nonempty)
                                                       / len(nonempty)) if nonempty else None})
        return res

    per_unit = bt.get("units")
    if per_unit is None:
        raise ValueError("this diff result has no per-tolerance head counts (written before they existed): rerun it")
    out["units"] = [{**u, "changed": g[i]} if g is not None else u for u, g in zip(d["units"], per_unit)]
    out["layers"] = regroup(d["layers"], lambda r, t: t["layer"] == r["layer"])
    out["kinds"] = regroup(d["kinds"], lambda r, t: t["kind"] == r["kind"])
    out["layer_kinds"] = regroup(d["layer_kinds"], lambda r, t: (t["layer"], t["kind"]) == (r["layer"], r["kind"]))
    return out
