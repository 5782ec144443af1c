"""Geometry and trajectory: a NaN or ±inf in one block matrix — base,
tuned or both, or a ΔW that overflows float32 — skips that matrix with the reason in the JSON and
on stdout before any SVD sees it (the rest measured as without it, the means without it); every
matrix non-finite, or a bad ``--k``, is one line. A matrix of zeros gives None with its reason for
what it leaves undefined. A trajectory given out of training order, with steps that disagree with
its names, a checkpoint twice or none is one line, never renumbered; one checkpoint is a trajectory.

Checkpoints: ``tiny_llama()`` (seed 0) with one weight edited in place, saved by save_pretrained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from fault_corpus import Case, params, run_case

Q0 = "layers.0.self_attn.q_proj.weight"
O1 = "layers.1.self_attn.o_proj.weight"


def _save(tmp: Path, name: str, edit=None, **kw) -> Path:
    """tiny_llama(**kw) with ``edit(model)`` applied in place under no_grad, saved at tmp/name."""
    m = tiny_llama(**kw)
    if edit is not None:
        with torch.no_grad():
            edit(m)
    m.save_pretrained(tmp / name)
    return tmp / name


def _update(m) -> None:
    """A small fine-tune: 300 elements of every layer-0 up_proj moved by 1e-2."""
    m.model.layers[0].mlp.up_proj.weight.view(-1)[:300] += 1e-2


def _set(*cells, update: bool = False):
    """edit: q_proj of layer 0 gets ``value`` at each ((row, col), value), after the update if asked."""
    def edit(m):
        if update:
            _update(m)
        for (i, j), v in cells:
            m.model.layers[0].self_attn.q_proj.weight[i, j] = v
    return edit


def _pair(base_edit=None, tuned_edit=_update):
    def setup(tmp):
        b = _save(tmp, "base", base_edit)
        t = _save(tmp, "tuned", tuned_edit)
        return ["geometry", b, t, "--quiet", "--json", tmp / "g.json"]
    return setup


def _skipped(reason: str, nonfinite: dict):
    """check: q of layer 0 is skipped with ``reason`` and its counts, left out of every mean (the q
    row is the other q matrix's own numbers), the 13 others measured as in a clean pair."""
    def check(tmp, out, err):
        from analysis.sparsity.geometry import geometry

        d = json.loads((tmp / "g.json").read_text())
        assert d["skipped"] == [{"name": Q0, "layer": 0, "kind": "q", "reason": reason, "nonfinite": nonfinite}]
        assert d["skipped_matrices"] == 1 and len(d["tensors"]) == 13 and Q0 not in {t["name"] for t in d["tensors"]}
        q = next(r for r in d["kinds"] if r["kind"] == "q")
        q1 = next(t for t in d["tensors"] if t["name"] == "layers.1.self_attn.q_proj.weight")
        assert (q["matrices"], q["skipped"], q["angle_u_max"], q["alpha_base"]) == (
            1, 1, q1["angle_u_max"], q1["alpha_base"])
        assert [(r["layer"], r["matrices"], r["skipped"]) for r in d["layers"]] == [(0, 6, 1), (1, 7, 0)]
        assert f"skipped {Q0}: {reason}" in out and "13 block matrices (1 skipped, left out of every mean)" in out
        # the pair without its bad elements: every other matrix's numbers are the same, bit for bit
        clean = geometry(_save(tmp, "base_clean"), _save(tmp, "tuned_clean", _update)).to_json()["tensors"]
        clean = {t["name"]: t for t in clean}
        for t in d["tensors"]:
            assert t == clean[t["name"]], t["name"]
    return check


def _none_written(tmp, out, err):
    assert not (tmp / "g.json").exists() and not list(tmp.glob("*.tmp*"))


def _all_nan(m):
    for layer in m.model.layers:
        for lin in (*[getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
                    *[getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
            lin.weight[1, 2] = math.nan


def _zero_o1(m):
    m.model.layers[1].self_attn.o_proj.weight.zero_()


def _zero_o1_tuned(m):
    _zero_o1(m)
    m.model.layers[1].self_attn.o_proj.weight[:4] = 1e-2  # 256 elements written on a matrix of zeros


def _check_zero(tmp, out, err):
    d = json.loads((tmp / "g.json").read_text())
    t = next(t for t in d["tensors"] if t["name"] == O1)
    assert t["changed"] == 256 and t["random_o1"] == 256 / (64 * 64) and d["skipped"] == []
    assert None is t["spectral_drift"] is t["angle_u_max"] is t["angle_v_mean"] is t["alignment"] \
        is t["principal_o1"] is t["smallest_o1"] is t["alpha_base"]
    assert t["undefined"]["spectral_drift"] == "the base is all zeros"
    assert t["undefined"]["angle_u_max"] == "the base is all zeros: it has no top-1 singular subspace"
    assert t["undefined"]["alignment"] == "the base is all zeros: it has no top-1 singular subspace"
    assert t["undefined"]["principal_o1"] == t["undefined"]["smallest_o1"] == (
        "the base is all zeros: every weight ties at 0, principal and smallest alike")
    o = next(r for r in d["kinds"] if r["kind"] == "o")
    o0 = next(t for t in d["tensors"] if t["name"] == "layers.0.self_attn.o_proj.weight")
    assert (o["matrices"], o["angle_u_max"], o["changed"]) == (2, o0["angle_u_max"], 256)  # the mean of the one defined


def _k(value: str, says: str) -> Case:
    def setup(tmp):
        return [*_pair()(tmp)[:3], "--k", value, "--quiet", "--json", tmp / "g.json"]
    return Case(f"geometry-k-{value.replace('%', 'pct').replace('-', 'minus')}", setup, says=("--k", says),
                check=_none_written)


# ---------------------------------------------------------------- trajectory
def _run(tmp: Path, *steps: int, parent: str = "run") -> list[Path]:
    """step-N checkpoints of one run: step N moves N/10 elements of layer-0 up_proj by 1e-2."""
    out = []
    for n in steps:
        def edit(m, n=n):
            m.model.layers[0].mlp.up_proj.weight.view(-1)[: n // 10] += 1e-2
        out.append(_save(tmp / parent, f"step-{n}", edit))
    return out


def _traj(*argv_of):
    def setup(tmp):
        b = _save(tmp, "base")
        return ["trajectory", b, *argv_of[0](tmp, b), "--quiet", "--json", tmp / "t.json"]
    return setup


def _no_t_json(tmp, out, err):
    assert not (tmp / "t.json").exists()


def _check_one_checkpoint(tmp, out, err):
    d = json.loads((tmp / "t.json").read_text())
    [c] = d["checkpoints"]
    assert (c["step"], c["vs_base"]["changed"], c["vs_previous"], c["cumulative_changed"], c["first_changed"],
            c["returned_to_base"]) == (10, 1, c["vs_base"], 1, 1, 0)
    assert c["overlap_with_final"] == {"o1": 1.0, "o2": 1.0, "jaccard": 1.0, "intersection": 1}
    assert d["first_changed_histogram"] == {"steps": [10], "counts": [1], "never": d["total_params"] - 1}


def _mismatch(tmp, b):
    [s10] = _run(tmp, 10)

    def edit(m):
        m.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(90, 64))
    return [s10, _save(tmp / "run", "step-20", edit)]


def _other_arch(tmp, b):
    from transformers import LlamaConfig, LlamaForCausalLM

    [s10] = _run(tmp, 10)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "run" / "step-20")
    return [s10, tmp / "run" / "step-20"]


def _check_resized(tmp, out, err):
    d = json.loads((tmp / "t.json").read_text())
    assert [(r["key"], r["compared_rows"]) for r in d["resized"]] == [("embed_tokens.weight", 50),
                                                                      ("lm_head.weight", 50)]
    assert [c["step"] for c in d["checkpoints"]] == [10, 20]


CASES = [
    # item 4: one NaN in a q_proj (a fine-tune keeps it: base and tuned)
    Case("geometry-nan-in-both", _pair(_set(((0, 0), math.nan)), _set(((0, 0), math.nan), update=True)), rc=0,
         check=_skipped("base holds 1 non-finite element (nan); tuned holds 1 non-finite element (nan)",
                        {"base": 1, "tuned": 1, "delta": 1})),
    Case("geometry-nan-in-tuned", _pair(None, _set(((0, 0), math.nan), update=True)), rc=0,
         check=_skipped("tuned holds 1 non-finite element (nan)", {"base": 0, "tuned": 1, "delta": 1})),
    # item 9a: +inf in the base gave angles of 59°/85° from an SVD of a non-finite matrix
    Case("geometry-inf-in-base", _pair(_set(((3, 5), math.inf)), _update), rc=0,
         check=_skipped("base holds 1 non-finite element (inf)", {"base": 1, "tuned": 0, "delta": 1})),
    Case("geometry-minus-inf-in-tuned", _pair(None, _set(((0, 0), -math.inf), update=True)), rc=0,
         check=_skipped("tuned holds 1 non-finite element (-inf)", {"base": 0, "tuned": 1, "delta": 1})),
    Case("geometry-mixed-nonfinite", _pair(_set(((0, 0), math.nan), ((0, 1), math.nan), ((2, 2), -math.inf)),
                                           _update), rc=0,
         check=_skipped("base holds 3 non-finite elements (2 nan, 1 -inf)", {"base": 3, "tuned": 0, "delta": 3})),
    # two finite matrices whose difference is not: ΔW is checked too
    Case("geometry-delta-overflows", _pair(_set(((0, 0), 3e38)), _set(((0, 0), -3e38), update=True)), rc=0,
         check=_skipped("ΔW = tuned − base overflows float32 in 1 element", {"base": 0, "tuned": 0, "delta": 1})),
    Case("geometry-every-matrix-nonfinite", _pair(_all_nan, _update),
         says=("no block matrix of", "could be compared", f"{Q0}: base holds 1 non-finite element (nan)",
               "and 11 more"), check=_none_written),
    Case("geometry-zero-matrix", _pair(_zero_o1, _zero_o1_tuned), rc=0, check=_check_zero),
    _k("0", "k must be a count"),
    _k("-3", "k must be a count"),
    _k("1000%", "k must be a count ≥ 1 or a fraction in (0, 1), got '1000%'"),
    _k("nan", "k is a count (8), a fraction of the rank (0.05) or a percentage (1%), got 'nan'"),
    _k("0.0", "k must be a count"),
    # item 9b: names that carry steps are never renumbered
    Case("trajectory-out-of-order", _traj(lambda tmp, b: _run(tmp, 30, 10, 20)),
         says=("not in training order: their names give steps 30, 10, 20; list them as 10, 20, 30",),
         check=_no_t_json),
    Case("trajectory-steps-disagree-with-names", _traj(lambda tmp, b: [*_run(tmp, 10, 20, 30), "--steps", "1,2,3"]),
         says=("steps 1,2,3 given, but the checkpoints' names say 10,20,30",), check=_no_t_json),
    Case("trajectory-steps-not-numbers", _traj(lambda tmp, b: [*_run(tmp, 10), "--steps", "10,x"]),
         says=("--steps: whole numbers separated by commas, got '10,x'",), check=_no_t_json),
    Case("trajectory-duplicate-checkpoint", _traj(lambda tmp, b: _run(tmp, 10) * 2),
         says=("step-10: given twice, as checkpoint 1 and as checkpoint 2",), check=_no_t_json),
    Case("trajectory-base-as-checkpoint", _traj(lambda tmp, b: [b, *_run(tmp, 10)]),
         says=("base: given twice, as the base and as checkpoint 1",), check=_no_t_json),
    Case("trajectory-two-checkpoints-one-step",
         _traj(lambda tmp, b: [*_run(tmp, 10, parent="a"), *_run(tmp, 10, parent="b")]),
         says=("both name step 10",), check=_no_t_json),
    Case("trajectory-no-checkpoint", _traj(lambda tmp, b: []),
         says=("trajectory needs at least one checkpoint after the base",), check=_no_t_json),
    Case("trajectory-one-checkpoint", _traj(lambda tmp, b: _run(tmp, 10)), rc=0, says=("wrote",),
         check=_check_one_checkpoint),
    Case("trajectory-mismatching-shapes", _traj(_mismatch),
         says=("step-20/config.json: does not match the weights", "[90, 64]"), check=_no_t_json),
    Case("trajectory-other-architecture", _traj(_other_arch),
         says=("step-20: different architecture", "intermediate_size 80 vs 96"), check=_no_t_json),
    Case("trajectory-resized-vocabulary",
         _traj(lambda tmp, b: [*_run(tmp, 10), _save(tmp / "run", "step-20", vocab=60)]), rc=0,
         says=("resized embed_tokens.weight 50×64 / 50×64 / 60×64: compared on the 50 shared rows",),
         check=_check_resized),
]


@pytest.mark.parametrize("case", params(CASES))
def test_fault(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
