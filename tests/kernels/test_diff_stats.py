"""The fused CPU loop against the torch reference, and the reference against hand counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.diff_stats import EDGES, EDGES32, N_BINS, diff_stats, diff_stats_cpu, diff_stats_reference, f32_floor

FIELDS = ("numel", "identical", "zero", "nonfinite", "changed")


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
    assert c.sum_sq_delta == pytest.approx(r.sum_sq_delta, rel=1e-9)
    assert c.max_abs_delta == r.max_abs_delta


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (37, 129), (2, 3, 17), (1031,), (300, 4099)])
@pytest.mark.parametrize("tol", [0.0, 1e-5, 3.3e-4])
def test_cpu_loop_matches_reference(dtype, shape, tol):
    b, t = _pair(shape, dtype, seed=hash((str(dtype), shape)) % 1000)
    _same(diff_stats_reference(b, t, tol), diff_stats_cpu(b, t, tol))


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


def test_f32_floor_is_exact():
    for x in (1e-5, 1e-8, 0.1, 3.3e-4, 1.0):
        y = f32_floor(x)
        assert float(y) <= x < float(np.nextafter(y, np.float32(np.inf)))


def test_dispatch_on_cpu_uses_loop():
    b, t = _pair((16, 16), torch.bfloat16, 3)
    _same(diff_stats_reference(b, t, 1e-5), diff_stats(b, t, 1e-5))
