"""The fused CPU loop of kernels.diff_stats, in numba (imported lazily: numba costs ~0.5 s to import).

One pass over a [R, C] pair of stored tensors: bf16 is read as its uint16 bits and widened by a
shift (no upcast copy), fp32 is read in place. Threads take blocks of rows, each with private
histograms and accumulators. Torch ops would need ~6 passes over memory and a temporary per
pass for the same statistics; this loop makes one.
"""

import numba
import numpy as np
from numba import types
from numba.extending import overload


def _value(x):  # stored element -> float32 value
    raise NotImplementedError


def _raw(x):  # stored element -> integer bits (for the bit-identity test)
    raise NotImplementedError


@overload(_value, inline="always")
def _value_impl(x):
    if x == types.uint16:
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    if x == types.float32:
        return lambda x: x


@overload(_raw, inline="always")
def _raw_impl(x):
    if x == types.uint16:
        return lambda x: x
    if x == types.float32:
        return lambda x: np.float32(x).view(np.int32)


@numba.njit(inline="always")
def _bits32(x):
    return np.float32(x).view(np.int32)


@numba.njit(parallel=True, nogil=True, cache=True)
def loop(bs, ts, tol32, edges32, lut, hist, rows, cols, exp_total, exp_changed, acc):
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
            rows[r] = nr
        acc[blk, 0] += identical
        acc[blk, 1] += zero
        acc[blk, 2] += nonfinite
        acc[blk, 3] += ssd
        acc[blk, 4] += ssb
        acc[blk, 5] = max(acc[blk, 5], mx)

