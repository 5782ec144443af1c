"""Runs as vectors in the overlap's one pass: cosine, sign agreement and relative norms of crafted
updates against a float64 computation (zero, identical, opposite, orthogonal and random pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import analysis.sparsity.overlap as ov
from analysis.__main__ import main
from analysis.sparsity.overlap import overlap

UP, Q = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"


def _write(tmp_path, name, tensors):
    p = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, p)
    return str(p)


def _cos64(a, b):
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_crafted_pairs_against_float64(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {UP: torch.randn(8, 16, generator=g), Q: torch.randn(16, 16, generator=g)}
    d = torch.randn(8 * 16 + 16 * 16, generator=g) * 1e-2
    half = torch.zeros_like(d)
    half[: d.numel() // 2] = d[: d.numel() // 2]
    other = torch.zeros_like(d)
    other[d.numel() // 2:] = d[d.numel() // 2:]  # disjoint support: orthogonal to ``half``
    rnd = torch.randn(d.numel(), generator=g) * 1e-2
    updates = {"zero": torch.zeros_like(d), "same": d, "same2": d.clone(), "neg": -d, "half": half,
               "other": other, "rnd": rnd}

    def tune(u):
        a, b = u[: 8 * 16].reshape(8, 16), u[8 * 16:].reshape(16, 16)
        return {UP: base[UP] + a, Q: base[Q] + b}

    paths = {k: _write(tmp_path, k, tune(u)) for k, u in updates.items()}
    names = list(updates)
    r = overlap(_write(tmp_path, "base", base), [paths[k] for k in names], tol=0.0)
    j = r.to_json()
    # the deltas as stored: float32 sums, taken back in float64
    tuned64 = {k: np.concatenate([tune(u)[UP].double().numpy().ravel(), tune(u)[Q].double().numpy().ravel()])
               for k, u in updates.items()}
    b64 = np.concatenate([base[UP].double().numpy().ravel(), base[Q].double().numpy().ravel()])
    deltas = {k: v - b64 for k, v in tuned64.items()}
    by = {tuple(names[i] for i in p["runs"]): p for p in j["pairs"]}
    assert by["same", "same2"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert by["same", "same2"]["sign_agreement"] == 1.0
    assert by["same", "neg"]["cosine"] == pytest.approx(-1.0, abs=1e-12)
    assert by["same", "neg"]["sign_agreement"] == 0.0
    assert by["half", "other"]["cosine"] == 0.0
    assert by["half", "other"]["sign_agreement"] is None  # no element changed by both
    assert by["zero", "same"]["cosine"] is None and by["zero", "same"]["sign_agreement"] is None
    for (a, b), p in by.items():
        if a == "zero":
            continue
        assert p["cosine"] == pytest.approx(_cos64(deltas[a], deltas[b]), rel=1e-12, abs=1e-15)
        both = (deltas[a] != 0) & (deltas[b] != 0)
        if both.any():
            want = float((np.sign(deltas[a][both]) == np.sign(deltas[b][both])).mean())
            assert p["sign_agreement"] == want
        assert p["sign_agreement_random"] == 0.5
    # per layer: layer 0 is the up_proj part, layer 1 the q_proj part
    p = by["same", "rnd"]
    n0 = 8 * 16
    assert [q["layer"] for q in p["by_layer"]] == [0, 1]
    assert p["by_layer"][0]["cosine"] == pytest.approx(_cos64(deltas["same"][:n0], deltas["rnd"][:n0]), rel=1e-12)
    assert p["by_layer"][1]["cosine"] == pytest.approx(_cos64(deltas["same"][n0:], deltas["rnd"][n0:]), rel=1e-12)
    assert {q["kind"] for q in p["by_kind"]} == {"up", "q"}
    # relative norms per tensor and run
    rel = {n: q["relative"] for q in j["relative_norms"] for n in (UP, Q) if n.endswith(q["name"])}  # aligned keys
    k = names.index("rnd")
    assert rel[UP][k] == pytest.approx(np.linalg.norm(deltas["rnd"][:n0]) / np.linalg.norm(b64[:n0]), rel=1e-12)
    assert rel[Q][names.index("zero")] == 0.0


def test_blocks_agree_with_one_block_and_non_finite_elements_stay_out(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 33, generator=g)
    a, b = base + 1e-3 * torch.randn(64, 33, generator=g), base + 1e-3 * torch.randn(64, 33, generator=g)
    a[3, 4] = float("nan")
    paths = [_write(tmp_path, n, {UP: t}) for n, t in (("base", base), ("a", a), ("b", b))]
    whole = overlap(paths[0], paths[1:], tol=0.0).to_json()["pairs"][0]
    import kernels.diff_stats as ks

    monkeypatch.setattr(ks, "VECTOR_BLOCK", 100)  # the torch path in 22 blocks, the last one short
    monkeypatch.setattr(ov, "vector_sums", ks.vector_sums_reference)
    blocks = overlap(paths[0], paths[1:], tol=0.0).to_json()["pairs"][0]
    assert blocks["cosine"] == pytest.approx(whole["cosine"], rel=1e-12)
    assert blocks["sign_agreement"] == whole["sign_agreement"]
    keep = np.isfinite(a.numpy().ravel())
    da = (a.double().numpy().ravel() - base.double().numpy().ravel())[keep]
    db = (b.double().numpy().ravel() - base.double().numpy().ravel())[keep]
    assert whole["cosine"] == pytest.approx(_cos64(da, db), rel=1e-12)


def test_cli_json_has_the_vector_fields(tmp_path):
    base = torch.randn(4, 4)
    paths = [_write(tmp_path, "base", {UP: base}), _write(tmp_path, "a", {UP: base + 1}),
             _write(tmp_path, "b", {UP: base - 1})]
    out = tmp_path / "o.json"
    assert main(["overlap", *paths, "--json", str(out), "--quiet"]) == 0
    (p,) = json.loads(out.read_text())["pairs"]
    assert p["runs"] == [0, 1] and p["cosine"] == pytest.approx(-1.0) and p["sign_agreement"] == 0.0
    assert p["by_layer"] == [{"layer": 0, "cosine": pytest.approx(-1.0), "sign_agreement": 0.0,
                              "sign_agreement_random": 0.5}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_numba_loop_equals_the_torch_blocks(dtype):
    from kernels.diff_stats import vector_sums, vector_sums_reference

    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 129, generator=g)
    ys = [x + torch.randn(37, 129, generator=g) * s for s in (1e-3, 1e-2, 0.0)]
    ys[0][0, :5] = x[0, :5]  # unchanged elements
    ys[1][1, 1], x[2, 2], ys[0][3, 3] = float("inf"), float("nan"), float("-inf")
    x, ys = x.to(dtype), [y.to(dtype) for y in ys]
    fast, ref = vector_sums(x, ys, 1e-3), vector_sums_reference(x, ys, 1e-3)
    np.testing.assert_allclose(fast[0], ref[0], rtol=1e-12, atol=1e-300)
    assert fast[1] == pytest.approx(ref[1], rel=1e-12)
    np.testing.assert_array_equal(fast[2], ref[2])
    np.testing.assert_array_equal(fast[3], ref[3])
    assert ref[3][0, 0] > 0 and ref[3][2, 2] == 0  # the identical run changed nothing
