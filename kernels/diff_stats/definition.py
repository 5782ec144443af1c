"""The definition of the per-tensor update statistics: what the three implementations share.

Everything the three implementations share — the tolerance grid, :class:`DiffStats`, the dtype
classes (:func:`comparison`), the stored bits and float32 upcasts, the pairs every
implementation hands to torch (:func:`special_stats`) and the changed-at-τ rule
(:func:`changed_mask`) — lives here, so the CPU loop (:mod:`kernels.diff_stats`) and the Triton
kernel (:mod:`kernels.diff_stats.triton_kernel`) import the definition and not each other. The rule and
the statistics are documented in :mod:`kernels.diff_stats`.
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
    # when asked for units (attention heads): # [units, 1 + len(EDGES)] unchanged counts of each
    # unit at 0 and at every grid edge
    unit_unchanged: np.ndarray | None = field(default=None, repr=False)

    def unchanged_at(self, tol: float) -> int:
        """Unchanged elements at a tolerance on the grid (0 or one of EDGES); for an exact-bit
        pair the same at every tolerance (the identical elements)."""
        if tol == 0:
            return self.identical + self.zero
        k = int(np.searchsorted(EDGES, tol))
        if k == len(EDGES) or EDGES[k] != tol:
            raise ValueError(f"tolerance {tol:g} is not on the grid (0 or 10**(k/{PER_DECADE}), 1e-10..1)")
        return self.identical + self.zero + int(self.hist[: k + 1].sum())

    def unchanged_grid(self) -> np.ndarray:
        """``# [1 + len(EDGES)]`` unchanged counts at 0 and at every grid edge (``unchanged_at`` of
        each, in one cumulative sum)."""
        return grid_unchanged(self.hist[None], np.array([self.identical + self.zero]))[0]


def grid_unchanged(hist: np.ndarray, identical_or_zero: np.ndarray) -> np.ndarray:
    """Unchanged counts at 0 and at every grid edge, ``# [U, 1 + len(EDGES)]``, from |Δ| histograms
    ``# [U, N_BINS]`` and the bit-identical or ±0 counts ``# [U]``."""
    cum = np.cumsum(hist, axis=1)[:, : len(EDGES)]
    return (identical_or_zero[:, None] + np.concatenate([np.zeros((len(hist), 1), np.int64), cum], 1)).astype(np.int64)


def check_units(base: torch.Tensor, units) -> None:
    """``units`` = (axis, [(start, stop), ...]): consecutive, non-overlapping lines of a 2-D tensor."""
    axis, bounds = units
    if base.dim() != 2 or axis not in (0, 1):
        raise ValueError("units apply to the rows (axis 0) or columns (axis 1) of a 2-D tensor")
    last = 0
    for a, b in bounds:
        if not last <= a < b <= base.shape[axis]:
            raise ValueError(f"unit lines {a}..{b} out of order or outside 0..{base.shape[axis]}")
        last = b


def stats_by_units(fn, base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool, units) -> DiffStats:
    """``fn``'s statistics with per-unit grid counts, by slicing: each unit (and each gap between
    units) is measured on its own and the parts merged exactly (:func:`merge_stats`). The path of
    the torch reference and the Triton kernel; the CPU loop counts units in its one pass."""
    check_units(base, units)
    axis, bounds = units
    cuts, unit_parts, last = [], [], 0
    for a, b in bounds:
        if a > last:
            cuts.append((last, a))
        unit_parts.append(len(cuts))
        cuts.append((a, b))
        last = b
    if last < base.shape[axis]:
        cuts.append((last, base.shape[axis]))
    parts = [fn(base.narrow(axis, a, b - a), tuned.narrow(axis, a, b - a), tol, with_mask=with_mask) for a, b in cuts]
    st = merge_stats(parts, axis)
    st.unit_unchanged = np.stack([parts[i].unchanged_grid() for i in unit_parts]) if unit_parts else \
        np.zeros((0, len(EDGES) + 1), np.int64)
    return st


