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

Three implementations: ``diff_stats_reference`` (plain torch, the definition), a fused
numba loop for CPU (torch ops make ~6 passes over memory and allocate per pass; the loop
makes one), and a Triton kernel on CUDA. ``diff_stats`` picks one at call time; exact-bit
and float64 pairs take the torch path in every implementation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

TOLERANCE = "tolerance"
EXACT_BITS = "exact_bits"

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
    compare: str = TOLERANCE  # or EXACT_BITS
    mask: torch.Tensor | None = field(default=None, repr=False, compare=False)  # bool, base's shape, when asked

    def unchanged_at(self, tol: float) -> int:
        """Unchanged elements at a tolerance on the grid (0 or one of EDGES); for an exact-bit
        pair the same at every tolerance (the identical elements)."""
        if tol == 0:
            return self.identical + self.zero
        k = int(np.searchsorted(EDGES, tol))
        if k == len(EDGES) or EDGES[k] != tol:
            raise ValueError(f"tolerance {tol:g} is not on the grid (0 or 10**(k/{PER_DECADE}), 1e-10..1)")
        return self.identical + self.zero + int(self.hist[: k + 1].sum())


# ------------------------------------------------------------------ dtypes

class Incomparable(ValueError):
    """A tensor pair with no defined comparison; the message is the reason, in one line."""


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def _upcastable(dtype: torch.dtype) -> bool:
    try:
        torch.empty(1, dtype=dtype).float()
        return True
    except Exception:  # noqa: BLE001 - torch raises RuntimeError or NotImplementedError by dtype
        return False


def dtype_class(dtype: torch.dtype) -> str:
    """How tensors of one dtype are compared: ``"tolerance"`` or ``"exact_bits"``.

    Args:
        dtype (torch.dtype): a stored dtype.
    Returns:
        str: ``"tolerance"`` for floating-point dtypes torch can upcast to float32 (fp64, fp32,
        bf16, fp16, fp8), ``"exact_bits"`` for integer, unsigned, bool and packed float formats.
    Raises:
        Incomparable: complex, or a dtype narrower than a byte.
    """
    if dtype.is_complex:
        raise Incomparable(f"{_name(dtype)}: complex tensors are not compared (no update sparsity is "
                           "defined for them)")
    if getattr(dtype, "itemsize", 0) not in _BITS:
        raise Incomparable(f"{_name(dtype)}: a dtype narrower than a byte is not compared")
    return TOLERANCE if dtype.is_floating_point and _upcastable(dtype) else EXACT_BITS


def comparison(a: torch.dtype, b: torch.dtype) -> str:
    """How a (base, tuned) pair of dtypes is compared (see the module docstring).

    Args:
        a (torch.dtype): θ⁰'s stored dtype.
        b (torch.dtype): θ¹'s stored dtype.
    Returns:
        str: ``"tolerance"`` (both floating point, possibly different widths) or
        ``"exact_bits"`` (the same integer / bool / packed dtype on both sides).
    Raises:
        Incomparable: complex, or stored differently (e.g. int8 vs bfloat16, int8 vs int32).
    """
    ka, kb = dtype_class(a), dtype_class(b)
    if ka == kb == TOLERANCE:
        return TOLERANCE
    if a == b:
        return EXACT_BITS
    reason = ("a quantized or integer tensor is compared only with one stored the same way"
                     if TOLERANCE in (ka, kb) else "different integer widths: the bits do not correspond")
    raise Incomparable(f"dtype {_name(a)} vs {_name(b)}: not compared ({reason})")


def _prepare(base: torch.Tensor, tuned: torch.Tensor) -> str:
    """Shape check; returns the comparison (raises Incomparable)."""
    if base.shape != tuned.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    return comparison(base.dtype, tuned.dtype)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The stored bits as a signed integer tensor of the same width and shape."""
    return x.detach().contiguous().view(_BITS[x.element_size()])


_UPCAST_LUTS: dict = {}


def _byte_float_lut(dtype: torch.dtype, device) -> torch.Tensor:
    """float32 value of each of the 256 codes of a one-byte float format, every NaN code kept
    distinct (torch's upcast maps e5m2's six NaN codes to four NaNs): NaN code c becomes the
    quiet NaN with payload c and c's sign."""
    key = (dtype, str(device))
    if key not in _UPCAST_LUTS:
        codes = np.arange(256, dtype=np.uint8)
        values = torch.from_numpy(codes.copy()).view(dtype).float().numpy()
        bits = values.view(np.uint32).copy()
        nan = np.isnan(values)
        c = codes[nan].astype(np.uint32)
        bits[nan] = np.uint32(0x7FC00000) | c | ((c >> np.uint32(7)) << np.uint32(31))
        _UPCAST_LUTS[key] = torch.from_numpy(bits.view(np.float32)).to(device)
    return _UPCAST_LUTS[key]


