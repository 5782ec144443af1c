"""Per-tensor update statistics of a (base, tuned) pair in one pass.

For each element: unchanged at τ iff the two stored values are bit-identical or
|θ¹ − θ⁰| ≤ τ, the difference taken in float32 after upcasting (shared/DESIGN.md §3); a NaN
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
- ``sum_sq_delta`` (‖Δ‖²_F over finite Δ), ``sum_sq_base`` (‖θ⁰‖²_F), ``max_abs_delta``.

Three implementations: ``diff_stats_reference`` (plain torch, the definition), a fused
numba loop for CPU (torch ops make ~6 passes over memory and allocate per pass; the loop
makes one), and a Triton kernel on CUDA. ``diff_stats`` picks one at call time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# ------------------------------------------------------------------ the tolerance grid

DECADES = 10  # 1e-10 .. 1
PER_DECADE = 10


def _edge(k: int) -> float:
    """10**(k / PER_DECADE), exactly the decimal literal at decades (1e-5 is 1e-05)."""
    return float(f"1e{k // PER_DECADE}") if k % PER_DECADE == 0 else 10.0 ** (k / PER_DECADE)


EDGES = np.array([_edge(k) for k in range(-DECADES * PER_DECADE, 1)], dtype=np.float64)  # [101]
N_BINS = len(EDGES) + 1  # + the (1, inf) bin


def f32_floor(x: float) -> np.float32:
    """The largest float32 ≤ x: for a float32 d, d ≤ x exactly iff d ≤ f32_floor(x)."""
    y = np.float32(x)
    return y if float(y) <= x else np.nextafter(y, np.float32(-np.inf))


EDGES32 = np.array([f32_floor(e) for e in EDGES], dtype=np.float32)


@dataclass
class DiffStats:
    """Statistics of one tensor pair (see module docstring)."""

    numel: int
    tol: float
    identical: int
    zero: int
    nonfinite: int
    changed: int  # at ``tol``
    hist: np.ndarray  # [N_BINS] int64
    row_changed: np.ndarray | None  # [rows] int64, 2-D tensors only
    col_changed: np.ndarray | None  # [cols] int64
    exp_total: np.ndarray  # [256] int64
    exp_changed: np.ndarray  # [256] int64
    sum_sq_delta: float
    sum_sq_base: float
    max_abs_delta: float

    def unchanged_at(self, tol: float) -> int:
        """Unchanged elements at a tolerance on the grid (0 or one of EDGES)."""
        if tol == 0:
            return self.identical + self.zero
        k = int(np.searchsorted(EDGES, tol))
        if k == len(EDGES) or EDGES[k] != tol:
            raise ValueError(f"tolerance {tol:g} is not on the grid (0 or 10**(k/{PER_DECADE}), 1e-10..1)")
        return self.identical + self.zero + int(self.hist[: k + 1].sum())


def _prepare(base: torch.Tensor, tuned: torch.Tensor):
    if base.shape != tuned.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    if not (base.is_floating_point() and tuned.is_floating_point()):
        raise ValueError(f"not floating point: {base.dtype}, {tuned.dtype}")


# ------------------------------------------------------------------ reference (torch)

def diff_stats_reference(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> DiffStats:
    """Plain-torch definition of every statistic (the other paths are tested against it).

    Args:
        base (Tensor): θ⁰, any float dtype, any shape.
        tuned (Tensor): θ¹, same shape.
        tol (float): τ ≥ 0.
    Returns:
        DiffStats
    """
    _prepare(base, tuned)
    b = base.detach().float().reshape(base.shape if base.dim() == 2 else (-1,))
    t = tuned.detach().float().reshape(b.shape)
    same_bits = _bits(base) == _bits(tuned)
    same_bits = same_bits.reshape(b.shape)
    d = (t - b).abs()
    finite = torch.isfinite(d)
    zero = (d == 0) & ~same_bits
    nonfinite = ~finite & ~same_bits
    pos = (d > 0) & finite & ~same_bits
    idx = torch.bucketize(d[pos], torch.from_numpy(EDGES32), right=False)
    hist = torch.bincount(idx, minlength=N_BINS)
    changed = ~(same_bits | (d <= f32_floor(tol)))  # NaN <= x is False
    exps = ((b.view(torch.int32) >> 23) & 0xFF).reshape(-1).long()
    df = torch.where(finite, d, 0).double()
    return DiffStats(
        numel=b.numel(), tol=float(tol),
        identical=int(same_bits.sum()), zero=int(zero.sum()), nonfinite=int(nonfinite.sum()),
        changed=int(changed.sum()), hist=hist.numpy().astype(np.int64),
        row_changed=changed.sum(1).numpy().astype(np.int64) if b.dim() == 2 else None,
        col_changed=changed.sum(0).numpy().astype(np.int64) if b.dim() == 2 else None,
        exp_total=torch.bincount(exps, minlength=256).numpy().astype(np.int64),
        exp_changed=torch.bincount(exps[changed.reshape(-1)], minlength=256).numpy().astype(np.int64),
        sum_sq_delta=float((df * df).sum()), sum_sq_base=float((b.double() ** 2).sum()),
        max_abs_delta=float(df.max()) if df.numel() else 0.0,
    )


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The stored bits as an integer tensor of the same width."""
    return x.detach().contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32,
                                         8: torch.int64}[x.element_size()])


