"""The plain-torch implementation of the per-tensor update statistics: the reference the CPU loop
(:mod:`kernels.diff_stats.numba_loop`) and the Triton kernel (:mod:`kernels.diff_stats.triton_kernel`)
are tested against, and the path of devices neither serves. Its definition is
:mod:`kernels.diff_stats.definition`."""

from __future__ import annotations

import numpy as np
import torch

from kernels.diff_stats.definition import (DiffStats, EDGES, empty_stats, EXACT_BITS, N_BINS, TOLERANCE, as_float64,
                                           changed_at, changed_mask, check_units, comparison, exact_stats,
                                           grid_unchanged, operands, prepare, stored_bits)


def special_stats(base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool,
                  units=None) -> DiffStats | None:
    """Stats of the pairs every implementation hands to torch: exact bits, empty, float64."""
    kind = prepare(base, tuned)
    if kind == EXACT_BITS:
        return diff_stats_reference(base, tuned, tol, with_mask=with_mask, units=units)
    if base.numel() == 0:
        st = empty_stats(base, tol, kind, with_mask)
        if units is not None:
            check_units(base, units)
            st.unit_unchanged = np.zeros((len(units[1]), len(EDGES) + 1), np.int64)
        return st
    if torch.float64 in (base.dtype, tuned.dtype):
        return diff_stats_reference(base, tuned, tol, with_mask=with_mask, units=units)
    return None


def diff_stats_reference(base: torch.Tensor, tuned: torch.Tensor, tol: float, *,
                         with_mask: bool = False, units=None) -> DiffStats:
    """Plain-torch definition of every statistic (the other paths are tested against it).

    Args:
        base (Tensor): θ⁰, any dtype :func:`comparison` accepts, any shape, any device.
        tuned (Tensor): θ¹, same shape.
        tol (float): τ ≥ 0.
        with_mask (bool): also return the changed mask as ``DiffStats.mask``. Default: False.
        units (tuple, optional): ``(axis, [(start, stop), ...])``, the lines of each unit (attention
            head) of a 2-D tensor: ``DiffStats.unit_unchanged`` gets each unit's unchanged count
            at every grid τ. Default: None.
    Returns:
        DiffStats
    Raises:
        Incomparable: complex, or stored differently.
    """
    kind = prepare(base, tuned)
    if units is not None:
        check_units(base, units)
    if kind == EXACT_BITS:
        st = exact_stats(base, tuned, tol, with_mask)
        if units is not None:  # τ does not apply: a unit's identical elements at every grid point
            ne = (stored_bits(base) != stored_bits(tuned)).movedim(units[0], 0)
            same = [int((~ne[a:b]).sum()) for a, b in units[1]]
            st.unit_unchanged = np.repeat(np.array(same, np.int64).reshape(-1, 1), len(EDGES) + 1, 1)
        return st
    return _reference(base, tuned, tol, with_mask, units)


def _reference(base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool, units=None) -> DiffStats:
    shape = base.shape if base.dim() == 2 else (-1,)
    bv, tv, same, thr, edges = operands(base, tuned, tol)
    b, t, same = bv.reshape(shape), tv.reshape(shape), same.reshape(shape)
    d = (t - b).abs()
    finite = torch.isfinite(d)
    zero = (d == 0) & ~same
    nonfinite = ~finite & ~same
    pos = (d > 0) & finite & ~same
    idx = torch.bucketize(d[pos], edges, right=False)
    hist = torch.bincount(idx, minlength=N_BINS)
    changed = changed_at(same, d, thr)
    exps = ((b.float().contiguous().view(torch.int32) >> 23) & 0xFF).reshape(-1).long()
    df = torch.where(finite, d, 0).double()
    two_d = b.dim() == 2
    unit_unchanged = None
    if units is not None:  # each element's unit (-1 outside every unit), its bucket, bincount per unit
        axis, bounds = units
        line = torch.full((b.shape[axis],), -1, dtype=torch.long, device=b.device)
        for u, (lo, hi) in enumerate(bounds):
            line[lo:hi] = u
        unit = (line[:, None] if axis == 0 else line[None, :]).expand(b.shape)
        U = len(bounds)
        inside = unit >= 0
        upos = unit[pos]
        keep = upos >= 0
        uh = torch.bincount(upos[keep] * N_BINS + idx[keep], minlength=U * N_BINS).reshape(U, N_BINS)
        iz = torch.bincount(unit[(same | zero) & inside], minlength=U)
        unit_unchanged = grid_unchanged(as_float64(uh).reshape(U, N_BINS), as_float64(iz))
    return DiffStats(
        numel=b.numel(), tol=float(tol),
        identical=int(same.sum()), zero=int(zero.sum()), nonfinite=int(nonfinite.sum()),
        changed=int(changed.sum()), hist=as_float64(hist),
        row_changed=as_float64(changed.sum(1)) if two_d else None,
        col_changed=as_float64(changed.sum(0)) if two_d else None,
        exp_total=as_float64(torch.bincount(exps, minlength=256)),
        exp_changed=as_float64(torch.bincount(exps[changed.reshape(-1)], minlength=256)),
        sum_sq_delta=float((df * df).sum()), sum_sq_base=float((b.double() ** 2).sum()),
        max_abs_delta=float(df.max()) if df.numel() else 0.0, compare=TOLERANCE,
        mask=changed.reshape(base.shape) if with_mask else None, unit_unchanged=unit_unchanged,
    )




def overlap_counts_reference(base: torch.Tensor, tuned: list[torch.Tensor], tol: float) -> np.ndarray:
    """Elements by (stratum, change code): ``counts[e, code]``, ``# [256, 2^N]`` int64.

    ``e`` is the IEEE exponent field of the base value as float32 (the magnitude-matched
    baseline's stratum; 0 for every element of an exact-bits tensor, whose integer codes have no
    exponent); bit k of ``code`` is set when fine-tune k changed the element at τ
    (:func:`changed_mask`). Every overlap count — changed sets, pairwise intersections, the
    consensus histogram, the strata — is a sum over this table.

    Raises:
        Incomparable: a pair with no defined comparison.
    """
    N = len(tuned)
    exact = any(comparison(base.dtype, t.dtype) == EXACT_BITS for t in tuned)
    code = torch.zeros(base.numel(), dtype=torch.long, device=base.device)
    for k, t in enumerate(tuned):
        code |= changed_mask(base, t, tol).reshape(-1).long() << k
    if exact:
        exps = torch.zeros_like(code)
    else:
        exps = ((base.detach().float().reshape(-1).view(torch.int32) >> 23) & 0xFF).long()
    counts = torch.bincount(exps * (1 << N) + code, minlength=256 << N)
    return counts.reshape(256, 1 << N).cpu().numpy().astype(np.int64)