def _upcast32(x: torch.Tensor) -> torch.Tensor:
    """float32 values of a float tensor; one-byte floats through a lookup table that keeps
    distinct codes distinct (so bit-identity of the upcasts is bit-identity of the codes)."""
    if x.dtype == torch.float32:
        return x.detach()
    if x.element_size() == 1:
        return _byte_float_lut(x.dtype, x.device)[x.detach().contiguous().view(torch.uint8).long()]
    return x.detach().float()


def _operands(base: torch.Tensor, tuned: torch.Tensor, tol: float):
    """(θ⁰, θ¹ values, bit-identical flags, threshold, bin edges) of a tolerance pair, all in
    the base's shape: float32 values (float64 when either side is float64), the threshold
    such that |Δ| ≤ τ exactly iff |Δ| ≤ threshold in that precision."""
    if torch.float64 in (base.dtype, tuned.dtype):
        bv, tv = base.detach().double(), tuned.detach().double()
        thr, edges = float(tol), torch.from_numpy(EDGES.copy())
    else:
        bv, tv = _upcast32(base), _upcast32(tuned)
        thr, edges = float(f32_floor(tol)), torch.from_numpy(EDGES32.copy())
    same = _bits(base) == _bits(tuned) if base.dtype == tuned.dtype else _bits(bv) == _bits(tv)
    return bv, tv, same, thr, edges.to(bv.device)


def _changed(same: torch.Tensor, d: torch.Tensor, thr: float) -> torch.Tensor:
    """THE definition: changed iff not bit-identical and not |Δ| ≤ τ (NaN <= x is False)."""
    return ~(same | (d <= thr))


def changed_mask(base: torch.Tensor, tuned: torch.Tensor, tol: float) -> torch.Tensor:
    """Bool mask of the elements changed at τ (the module's definition, every dtype class).

    Args:
        base (Tensor): θ⁰.
        tuned (Tensor): θ¹, same shape.
        tol (float): τ ≥ 0 (ignored by exact-bit pairs).
    Returns:
        BoolTensor: base's shape and device.
    Raises:
        Incomparable: a pair with no defined comparison (complex, different storage).
    """
    if _prepare(base, tuned) == EXACT_BITS:
        return _bits(base) != _bits(tuned)
    bv, tv, same, thr, _ = _operands(base, tuned, tol)
    return _changed(same, (tv - bv).abs(), thr)


def _np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.int64)


def _empty_stats(base: torch.Tensor, tol: float, kind: str, with_mask: bool) -> DiffStats:
    """A pair with no elements: all counts 0 (a [0, C] matrix still has C column counts)."""
    two_d = base.dim() == 2
    return DiffStats(numel=0, tol=float(tol), identical=0, zero=0, nonfinite=0, changed=0,
                     hist=np.zeros(N_BINS, np.int64),
                     row_changed=np.zeros(base.shape[0], np.int64) if two_d else None,
                     col_changed=np.zeros(base.shape[1], np.int64) if two_d else None,
                     exp_total=np.zeros(256, np.int64), exp_changed=np.zeros(256, np.int64),
                     sum_sq_delta=0.0, sum_sq_base=0.0, max_abs_delta=0.0, compare=kind,
                     mask=torch.zeros(base.shape, dtype=torch.bool, device=base.device) if with_mask else None)


def _exact_stats(base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool) -> DiffStats:
    """An exact-bit pair (integer, bool, packed): changed iff the stored bits differ, at every τ."""
    ne = _bits(base) != _bits(tuned)
    n, c = ne.numel(), int(ne.sum())
    two_d = base.dim() == 2
    nan = float("nan")
    return DiffStats(numel=n, tol=float(tol), identical=n - c, zero=0, nonfinite=0, changed=c,
                     hist=np.zeros(N_BINS, np.int64),
                     row_changed=_np64(ne.sum(1)) if two_d else None,
                     col_changed=_np64(ne.sum(0)) if two_d else None,
                     exp_total=np.zeros(256, np.int64), exp_changed=np.zeros(256, np.int64),
                     sum_sq_delta=nan, sum_sq_base=nan, max_abs_delta=nan, compare=EXACT_BITS,
                     mask=ne if with_mask else None)


