"""The geometry of an update (analysis/sparsity/geometry.py) against hand-built cases, the randomized top-k
against a full SVD, α on a known spectrum, the principal selector, and the ``geometry`` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.__main__ import main
from analysis.errors import SubnetscopeError
from analysis.sparsity.geometry import (geometry, matrix_geometry, power_law_alpha, principal_angles, resolve_k,
                                        spectrum_top_k)


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _matrix(m=40, n=30, seed=0):
    """W₀ = U diag(σ) Vᵀ with distinct σ = 10, 9, … (well separated) and its factors."""
    u, v = _orthonormal(m, seed)[:, :n], _orthonormal(n, seed + 1)
    s = torch.linspace(10, 1, n, dtype=torch.float64)
    return (u * s) @ v.T, u, s, v


def test_resolve_k():
    assert resolve_k(None, 576) == 6 and resolve_k(None, 30) == 1  # 1% of the rank, at least 1
    assert resolve_k(0.1, 30) == 3 and resolve_k(8, 30) == 8 and resolve_k(100, 30) == 30
    for bad in (0, -1, 0.0, float("nan"), 2.5, True):
        with pytest.raises(SubnetscopeError, match="k must be"):
            resolve_k(bad, 30)
    from analysis.sparsity.geometry import parse_k

    assert (parse_k(""), parse_k("1%"), parse_k("8"), parse_k("0.05"), parse_k("5%")) == (None, None, 8, 0.05, 0.05)
    for bad in ("abc", "1.5", "-3", "0%"):
        with pytest.raises(SubnetscopeError, match="k "):
            parse_k(bad)


def test_identical_matrices():
    w, *_ = _matrix()
    g = matrix_geometry(w, w.clone(), k=3, dtype=torch.float64)
    assert g.spectral_drift == 0 and g.top_k_drift == 0 and g.changed == 0
    assert g.angle_u_max == pytest.approx(0, abs=1e-5) and g.angle_v_max == pytest.approx(0, abs=1e-5)
    assert g.alignment is None and g.principal_o1 is None and g.random_o1 is None  # no update: undefined
    assert g.alignment_random == 9 / (40 * 30)


def test_rank_one_update_inside_and_outside_the_principal_subspace():
    w, u, s, v = _matrix()
    inside = w + 1e-2 * torch.outer(u[:, 0], v[:, 0])  # along the top singular pair
    outside = w + 1e-2 * torch.outer(u[:, -1], v[:, -1])  # along the smallest
    assert matrix_geometry(w, inside, k=1, dtype=torch.float64).alignment == pytest.approx(1, abs=1e-9)
    assert matrix_geometry(w, outside, k=1, dtype=torch.float64).alignment == pytest.approx(0, abs=1e-9)
    # inside k = 2 as well; a mixed update splits by its squared norm (3² : 4²)
    mixed = w + 1e-2 * (3 * torch.outer(u[:, 0], v[:, 0]) + 4 * torch.outer(u[:, -1], v[:, -1]))
    assert matrix_geometry(w, mixed, k=1, dtype=torch.float64).alignment == pytest.approx(9 / 25, abs=1e-9)


@pytest.mark.parametrize("theta", [5.0, 30.0])
def test_rotation_by_a_known_angle(theta):
    """W₁ = R W₀ with R a rotation by θ in the plane of u₁ and a direction outside the column space:
    U's leading direction turns by θ, V's does not move, the spectrum is unchanged."""
    m, n = 40, 30
    w, u, s, v = _matrix(m, n)
    full = _orthonormal(m, 0)  # its first n columns are u; column n is orthogonal to every uᵢ
    a, b = full[:, 0], full[:, n]
    t = math.radians(theta)
    r = torch.eye(m, dtype=torch.float64) + (math.cos(t) - 1) * (torch.outer(a, a) + torch.outer(b, b)) \
        + math.sin(t) * (torch.outer(b, a) - torch.outer(a, b))
    g = matrix_geometry(w, r @ w, k=1, dtype=torch.float64)
    assert g.angle_u_max == pytest.approx(theta, abs=1e-6)
    assert g.angle_v_max == pytest.approx(0, abs=1e-5)
    assert g.spectral_drift == pytest.approx(0, abs=1e-12)


def test_principal_angles_of_known_subspaces():
    e = torch.eye(4, dtype=torch.float64)
    t = math.radians(40)
    b = torch.stack([e[0], math.cos(t) * e[1] + math.sin(t) * e[2]], 1)
    assert principal_angles(e[:, :2], b).tolist() == pytest.approx([0, 40], abs=1e-9)


def test_spectral_drift_by_hand():
    w, u, s, v = _matrix()
    s1 = s.clone()
    s1[0] *= 1.1  # only σ₁ moves, by 10%: drift = 0.1 σ₁ / ‖σ‖
    g = matrix_geometry(w, (u * s1) @ v.T, k=1, dtype=torch.float64)
    assert g.spectral_drift == pytest.approx(0.1 * 10 / float(torch.linalg.vector_norm(s)), rel=1e-9)
    assert g.top_k_drift == pytest.approx(0.1, rel=1e-9)


def test_principal_and_smallest_weight_overlap():
    """An update written exactly on the c principal weights gives principal o1 = Jaccard = 1; one on
    the c smallest |W₀| gives smallest o1 = 1; random is the density."""
    w, u, s, v = _matrix()
    approx = (u[:, :1] * s[:1]) @ v[:, :1].T
    c = 60
    top = torch.topk(approx.abs().reshape(-1), c).indices
    w1 = w.clone().reshape(-1)
    w1[top] += 0.5
    g = matrix_geometry(w, w1.reshape(w.shape), k=1, dtype=torch.float64)
    assert (g.changed, g.principal_o1, g.principal_jaccard) == (c, 1.0, 1.0)
    assert g.random_o1 == pytest.approx(c / w.numel())
    small = torch.topk(-w.abs().reshape(-1), c).indices
    w2 = w.clone().reshape(-1)
    w2[small] += 0.5
    g2 = matrix_geometry(w, w2.reshape(w.shape), k=1, dtype=torch.float64)
    assert g2.smallest_o1 == 1.0 and g2.principal_o1 < 0.2


def test_randomized_top_k_against_a_full_svd(monkeypatch):
    """Beyond FULL_SVD_MAX the top-k comes from torch.svd_lowrank: its σ within the stated error of
    the exact ones, and its subspaces within the angle the stated residual bounds (sin θ ≤ residual ·
    σ₁ / gap); on a noisy spectrum without a gap, the stated error still covers the σ error."""
    import analysis.sparsity.geometry as geo

    monkeypatch.setattr(geo, "FULL_SVD_MAX", 50)
    u, v = _orthonormal(300, 7)[:, :200], _orthonormal(200, 8)
    s = torch.cat([torch.tensor([10.0, 9, 8, 7, 6], dtype=torch.float64), torch.logspace(0, -2, 195).double()])
    w = (u * s) @ v.T
    sigma, uk, sk, vk, err = spectrum_top_k(w, 5)
    assert torch.allclose(sigma, s) and err < 1e-8  # the spectrum itself is always exact
    bound = math.degrees(math.asin(min(1.0, err * 10 / (6 - 1))))
    assert float(principal_angles(uk, u[:, :5]).max()) <= bound + 1e-4  # arccos near 1: ~1e-6° of rounding
    assert float(principal_angles(vk, v[:, :5]).max()) <= bound + 1e-4  # arccos near 1: ~1e-6° of rounding
    g = torch.Generator().manual_seed(5)
    noisy = (torch.randn(300, 200, generator=g) * torch.logspace(0, -2, 200)).double()
    sigma, _, sk, _, err = spectrum_top_k(noisy, 5)
    assert 0 < err < 0.1 and float((sk - sigma[:5]).abs().max() / sigma[0]) <= err


def test_alpha_on_a_known_power_law_spectrum():
    """Eigenvalues at the quantiles of a Pareto law with density ∝ λ^-α: WeightWatcher's fit finds α."""
    for alpha in (2.5, 4.0):
        q = (np.arange(2000) + 0.5) / 2000
        ev = (1 - q) ** (-1 / (alpha - 1))
        assert power_law_alpha(np.sqrt(ev)) == pytest.approx(alpha, abs=0.1)
    assert power_law_alpha(np.array([1.0, 0.0, 2.0])) is None  # too few eigenvalues


