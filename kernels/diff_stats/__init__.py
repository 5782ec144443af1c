"""Per-tensor update statistics of a (base, tuned) pair in one pass.

For each element: unchanged at τ iff the two stored values are bit-identical or
|θ¹ − θ⁰| ≤ τ, the difference taken in float32 after upcasting (docs/design.md §3); a NaN
difference is never ≤ τ. One pass gives:

- ``identical``: bit-identical elements; ``zero``: |Δ| = 0 but not bit-identical (±0);
  ``nonfinite``: Δ is NaN or ±inf and the bits differ;
- ``hist``: counts of the remaining |Δ| > 0 over the log grid ``EDGES`` (10 bins a decade
  from 1e-10 to 1): ``hist[i]`` counts EDGES[i-1] < |Δ| ≤ EDGES[i]; ``hist[0]`` is
  (0, 1e-10], ``hist[-1]`` is (1, inf). So unchanged(τ) at any grid point is a prefix sum;
- ``changed``: elements changed at the requested τ (exact for any τ, on the grid or not);
- ``row_changed`` / ``col_changed``: changed counts per row / column of a 2-D tensor (heads
  are rows of q/k/v and columns of o_proj; MLP channels rows of gate/up, columns of down);
- ``exp_total`` / ``exp_changed``: element and changed counts per IEEE exponent field of the
  float32 upcast of θ⁰ (256 strata; for bf16 the stored exponent field) — the strata of the
  magnitude-matched overlap baseline and of the bf16-absorption view;
- ``sum_sq_delta`` (‖Δ‖²_F over finite Δ), ``sum_sq_base`` (‖θ⁰‖²_F), ``max_abs_delta``;
- ``mask`` (only when asked): the bool changed mask, from the same pass.

Every dtype has a defined answer (:func:`comparison`):

- **tolerance** (``compare == "tolerance"``): both tensors floating point — float32, bfloat16,
  float16, float64 and the one-byte float8 formats (e4m3fn, e5m2 and their fnuz / e8m0
  variants). The definition above on the float32 upcast, which is exact for every format
  narrower than float32 (a float64 pair is compared in float64). fp8 is a float format and a
  researcher asks of it what of bf16: did the value move by more than τ? So fp8 takes the
  tolerance rule, not exact bits. Note its steps: the smallest nonzero |Δ| is 2⁻⁹ ≈ 2e-3 for
  e4m3 and 2⁻¹⁶ ≈ 1.5e-5 for e5m2, so at τ ≤ 1e-5 an fp8 element is unchanged only when
  bit-identical or ±0, and the sweep shows where a coarser τ starts absorbing fp8 steps.
  Bit-identity is always tested on the stored bits (every NaN payload counts), and for two
  different float dtypes (bf16 base, fp32 fine-tune) on their upcasts.
- **exact bits** (``compare == "exact_bits"``): integer, unsigned and bool tensors (int8
  quantized weights, GPTQ/AWQ packed int32 ``qweight`` / ``qzeros``, masks) and float formats
  torch cannot upcast (float4_e2m1fn_x2, two values a byte): an element is changed iff its
  stored bits differ. τ does not apply (an int8 step of 1 is no small update, and a packed
  word has no |Δ|), so the unchanged count is the same at every τ; the |Δ| histogram and the
  exponent strata stay empty, and ‖Δ‖, ‖θ⁰‖ and max |Δ| are undefined (NaN).
- **not compared** (:class:`Incomparable`, the reason in one line): complex tensors, and
  pairs stored differently (int8 vs bfloat16, int8 vs int32), whose bits do not correspond.

A tensor with no elements gives all-zero counts (its rows / columns keep their lengths).

Three implementations: ``diff_stats_reference`` (plain torch, the definition, in
:mod:`kernels.diff_stats.reference` with everything the three share), a fused numba loop for
CPU (here: torch ops make ~6 passes over memory and allocate per pass; the loop makes one), and
a Triton kernel on CUDA (:mod:`kernels.diff_stats.triton_kernel`). ``diff_stats`` picks one at call
time; exact-bit and float64 pairs take the torch path in every implementation. This module
re-exports the definition's public names, so callers import from one place.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kernels.diff_stats.definition import (COUNT_SLOTS, DECADES, EDGES, EDGES32, EXACT_BITS, MAX_CODED_RUNS, N_BINS,
                                           PER_DECADE, SPECIAL, TOLERANCE, DiffStats, Incomparable, cell_tables,
                                           changed_mask, check_units, comparison, grid_unchanged, merge_stats,
                                           dtype_class, f32_floor, stats_by_units, stored_bits, upcast32)
from kernels.diff_stats.reference import (special_stats, diff_stats_reference, overlap_counts_reference)

__all__ = ["DECADES", "EDGES", "EDGES32", "EXACT_BITS", "MAX_CODED_RUNS", "N_BINS", "PER_DECADE", "TOLERANCE",
           "DiffStats", "Incomparable", "changed_mask", "comparison", "diff_stats", "diff_stats_cpu", "merge_stats",
           "diff_stats_reference", "dtype_class", "f32_floor", "overlap_counts", "overlap_counts_reference",
           "stored_bits", "vector_sums"]


# ------------------------------------------------------------------ CPU: fused numba loop

_TABLES = None
CHUNK = 1 << 22  # elements per upcast chunk (fp8 and mixed-dtype pairs)


def _torch_threads_kept(fn):
    """numba's parallel loops start their OpenMP pool (on import of the compiled loop and on launch),
    which resets torch's intra-op thread count to the number of cores: a caller that chose one
    thread (a trainer checking its mask, the test suite) keeps it."""
    @functools.wraps(fn)
    def kept(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return kept


@_torch_threads_kept
def diff_stats_cpu(base: torch.Tensor, tuned: torch.Tensor, tol: float, *, with_mask: bool = False,
                   units=None) -> DiffStats:
    """Fused single pass on CPU (numba, threads over row blocks). bf16 and fp16 are read as raw
    bits with no upcast copy (fp16 widened exactly in the loop); fp32 in place; fp8 and
    mixed-dtype pairs are upcast in chunks; exact-bit, empty and float64 pairs take the torch
    path. With ``with_mask`` the same pass writes the changed mask; with ``units`` (see
    :func:`diff_stats`) it also counts each unit's |Δ| histogram."""
    global _TABLES
    special = special_stats(base, tuned, tol, with_mask, units)
    if special is not None:
        return special
    if units is not None:
        check_units(base, units)
    if _TABLES is None:
        _TABLES = cell_tables()
    import numba

    from kernels.diff_stats.numba_loop import loop  # compiled on first use, cached on disk

    two_d = base.dim() == 2
    R, C = base.shape if two_d else (1, base.numel())
    if not two_d and C > 4096:  # 1-D and N-D: fold into rows so threads share the work
        R, C = _fold(base.numel())
    nb = max(1, min(numba.get_num_threads(), R))
    counts = np.zeros((nb, 256 * COUNT_SLOTS), np.int64)
    rows = np.zeros(R, np.int64)
    cols = np.zeros((nb, C), np.int64)
    acc = np.zeros((nb, 2), np.float64)
    mx = np.zeros(nb, np.int32)
    mask = np.zeros((R, C), np.bool_) if with_mask else None
    U = 0 if units is None else len(units[1])
    unit_axis = 0 if units is None else 1 + units[0]
    unit_of = np.full(0 if units is None else base.shape[units[0]], U, np.int32)  # U: outside every unit
    for u, (a, z) in enumerate(() if units is None else units[1]):
        unit_of[a:z] = u
    unit_counts = np.zeros((nb, U + 1, COUNT_SLOTS), np.int64) if units is not None else None
    tol32 = f32_floor(tol)
    slot, edge = _TABLES
    b = base.detach().contiguous()
    t = tuned.detach().contiguous()
    same_dtype = b.dtype == t.dtype

    def run(bs, ts, part_rows, part_mask, r0=0):
        of = None if units is None else unit_of[r0: r0 + len(bs)] if unit_axis == 1 else unit_of
        loop(bs, ts, tol32, slot, edge, COUNT_SLOTS, counts, part_rows, cols, acc, mx, part_mask, unit_axis, of,
             unit_counts)

    if same_dtype and b.dtype == torch.bfloat16:
        run(_np_bits16(b).reshape(R, C), _np_bits16(t).reshape(R, C), rows, mask)
    elif same_dtype and b.dtype == torch.float16:  # int16 bits: widened exactly, NaN payloads kept
        run(b.view(torch.int16).numpy().reshape(R, C), t.view(torch.int16).numpy().reshape(R, C), rows, mask)
    elif same_dtype and b.dtype == torch.float32:
        run(b.numpy().reshape(R, C), t.numpy().reshape(R, C), rows, mask)
    else:  # fp8, mixed float dtypes: chunks of float32 upcasts (distinct codes stay distinct)
        step = max(1, CHUNK // C)
        bf, tf = b.reshape(R, C), t.reshape(R, C)
        for r0 in range(0, R, step):
            run(upcast32(bf[r0: r0 + step]).numpy(), upcast32(tf[r0: r0 + step]).numpy(), rows[r0: r0 + step],
                None if mask is None else mask[r0: r0 + step], r0)
    table = counts.sum(0).reshape(256, N_BINS + 3, 2)  # [stratum, bucket or SPECIAL, changed]
    unit_unchanged = None
    if units is not None:  # [unit, bucket or SPECIAL] (only the even slots: 2 · bucket)
        ut = unit_counts.sum(0)[:U].reshape(U, N_BINS + 3, 2)[:, :, 0]
        unit_unchanged = grid_unchanged(ut[:, :N_BINS], ut[:, SPECIAL["identical"]] + ut[:, SPECIAL["zero"]])
    return DiffStats(
        numel=base.numel(), tol=float(tol), identical=int(table[:, SPECIAL["identical"]].sum()),
        zero=int(table[:, SPECIAL["zero"]].sum()), nonfinite=int(table[:, SPECIAL["nonfinite"]].sum()),
        changed=int(rows.sum()), hist=table[:, :N_BINS].sum((0, 2)),
        row_changed=rows if two_d else None, col_changed=cols.sum(0) if two_d else None,
        exp_total=table.sum((1, 2)), exp_changed=table[:, :, 1].sum(1), sum_sq_delta=float(acc[:, 0].sum()),
        sum_sq_base=float(acc[:, 1].sum()), max_abs_delta=float(mx.max().view(np.float32)), compare=TOLERANCE,
        mask=torch.from_numpy(mask).reshape(base.shape) if with_mask else None, unit_unchanged=unit_unchanged)


def _np_bits16(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def _fold(n: int) -> tuple[int, int]:
    """A [R, C] view of n elements with C dividing n, C ≤ 4096 (for threads over rows)."""
    for c in range(min(4096, n), 0, -1):
        if n % c == 0:
            return n // c, c
    return 1, n


def _rows(base: torch.Tensor) -> tuple[int, int]:
    """The [R, C] view the loops take: a matrix as it is, anything else as one row or folded."""
    R, C = base.shape if base.dim() == 2 else (1, base.numel())
    if base.dim() != 2 and C > 4096:
        R, C = _fold(base.numel())
    return R, C


def _as_stored(x: torch.Tensor, R: int, C: int) -> np.ndarray:
    """The tensor's storage as the numba loops read it: bf16 as uint16 bits, fp16 as int16, fp32 itself."""
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        return _np_bits16(x).reshape(R, C)
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().reshape(R, C)
    return x.numpy().reshape(R, C)


@_torch_threads_kept
def overlap_counts(base: torch.Tensor, tuned: list[torch.Tensor], tol: float) -> np.ndarray:
    """:func:`overlap_counts_reference`'s table in one pass over the base and the N fine-tunes when
    every fine-tune is stored like the base in bf16, fp16 or fp32 (read as stored, no upcast copy):
    on CPU the numba loop, on CUDA the Triton kernel; otherwise (fp8, mixed storage, exact bits,
    float64, or CUDA without Triton) the torch reference.

    Args:
        base (Tensor): θ⁰.
        tuned (list[Tensor]): N ≤ ``MAX_CODED_RUNS`` fine-tunes, same shape and device.
        tol (float): τ ≥ 0.
    Returns:
        np.ndarray: ``# [256, 2^N]`` int64 counts by (stratum, change code).
    Raises:
        Incomparable: a pair with no defined comparison.
    """
    N = len(tuned)
    if not 1 <= N <= MAX_CODED_RUNS:
        raise ValueError(f"overlap_counts takes 1 to {MAX_CODED_RUNS} fine-tunes, got {N}")
    for t in tuned:
        comparison(base.dtype, t.dtype)  # Incomparable for complex / differently stored pairs
    fast = (base.numel() > 0 and base.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and all(t.dtype == base.dtype for t in tuned))
    if base.is_cuda:
        from kernels.diff_stats import triton_kernel as diff_stats_triton

        if fast and diff_stats_triton.available():
            return diff_stats_triton.overlap_counts_triton(base, tuned, tol)
        return overlap_counts_reference(base, tuned, tol)
    if fast:
        try:
            import numba

            from kernels.diff_stats.numba_loop import overlap_loop
        except ImportError:
            fast = False
    if not fast:
        return overlap_counts_reference(base, tuned, tol)
    R, C = _rows(base)
    nb = max(1, min(numba.get_num_threads(), R))
    hist = np.zeros((nb, 256, 1 << N), np.int64)

    overlap_loop(_as_stored(base, R, C), tuple(_as_stored(t, R, C) for t in tuned), f32_floor(tol), hist)
    return hist.sum(0)


@_torch_threads_kept
def vector_sums(base: torch.Tensor, tuned: list[torch.Tensor], tol: float):
    """The N fine-tunes of one floating tensor as update vectors Δ_k = θ_k − θ⁰, in float64 over the
    elements finite in the base and every fine-tune: ⟨Δ_a, Δ_b⟩ [N, N], ‖θ⁰‖², and [N, N] counts of the
    elements both a and b changed at τ (:func:`changed_mask`'s rule) with the same sign, and in all.
    On CPU, for fine-tunes stored like the base in bf16, fp16 or fp32, the numba loop reads them as
    stored; otherwise torch in blocks of ``VECTOR_BLOCK`` elements.

    Returns:
        tuple: (dots [N, N] float64, base_sq float, agree [N, N] int64, both [N, N] int64).
    """
    N = len(tuned)
    fast = (not base.is_cuda and base.numel() > 0 and base.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and all(t.dtype == base.dtype for t in tuned))
    if fast:
        try:
            import numba

            from kernels.diff_stats.numba_loop import vector_loop
        except ImportError:
            fast = False
    if not fast:
        return vector_sums_reference(base, tuned, tol)
    R, C = _rows(base)
    nb = max(1, min(numba.get_num_threads(), R))
    dots, b2 = np.zeros((nb, N, N)), np.zeros(nb)
    agree, both = np.zeros((nb, N, N), np.int64), np.zeros((nb, N, N), np.int64)

    stored = [_as_stored(x, R, C) for x in (base, *tuned)]
    vector_loop(stored[0], tuple(stored[1:]), f32_floor(tol), dots, b2, agree, both)
    sym = [np.triu(m.sum(0)) + np.triu(m.sum(0), 1).T for m in (dots, agree, both)]
    return sym[0], float(b2.sum()), sym[1], sym[2]


VECTOR_BLOCK = 1 << 22  # elements per float64 block of the torch path: N + 1 blocks of 32 MiB at a time


def vector_sums_reference(base: torch.Tensor, tuned: list[torch.Tensor], tol: float):
    """:func:`vector_sums` in torch, in blocks (any floating dtype and device)."""
    N = len(tuned)
    dots, agree, both = np.zeros((N, N)), np.zeros((N, N), np.int64), np.zeros((N, N), np.int64)
    b2 = 0.0
    xf, yf = base.reshape(-1), [y.reshape(-1) for y in tuned]
    for i in range(0, xf.numel(), VECTOR_BLOCK):
        xb = xf[i:i + VECTOR_BLOCK].double()
        yb = [y[i:i + VECTOR_BLOCK].double() for y in yf]
        finite = torch.isfinite(xb)
        for y in yb:
            finite &= torch.isfinite(y)
        d = torch.stack([torch.where(finite, y - xb, 0.0) for y in yb])  # [N, n]
        dots += (d @ d.T).cpu().numpy()
        b2 += float(torch.where(finite, xb, 0.0).square().sum())
        m = torch.stack([changed_mask(xf[i:i + VECTOR_BLOCK], y[i:i + VECTOR_BLOCK], tol) for y in yf]) & finite
        pos = d > 0
        for a in range(N):
            for c in range(a, N):
                mb = m[a] & m[c]
                both[a, c] = both[c, a] = both[a, c] + int(mb.sum())
                agree[a, c] = agree[c, a] = agree[a, c] + int((mb & (pos[a] == pos[c])).sum())
    return dots, b2, agree, both


def diff_stats(base: torch.Tensor, tuned: torch.Tensor, tol: float, *, with_mask: bool = False,
               units=None) -> DiffStats:
    """Chooses at call time: CUDA tensors -> Triton kernel when available; CPU -> the numba
    loop when numba imports; otherwise the torch reference. Every path accepts every dtype
    :func:`comparison` accepts (exact-bit, empty and float64 pairs go through torch).

    Args:
        base (Tensor): θ⁰.
        tuned (Tensor): θ¹, same shape and device.
        tol (float): τ ≥ 0.
        with_mask (bool): also return the changed mask (``DiffStats.mask``), from the same pass.
            Default: False.
        units (tuple, optional): ``(axis, [(start, stop), ...])``: consecutive line ranges (rows
            for axis 0, columns for 1) of a 2-D tensor, one per unit (an attention head);
            ``DiffStats.unit_unchanged`` then holds each unit's unchanged count at 0 and every
            grid edge. The CPU loop counts them in its pass; Triton measures unit by unit.
    Returns:
        DiffStats
    Raises:
        Incomparable: complex, or stored differently.
        ValueError: ``units`` not ordered ranges of the tensor's lines.
    """
    if base.is_cuda:
        from kernels.diff_stats import triton_kernel as diff_stats_triton

        if diff_stats_triton.available():
            fn = diff_stats_triton.diff_stats_triton
            if units is not None:
                return stats_by_units(fn, base, tuned, tol, with_mask, units)
            return fn(base, tuned, tol, with_mask=with_mask)
        return diff_stats_reference(base, tuned, tol, with_mask=with_mask, units=units)
    try:
        return diff_stats_cpu(base, tuned, tol, with_mask=with_mask, units=units)
    except ImportError:
        return diff_stats_reference(base, tuned, tol, with_mask=with_mask, units=units)
