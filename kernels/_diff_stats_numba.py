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


@numba.njit(parallel=True, nogil=True, cache=True)
def loop(bs, ts, tol32, edges32, lut, hist, rows, cols, exp_total, exp_changed, acc, mask):
    R, C = bs.shape
    nb = hist.shape[0]
    n_edges = edges32.shape[0]
    for blk in numba.prange(nb):
        h = hist[blk]
        et = exp_total[blk]
        ec = exp_changed[blk]
        cl = cols[blk]
        identical = 0
        zero = 0
        nonfinite = 0
        ssd = 0.0
        ssb = 0.0
        mx = np.float32(0)
        for r in range(blk * R // nb, (blk + 1) * R // nb):
            nr = 0
            for c in range(C):
                bv = _value(bs[r, c])
                tv = _value(ts[r, c])
                e = (_bits32(bv) >> 23) & 0xFF
                et[e] += 1
                ssb += np.float64(bv) * np.float64(bv)
                if _raw(bs[r, c]) == _raw(ts[r, c]):
                    identical += 1
                    continue
                d = np.float32(abs(tv - bv))
                if d == 0:
                    zero += 1
                    continue
                if d != d or d == np.inf:
                    nonfinite += 1
                else:
                    ssd += np.float64(d) * np.float64(d)
                    mx = max(mx, d)
                    k = lut[_bits32(d) >> 15]
                    if k < n_edges and d > edges32[k]:
                        k += 1
                    h[k] += 1
                    if d <= tol32:
                        continue
                ec[e] += 1
                cl[c] += 1
                nr += 1
                if mask is not None:
                    mask[r, c] = True
            rows[r] = nr
        acc[blk, 0] += identical
        acc[blk, 1] += zero
        acc[blk, 2] += nonfinite
        acc[blk, 3] += ssd
        acc[blk, 4] += ssb
        acc[blk, 5] = max(acc[blk, 5], mx)



@numba.njit(parallel=True, nogil=True, cache=True)
def overlap_loop(bs, ts, tol32, hist):
    """One pass over a base [R, C] and N fine-tunes of it (a tuple of [R, C] arrays of the base's
    storage): each element adds 1 to ``hist[block, e, code]``, e the IEEE exponent field of the
    base value as float32, bit k of ``code`` set when fine-tune k changed it at τ (the diff loop's
    rule: not bit-identical and not |Δ| ≤ τ, NaN and ±inf changed)."""
    R, C = bs.shape
    nb = hist.shape[0]
    N = len(ts)
    for blk in numba.prange(nb):
        h = hist[blk]
        for r in range(blk * R // nb, (blk + 1) * R // nb):
            for c in range(C):
                x = bs[r, c]
                bv = _value(x)
                e = (_bits32(bv) >> 23) & 0xFF
                code = 0
                for k in range(N):
                    y = ts[k][r, c]
                    if _raw(x) != _raw(y):
                        d = np.float32(abs(_value(y) - bv))
                        if not d <= tol32:
                            code |= 1 << k
                h[e, code] += 1
