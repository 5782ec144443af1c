"""Exact counts of the diff on crafted checkpoints with changes planted at known positions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analysis.__main__ import main
from analysis.sparsity.diff import diff_checkpoints
from analysis.sparsity.masks import load_mask
from conftest import tiny_llama

N = 68_160  # parameters of the tiny Llama
Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]: 4 heads × 16 rows
K = "model.layers.1.self_attn.k_proj.weight"  # [32, 64]: 2 kv heads × 16 rows
O_PROJ = "model.layers.1.self_attn.o_proj.weight"  # [64, 64]: 4 heads × 16 columns
UP = "model.layers.0.mlp.up_proj.weight"  # [96, 64]: 96 channels
EMB = "model.embed_tokens.weight"


def _base_sd(vocab=50):
    return {k: v.detach().clone().contiguous() for k, v in tiny_llama(vocab=vocab).state_dict().items()}


def _planted(sd):
    """Plants changes; returns the tuned state dict and the expected counts."""
    t = {k: v.clone() for k, v in sd.items()}
    # above τ=1e-5: 7 elements in head 2 of q (rows 32..47)
    for j in range(7):
        t[Q][33 + j, j] += 1e-3
    # below τ (5e-6): 5 elements in head 0 of q — changed at τ=0 and 1e-6, unchanged at 1e-5
    for j in range(5):
        t[Q][2, 10 + j] = sd[Q][2, 10 + j] + 5e-6
    # NaN: 2 elements in kv head 1 of k (rows 16..31): always changed
    t[K][20, 3] = float("nan")
    t[K][21, 4] = float("nan")
    # +inf in o column 17 (head 1): changed, nonfinite
    t[O_PROJ][5, 17] = float("inf")
    # base NaN, tuned the same NaN bits: bit-identical, unchanged
    sd[UP][0, 0] = float("nan")
    t[UP][0, 0] = sd[UP][0, 0].clone()
    # +0 -> -0: not bit-identical, |Δ| = 0: unchanged at every τ including 0
    sd[UP][1, 1] = 0.0
    t[UP][1, 1] = -0.0
    # 3 channels of up (rows 4, 5, 6) changed in 2 elements each by 0.25
    for c in (4, 5, 6):
        t[UP][c, :2] += 0.25
    # embedding row 3 fully changed by 5e-3 (64 elements)
    t[EMB][3] += 5e-3
    above = 7 + 2 + 1 + 6 + 64
    return t, {"above": above, "below": 5}


def _write_dir(d, sd, config_model):
    d.mkdir(parents=True)
    save_file(sd, d / "model.safetensors")
    config_model.config.to_json_file(d / "config.json")
    return d


@pytest.fixture
def planted(tmp_path):
    model = tiny_llama()
    sd = _base_sd()
    tuned, expect = _planted(sd)
    return _write_dir(tmp_path / "base", sd, model), _write_dir(tmp_path / "tuned", tuned, model), expect


def test_exact_counts_at_each_tolerance(planted):
    base, tuned, e = planted
    r = diff_checkpoints(base, tuned, tol=1e-5)
    assert r.total_params == N and r.skipped == []
    assert r.changed_params == e["above"]
    assert r.update_sparsity == (N - e["above"]) / N
    sweep = {s["tolerance"]: s["unchanged"] for s in r.sweep([0.0, 1e-6, 1e-5, 1e-4, 1e-2, 1.0])}
    assert sweep[0.0] == N - e["above"] - e["below"]
    assert sweep[1e-6] == N - e["above"] - e["below"]
    assert sweep[1e-5] == N - e["above"]
    # 1e-3 changes of q are float32(x + 1e-3) - x ≈ 1e-3 ± ulp: above 1e-4, and ≤ 1e-2 with the embedding row
    assert sweep[1e-4] == N - e["above"]
    assert sweep[1e-2] == N - 3 - 6  # NaN, NaN, inf and the six 0.25 changes remain
    assert sweep[1.0] == N - 3
    assert diff_checkpoints(base, tuned, tol=0).changed_params == e["above"] + e["below"]
    assert diff_checkpoints(base, tuned, tol=0.5).changed_params == 3
    t = {x.name: x for x in r.tensors}
    assert t[Q].changed == 7 and t[K].changed == 2 and t[O_PROJ].changed == 1 and t[UP].changed == 6
    assert t[K].stats.nonfinite == 2 and t[O_PROJ].stats.nonfinite == 1
    assert t[UP].stats.identical == 96 * 64 - 6 - 1  # all but the 6 changes and the ±0 element
    assert t[UP].stats.zero == 1


def test_layers_kinds_heads_channels(planted):
    base, tuned, _ = planted
    r = diff_checkpoints(base, tuned, tol=1e-5)
    layers = {x["layer"]: x for x in r.by_layer()}
    assert layers[0]["changed"] == 7 + 6 and layers[1]["changed"] == 3
    n0 = layers[0]["numel"]
    assert n0 == 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64 + 2 * 64
    assert layers[0]["update_sparsity"] == (n0 - 13) / n0  # weighted by element count
    kinds = {x["kind"]: x["changed"] for x in r.by_kind()}
    assert kinds == {"embed": 64, "q": 7, "k": 2, "v": 0, "o": 1, "gate": 0, "up": 6, "down": 0,
                     "attn_norm": 0, "mlp_norm": 0, "final_norm": 0, "lm_head": 0}
    units = {(u["layer"], u["component"]): u for u in r.by_unit()}
    assert units[(0, "q")]["changed"] == [0, 0, 7, 0] and units[(0, "q")]["numel"] == 16 * 64
    assert units[(1, "k")]["changed"] == [0, 2] and units[(1, "k")]["unit"] == "kv_head"  # GQA: 2 kv heads
    assert units[(1, "o")]["changed"] == [0, 1, 0, 0]  # column 17 belongs to head 1
    assert units[(0, "up")]["changed"][3:8] == [0, 2, 2, 2, 0] and len(units[(0, "up")]["changed"]) == 96
    assert units[(0, "down")]["unit"] == "channel" and units[(0, "down")]["numel"] == 64


def test_sharded_prefixed_pair_and_resized_vocab(tmp_path):
    model = tiny_llama()
    sd = _base_sd()
    tuned, e = _planted(sd)
    base = tmp_path / "base-sharded"
    model.save_pretrained(base, max_shard_size="60KB")  # then overwrite the shards' values:
    from analysis.checkpoints import open_checkpoint
    ck = open_checkpoint(base)
    for f in ck.files:
        names = [n for n, t in ck.tensors.items() if t.file == str(f)]
        save_file({n: sd[n] for n in names}, f, metadata={"format": "pt"})
    # tuned: no "model." prefix, vocabulary grown to 53 rows (new rows random)
    big = {k.removeprefix("model."): v for k, v in tuned.items()}
    for k in ("embed_tokens.weight", "lm_head.weight"):
        big[k] = torch.cat([big[k], torch.randn(3, 64)])
    tdir = tmp_path / "tuned"
    tdir.mkdir()
    save_file(big, tdir / "model.safetensors")
    r = diff_checkpoints(base, tdir, tol=1e-5)
    assert r.total_params == N and r.changed_params == e["above"]
    assert {x["key"] for x in r.resized} == {"embed_tokens.weight", "lm_head.weight"}


def test_bf16_counts(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    t = {k: v.clone() for k, v in sd.items()}
    w = t[UP]
    bits = w.view(torch.int16)
    bits[7, :9] += 1  # one bf16 ulp up on 9 elements
    b, d = tmp_path / "b", tmp_path / "t"
    _write_dir(b, sd, model)
    _write_dir(d, t, model)
    r = diff_checkpoints(b, d, tol=0)
    assert r.changed_params == 9
    ulp_max = max(abs(float(t[UP][7, j].float() - sd[UP][7, j].float())) for j in range(9))
    assert diff_checkpoints(b, d, tol=ulp_max).changed_params == 0


def test_cli_diff_contract_and_mask(planted, tmp_path):
    base, tuned, e = planted
    out, mask = tmp_path / "d.json", tmp_path / "m.safetensors"
    assert main(["diff", str(base), str(tuned), "--tol", "1e-5", "--json", str(out), "--mask-out", str(mask),
                 "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "subnetscope.diff/1" and d["tolerance"] == 1e-5
    assert d["total_params"] == N and d["changed_params"] == e["above"]
    sweep = {s["tolerance"]: s["update_sparsity"] for s in d["tolerance_sweep"]}
    assert {0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4} <= set(sweep)
    assert sweep[0.0] == (N - e["above"] - e["below"]) / N
    q = next(t for t in d["tensors"] if t["name"] == Q)
    assert (q["shape"], q["numel"], q["changed"], q["layer"], q["kind"]) == ([64, 64], 4096, 7, 0, "q")
    assert sum(L["changed"] for L in d["layers"]) == e["above"] - 64  # the embedding is outside the layers
    assert d["skipped"] == []
    # all floating point: every element compared with the tolerance, none by exact bits
    assert d["by_compare"] == {"tolerance": {"tensors": 21, "numel": N, "changed": e["above"]},
                               "exact_bits": {"tensors": 0, "numel": 0, "changed": 0}}
    assert {t["compare"] for t in d["tensors"]} == {"tolerance"}
    assert {r["unchanged_exact_bits"] for r in d["tolerance_sweep"]} == {0}
    assert d["delta_histogram"]["numel"] == N
    m = load_mask(mask)
    assert sum(int(v.sum()) for v in m.values()) == e["above"]
    assert m[Q][33:40].sum() == 7 and bool(m[K][20, 3]) and not bool(m[UP][1, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cli_diff_norms_by_hand(tmp_path, dtype):
    """The JSON's base_fro = ‖θ⁰‖_F (over every element, unchanged ones included), delta_fro = ‖Δ‖_F
    and max_abs_delta on a tensor with hand-computable values; base_fro is None when θ⁰ holds a NaN."""
    model = tiny_llama()
    sd = {k: v.to(dtype) for k, v in _base_sd().items()}
    sd[Q] = torch.full((64, 64), 0.25, dtype=dtype)  # ‖θ⁰‖² = 4096 · 1/16 = 256
    tuned = {k: v.clone() for k, v in sd.items()}
    tuned[Q][0, 0] += 3.0  # Δ = 3 and 4: ‖Δ‖ = 5, max |Δ| = 4 (all exact in bf16)
    tuned[Q][63, 5] += 4.0
    sd[UP][7, 7] = float("nan")  # θ⁰ holds a NaN: ‖θ⁰‖ undefined
    tuned[UP][7, 7] = 1.0
    base, tdir = _write_dir(tmp_path / "base", sd, model), _write_dir(tmp_path / "tuned", tuned, model)
    out = tmp_path / "d.json"
    assert main(["diff", str(base), str(tdir), "--tol", "1e-5", "--json", str(out), "--quiet"]) == 0
    rows = {t["name"]: t for t in json.loads(out.read_text())["tensors"]}
    q = rows[Q]
    assert (q["base_fro"], q["delta_fro"], q["max_abs_delta"], q["changed"]) == (16.0, 5.0, 4.0, 2)
    assert rows[UP]["base_fro"] is None and rows[UP]["changed"] == 1
    emb = sd[EMB].double()
    assert rows[EMB]["base_fro"] == pytest.approx(float(emb.pow(2).sum().sqrt()), rel=1e-12)
    assert rows[EMB]["delta_fro"] == 0.0 and rows[EMB]["changed"] == 0


def test_mask_from_the_pass_is_the_definition(planted):
    """on_mask gets the mask of the statistics pass; it equals the one definition
    (kernels.diff_stats.changed_mask, re-exported as analysis.sparsity.diff.changed_mask) on every tensor."""
    from analysis.checkpoints import open_checkpoint
    from analysis.sparsity.diff import changed_mask
    from kernels.diff_stats import changed_mask as definition

    base, tuned, e = planted
    masks = {}
    r = diff_checkpoints(base, tuned, tol=1e-5, on_mask=masks.__setitem__)
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    for name, m in masks.items():
        want = definition(b.tensor(name), t.tensor(name), 1e-5)
        assert torch.equal(m, want) and torch.equal(changed_mask(b.tensor(name), t.tensor(name), 1e-5), want), name
    assert sum(int(m.sum()) for m in masks.values()) == e["above"]
    assert all(x.stats.mask is None for x in r.tensors)  # the result keeps statistics, not masks


def test_changed_mask_of_an_incomparable_pair_is_one_line():
    from analysis.sparsity.diff import changed_mask
    from analysis.errors import SubnetscopeError

    with pytest.raises(SubnetscopeError, match=r"^dtype int8 vs bfloat16: not compared"):
        changed_mask(torch.zeros(2, dtype=torch.int8), torch.zeros(2, dtype=torch.bfloat16), 1e-5)


def test_cli_diff_bad_tolerance(planted, capsys):
    base, tuned, _ = planted
    with pytest.raises(SystemExit) as ei:
        main(["diff", str(base), str(tuned), "--tol", "-1", "--json", "x.json"])
    assert ei.value.code == 2
    assert main(["diff", str(base), "/no/such/dir", "--json", "x.json", "--quiet"]) == 2
    assert "/no/such/dir: no such file or directory" in capsys.readouterr().err


def test_update_rank(tmp_path):
    """rank(ΔW) with torch.linalg.matrix_rank's default tolerance: a planted rank-2 update."""
    model = tiny_llama()
    sd = _base_sd()
    t = {k: v.clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 2, generator=g), torch.randn(2, 64, generator=g)
    t[Q] += 0.1 * (u @ v)
    b, d = _write_dir(tmp_path / "b", sd, model), _write_dir(tmp_path / "t", t, model)
    r = diff_checkpoints(b, d, tol=1e-5, rank=True)
    ranks = {x.name: x.rank for x in r.tensors}
    assert ranks[Q] == 2 and ranks[O_PROJ] == 0 and ranks[EMB] == 0
    assert ranks["model.norm.weight"] is None  # 1-D: no rank
    q = next(x for x in r.to_json()["tensors"] if x["name"] == Q)
    assert q["rank_fraction"] == 2 / 64


