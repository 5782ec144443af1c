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

def _bucket_lut() -> np.ndarray:
    """For every float32 with a given top 17 bits (sign 0, exponent, 8 mantissa bits) the
    bucket of the smallest such value; one edge can lie inside a cell (edges are 10^0.1 ≈
    1.26 apart, a cell ≤ 2^-8 wide), so the loop corrects with one comparison."""
    cells = np.arange(1 << 16, dtype=np.int64)
    low = (cells << 15).astype(np.uint32).view(np.float32)
    low = np.where(np.isfinite(low), low, np.float32(np.inf))
    return np.searchsorted(EDGES32, low, side="left").astype(np.int32)


_LUT = None
CHUNK = 1 << 22  # elements per fp16 upcast chunk


def diff_stats_cpu(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> DiffStats:
    """Fused single pass on CPU (numba, threads over row blocks). bf16 is read as raw bits
    with no upcast copy; fp32 in place; fp16 is upcast in chunks."""
    global _LUT
    _prepare(base, tuned)
    if _LUT is None:
        _LUT = _bucket_lut()
    import numba

    from kernels._diff_stats_numba import loop  # compiled on first use, cached on disk

    two_d = base.dim() == 2
    R, C = (base.shape if two_d else (1, base.numel())) if base.numel() else (0, 1)
    if not two_d and C > 4096:  # 1-D and N-D: fold into rows so threads share the work
        R, C = _fold(base.numel())
    nb = max(1, min(numba.get_num_threads(), R))
    hist = np.zeros((nb, N_BINS), np.int64)
    rows = np.zeros(R, np.int64)
    cols = np.zeros((nb, C), np.int64)
    exp_total = np.zeros((nb, 256), np.int64)
    exp_changed = np.zeros((nb, 256), np.int64)
    acc = np.zeros((nb, 6), np.float64)
    tol32 = f32_floor(tol)
    b = base.detach().contiguous()
    t = tuned.detach().contiguous()
    if b.dtype == torch.bfloat16 and t.dtype == torch.bfloat16:
        loop(_np_bits16(b).reshape(R, C), _np_bits16(t).reshape(R, C), tol32, EDGES32, _LUT, hist, rows,
                  cols, exp_total, exp_changed, acc)
    elif b.dtype == torch.float32 and t.dtype == torch.float32:
        loop(b.numpy().reshape(R, C), t.numpy().reshape(R, C), tol32, EDGES32, _LUT, hist, rows, cols,
                 exp_total, exp_changed, acc)
    else:
        step = max(1, CHUNK // C)
        bf, tf = b.reshape(R, C), t.reshape(R, C)
        for r0 in range(0, R, step):
            part = rows[r0: r0 + step]
            loop(bf[r0: r0 + step].float().numpy(), tf[r0: r0 + step].float().numpy(), tol32, EDGES32, _LUT,
                     hist, part, cols, exp_total, exp_changed, acc)
    changed = int(rows.sum())
    return DiffStats(
        numel=base.numel(), tol=float(tol), identical=int(acc[:, 0].sum()), zero=int(acc[:, 1].sum()),
        nonfinite=int(acc[:, 2].sum()), changed=changed, hist=hist.sum(0),
        row_changed=rows if two_d else None, col_changed=cols.sum(0) if two_d else None,
        exp_total=exp_total.sum(0), exp_changed=exp_changed.sum(0), sum_sq_delta=float(acc[:, 3].sum()),
        sum_sq_base=float(acc[:, 4].sum()), max_abs_delta=float(acc[:, 5].max()) if base.numel() else 0.0)


def _np_bits16(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def _fold(n: int) -> tuple[int, int]:
    """A [R, C] view of n elements with C dividing n, C ≤ 4096 (for threads over rows)."""
    for c in range(min(4096, n), 0, -1):
        if n % c == 0:
            return n // c, c
    return 1, n


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
