"""The per-tensor diff statistics of kernels.diff_stats as one fused Triton kernel (CUDA).

One pass over a (base, tuned) pair: each program loads a block of both tensors (bf16, fp16,
fp32; fp8 is upcast to float32 first through the lookup table that keeps its codes distinct)
and their stored bits (of the float32 upcasts when the two dtypes differ), and accumulates
with atomics: the identical / zero / non-finite / changed counts, the |Δ| histogram over the
tolerance grid (bucket from a lookup table on the top bits of |Δ| plus one comparison, as the
CPU loop), the exponent-field histograms of θ⁰ (all and changed), per-row and per-column
changed counts, ‖Δ‖², ‖θ⁰‖² (float64) and max |Δ|; with a mask it also stores the changed flag
of every element. Exact-bit, empty and float64 pairs take the torch path (kernels.diff_stats).
Tested against ``diff_stats_reference`` on CUDA, and on CPU under ``TRITON_INTERPRET=1`` for
small shapes.

The overlap table of N fine-tunes (``overlap_counts``, as the CPU ``overlap_loop``) is one more
kernel: each program loads a block of the base and of every fine-tune once, builds each
element's change code (bit k: fine-tune k changed it at τ) and adds 1 to ``counts[e, code]``.
"""

from __future__ import annotations

import torch

from kernels.diff_stats.definition import (EDGES32, MAX_CODED_RUNS, N_BINS, TOLERANCE, DiffStats, bucket_lut, f32_floor,
                                           stored_bits, upcast32)
from kernels.diff_stats.reference import special_stats

