"""The fused CPU loop of kernels.diff_stats, in numba (imported lazily: numba costs ~0.5 s to import).

One pass over a [R, C] pair of stored tensors: bf16 is read as its uint16 bits and widened by a
shift, fp16 as its int16 bits and widened exactly (normal, subnormal, inf and NaN with its
payload; no upcast copy), fp32 is read in place. Threads take blocks of rows, each with private
histograms and accumulators. Torch ops would need ~6 passes over memory and a temporary per
pass for the same statistics; this loop makes one. With a ``mask`` array (None otherwise: numba
prunes the store at compile time, so the plain statistics compile without it) the same pass
marks the changed elements.
"""

import numba
import numpy as np
from numba import types
from numba.extending import overload

from kernels.diff_stats import definition as _ref


def _value(x):  # stored element -> float32 value
    raise NotImplementedError


def _raw(x):  # stored element -> integer bits (for the bit-identity test)
    raise NotImplementedError


@numba.njit(nogil=True, cache=True)
def _fp16_value(x):
    """fp16 bits (int16) -> the exact float32 value (a plain njit function: LLVM inlines it)."""
    h = np.uint32(x) & np.uint32(0xFFFF)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    em = h & np.uint32(0x7FFF)  # exponent and mantissa
    if em >= np.uint32(0x7C00):  # inf, NaN (payload kept)
        bits = sign | np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << np.uint32(13))
    elif em >= np.uint32(0x0400):  # normal: rebias the exponent by 127 - 15
        bits = sign | ((em << np.uint32(13)) + np.uint32(112 << 23))
    else:  # ±0 and subnormal: m · 2^-24, exact in float32
        bits = sign | np.float32(np.float32(em) * np.float32(5.9604644775390625e-08)).view(np.uint32)
    return np.uint32(bits).view(np.float32)


@overload(_value, inline="always")
def _value_impl(x):
    if x == types.uint16:  # bf16 bits
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    if x == types.int16:  # fp16 bits
        return lambda x: _fp16_value(x)
    if x == types.float32:
        return lambda x: x


@overload(_raw, inline="always")
def _raw_impl(x):
    if x == types.uint16 or x == types.int16:
        return lambda x: x
    if x == types.float32:
        return lambda x: np.float32(x).view(np.int32)


@numba.njit(inline="always")
def _bits32(x):
    return np.float32(x).view(np.int32)


@numba.njit(inline="always")
def _slot(bits, cell_slot, cell_edge):
    """The count slot of an element code: ``cell_slot`` of its top 16 bits, resolved by one
    comparison in the ~1 cell in 40 that holds a grid edge (flagged STRADDLE)."""
    cell = np.uint32(bits) >> np.uint32(16)
    s = cell_slot[cell]
    if s >= STRADDLE:
        s += 2 * np.int32(np.int32(bits).view(np.float32) > cell_edge[cell]) - STRADDLE
    return s