def _pair(tmp_path):
    from conftest import tiny_llama

    m = tiny_llama()
    base = {n: p.detach().clone().contiguous() for n, p in m.state_dict().items()}
    tuned = {n: t.clone() for n, t in base.items()}
    g = torch.Generator().manual_seed(1)
    for n, t in tuned.items():
        if t.dim() == 2 and ".layers." in n:
            t += 1e-3 * torch.randn(t.shape, generator=g) * (torch.rand(t.shape, generator=g) < 0.2)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")


def test_geometry_of_a_checkpoint_pair_and_the_cli(tmp_path, capsys):
    base, tuned = _pair(tmp_path)
    r = geometry(base, tuned, k=2)
    assert len(r.matrices) == 14  # 2 blocks × q, k, v, o, gate, up, down
    for g in r.matrices:
        assert 0.1 < g.changed / math.prod(g.shape) < 0.3  # ~20% of each matrix moved
        assert 0 <= g.alignment <= 1 and g.svd_error == 0 and g.k == 2
    assert {x["kind"] for x in r.kinds()} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert [x["layer"] for x in r.layers()] == [0, 1]
    out = tmp_path / "g.json"
    assert main(["geometry", base, tuned, "--k", "2", "--json", str(out), "--quiet", "--spectra"]) == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "subnetscope.geometry/1" and len(d["tensors"]) == 14
    first = d["tensors"][0]
    assert first["alignment"] == pytest.approx(r.matrices[0].alignment) and len(first["sigma_base"]) == 64
    assert "wrote" in capsys.readouterr().out
    assert main(["geometry", base, tuned, "--k", "0", "--json", str(out), "--quiet"]) == 2  # one line, no usage
    assert capsys.readouterr().err.startswith("error: --k: k must be")
    assert main(["geometry", base, tuned, "--json", base, "--quiet"]) == 2  # never overwrites an input
    assert main(["geometry", base, str(tmp_path / "missing"), "--json", str(out), "--quiet"]) == 2
    if not torch.cuda.is_available():
        assert main(["geometry", base, tuned, "--device", "cuda", "--json", str(out), "--quiet"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    from analysis.sparsity.geometry import matrix_detail

    m = matrix_detail(base, tuned, "layers.1.mlp.up_proj.weight", k=2)
    assert len(m["sigma_base"]) == 64 and len(m["angles_u"]) == 2 and max(m["angles_u"]) == pytest.approx(
        r.matrices[12].angle_u_max, abs=1e-3)
    with pytest.raises(SubnetscopeError, match="not a matrix present in both"):
        matrix_detail(base, tuned, "layers.1.mlp.nope.weight")


def test_principal_selector_formula():
    from analysis.importance.selectors import get_selector
    from conftest import tiny_llama

    m = tiny_llama()
    s = get_selector("principal").fn(m, None, k=3)
    w = dict(m.named_parameters())["model.layers.1.mlp.down_proj.weight"].detach().double()
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    want = ((u[:, :3] * sv[:3]) @ vh[:3]).abs().float()
    assert torch.allclose(s.values["model.layers.1.mlp.down_proj.weight"], want, atol=1e-5)
    assert "model.embed_tokens.weight" in s.info["unscored"] and len(s.values) == 14


def test_non_finite_matrices_are_refused_before_any_svd(monkeypatch, tmp_path):
    """No SVD ever sees NaN / ±inf (LAPACK fails on them, or returns a spectrum of garbage): the full
    and the randomized paths of spectrum_top_k, matrix_geometry, matrix_detail and the principal
    selector all say which matrix holds what."""
    import analysis.sparsity.geometry as geo
    from analysis.sparsity.geometry import NonFiniteMatrix, matrix_detail, nonfinite_reason
    from analysis.importance.selectors import get_selector
    from analysis.importance.selectors.base import SelectorError
    from conftest import tiny_llama

    w, *_ = _matrix()
    bad = w.clone()
    bad[1, 2], bad[3, 4] = math.nan, -math.inf

    def no_svd(*a, **k):
        raise AssertionError("an SVD of a non-finite matrix")

    with monkeypatch.context() as mp:
        for f in ("svd", "svdvals"):
            mp.setattr(torch.linalg, f, no_svd)
        mp.setattr(torch, "svd_lowrank", no_svd)
        for full_max in (1024, 10):  # the exact and the randomized path
            mp.setattr(geo, "FULL_SVD_MAX", full_max)
            with pytest.raises(NonFiniteMatrix,
                               match=r"^matrix holds 2 non-finite elements \(1 nan, 1 -inf\): no SVD$"):
                spectrum_top_k(bad, 3)
            with pytest.raises(NonFiniteMatrix) as e:
                matrix_geometry(w, bad, k=3, name="m")
            assert (str(e.value), e.value.counts) == ("m: tuned holds 2 non-finite elements (1 nan, 1 -inf)",
                                                      {"base": 0, "tuned": 2, "delta": 2})
    huge = w.clone()
    huge[0, 0] = 1e300  # finite in float64, beyond float32: the SVD dtype decides
    assert nonfinite_reason(huge.float(), "base", huge) == "base holds 1 element beyond the float32 range of the SVDs"
    assert matrix_geometry(huge, huge, k=1, dtype=torch.float64).changed == 0
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] = math.inf
    with pytest.raises(SelectorError, match=r"^principal: model\.layers\.1\.mlp\.down_proj\.weight: matrix holds 1 "
                                            r"non-finite element \(inf\): no SVD$"):
        get_selector("principal").fn(m, None, k=3)
    m.save_pretrained(tmp_path / "bad")
    tiny_llama().save_pretrained(tmp_path / "good")
    with pytest.raises(NonFiniteMatrix, match=r"^layers\.1\.mlp\.down_proj\.weight: tuned holds 1 non-finite "
                                              r"element \(inf\)$"):
        matrix_detail(tmp_path / "good", tmp_path / "bad", "layers.1.mlp.down_proj.weight")


def test_quantities_that_are_not_one_number_are_none_with_the_reason():
    """A top-k subspace is unique only when σₖ > σₖ₊₁: the angles (and, for the base, the alignment)
    are None with the reason otherwise; the principal weights need a unique rank-k approximation,
    which a base of rank < k still has; ΔW = 0 leaves the alignment undefined."""
    u, v = _orthonormal(8, 0)[:, :6], _orthonormal(6, 1)
    w0 = (u * torch.tensor([3.0, 2, 2, 1, 0.5, 0.25], dtype=torch.float64)) @ v.T  # σ₂ = σ₃
    w1 = w0 + 1e-3 * torch.outer(u[:, 0], v[:, 0])
    g = matrix_geometry(w0, w1, k=2, dtype=torch.float64)
    why = "the base's top-2 singular subspace is not unique (σ2 = 2, σ3 = 2)"
    assert g.angle_u_max is None and g.angle_v_mean is None and g.alignment is None and g.principal_o1 is None
    assert g.undefined["alignment"] == why  # the base's alone; the angles need the tuned's too
    assert g.undefined["angle_u_max"] == why + "; the tuned's top-2 singular subspace is not unique (σ2 = 2, σ3 = 2)"
    assert g.undefined["principal_o1"] == "the base's best rank-2 approximation is not unique (σ2 = 2, σ3 = 2)"
    one = matrix_geometry(w0, w1, k=1, dtype=torch.float64)  # σ₁ > σ₂: all defined
    assert one.undefined == {} and one.alignment == pytest.approx(1, abs=1e-9)
    rank1 = 4 * torch.outer(u[:, 0], v[:, 0])  # rank 1 < k = 2: no unique subspace, a unique approximation (W₀)
    g = matrix_geometry(rank1, rank1 + 1e-3 * torch.outer(u[:, 1], v[:, 1]), k=2, dtype=torch.float64)
    assert g.angle_u_max is None and g.undefined["angle_u_max"].startswith(
        "the base's top-2 singular subspace is not unique (σ2 = 0, σ3 = 0)")
    assert "tuned's top-2 singular subspace is not unique" not in g.undefined["angle_u_max"]  # σ₂ = 1e-3 > σ₃ = 0
    assert g.principal_o1 is not None and "principal_o1" not in g.undefined
    same = matrix_geometry(w0, w0.clone(), k=1, dtype=torch.float64)
    assert same.undefined == {"alignment": "ΔW = 0", **{f: "no element changed at τ = 1e-05" for f in (
        "principal_o1", "principal_jaccard", "smallest_o1", "smallest_jaccard", "random_o1", "random_jaccard")}}