def merge_stats(parts: list[DiffStats], axis: int) -> DiffStats:
    """The statistics of a 2-D pair from those of its consecutive slices along ``axis`` (0: row
    blocks, 1: column blocks), exactly: counts, histograms and sums add, the per-line counts of
    the sliced axis are concatenated and of the other added, max |Δ| is the largest, masks are
    concatenated. All parts must share τ and the kind of comparison."""
    p0 = parts[0]
    cat, add = ("row_changed", "col_changed") if axis == 0 else ("col_changed", "row_changed")
    lines = {cat: np.concatenate([getattr(p, cat) for p in parts]),
             add: functools.reduce(np.add, (getattr(p, add) for p in parts))}
    masks = [p.mask for p in parts]
    return DiffStats(
        numel=sum(p.numel for p in parts), tol=p0.tol, identical=sum(p.identical for p in parts),
        zero=sum(p.zero for p in parts), nonfinite=sum(p.nonfinite for p in parts),
        changed=sum(p.changed for p in parts), hist=sum(p.hist for p in parts), **lines,
        exp_total=sum(p.exp_total for p in parts), exp_changed=sum(p.exp_changed for p in parts),
        sum_sq_delta=sum(p.sum_sq_delta for p in parts), sum_sq_base=sum(p.sum_sq_base for p in parts),
        max_abs_delta=max(p.max_abs_delta for p in parts), compare=p0.compare,
        mask=None if masks[0] is None else torch.cat(masks, axis))


# ------------------------------------------------------------------ dtypes

class Incomparable(ValueError):
    """A tensor pair with no defined comparison; the message is the reason, in one line."""


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.cache
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


def prepare(base: torch.Tensor, tuned: torch.Tensor) -> str:
    """Shape check; returns the comparison (raises Incomparable)."""
    if base.shape != tuned.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    return comparison(base.dtype, tuned.dtype)


def stored_bits(x: torch.Tensor) -> torch.Tensor:
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


def upcast32(x: torch.Tensor) -> torch.Tensor:
    """float32 values of a float tensor; one-byte floats through a lookup table that keeps
    distinct codes distinct (so bit-identity of the upcasts is bit-identity of the codes)."""
    if x.dtype == torch.float32:
        return x.detach()
    if x.element_size() == 1:
        return _byte_float_lut(x.dtype, x.device)[x.detach().contiguous().view(torch.uint8).long()]
    return x.detach().float()


def operands(base: torch.Tensor, tuned: torch.Tensor, tol: float):
    """(θ⁰, θ¹ values, bit-identical flags, threshold, bin edges) of a tolerance pair, all in
    the base's shape: float32 values (float64 when either side is float64), the threshold
    such that |Δ| ≤ τ exactly iff |Δ| ≤ threshold in that precision."""
    if torch.float64 in (base.dtype, tuned.dtype):
        bv, tv = base.detach().double(), tuned.detach().double()
        thr, edges = float(tol), torch.from_numpy(EDGES.copy())
    else:
        bv, tv = upcast32(base), upcast32(tuned)
        thr, edges = float(f32_floor(tol)), torch.from_numpy(EDGES32.copy())
    same = stored_bits(base) == stored_bits(tuned) if base.dtype == tuned.dtype else stored_bits(bv) == stored_bits(tv)
    return bv, tv, same, thr, edges.to(bv.device)


def changed_at(same: torch.Tensor, d: torch.Tensor, thr: float) -> torch.Tensor:
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
    if prepare(base, tuned) == EXACT_BITS:
        return stored_bits(base) != stored_bits(tuned)
    bv, tv, same, thr, _ = operands(base, tuned, tol)
    return changed_at(same, (tv - bv).abs(), thr)


def as_float64(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.int64)


def empty_stats(base: torch.Tensor, tol: float, kind: str, with_mask: bool) -> DiffStats:
    """A pair with no elements: all counts 0 (a [0, C] matrix still has C column counts)."""
    two_d = base.dim() == 2
    return DiffStats(numel=0, tol=float(tol), identical=0, zero=0, nonfinite=0, changed=0,
                     hist=np.zeros(N_BINS, np.int64),
                     row_changed=np.zeros(base.shape[0], np.int64) if two_d else None,
                     col_changed=np.zeros(base.shape[1], np.int64) if two_d else None,
                     exp_total=np.zeros(256, np.int64), exp_changed=np.zeros(256, np.int64),
                     sum_sq_delta=0.0, sum_sq_base=0.0, max_abs_delta=0.0, compare=kind,
                     mask=torch.zeros(base.shape, dtype=torch.bool, device=base.device) if with_mask else None)