# Element codes of the histogram pass (|Δ| bits are ≥ 0, so negative codes are free): a bit-identical
# element, and |Δ| = 0 without bit identity (±0, or an fp16 and bf16 upcast of the same value).
CODE_IDENTICAL = np.int32(_ref.CODE_IDENTICAL)
CODE_ZERO = np.int32(_ref.CODE_ZERO)
STRADDLE = np.int32(_ref.STRADDLE)
_FM = {"reassoc", "contract", "nsz", "arcp"}  # float sums may be reordered (vector lanes); no NaN/inf shortcut


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def loop(bs, ts, tol32, cell_slot, cell_edge, width, counts, rows, cols, acc, mx_bits, mask, unit_axis, unit_of, units):
    """Every statistic of a [R, C] pair, row by row, in three loops over the row (each simple enough
    for LLVM to vectorize the first two; measured 2-3x faster than one loop doing everything):

    A. (vector) Δ in float32, changed at τ (row and column counts, the mask), ‖θ⁰‖², and per
       element a code (|Δ|'s bits, or CODE_IDENTICAL / CODE_ZERO) and its stratum·width + changed;
    B. (vector) ‖Δ‖² and max |Δ| over the finite nonzero Δ;
    C. (scalar) one update of ``counts[stratum, slot]``: the slot is ``cell_slot`` of the code's top
       16 bits (2 · the cell's bucket, or a special slot); in the few cells that hold a grid edge
       (flagged STRADDLE) plus 2 when |Δ| lies above it (``cell_edge``). Every count but the
       row/column ones is a sum over that table (kernels.diff_stats.diff_stats_cpu).
       With ``units`` (None otherwise: numba prunes it at compile time, as the mask; any test of
       it in the compiled loop cost tensors without heads 10-30%) and ``unit_axis`` 1 (rows) or 2
       (columns), C also adds 1 to ``units[block, unit_of[row or column], slot]``: the |Δ|
       histogram of each attention head."""
    R, C = bs.shape
    nb = counts.shape[0]
    for blk in numba.prange(nb):
        h = counts[blk]
        cl = cols[blk]
        code = np.empty(C, np.int32)
        base = np.empty(C, np.int32)
        ssd = 0.0
        ssb = 0.0
        mx = np.int32(0)
        for r in range(blk * R // nb, (blk + 1) * R // nb):
            nr = 0
            for c in range(C):  # A
                x = bs[r, c]
                y = ts[r, c]
                bv = _value(x)
                d = np.float32(abs(_value(y) - bv))
                same = _raw(x) == _raw(y)
                ch = (not same) & (not d <= tol32)
                cl[c] += ch
                nr += ch
                if mask is not None:
                    mask[r, c] = ch
                ssb += np.float64(bv) * np.float64(bv)
                bits = _bits32(d)
                bits = CODE_ZERO if bits == 0 else bits
                code[c] = CODE_IDENTICAL if same else bits
                base[c] = ((_bits32(bv) >> 23) & 0xFF) * width + np.int32(ch)
            rows[r] = nr
            for c in range(C):  # B
                bits = code[c]
                fb = bits if (bits > 0) & (bits < 0x7F800000) else np.int32(0)
                df = np.float64(np.int32(fb).view(np.float32))
                ssd += df * df
                mx = max(mx, fb)
            if units is None:  # pruned at compile time
                for c in range(C):  # C
                    h[base[c] + _slot(code[c], cell_slot, cell_edge)] += 1
            elif unit_axis == 1:
                hu = units[blk, unit_of[r]]
                for c in range(C):
                    s = _slot(code[c], cell_slot, cell_edge)
                    h[base[c] + s] += 1
                    hu[s] += 1
            else:
                hb = units[blk]
                for c in range(C):
                    s = _slot(code[c], cell_slot, cell_edge)
                    h[base[c] + s] += 1
                    hb[unit_of[c], s] += 1
        acc[blk, 0] += ssd
        acc[blk, 1] += ssb
        mx_bits[blk] = max(mx_bits[blk], mx)


@numba.njit(parallel=True, nogil=True, cache=True)
def overlap_loop(bs, ts, tol32, hist):
    """One pass over a base [R, C] and N fine-tunes of it (a tuple of [R, C] arrays of the base's
    storage): each element adds 1 to ``hist[block, e, code]``, e the IEEE exponent field of the
    base value as float32, bit k of ``code`` set when fine-tune k changed it at τ (the diff loop's
    rule: not bit-identical and not |Δ| ≤ τ, NaN and ±inf changed). Per row: a vectorized loop
    for the strata, one per fine-tune OR-ing its bit into the codes, one table update per element."""
    R, C = bs.shape
    nb = hist.shape[0]
    N = len(ts)
    for blk in numba.prange(nb):
        h = hist[blk].reshape(-1)
        key = np.empty(C, np.int32)
        for r in range(blk * R // nb, (blk + 1) * R // nb):
            for c in range(C):
                key[c] = ((_bits32(_value(bs[r, c])) >> 23) & 0xFF) << N
            for k in range(N):
                t = ts[k]
                for c in range(C):
                    x = bs[r, c]
                    y = t[r, c]
                    d = np.float32(abs(_value(y) - _value(x)))
                    key[c] |= np.int32((_raw(x) != _raw(y)) & (not d <= tol32)) << k
            for c in range(C):
                h[key[c]] += 1


@numba.njit(parallel=True, nogil=True, cache=True)
def vector_loop(bs, ts, tol32, dots, b2, agree, both):
    """The runs as vectors over the same base [R, C] and N fine-tunes (``overlap_loop``'s storage): per
    block of rows, in float64 over the elements finite in the base and every fine-tune, Δ_k = θ_k − θ⁰,
    ``dots[block, a, b]`` += Δ_a Δ_b, ``b2[block]`` += θ⁰², and, among the elements both a and b changed
    at τ (``overlap_loop``'s rule), ``both[block, a, b]`` += 1 and ``agree[block, a, b]`` += 1 where
    sign Δ_a = sign Δ_b. Row by row in branch-free loops over the columns (they vectorize): Δ with
    non-finite elements zeroed, and per run a code 0 (unchanged or not finite), 1 (changed, Δ < 0) or
    2 (changed, Δ > 0)."""
    R, C = bs.shape
    nb = dots.shape[0]
    N = len(ts)
    for blk in numba.prange(nb):
        d = np.empty((N, C), np.float64)
        code = np.empty((N, C), np.int8)
        fin = np.empty(C, np.bool_)
        xv = np.empty(C, np.float64)
        for r in range(blk * R // nb, (blk + 1) * R // nb):
            for c in range(C):
                v = np.float64(_value(bs[r, c]))
                xv[c] = v
                fin[c] = np.isfinite(v)
            for k in range(N):
                t = ts[k]
                for c in range(C):
                    y = np.float64(_value(t[r, c]))
                    fin[c] &= np.isfinite(y)
                    d[k, c] = y - xv[c]
            s2 = 0.0
            for c in range(C):
                s2 += xv[c] * xv[c] if fin[c] else 0.0
            b2[blk] += s2
            for k in range(N):
                t = ts[k]
                for c in range(C):
                    x = bs[r, c]
                    y = t[r, c]
                    dk = d[k, c] if fin[c] else 0.0
                    d[k, c] = dk
                    chg = fin[c] & (_raw(x) != _raw(y)) & (not np.float32(abs(dk)) <= tol32)
                    code[k, c] = np.int8(chg) * (np.int8(1) + np.int8(dk > 0))
            for a in range(N):
                for b in range(a, N):
                    sd = 0.0
                    nboth = 0
                    nagree = 0
                    for c in range(C):
                        sd += d[a, c] * d[b, c]
                        ca = code[a, c]
                        cb = code[b, c]
                        nboth += (ca != 0) & (cb != 0)
                        nagree += (ca != 0) & (ca == cb)
                    dots[blk, a, b] += sd
                    both[blk, a, b] += nboth
                    agree[blk, a, b] += nagree