# ------------------------------------------------------------------ CPU: fused numba loop

_numba_loop = None


def _get_numba_loop():
    """Compiles the fused loop on first use (cached on disk by numba)."""
    global _numba_loop
    if _numba_loop is not None:
        return _numba_loop
    import numba

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def loop(b32, t32, bb, tb, ncols, row0, tol32, edges32, lut, hist, rows, cols, exp_total,
             exp_changed, acc):
        # b32/t32: float32 upcasts of one chunk; bb/tb: their bits (int32 views of the stored
        # values' upcast — the upcast is injective, so equal bits <=> equal stored bits)
        n_edges = edges32.shape[0]
        identical = 0
        zero = 0
        nonfinite = 0
        changed = 0
        ssd = 0.0
        ssb = 0.0
        mx = 0.0
        for i in range(b32.shape[0]):
            bv = b32[i]
            e = (bb[i] >> 23) & 0xFF
            exp_total[e] += 1
            ssb += np.float64(bv) * np.float64(bv)
            if bb[i] == tb[i]:
                identical += 1
                continue
            d = np.float32(abs(t32[i] - bv))
            if d <= tol32:
                if d == 0:
                    zero += 1
                else:
                    ssd += np.float64(d) * np.float64(d)
                    if d > mx:
                        mx = d
                    k = lut[np.int32(np.float32(d).view(np.int32)) >> 15]
                    if k < n_edges and d > edges32[k]:
                        k += 1
                    hist[k] += 1
                continue
            # changed at tol (NaN lands here: NaN <= tol is False)
            changed += 1
            exp_changed[e] += 1
            if ncols > 0:
                rows[row0 + i // ncols] += 1
                cols[i % ncols] += 1
            if d != d or d == np.inf:
                nonfinite += 1
            else:
                ssd += np.float64(d) * np.float64(d)
                if d > mx:
                    mx = d
                k = lut[np.int32(np.float32(d).view(np.int32)) >> 15]
                if k < n_edges and d > edges32[k]:
                    k += 1
                hist[k] += 1
        acc[0] += identical
        acc[1] += zero
        acc[2] += nonfinite
        acc[3] += changed
        acc[4] += ssd
        acc[5] += ssb
        if mx > acc[6]:
            acc[6] = mx

    _numba_loop = loop
    return loop


def _bucket_lut() -> np.ndarray:
    """For every float32 with a given top 17 bits (sign 0, exponent, 8 mantissa bits) the
    bucket of the smallest such value; one edge can lie inside a cell (edges are 10^0.1 ≈
    1.26 apart, a cell ≤ 2^-8 wide), so the loop corrects with one comparison."""
    cells = np.arange(1 << 16, dtype=np.int64)
    low = (cells << 15).astype(np.uint32).view(np.float32)
    low = np.where(np.isfinite(low), low, np.float32(np.inf))
    return np.searchsorted(EDGES32, low, side="left").astype(np.int32)


_LUT = None
CHUNK = 1 << 20  # elements per chunk: the upcasts of a chunk stay in cache-friendly sizes


def diff_stats_cpu(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> DiffStats:
    """Fused single pass on CPU (numba), chunked so memory stays at a few MB per chunk."""
    global _LUT
    _prepare(base, tuned)
    if _LUT is None:
        _LUT = _bucket_lut()
    loop = _get_numba_loop()
    b = base.detach().reshape(-1)
    t = tuned.detach().reshape(-1)
    ncols = base.shape[1] if base.dim() == 2 else 0
    nrows = base.shape[0] if base.dim() == 2 else 0
    hist = np.zeros(N_BINS, np.int64)
    rows = np.zeros(max(nrows, 1), np.int64)
    cols = np.zeros(max(ncols, 1), np.int64)
    exp_total = np.zeros(256, np.int64)
    exp_changed = np.zeros(256, np.int64)
    acc = np.zeros(7, np.float64)
    step = CHUNK if ncols == 0 else max(1, CHUNK // ncols) * ncols
    tol32 = f32_floor(tol)
    for s in range(0, b.numel(), step):
        b32 = b[s: s + step].float().numpy()
        t32 = t[s: s + step].float().numpy()
        loop(b32, t32, b32.view(np.int32), t32.view(np.int32), ncols, s // ncols if ncols else 0, tol32,
             EDGES32, _LUT, hist, rows, cols, exp_total, exp_changed, acc)
    return DiffStats(
        numel=b.numel(), tol=float(tol), identical=int(acc[0]), zero=int(acc[1]), nonfinite=int(acc[2]),
        changed=int(acc[3]), hist=hist, row_changed=rows if nrows else None, col_changed=cols if ncols else None,
        exp_total=exp_total, exp_changed=exp_changed, sum_sq_delta=float(acc[4]), sum_sq_base=float(acc[5]),
        max_abs_delta=float(acc[6]))


def diff_stats(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> DiffStats:
    """Chooses at call time: CUDA tensors -> Triton kernel when available; CPU -> the numba
    loop when numba imports; otherwise the torch reference."""
    if base.is_cuda:
        from kernels import diff_stats_triton

        if diff_stats_triton.available():
            return diff_stats_triton.diff_stats_triton(base, tuned, tol)
        return diff_stats_reference(base, tuned, tol)
    try:
        return diff_stats_cpu(base, tuned, tol)
    except ImportError:
        return diff_stats_reference(base, tuned, tol)
