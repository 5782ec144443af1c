"""The fused CPU loop against the torch reference, and the reference against hand counts;
every dtype class (tolerance, exact bits, not comparable), empty tensors and the mask."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from kernels.diff_stats import (EDGES, EDGES32, EXACT_BITS, N_BINS, TOLERANCE, Incomparable, changed_mask, comparison,
                                diff_stats, diff_stats_cpu, diff_stats_reference, dtype_class, f32_floor, merge_stats,
                                stats_by_units)

FIELDS = ("numel", "identical", "zero", "nonfinite", "changed", "compare")
IMPLS = (diff_stats_reference, diff_stats_cpu)


def _seed(*parts) -> int:
    """A seed stable across processes (hash() of a str is randomised per process)."""
    return zlib.crc32(repr(parts).encode())


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9)


def _pair(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g).to(dtype)
    t = b.clone()
    n = b.numel()
    flat = t.reshape(-1)
    pick = torch.rand(n, generator=g) < 0.6
    scale = 10 ** torch.empty(n).uniform_(-11, 0.5, generator=g)
    flat[pick] = (b.reshape(-1).float()[pick] + torch.randn(n, generator=g)[pick] * scale[pick]).to(dtype)
    if n > 4:
        flat[0] = float("nan")
        flat[1] = float("-inf")
        b.reshape(-1)[2] = 0.0
        flat[2] = -0.0
    return b, t


def _same(r, c):
    for f in FIELDS:
        assert getattr(r, f) == getattr(c, f), f
    assert np.array_equal(r.hist, c.hist)
    assert np.array_equal(r.exp_total, c.exp_total) and np.array_equal(r.exp_changed, c.exp_changed)
    if r.row_changed is None:
        assert c.row_changed is None
    else:
        assert np.array_equal(r.row_changed, c.row_changed) and np.array_equal(r.col_changed, c.col_changed)
    assert _same_float(c.sum_sq_delta, r.sum_sq_delta)
    assert _same_float(c.sum_sq_base, r.sum_sq_base), (c.sum_sq_base, r.sum_sq_base)
    assert _same_float(c.max_abs_delta, r.max_abs_delta)
    if r.mask is not None:
        assert c.mask is not None and torch.equal(r.mask.cpu(), c.mask.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (37, 129), (2, 3, 17), (1031,), (300, 4099)])
@pytest.mark.parametrize("tol", [0.0, 1e-5, 3.3e-4])
def test_cpu_loop_matches_reference(dtype, shape, tol):
    b, t = _pair(shape, dtype, seed=_seed(str(dtype), shape))
    _same(diff_stats_reference(b, t, tol), diff_stats_cpu(b, t, tol))


def test_seeds_are_stable():
    assert _seed("torch.bfloat16", (3, 5)) == 1028618254  # the same in every process


def test_chunking_rows_spanning_chunks(monkeypatch):
    import kernels.diff_stats as ds

    b, t = _pair((50, 33), torch.float32, seed=1)
    monkeypatch.setattr(ds, "CHUNK", 100)  # 3 rows a chunk
    _same(diff_stats_reference(b, t, 1e-5), diff_stats_cpu(b, t, 1e-5))


def test_hand_counted_example():
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, float("nan"), 5.0, 6.0])
    t = torch.tensor([1.0, 2.0 + 2**-20, 3.5, 4.0 + 2**-10, -0.0, float("nan"), float("nan"), 7.0])
    for fn in (diff_stats_reference, diff_stats_cpu):
        s = fn(b, t, 1e-5)
        # identical: 1.0 and the NaN with equal bits; zero: 0.0 -> -0.0
        assert (s.identical, s.zero, s.nonfinite) == (2, 1, 1)
        # changed at 1e-5: 3.5 (0.5), 4+2^-10 (~9.8e-4), NaN, 7 (1.0); 2^-20 ≈ 9.5e-7 is below
        assert s.changed == 4
        assert s.unchanged_at(0) == 3 and s.unchanged_at(1e-6) == 4 and s.unchanged_at(1.0) == 7
        assert s.max_abs_delta == 1.0
        assert s.sum_sq_delta == pytest.approx(2**-40 + 0.25 + 2**-20 + 1.0)
        assert s.exp_total[127] == 1 and s.exp_total[128] == 2  # 1.0 ; 2.0 and 3.0
        assert s.row_changed is None
        assert math.isnan(s.sum_sq_base)  # θ⁰ holds a NaN: ‖θ⁰‖² is NaN (the JSON's base_fro is None)
        assert s.compare == TOLERANCE


def test_sum_sq_base_by_hand():
    """‖θ⁰‖²_F (the JSON's base_fro²) over every element, identical ones included."""
    b = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]])
    t = b.clone()
    t[0, 0] = 1.5
    t[1, 2] = float("nan")  # (fp8 e4m3 has no inf: it would saturate to 448)
    want = 1 + 4 + 0.25 + 9 + 0 + 0.0625
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn):
        for fn in IMPLS:
            s = fn(b.to(dtype), t.to(dtype), 1e-5)
            assert s.sum_sq_base == want, (dtype, fn.__name__)
            assert s.sum_sq_delta == 0.25 and s.max_abs_delta == 0.5 and (s.changed, s.nonfinite) == (2, 1)