def _special(base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool) -> DiffStats | None:
    """Stats of the pairs every implementation hands to torch: exact bits, empty, float64."""
    kind = _prepare(base, tuned)
    if kind == EXACT_BITS:
        return _exact_stats(base, tuned, tol, with_mask)
    if base.numel() == 0:
        return _empty_stats(base, tol, kind, with_mask)
    if torch.float64 in (base.dtype, tuned.dtype):
        return _reference(base, tuned, tol, with_mask)
    return None


# ------------------------------------------------------------------ reference (torch)

def diff_stats_reference(base: torch.Tensor, tuned: torch.Tensor, tol: float, *,
                         with_mask: bool = False) -> DiffStats:
    """Plain-torch definition of every statistic (the other paths are tested against it).

    Args:
        base (Tensor): θ⁰, any dtype :func:`comparison` accepts, any shape, any device.
        tuned (Tensor): θ¹, same shape.
        tol (float): τ ≥ 0.
        with_mask (bool): also return the changed mask as ``DiffStats.mask``. Default: False.
    Returns:
        DiffStats
    Raises:
        Incomparable: complex, or stored differently.
    """
    kind = _prepare(base, tuned)
    if kind == EXACT_BITS:
        return _exact_stats(base, tuned, tol, with_mask)
    return _reference(base, tuned, tol, with_mask)


def _reference(base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool) -> DiffStats:
    shape = base.shape if base.dim() == 2 else (-1,)
    bv, tv, same, thr, edges = _operands(base, tuned, tol)
    b, t, same = bv.reshape(shape), tv.reshape(shape), same.reshape(shape)
    d = (t - b).abs()
    finite = torch.isfinite(d)
    zero = (d == 0) & ~same
    nonfinite = ~finite & ~same
    pos = (d > 0) & finite & ~same
    idx = torch.bucketize(d[pos], edges, right=False)
    hist = torch.bincount(idx, minlength=N_BINS)
    changed = _changed(same, d, thr)
    exps = ((b.float().contiguous().view(torch.int32) >> 23) & 0xFF).reshape(-1).long()
    df = torch.where(finite, d, 0).double()
    two_d = b.dim() == 2
    return DiffStats(
        numel=b.numel(), tol=float(tol),
        identical=int(same.sum()), zero=int(zero.sum()), nonfinite=int(nonfinite.sum()),
        changed=int(changed.sum()), hist=_np64(hist),
        row_changed=_np64(changed.sum(1)) if two_d else None,
        col_changed=_np64(changed.sum(0)) if two_d else None,
        exp_total=_np64(torch.bincount(exps, minlength=256)),
        exp_changed=_np64(torch.bincount(exps[changed.reshape(-1)], minlength=256)),
        sum_sq_delta=float((df * df).sum()), sum_sq_base=float((b.double() ** 2).sum()),
        max_abs_delta=float(df.max()) if df.numel() else 0.0, compare=TOLERANCE,
        mask=changed.reshape(base.shape) if with_mask else None,
    )


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
CHUNK = 1 << 22  # elements per upcast chunk (fp8 and mixed-dtype pairs)