def test_every_grid_tolerance_from_one_pass(demo):
    """at_tolerance re-aggregates the JSON of one pass at τ = 1e-5 to any grid τ: headline, tensors,
    layers, kinds, layer × kind and every attention head equal a fresh diff at that τ exactly, in
    well under 100 ms; MLP channels stay at the pass τ."""
    import time

    from analysis.sparsity.diff import at_tolerance, tolerance_grid

    base, tuned = demo / "sft", demo / "rl-seed1"
    one = diff_checkpoints(base, tuned, tol=1e-5).to_json()
    assert one["by_tolerance"]["tolerances"] == tolerance_grid() and len(one["by_tolerance"]["tensors"]) == len(
        one["tensors"])
    moved = False
    for tol in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        t0 = time.perf_counter()
        got = at_tolerance(one, tol)
        took = time.perf_counter() - t0
        want = diff_checkpoints(base, tuned, tol=tol).to_json()
        assert took < 0.1, took
        for key in ("changed_params", "update_sparsity", "tensors", "layers", "kinds", "layer_kinds"):
            assert got[key] == want[key], (tol, key)
        heads = [(g, w, o) for g, w, o in zip(got["units"], want["units"], one["units"]) if g["unit"] != "channel"]
        assert heads and all(g == w for g, w, _ in heads), tol  # every head at τ, from the one pass
        moved |= any(g["changed"] != o["changed"] for g, _, o in heads)
        assert [u for u in got["units"] if u["unit"] == "channel"] == [
            u for u in one["units"] if u["unit"] == "channel"]  # channels keep the pass τ
        assert got["tolerance"] == tol and got["detail_tolerance"] == 1e-5
    assert moved  # the head counts do depend on τ here
    with pytest.raises(ValueError, match="not on the grid"):
        at_tolerance(one, 3e-5)
    old = {**one, "by_tolerance": {k: v for k, v in one["by_tolerance"].items() if k != "units"}}
    with pytest.raises(ValueError, match="no per-tolerance head counts .*rerun it"):  # written before heads per τ
        at_tolerance(old, 1e-4)