def test_edges_are_inclusive_upper_bounds():
    """|Δ| exactly equal to a grid edge falls in that edge's bin (unchanged at that τ)."""
    d = torch.from_numpy(EDGES32.copy())
    b = torch.zeros_like(d)
    for fn in (diff_stats_reference, diff_stats_cpu):
        s = fn(b, d, 1e-5)
        assert np.array_equal(s.hist, np.r_[np.ones(len(EDGES), np.int64), 0])
        k = int(np.searchsorted(EDGES, 1e-5))
        assert s.changed == len(EDGES) - 1 - k
        assert s.unchanged_at(1e-5) == k + 1  # edges 0..k are ≤ 1e-5
    assert N_BINS == len(EDGES) + 1


def test_bucket_tables_at_every_edge_and_cell_boundary():
    """The CPU pass finds |Δ|'s bucket from a 16-bit cell table (plus one comparison in the cells
    that hold a grid edge): exact at each
    grid edge and one float32 step either side, at every cell's lowest value and the value below it,
    for subnormal, huge, inf and NaN |Δ| — the histogram equals searchsorted over the edges."""
    from kernels.diff_stats.definition import (cell_tables)

    slot, edge = cell_tables()
    assert (slot >= (1 << 20)).sum() == len(EDGES32) and np.isfinite(edge).sum() == len(EDGES32)  # one cell an edge
    cells = (np.arange(0x7F80, dtype=np.int64) << 16).astype(np.uint32).view(np.float32)
    hi = (np.arange(1, 0x7F81, dtype=np.int64) << 16).astype(np.uint32).view(np.float32)
    assert max(((EDGES32 >= lo) & (EDGES32 < h)).sum() for lo, h in zip(cells, hi)) == 1  # ≤ 1 edge a cell
    up, down = np.nextafter(EDGES32, np.float32(np.inf)), np.nextafter(EDGES32, np.float32(0))
    d = np.concatenate([EDGES32, up, down, cells[1:], np.nextafter(cells[1:], np.float32(0)),
                        np.float32([1e-45, 1e-39, 3e38, np.inf, np.nan])]).astype(np.float32)
    s = diff_stats_cpu(torch.zeros(len(d)), torch.from_numpy(d), 1e-5)
    finite = d[np.isfinite(d) & (d > 0)]
    want = np.bincount(np.searchsorted(EDGES32, finite, side="left"), minlength=N_BINS)
    assert np.array_equal(s.hist, want) and s.nonfinite == 2 and s.zero == 0 and s.identical == 0
    assert s.max_abs_delta == float(finite.max())
    _same(diff_stats_reference(torch.zeros(len(d)), torch.from_numpy(d), 1e-5), s)


def test_f32_floor_is_exact():
    for x in (1e-5, 1e-8, 0.1, 3.3e-4, 1.0):
        y = f32_floor(x)
        assert float(y) <= x < float(np.nextafter(y, np.float32(np.inf)))


def spy_implementations(monkeypatch, *, triton: bool = False) -> list[str]:
    """Wraps every implementation so that each call that returns records which one ran:
    ``"loop"`` (the numba loop inside diff_stats_cpu), ``"reference"`` (plain torch: the public
    reference or the torch path the others hand special pairs to), and with ``triton`` also
    ``"triton"`` (the CUDA kernel's host function, as the dispatcher calls it).

    Returns:
        list[str]: filled as the spied functions run.
    """
    import importlib

    targets = [("kernels.diff_stats.numba_loop", "loop", "loop"),
               ("kernels.diff_stats", "diff_stats_reference", "reference"),
               ("kernels.diff_stats.reference", "_reference", "reference")]
    if triton:
        targets.append(("kernels.diff_stats.triton_kernel", "diff_stats_triton", "triton"))
    ran: list[str] = []
    for module_name, attr, label in targets:
        module = importlib.import_module(module_name)
        real = getattr(module, attr)

        def wrapper(*args, _real=real, _label=label, **kwargs):
            out = _real(*args, **kwargs)
            ran.append(_label)
            return out

        monkeypatch.setattr(module, attr, wrapper)
    return ran