try:  # Triton is optional: CPU-only installs use the numba loop or the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def available() -> bool:
    """Triton importable (the caller checks that the tensors are on CUDA)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _diff_stats_kernel(b_ptr, t_ptr, bb_ptr, tb_ptr, n, ncols, tol32, edges_ptr, lut_ptr,
                           counts_ptr, sums_ptr, max_ptr, hist_ptr, exp_total_ptr, exp_changed_ptr,
                           rows_ptr, cols_ptr, mask_ptr, N_EDGES: tl.constexpr, NB: tl.constexpr,
                           HAS_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        bv = tl.load(b_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tv = tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        same = tl.load(bb_ptr + offs, mask=valid, other=0) == tl.load(tb_ptr + offs, mask=valid, other=0)
        d = tl.abs(tv - bv)
        nan_or_inf = (d != d) | (d == float("inf"))
        diff = valid & ~same
        zero = diff & (d == 0.0)
        nonfinite = diff & nan_or_inf
        pos = diff & (d > 0.0) & ~nan_or_inf  # finite, positive: goes in the |Δ| histogram
        changed = diff & ~(d <= tol32)  # NaN <= x is False
        # bucket: count of edges < d, from the lookup table of the top 17 bits + one comparison
        dbits = d.to(tl.int32, bitcast=True)
        cell = tl.where(pos, dbits >> 15, 0)
        k = tl.load(lut_ptr + cell, mask=pos, other=0)
        ek = tl.load(edges_ptr + tl.minimum(k, N_EDGES - 1), mask=pos, other=0.0)
        k = tl.where((k < N_EDGES) & (d > ek), k + 1, k)
        k = tl.where(pos, k, NB)  # NB: a dummy bin for elements not in the histogram
        tl.atomic_add(hist_ptr + k, 1, mask=pos)
        e = (bv.to(tl.int32, bitcast=True) >> 23) & 0xFF
        tl.atomic_add(exp_total_ptr + e, 1, mask=valid)
        tl.atomic_add(exp_changed_ptr + e, 1, mask=changed)
        if HAS_MASK:
            tl.store(mask_ptr + offs, changed.to(tl.int8), mask=valid)
        if HAS_ROWS:
            tl.atomic_add(rows_ptr + offs // ncols, 1, mask=changed)
            tl.atomic_add(cols_ptr + offs % ncols, 1, mask=changed)
        tl.atomic_add(counts_ptr + 0, tl.sum((valid & same).to(tl.int64)))
        tl.atomic_add(counts_ptr + 1, tl.sum(zero.to(tl.int64)))
        tl.atomic_add(counts_ptr + 2, tl.sum(nonfinite.to(tl.int64)))
        tl.atomic_add(counts_ptr + 3, tl.sum(changed.to(tl.int64)))
        dd = tl.where(pos, d, 0.0).to(tl.float64)
        bb = tl.where(valid, bv, 0.0).to(tl.float64)
        tl.atomic_add(sums_ptr + 0, tl.sum(dd * dd))
        tl.atomic_add(sums_ptr + 1, tl.sum(bb * bb))
        tl.atomic_max(max_ptr, tl.max(tl.where(pos, d, 0.0)))


if triton is not None:

    @triton.jit
    def _changed_bit(bv, bb, t_ptr, tb_ptr, offs, valid, tol32, K: tl.constexpr):
        """Bit K set where fine-tune K changed the element at τ: not bit-identical and not |Δ| ≤ τ."""
        tv = tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        same = bb == tl.load(tb_ptr + offs, mask=valid, other=0)
        d = tl.abs(tv - bv)
        return tl.where(~same & ~(d <= tol32), 1 << K, 0)

    @triton.jit
    def _overlap_kernel(b_ptr, bb_ptr, ts, tbs, n, tol32, counts_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        bv = tl.load(b_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        bb = tl.load(bb_ptr + offs, mask=valid, other=0)
        code = tl.zeros([BLOCK], dtype=tl.int32)
        for k in tl.static_range(N):  # ts / tbs: tuples of N pointers (values, stored bits)
            code |= _changed_bit(bv, bb, ts[k], tbs[k], offs, valid, tol32, k)
        e = (bv.to(tl.int32, bitcast=True) >> 23) & 0xFF
        tl.atomic_add(counts_ptr + e * (1 << N) + code, 1, mask=valid)


def overlap_counts_triton(base: torch.Tensor, tuned: list[torch.Tensor], tol: float, block: int = 2048):
    """``overlap_counts``' table in one kernel (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1): the base and N ≤ ``MAX_CODED_RUNS`` fine-tunes stored like it in bf16,
    fp16 or fp32, read once each.

    Returns:
        np.ndarray: ``# [256, 2^N]`` int64 counts by (stratum, change code).
    """
    if triton is None:
        raise ImportError("triton is not installed")
    N = len(tuned)
    if not 1 <= N <= MAX_CODED_RUNS:
        raise ValueError(f"overlap_counts takes 1 to {MAX_CODED_RUNS} fine-tunes, got {N}")
    if base.dtype not in (torch.bfloat16, torch.float16, torch.float32) or any(t.dtype != base.dtype for t in tuned):
        raise ValueError("the Triton overlap kernel takes a base and fine-tunes stored alike in bf16, fp16 or fp32")
    b = base.detach().contiguous().reshape(-1)
    ts = [t.detach().contiguous().reshape(-1) for t in tuned]
    counts = torch.zeros(256 * (1 << N), dtype=torch.int64, device=b.device)
    n = b.numel()
    if n:
        _overlap_kernel[(triton.cdiv(n, block),)](b, stored_bits(b), tuple(ts), tuple(stored_bits(t) for t in ts), n,
                                                  float(f32_floor(tol)), counts, N=N, BLOCK=block)
    return counts.reshape(256, 1 << N).cpu().numpy()


_TABLES: dict = {}


def diff_stats_triton(base: torch.Tensor, tuned: torch.Tensor, tol: float, block: int = 2048, *,
                      with_mask: bool = False) -> DiffStats:
    """Runs the fused kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    Args:
        base, tuned (Tensor): same shape, same device, any dtypes ``kernels.diff_stats.comparison``
            accepts (exact-bit, empty and float64 pairs are computed with torch).
        tol (float): τ ≥ 0.
        block (int): elements per program. Default: 2048.
        with_mask (bool): also return the changed mask (``DiffStats.mask``, on the device).
            Default: False.
    Returns:
        DiffStats (counts exact; sums in float64 by block, so they may differ from the
        reference in the last digits).
    Raises:
        Incomparable: complex, or stored differently.
    """
    if triton is None:
        raise ImportError("triton is not installed")
    special = special_stats(base, tuned, tol, with_mask)
    if special is not None:
        return special
    dev = base.device
    b = base.detach().contiguous().reshape(-1)
    t = tuned.detach().contiguous().reshape(-1)
    same_dtype = b.dtype == t.dtype
    if same_dtype:
        bb, tb = stored_bits(b), stored_bits(t)  # the stored bits
    if not same_dtype or b.element_size() == 1:  # fp8, mixed dtypes: float32 values
        b, t = upcast32(b), upcast32(t)
        if not same_dtype:
            bb, tb = stored_bits(b), stored_bits(t)  # mixed dtypes: bit-identity of the upcasts
    n = b.numel()
    two_d = base.dim() == 2
    ncols = base.shape[1] if two_d else 1
    nrows = base.shape[0] if two_d else 1
    if dev not in _TABLES:
        _TABLES[dev] = (torch.from_numpy(EDGES32.copy()).to(dev), torch.from_numpy(bucket_lut()).to(dev))
    edges, lut = _TABLES[dev]
    i64 = dict(dtype=torch.int64, device=dev)
    counts = torch.zeros(4, **i64)
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    mx = torch.zeros(1, dtype=torch.float32, device=dev)
    hist = torch.zeros(N_BINS + 1, **i64)
    exp_total = torch.zeros(256, **i64)
    exp_changed = torch.zeros(256, **i64)
    rows = torch.zeros(nrows, **i64)
    cols = torch.zeros(ncols, **i64)
    mask = torch.empty(n, dtype=torch.int8, device=dev) if with_mask else counts  # counts: an unused pointer
    grid = (triton.cdiv(n, block),)
    _diff_stats_kernel[grid](b, t, bb, tb, n, ncols, float(f32_floor(tol)), edges, lut, counts,
                             sums, mx, hist, exp_total, exp_changed, rows, cols, mask, N_EDGES=len(EDGES32),
                             NB=N_BINS, HAS_ROWS=two_d, HAS_MASK=with_mask, BLOCK=block)
    c = counts.cpu().numpy()
    s = sums.cpu().numpy()
    return DiffStats(
        numel=n, tol=float(tol), identical=int(c[0]), zero=int(c[1]), nonfinite=int(c[2]), changed=int(c[3]),
        hist=hist[:N_BINS].cpu().numpy(), row_changed=rows.cpu().numpy() if two_d else None,
        col_changed=cols.cpu().numpy() if two_d else None, exp_total=exp_total.cpu().numpy(),
        exp_changed=exp_changed.cpu().numpy(), sum_sq_delta=float(s[0]), sum_sq_base=float(s[1]),
        max_abs_delta=float(mx.item()), compare=TOLERANCE,
        mask=mask.view(torch.bool).reshape(base.shape) if with_mask else None)

