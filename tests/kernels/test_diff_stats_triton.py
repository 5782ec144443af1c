"""The fused Triton kernel against the torch reference: on CUDA when there is one, otherwise
on CPU under TRITON_INTERPRET=1 (small shapes: the interpreter is slow)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernel is defined

from kernels.diff_stats import diff_stats, diff_stats_reference  # noqa: E402
from kernels.diff_stats.triton_kernel import available, diff_stats_triton  # noqa: E402
from test_diff_stats import _pair, _same, spy_implementations  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
SHAPES = [(1,), (7,), (3, 5), (37, 129), (2, 3, 17), (1031,)] + ([(300, 4099), (4097, 1023)] if ON_CUDA else [])


def test_triton_is_installed():
    assert available()  # the Makefile installs triton (torch's CUDA wheel brings its own)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_kernel_matches_reference(dtype, shape, tol):
    b, t = _pair(shape, dtype, seed=len(shape) * 7 + shape[0])
    _same(diff_stats_reference(b, t, tol), diff_stats_triton(b.to(DEVICE), t.to(DEVICE), tol, block=256))


def test_blocks_spanning_rows():
    b, t = _pair((19, 33), torch.bfloat16, seed=5)  # 627 elements: blocks of 128 cut rows
    _same(diff_stats_reference(b, t, 1e-5), diff_stats_triton(b.to(DEVICE), t.to(DEVICE), 1e-5, block=128))


def test_dispatch_by_device(monkeypatch):
    """diff_stats picks Triton for CUDA tensors and the CPU loop otherwise (which one ran is
    recorded, so a silent fall-back to the reference fails); both match the reference."""
    b, t = _pair((64, 65), torch.bfloat16, seed=9)
    want = diff_stats_reference(b, t, 1e-5)
    ran = spy_implementations(monkeypatch, triton=True)
    got = diff_stats(b.to(DEVICE), t.to(DEVICE), 1e-5)
    assert set(ran) == ({"triton"} if ON_CUDA else {"loop"}), ran
    _same(want, got)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA tensors")
def test_dispatch_on_cuda_without_triton_uses_reference(monkeypatch):
    import kernels.diff_stats.triton_kernel as tr

    b, t = _pair((64, 65), torch.bfloat16, seed=9)
    want = diff_stats_reference(b, t, 1e-5)
    ran = spy_implementations(monkeypatch, triton=True)
    monkeypatch.setattr(tr, "available", lambda: False)
    got = diff_stats(b.to(DEVICE), t.to(DEVICE), 1e-5)
    assert set(ran) == {"reference"}, ran
    _same(want, got)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_codes_and_mask(dtype):
    """fp8 is upcast through the table that keeps NaN codes distinct; the mask comes from the pass."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    g = torch.Generator().manual_seed(11)
    b = codes[torch.randint(0, 256, (64, 48), generator=g)].view(dtype)
    t = b.view(torch.uint8).clone()
    t[::3] = codes[torch.randint(0, 256, t[::3].shape, generator=g)]
    t = t.view(dtype)
    for tol in (0.0, 1e-5, 0.3):
        r = diff_stats_reference(b, t, tol, with_mask=True)
        _same(r, diff_stats_triton(b.to(DEVICE), t.to(DEVICE), tol, block=256, with_mask=True))
        assert 0 < r.changed < b.numel()


def test_mixed_dtypes_mask_exact_and_empty():
    b, t = _pair((19, 33), torch.bfloat16, seed=6)
    t = t.float()
    t[0, :5] = b[0, :5].float()  # equal values in another dtype: bit-identical upcasts
    _same(diff_stats_reference(b, t, 1e-5, with_mask=True),
          diff_stats_triton(b.to(DEVICE), t.to(DEVICE), 1e-5, block=128, with_mask=True))
    q = torch.arange(12, dtype=torch.int8).reshape(3, 4)
    s = diff_stats_triton(q.to(DEVICE), (q + (q == 5)).to(DEVICE), 1.0)
    assert (s.compare, s.changed, s.row_changed.tolist()) == ("exact_bits", 1, [0, 1, 0])
    e = diff_stats_triton(torch.zeros(0, 7, device=DEVICE), torch.zeros(0, 7, device=DEVICE), 1e-5, with_mask=True)
    assert (e.numel, len(e.col_changed), tuple(e.mask.shape)) == (0, 7, (0, 7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, n_runs", [((37, 29), 1), ((1031,), 3), ((5, 7, 11), 10)])
def test_overlap_kernel_matches_reference(dtype, shape, n_runs):
    """The Triton overlap table equals the torch reference, with NaN, ±0 and inf planted in every
    run (so bit-identity and the NaN rule are exercised); up to the 10 coded runs."""
    from kernels.diff_stats import overlap_counts_reference
    from kernels.diff_stats.triton_kernel import overlap_counts_triton
    from test_diff_stats import _runs_of

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    flat = x.reshape(-1)
    flat[:3] = torch.tensor([0.0, float("nan"), float("inf")]).to(dtype)
    ys = _runs_of(x, n_runs, seed=n_runs)
    for k, y in enumerate(ys):
        y.reshape(-1)[k % 3] = torch.tensor([-0.0, float("nan"), float("-inf")])[k % 3].to(dtype)
    got = overlap_counts_triton(x.to(DEVICE), [y.to(DEVICE) for y in ys], 1e-5, block=256)
    ref = overlap_counts_reference(x, ys, 1e-5)
    assert got.shape == (256, 1 << n_runs) and got.sum() == x.numel()
    assert np.array_equal(got, ref)


def test_overlap_dispatch_by_device():
    """overlap_counts takes the Triton kernel for CUDA tensors stored alike, the torch reference
    for mixed storage on CUDA, and the numba loop on CPU; all equal the reference."""
    import kernels.diff_stats as ds
    import kernels.diff_stats.triton_kernel as tr
    from test_diff_stats import _runs_of

    x = torch.randn(40, 33, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ys = _runs_of(x, 2, seed=2)
    ref = ds.overlap_counts_reference(x, ys, 1e-5)
    ran = []
    real = tr.overlap_counts_triton
    tr.overlap_counts_triton = lambda *a, **k: ran.append("triton") or real(*a, **k)
    try:
        got = ds.overlap_counts(x.to(DEVICE), [y.to(DEVICE) for y in ys], 1e-5)
    finally:
        tr.overlap_counts_triton = real
    assert ran == (["triton"] if ON_CUDA else []) and np.array_equal(got, ref)


@pytest.mark.parametrize("axis", [0, 1])
def test_units_by_slices_match_reference(axis):
    """On CUDA the heads' grid counts come from the kernel run head by head and merged exactly."""
    from kernels.diff_stats import stats_by_units

    b, t = _pair((24, 40), torch.bfloat16, seed=11 + axis)
    units = (axis, [(0, 4), (4, 8), (12, 20)])
    want = diff_stats_reference(b, t, 1e-5, units=units)
    got = stats_by_units(diff_stats_triton, b.to(DEVICE), t.to(DEVICE), 1e-5, True, units)  # column views too
    assert np.array_equal(got.unit_unchanged, want.unit_unchanged)
    _same(diff_stats_reference(b, t, 1e-5, with_mask=True), got)