def test_dispatch_on_cpu_uses_loop(monkeypatch):
    """On CPU with numba, diff_stats runs the fused loop, never the torch reference."""
    b, t = _pair((16, 16), torch.bfloat16, 3)
    want = diff_stats_reference(b, t, 1e-5)
    ran = spy_implementations(monkeypatch)
    got = diff_stats(b, t, 1e-5)
    assert set(ran) == {"loop"}, ran
    _same(want, got)


def test_dispatch_without_numba_uses_reference(monkeypatch):
    """Where numba does not import, diff_stats falls back to the torch reference (same answer)."""
    import kernels.diff_stats as ds

    def no_numba(*args, **kwargs):
        raise ImportError("No module named 'numba'")

    b, t = _pair((16, 16), torch.bfloat16, 3)
    want = diff_stats_reference(b, t, 1e-5)
    ran = spy_implementations(monkeypatch)
    monkeypatch.setattr(ds, "diff_stats_cpu", no_numba)
    got = diff_stats(b, t, 1e-5)
    assert set(ran) == {"reference"}, ran
    _same(want, got)


# ------------------------------------------------------------------ dtype classes

def test_dtype_classes():
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2):
        assert dtype_class(dt) == TOLERANCE
    for dt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.uint32,
               torch.float4_e2m1fn_x2):
        assert dtype_class(dt) == EXACT_BITS
    assert comparison(torch.bfloat16, torch.float32) == TOLERANCE  # a bf16 base, an fp32 fine-tune
    assert comparison(torch.int32, torch.int32) == EXACT_BITS


@pytest.mark.parametrize("a, b, match", [
    (torch.complex64, torch.complex64, "complex64: complex tensors are not compared"),
    (torch.int8, torch.bfloat16, "dtype int8 vs bfloat16: not compared .a quantized"),
    (torch.float16, torch.int8, "dtype float16 vs int8"),
    (torch.int8, torch.int32, "dtype int8 vs int32: not compared .different integer widths"),
    (torch.bool, torch.uint8, "dtype bool vs uint8"),
])
def test_incomparable_pairs_say_why(a, b, match):
    with pytest.raises(Incomparable, match=match):
        comparison(a, b)
    x, y = torch.zeros(3, dtype=a), torch.zeros(3, dtype=b)
    for fn in (*IMPLS, diff_stats, changed_mask):
        with pytest.raises(Incomparable, match=match):
            fn(x, y, 1e-5)


def test_int8_exact_bits_ignore_tolerance():
    """int8 (quantized) pairs: changed iff the stored bits differ, at every τ, however small the step."""
    g = torch.Generator().manual_seed(_seed("int8"))
    b = torch.randint(-128, 128, (12, 10), generator=g, dtype=torch.int8)
    t = b.clone()
    flips = [(0, 0), (0, 9), (3, 3), (5, 1), (5, 2), (11, 0), (11, 9)]  # 7 elements, steps of ±1 and more
    for k, (i, j) in enumerate(flips):
        t[i, j] = int(b[i, j]) + (1 if b[i, j] < 127 else -1) * (1 + k % 2)
    for fn in (*IMPLS, diff_stats):
        for tol in (0.0, 1e-5, 1.0, 1e3):
            s = fn(b, t, tol, with_mask=True)
            assert (s.compare, s.numel, s.changed, s.identical, s.zero, s.nonfinite) == (EXACT_BITS, 120, 7, 113, 0, 0)
            assert s.row_changed.tolist() == [2, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 2]
            assert s.col_changed.tolist() == [2, 1, 1, 1, 0, 0, 0, 0, 0, 2]
            assert [s.unchanged_at(x) for x in (0, 1e-8, 1e-5, 1.0)] == [113] * 4  # constant sweep
            assert s.hist.sum() == 0 and s.exp_total.sum() == 0  # no |Δ|, no exponent strata
            assert math.isnan(s.sum_sq_delta) and math.isnan(s.max_abs_delta)
            assert sorted(map(tuple, s.mask.nonzero().tolist())) == sorted(flips)
    assert torch.equal(changed_mask(b, t, 1.0), diff_stats_reference(b, t, 0, with_mask=True).mask)