def exact_stats(base: torch.Tensor, tuned: torch.Tensor, tol: float, with_mask: bool) -> DiffStats:
    """An exact-bit pair (integer, bool, packed): changed iff the stored bits differ, at every τ."""
    ne = stored_bits(base) != stored_bits(tuned)
    n, c = ne.numel(), int(ne.sum())
    two_d = base.dim() == 2
    nan = float("nan")
    return DiffStats(numel=n, tol=float(tol), identical=n - c, zero=0, nonfinite=0, changed=c,
                     hist=np.zeros(N_BINS, np.int64),
                     row_changed=as_float64(ne.sum(1)) if two_d else None,
                     col_changed=as_float64(ne.sum(0)) if two_d else None,
                     exp_total=np.zeros(256, np.int64), exp_changed=np.zeros(256, np.int64),
                     sum_sq_delta=nan, sum_sq_base=nan, max_abs_delta=nan, compare=EXACT_BITS,
                     mask=ne if with_mask else None)


def bucket_lut() -> np.ndarray:
    """For every float32 with a given top 17 bits (sign 0, exponent, 8 mantissa bits) the
    bucket of the smallest such value; one edge can lie inside a cell (edges are 10^0.1 ≈
    1.26 apart, a cell ≤ 2^-8 wide), so the loop corrects with one comparison."""
    cells = np.arange(1 << 16, dtype=np.int64)
    low = (cells << 15).astype(np.uint32).view(np.float32)
    low = np.where(np.isfinite(low), low, np.float32(np.inf))
    return np.searchsorted(EDGES32, low, side="left").astype(np.int32)


CODE_IDENTICAL = -1  # element codes of the CPU histogram pass (kernels.diff_stats.numba_loop.loop): |Δ|'s
CODE_ZERO = int(np.uint32(0xFFE00000).view(np.int32))  # float32 bits are ≥ 0, so negatives are free
SPECIAL = {"identical": N_BINS, "zero": N_BINS + 1, "nonfinite": N_BINS + 2}  # pseudo-buckets after the grid
COUNT_SLOTS = 2 * (N_BINS + 3)  # per stratum: 2 · bucket + changed


STRADDLE = 1 << 20  # flag in cell_tables' slot: the cell holds a grid edge, compare |Δ| with it


def cell_tables() -> tuple[np.ndarray, np.ndarray]:
    """Tables of the CPU histogram pass over the top 16 bits of an element's code (a cell: the
    exponent and 7 mantissa bits of |Δ|, ≤ 2^(1/128) wide, so at most one grid edge lies in it,
    edges being 10^0.1 ≈ 1.26 apart). ``slot[cell]`` = 2 · the bucket of every value in the cell,
    or, for the ~1 cell in 40 that holds an edge, 2 · the bucket of its lowest value + STRADDLE
    (then the element's bucket is one more when |Δ| > ``edge[cell]``, the edge inside it); NaN /
    inf cells and the two negative codes map to 2 · their SPECIAL pseudo-bucket."""
    cells = np.arange(1 << 16, dtype=np.int64)
    low = (cells << 16).astype(np.uint32).view(np.float32)
    high = ((cells + 1) << 16).astype(np.uint32).view(np.float32)
    finite = np.isfinite(low) & (cells < 0x7F80)
    k = np.searchsorted(EDGES32, np.where(finite, low, np.float32(np.inf)), side="left")
    edge = np.append(EDGES32, np.float32(np.inf))[k].astype(np.float32)
    straddle = finite & (edge < np.where(cells < 0x7F7F, high, np.float32(np.inf)))
    slot = 2 * k + np.where(straddle, STRADDLE, 0)
    slot[0x7F80:0x8000] = 2 * SPECIAL["nonfinite"]  # |Δ| = inf or NaN
    slot[0x8000:] = 0  # other negative codes do not occur
    slot[(CODE_ZERO & 0xFFFFFFFF) >> 16] = 2 * SPECIAL["zero"]
    slot[(CODE_IDENTICAL & 0xFFFFFFFF) >> 16] = 2 * SPECIAL["identical"]
    edge[~straddle] = np.inf
    return slot.astype(np.int32), edge


# ------------------------------------------------------------------ overlap of N fine-tunes

MAX_CODED_RUNS = 10  # overlap counts by code: [256, 2^N] per tensor (8 MiB at N = 10)


