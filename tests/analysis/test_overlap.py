"""Overlap against a hand-computed example, the CLI contract, and masks (round trip, algebra)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analysis.__main__ import main
from analysis.sparsity.masks import MaskError, consensus, intersect, load_mask, save_mask, union
from analysis.sparsity.overlap import overlap

W = "model.layers.0.mlp.up_proj.weight"


def _runs(tmp_path):
    """100 elements: 50 of |θ⁰| = 1 (one exponent stratum), 50 of 0.001 (another)."""
    base = torch.cat([torch.ones(50), torch.full((50,), 0.001)]).reshape(10, 10)
    changed = {"A": [*range(0, 10), *range(50, 70)], "B": [*range(5, 15), *range(60, 80)], "C": [*range(0, 5)]}
    paths = {}
    save_file({W: base}, tmp_path / "base.safetensors")
    for run, idx in changed.items():
        t = base.clone().reshape(-1)
        t[idx] += torch.where(t[idx] > 0.5, 0.5, 0.01)
        save_file({W: t.reshape(10, 10)}, tmp_path / f"{run}.safetensors")
        paths[run] = str(tmp_path / f"{run}.safetensors")
    return str(tmp_path / "base.safetensors"), paths


def test_pair_hand_computed(tmp_path):
    base, p = _runs(tmp_path)
    r = overlap(base, [p["A"], p["B"]], tol=1e-5)
    (pair,) = r.pairs()
    # |I_A| = |I_B| = 30, |I_A ∩ I_B| = |{5..9} ∪ {60..69}| = 15
    assert (pair["changed_a"], pair["changed_b"], pair["intersection"]) == (30, 30, 15)
    assert pair["o1"] == pair["o2"] == 0.5
    assert pair["jaccard"] == pytest.approx(15 / 45)
    assert pair["sparsity_a"] == pytest.approx(0.7) and pair["o1_random"] == pytest.approx(0.3)
    assert pair["jaccard_random"] == pytest.approx(0.09 / 0.51)
    # matched: stratum |θ⁰|=1: 10·10/50 = 2; stratum 0.001: 20·20/50 = 8 -> 10 expected in common
    assert pair["o1_matched"] == pytest.approx(10 / 30) and pair["o2_matched"] == pytest.approx(10 / 30)
    assert r.layers[0].numel == 100 and r.kinds["up"].inter[0, 1] == 15
    assert pair["note"] is None  # every ratio defined
    assert r.to_json()["by_compare"] == {"tolerance": {"numel": 100}, "exact_bits": {"numel": 0}}


def test_consensus_three_runs_and_cli(tmp_path):
    base, p = _runs(tmp_path)
    out = tmp_path / "o.json"
    assert main(["overlap", base, p["A"], p["B"], p["C"], "--json", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["consensus"] == [55, 25, 20, 0]
    assert [(q["a"], q["b"]) for q in d["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    ac = d["pairs"][1]  # A vs C: C ⊂ A
    assert (ac["intersection"], ac["o1"], ac["o2"]) == (5, 5 / 30, 1.0)
    keys = {"a", "b", "sparsity_a", "sparsity_b", "o1", "o2", "o1_random", "o2_random", "o1_matched",
            "o2_matched", "jaccard", "jaccard_random", "note"}
    assert keys <= set(d["pairs"][0])


def test_overlap_needs_two_runs(tmp_path, capsys):
    base, p = _runs(tmp_path)
    assert main(["overlap", base, p["A"], "--json", str(tmp_path / "x.json")]) == 2
    assert "at least two" in capsys.readouterr().err


def test_mask_round_trip_and_algebra(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.rand(7, 13, generator=g) < 0.3, "b": torch.rand(5, generator=g) < 0.5}
    b = {"w": torch.rand(7, 13, generator=g) < 0.3, "b": torch.rand(5, generator=g) < 0.5}
    f = tmp_path / "a.safetensors"
    save_mask(f, a, source="test")
    back = load_mask(f)
    assert set(back) == {"w", "b"} and all(torch.equal(back[k], a[k]) for k in a)
    # packed bits are numpy.packbits, big-endian, row-major: check the first byte by hand
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        first = int(h.get_tensor("w")[0])
    bits = a["w"].reshape(-1)[:8].tolist()
    assert first == sum(int(v) << (7 - i) for i, v in enumerate(bits))
    assert torch.equal(intersect(a, b)["w"], a["w"] & b["w"])
    assert torch.equal(union(a, b)["w"], a["w"] | b["w"])
    c = {"w": torch.zeros(7, 13, dtype=torch.bool), "b": torch.ones(5, dtype=torch.bool)}
    two = consensus([a, b, c], 2)["w"]
    assert torch.equal(two, (a["w"].int() + b["w"].int() + c["w"].int()) >= 2)


def test_mask_errors(tmp_path):
    with pytest.raises(MaskError, match="no such mask file"):
        load_mask(tmp_path / "none.safetensors")
    save_file({"w": torch.zeros(3)}, tmp_path / "weights.safetensors")
    with pytest.raises(MaskError, match="not a Subnetscope mask"):
        load_mask(tmp_path / "weights.safetensors")
    with pytest.raises(MaskError, match="different tensors"):
        union({"w": torch.zeros(2, dtype=torch.bool)}, {"v": torch.zeros(2, dtype=torch.bool)})


def test_coded_and_pairwise_counts_agree(tmp_path, monkeypatch):
    """The fused per-code counts (up to MAX_CODED_RUNS runs) and the pair-by-pair masks (beyond)
    give the same overlap, every count and baseline."""
    import analysis.sparsity.overlap as ov

    base, p = _runs(tmp_path)
    coded = overlap(base, [p["A"], p["B"], p["C"]], tol=1e-5).to_json()
    monkeypatch.setattr(ov, "MAX_CODED_RUNS", 2)  # three runs: counted pair by pair
    pairwise = overlap(base, [p["A"], p["B"], p["C"]], tol=1e-5).to_json()
    assert coded["consensus"] == pairwise["consensus"] == [55, 25, 20, 0]
    for a, b in zip(coded["pairs"], pairwise["pairs"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k]) if isinstance(a[k], float) else a[k] == b[k], k