def test_packed_int32_bool_and_uint_exact_bits():
    """GPTQ-style packed int32 words, bool masks, uint8 and float4 (no upcast in torch) by their bits."""
    q = torch.tensor([[0x12345678, -1], [0, 7]], dtype=torch.int32)
    q2 = q.clone()
    q2[0, 1] = 0x7FFFFFFF  # one word: 1 of 4 elements changed, whatever the nibbles
    bits = torch.tensor([True, False, True, True])
    u = torch.tensor([0, 255, 128], dtype=torch.uint8)
    f4 = torch.tensor([1, 2, 3], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    f4t = torch.tensor([1, 2, 4], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    for fn in (*IMPLS, diff_stats):
        assert fn(q, q2, 1e9).changed == 1
        assert fn(bits, ~bits, 0).changed == 4 and fn(bits, bits.clone(), 0).changed == 0
        assert fn(u, torch.tensor([0, 254, 128], dtype=torch.uint8), 1e-5).changed == 1
        s = fn(f4, f4t, 1.0)
        assert (s.compare, s.changed) == (EXACT_BITS, 1)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz, torch.float8_e8m0fnu])
def test_fp8_every_code_pair(dtype):
    """All 256 × 256 (base, tuned) code pairs: the CPU path agrees with the reference, NaN codes
    included (torch maps e5m2's six NaN codes to four float32 NaNs; the bits still count)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    b = codes.repeat_interleave(256).reshape(256, 256).view(dtype)
    t = codes.repeat(256).reshape(256, 256).view(dtype)
    for tol in (0.0, 1e-5, 0.3):
        r = diff_stats_reference(b, t, tol, with_mask=True)
        _same(r, diff_stats_cpu(b, t, tol, with_mask=True))
        assert r.identical == 256 and r.compare == TOLERANCE


def test_fp8_hand_counts():
    """fp8 takes the tolerance rule on the float32 upcast: e4m3's step at 1.0 is 0.125."""
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        b = torch.tensor([1.0, 1.0, 2.0, 0.0, -4.0, 0.5, 8.0]).to(dtype)
        t = torch.tensor([1.0, 1.25, 2.0, -0.0, -4.0, 0.75, 16.0]).to(dtype)
        for fn in (*IMPLS, diff_stats):
            assert fn(b, t, 1e-5).changed == 3  # 1 -> 1.25, 0.5 -> 0.75, 8 -> 16; ±0 is |Δ| = 0
            assert fn(b, t, 0.25).changed == 1  # only the step of 8
            s = fn(b, t, 0)
            assert (s.identical, s.zero, s.changed) == (3, 1, 3)
            assert s.unchanged_at(1e-5) == 4 and s.unchanged_at(1.0) == 6 and s.unchanged_at(10.0 ** 0) == 6


def test_fp16_every_code():
    """fp16 is read as bits and widened in the loop: every one of the 65,536 codes (subnormals,
    ±inf, NaN payloads) against the reference."""
    codes = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    b = codes.view(torch.float16)
    for shift in (1, 977, 32768):
        t = torch.roll(codes, shift).view(torch.float16)
        _same(diff_stats_reference(b, t, 1e-5, with_mask=True), diff_stats_cpu(b, t, 1e-5, with_mask=True))
    nan_a = torch.tensor([0x7E00, 0x7E01, 0x3C00], dtype=torch.int16).view(torch.float16)  # two NaN payloads, 1.0
    nan_b = torch.tensor([0x7E01, 0x7E01, 0x3C00], dtype=torch.int16).view(torch.float16)
    for fn in IMPLS:
        s = fn(nan_a, nan_b, 1e-5)
        assert (s.identical, s.nonfinite, s.changed) == (2, 1, 1)  # a NaN payload change is a change


def test_float64_compared_in_float64():
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    t = b + torch.tensor([1e-12, 0.0, 2e-5], dtype=torch.float64)  # 1e-12 vanishes in float32
    for fn in (*IMPLS, diff_stats):
        s = fn(b, t, 0)
        assert (s.identical, s.changed) == (1, 2)
        assert fn(b, t, 1e-10).changed == 1 and fn(b, t, 1e-5).changed == 1 and fn(b, t, 1e-4).changed == 0
        assert s.hist[0] == 1  # 1e-12 in (0, 1e-10]
    mixed = diff_stats_reference(b.float(), t, 0)  # float32 base, float64 fine-tune: compared in float64
    assert mixed.changed == 2