def diff_stats_cpu(base: torch.Tensor, tuned: torch.Tensor, tol: float, *, with_mask: bool = False) -> DiffStats:
    """Fused single pass on CPU (numba, threads over row blocks). bf16 and fp16 are read as raw
    bits with no upcast copy (fp16 widened exactly in the loop); fp32 in place; fp8 and
    mixed-dtype pairs are upcast in chunks; exact-bit, empty and float64 pairs take the torch
    path. With ``with_mask`` the same pass writes the changed mask."""
    global _LUT
    special = _special(base, tuned, tol, with_mask)
    if special is not None:
        return special
    if _LUT is None:
        _LUT = _bucket_lut()
    import numba

    from kernels._diff_stats_numba import loop  # compiled on first use, cached on disk

    two_d = base.dim() == 2
    R, C = base.shape if two_d else (1, base.numel())
    if not two_d and C > 4096:  # 1-D and N-D: fold into rows so threads share the work
        R, C = _fold(base.numel())
    nb = max(1, min(numba.get_num_threads(), R))
    hist = np.zeros((nb, N_BINS), np.int64)
    rows = np.zeros(R, np.int64)
    cols = np.zeros((nb, C), np.int64)
    exp_total = np.zeros((nb, 256), np.int64)
    exp_changed = np.zeros((nb, 256), np.int64)
    acc = np.zeros((nb, 6), np.float64)
    mask = np.zeros((R, C), np.bool_) if with_mask else None
    tol32 = f32_floor(tol)
    b = base.detach().contiguous()
    t = tuned.detach().contiguous()
    same_dtype = b.dtype == t.dtype
    if same_dtype and b.dtype == torch.bfloat16:
        loop(_np_bits16(b).reshape(R, C), _np_bits16(t).reshape(R, C), tol32, EDGES32, _LUT, hist, rows,
             cols, exp_total, exp_changed, acc, mask)
    elif same_dtype and b.dtype == torch.float16:  # int16 bits: widened exactly, NaN payloads kept
        loop(b.view(torch.int16).numpy().reshape(R, C), t.view(torch.int16).numpy().reshape(R, C), tol32,
             EDGES32, _LUT, hist, rows, cols, exp_total, exp_changed, acc, mask)
    elif same_dtype and b.dtype == torch.float32:
        loop(b.numpy().reshape(R, C), t.numpy().reshape(R, C), tol32, EDGES32, _LUT, hist, rows, cols,
             exp_total, exp_changed, acc, mask)
    else:  # fp8, mixed float dtypes: chunks of float32 upcasts (distinct codes stay distinct)
        step = max(1, CHUNK // C)
        bf, tf = b.reshape(R, C), t.reshape(R, C)
        for r0 in range(0, R, step):
            part = rows[r0: r0 + step]
            loop(_upcast32(bf[r0: r0 + step]).numpy(), _upcast32(tf[r0: r0 + step]).numpy(), tol32, EDGES32,
                 _LUT, hist, part, cols, exp_total, exp_changed, acc,
                 None if mask is None else mask[r0: r0 + step])
    changed = int(rows.sum())
    return DiffStats(
        numel=base.numel(), tol=float(tol), identical=int(acc[:, 0].sum()), zero=int(acc[:, 1].sum()),
        nonfinite=int(acc[:, 2].sum()), changed=changed, hist=hist.sum(0),
        row_changed=rows if two_d else None, col_changed=cols.sum(0) if two_d else None,
        exp_total=exp_total.sum(0), exp_changed=exp_changed.sum(0), sum_sq_delta=float(acc[:, 3].sum()),
        sum_sq_base=float(acc[:, 4].sum()), max_abs_delta=float(acc[:, 5].max()), compare=TOLERANCE,
        mask=torch.from_numpy(mask).reshape(base.shape) if with_mask else None)


def _np_bits16(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy().view(np.uint16)


def _fold(n: int) -> tuple[int, int]:
    """A [R, C] view of n elements with C dividing n, C ≤ 4096 (for threads over rows)."""
    for c in range(min(4096, n), 0, -1):
        if n % c == 0:
            return n // c, c
    return 1, n


def diff_stats(base: torch.Tensor, tuned: torch.Tensor, tol: float, *, with_mask: bool = False) -> DiffStats:
    """Chooses at call time: CUDA tensors -> Triton kernel when available; CPU -> the numba
    loop when numba imports; otherwise the torch reference. Every path accepts every dtype
    :func:`comparison` accepts (exact-bit, empty and float64 pairs go through torch).

    Args:
        base (Tensor): θ⁰.
        tuned (Tensor): θ¹, same shape and device.
        tol (float): τ ≥ 0.
        with_mask (bool): also return the changed mask (``DiffStats.mask``), from the same pass.
            Default: False.
    Returns:
        DiffStats
    Raises:
        Incomparable: complex, or stored differently.
    """
    if base.is_cuda:
        from kernels import diff_stats_triton

        if diff_stats_triton.available():
            return diff_stats_triton.diff_stats_triton(base, tuned, tol, with_mask=with_mask)
        return diff_stats_reference(base, tuned, tol, with_mask=with_mask)
    try:
        return diff_stats_cpu(base, tuned, tol, with_mask=with_mask)
    except ImportError:
        return diff_stats_reference(base, tuned, tol, with_mask=with_mask)