def test_mixed_float_dtypes():
    """A bf16 base and an fp32 fine-tune: bit-identity on the upcasts, same answer on every path."""
    b = torch.tensor([[1.0, 2.0, 3.0, 0.0]]).bfloat16()
    t = b.float().clone()
    t[0, 1] += 1e-6
    t[0, 2] += 1e-3
    t[0, 3] = -0.0
    for fn in (*IMPLS, diff_stats):
        s = fn(b, t, 1e-5)
        assert (s.identical, s.zero, s.changed) == (1, 1, 1)
        assert fn(b, t, 0).changed == 2


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8,
                                   torch.bool, torch.float64])
def test_empty_tensors_are_zero_counts(shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    for fn in (*IMPLS, diff_stats):
        s = fn(x, x.clone(), 1e-5, with_mask=True)
        assert (s.numel, s.changed, s.identical, s.unchanged_at(1e-5), int(s.hist.sum())) == (0, 0, 0, 0, 0)
        assert s.mask.shape == x.shape
        if len(shape) == 2:
            assert (len(s.row_changed), len(s.col_changed)) == shape and s.row_changed.sum() == 0
        else:
            assert s.row_changed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("shape", [(37, 129), (5000,), (2, 3, 17)])
def test_mask_from_the_same_pass(dtype, shape, monkeypatch):
    """with_mask gives the changed mask of the one pass; it equals the public changed_mask
    (the definition) on every path, also when fp8 is upcast in chunks that cut rows."""
    import kernels.diff_stats as ds

    monkeypatch.setattr(ds, "CHUNK", 1000)
    b, t = _pair(shape, dtype, seed=_seed("mask", str(dtype), shape))
    want = changed_mask(b, t, 1e-5)
    assert want.shape == b.shape and want.dtype == torch.bool
    for fn in (*IMPLS, diff_stats):
        s = fn(b, t, 1e-5, with_mask=True)
        assert torch.equal(s.mask, want) and int(want.sum()) == s.changed
        assert fn(b, t, 1e-5).mask is None


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merged_slices_equal_the_whole(axis, dtype):
    """Stats of consecutive slices (uneven, one empty) merge into exactly the whole tensor's, mask
    included; each slice's unchanged count at every grid τ is unchanged_at's."""
    b, t = _pair((37, 129), dtype, seed=_seed("merge", axis, str(dtype)))
    cuts = [0, 5, 5, 20, b.shape[axis]]
    parts = [diff_stats(b.narrow(axis, x, y - x), t.narrow(axis, x, y - x), 1e-5, with_mask=True)
             for x, y in zip(cuts, cuts[1:])]
    _same(diff_stats_reference(b, t, 1e-5, with_mask=True), merge_stats(parts, axis))
    grid = [0.0, *EDGES.tolist()]
    for p in parts:
        assert p.unchanged_grid().tolist() == [p.unchanged_at(g) for g in grid]
    assert len(set(parts[-1].unchanged_grid().tolist())) > 3  # the counts move along the grid


@pytest.mark.parametrize(("axis", "dtype"), [(0, torch.bfloat16), (1, torch.bfloat16), (0, torch.float16),
                                             (1, torch.float32), (0, torch.float64), (1, torch.float8_e4m3fn),
                                             (0, torch.int8)])
def test_unit_counts_every_path(axis, dtype, monkeypatch):
    """Per-unit unchanged counts at every grid τ: the reference (one bincount over the elements),
    the CPU loop (in its pass, fp8 chunks cutting units) and slicing + merge agree, and a unit's
    counts equal unchanged_at of that unit's slice measured alone; units may leave gaps."""
    import kernels.diff_stats as ds

    monkeypatch.setattr(ds, "CHUNK", 700)
    shape = (40, 96)
    if dtype == torch.int8:
        g = torch.Generator().manual_seed(3)
        b = torch.randint(-128, 127, shape, generator=g, dtype=torch.int8)
        t = torch.where(torch.rand(shape, generator=g) < 0.3, b + 1, b).to(torch.int8)
    else:
        b, t = _pair(shape, dtype, seed=_seed("units", axis, str(dtype)))
    units = (axis, [(0, 8), (8, 16), (20, 21), (30, shape[axis])])
    grid = [0.0, *EDGES.tolist()]
    ref = diff_stats_reference(b, t, 1e-5, units=units)
    want = np.array([[diff_stats_reference(b.narrow(axis, x, y - x), t.narrow(axis, x, y - x), 1e-5).unchanged_at(g)
                      for g in grid] for x, y in units[1]])
    assert np.array_equal(ref.unit_unchanged, want)
    if dtype != torch.int8:
        assert len(set(want[0].tolist())) > 3  # the counts move along the grid
    for st in (diff_stats_cpu(b, t, 1e-5, units=units, with_mask=True), diff_stats(b, t, 1e-5, units=units),
               stats_by_units(diff_stats_reference, b, t, 1e-5, False, units)):
        assert np.array_equal(st.unit_unchanged, want)
        _same(diff_stats_reference(b, t, 1e-5), st)  # the tensor's own statistics are unchanged by units
    with pytest.raises(ValueError, match="out of order"):
        diff_stats(b, t, 1e-5, units=(axis, [(8, 16), (0, 8)]))


# ------------------------------------------------------------------ overlap counts: CPU loop vs reference

def _runs_of(x: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """n fine-tunes of x: ~30% of elements moved by 1e-2 … 1e-8 (around τ = 1e-5), some NaN, ±inf,
    a -0.0 where the base has +0.0, and elements set back to the base's bits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    flat = x.reshape(-1)
    for k in range(n):
        y = flat.float().clone()
        m = torch.rand(flat.shape, generator=g) < 0.3
        step = torch.randn(int(m.sum()), generator=g) * 10.0 ** -torch.randint(2, 9, (int(m.sum()),), generator=g)
        y[m] += step
        y = y.to(x.dtype)
        y[k: k + 3] = float("nan")
        y[10 + k] = float("inf")
        y[20 + k] = -float("inf")
        zeros = (flat == 0).nonzero().reshape(-1)
        if len(zeros):
            y[zeros[:2]] = -0.0
        out.append(y.reshape(x.shape))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 97), (5000,), (3, 4, 50)])
@pytest.mark.parametrize("n_runs", [1, 2, 4])
def test_overlap_counts_loop_matches_reference(dtype, shape, n_runs):
    from kernels.diff_stats import overlap_counts, overlap_counts_reference

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    x.reshape(-1)[:4] = 0.0
    ys = _runs_of(x, n_runs, seed=n_runs)
    got = overlap_counts(x, ys, 1e-5)
    ref = overlap_counts_reference(x, ys, 1e-5)
    assert got.shape == (256, 1 << n_runs) and got.sum() == x.numel()
    assert np.array_equal(got, ref)
    # and the table says what the masks say: run k's changed count, the pairwise intersections
    masks = [changed_mask(x, y, 1e-5).reshape(-1) for y in ys]
    codes = np.arange(1 << n_runs)
    for k in range(n_runs):
        assert got[:, (codes >> k) & 1 == 1].sum() == int(masks[k].sum())
    if n_runs >= 2:
        both = ((codes & 1) == 1) & ((codes >> 1) & 1 == 1)
        assert got[:, both].sum() == int((masks[0] & masks[1]).sum())


def test_overlap_counts_fallbacks_agree():
    """fp8, mixed storage, integers and float64 go through the reference; the table is still exact."""
    from kernels.diff_stats import overlap_counts, overlap_counts_reference

    x = torch.randn(40, 33)
    cases = [(x.to(torch.float8_e4m3fn), [(x * 1.1).to(torch.float8_e4m3fn)] * 2),
             (x.double(), [x.double() + 1e-4, x.double()]),
             ((x * 100).to(torch.int32), [(x * 100).to(torch.int32) + 1, (x * 100).to(torch.int32)])]
    for base, ys in cases:
        got = overlap_counts(base, ys, 1e-5)
        assert np.array_equal(got, overlap_counts_reference(base, ys, 1e-5))
        assert got.sum() == base.numel()
    ints = overlap_counts(cases[2][0], cases[2][1], 1e-5)
    assert ints[0].sum() == x.numel()  # integer codes: one stratum


def test_numba_loops_keep_the_callers_torch_thread_count():
    """numba's OpenMP pool reset torch's thread count to the cores' number after a diff: a masked
    fine-tune that checked its mask trained later steps with other threads (last-bit differences)."""
    from kernels.diff_stats import diff_stats, overlap_counts

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(64, 96)
        b = a.clone()
        b[::3] += 1e-3
        assert diff_stats(a, b, 1e-5).changed == 22 * 96  # rows 0, 3, ..., 63
        overlap_counts(a, (b, b.clone()), 1e-5)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
