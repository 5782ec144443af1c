"""Every stored dtype has a defined answer, and "nothing compared" is a one-line error.

Crafted checkpoints with changes planted at known places: int8 and GPTQ-style packed int32
(exact bits, τ does not apply), fp8 (tolerance on the float32 upcast), bool / uint8, complex
(skipped with the reason), zero-size tensors, pairs with nothing comparable; the same through
overlap, predictive power, importance and the CLI (exit 2 and one line on stderr).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.__main__ import main
from analysis.sparsity.diff import PAPER_TOL, diff_checkpoints
from analysis.errors import SubnetscopeError
from analysis.sparsity.overlap import overlap
from conftest import ROOT, tiny_gpt2, tiny_llama

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def _save(path: Path, sd: dict) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return str(path)


def _pair(tmp_path, base: dict, tuned: dict) -> tuple[str, str]:
    return _save(tmp_path / "base.safetensors", base), _save(tmp_path / "tuned.safetensors", tuned)


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def _int8_pair():
    """int8 q (16 × 8) with 7 codes changed, some by a step of 1; float32 up (8 × 8) with three
    changes of 1e-3 and two of 1e-6."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-100, 100, (16, 8), generator=g, dtype=torch.int8)
    up = torch.randn(8, 8, generator=g)
    tq, tup = q.clone(), up.clone()
    for k in range(7):
        tq[2 * k, k] += 1 + k
    tup[0, :3] += 1e-3
    tup[5, :2] += 1e-6
    return {Q: q, UP: up}, {Q: tq, UP: tup}


# ------------------------------------------------------------------ diff: exact bits

def test_int8_changed_exactly_at_every_tolerance(tmp_path):
    b, t = _pair(tmp_path, *_int8_pair())
    for tol, float_changed in ((0.0, 5), (1e-5, 3), (1.0, 0), (1e3, 0)):
        r = diff_checkpoints(b, t, tol=tol)
        assert (r.total_params, r.changed_params) == (128 + 64, 7 + float_changed), tol
    r = diff_checkpoints(b, t, tol=1e-5)
    d = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert d["by_compare"] == {"tolerance": {"tensors": 1, "numel": 64, "changed": 3},
                               "exact_bits": {"tensors": 1, "numel": 128, "changed": 7}}
    rows = {x["name"]: x for x in d["tensors"]}
    assert (rows[Q]["compare"], rows[Q]["dtype"], rows[Q]["changed"]) == ("exact_bits", "int8", 7)
    assert rows[Q]["delta_fro"] is None and rows[Q]["base_fro"] is None and rows[Q]["max_abs_delta"] is None
    assert rows[UP]["compare"] == "tolerance" and rows[UP]["delta_fro"] > 0
    sweep = {s["tolerance"]: s for s in d["tolerance_sweep"]}
    assert {s["unchanged_exact_bits"] for s in sweep.values()} == {121}  # the int8 part never moves with τ
    assert sweep[0.0]["unchanged"] == 121 + 59 and sweep[1e-5]["unchanged"] == 121 + 61
    assert sweep[1.0]["unchanged"] == 121 + 64 and sweep[1.0]["update_sparsity"] == (192 - 7) / 192
    assert d["delta_histogram"]["numel"] == 64 and d["delta_histogram"]["identical"] == 59  # floats only
    (layer0,) = d["layers"]
    assert (layer0["numel"], layer0["changed"], layer0["exact_bits_numel"]) == (192, 10, 128)
    assert sum(a["numel"] for a in d["absorption"]) == 64  # exponent strata: float elements only


def test_int8_weights_in_a_model_leave_heads_out(tmp_path):
    """An int8 q_proj of a real layout: counted, but no head rows (quantized layouts need not map
    to heads); the float layers keep theirs."""
    model = tiny_llama()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd[Q] = (sd[Q] * 100).round().to(torch.int8)
    tuned = {k: v.clone() for k, v in sd.items()}
    tuned[Q][40, 0] += 1
    tuned["model.layers.1.self_attn.q_proj.weight"][40, 0] += 0.1
    for name, s in (("base", sd), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(s, tmp_path / name / "model.safetensors")
        model.config.to_json_file(tmp_path / name / "config.json")
    r = diff_checkpoints(tmp_path / "base", tmp_path / "tuned", tol=1e-5)
    assert r.changed_params == 2 and r.by_compare()["exact_bits"] == {"tensors": 1, "numel": 4096, "changed": 1}
    units = {(u["layer"], u["component"]): u["changed"] for u in r.by_unit()}
    assert (0, "q") not in units and units[(1, "q")] == [0, 0, 1, 0]


def test_gptq_packed_int32_and_fp16_scales(tmp_path):
    """GPTQ / AWQ layout: packed int32 qweight / qzeros / g_idx by their bits, fp16 scales by τ."""
    pre = "model.layers.0.self_attn.q_proj."
    g = torch.Generator().manual_seed(2)
    base = {pre + "qweight": torch.randint(-2**31, 2**31 - 1, (8, 64), generator=g, dtype=torch.int32),
            pre + "qzeros": torch.randint(-2**31, 2**31 - 1, (1, 8), generator=g, dtype=torch.int32),
            pre + "scales": torch.rand(1, 64, generator=g).half(),
            pre + "g_idx": torch.arange(64, dtype=torch.int32) // 8}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned[pre + "qweight"][0, :3] ^= 1 << 28  # three words, one nibble each
    tuned[pre + "qzeros"][0, 5] += 1
    tuned[pre + "scales"][0, :2] += 0.01
    b, t = _pair(tmp_path, base, tuned)
    r = diff_checkpoints(b, t, tol=1e-5)
    assert r.total_params == 512 + 8 + 64 + 64 and r.changed_params == 3 + 1 + 2
    assert diff_checkpoints(b, t, tol=1.0).changed_params == 4  # the packed words do not care about τ
    assert r.by_compare()["exact_bits"] == {"tensors": 3, "numel": 584, "changed": 4}
    assert {x.name.rsplit(".", 1)[1]: x.compare for x in r.tensors} == {
        "qweight": "exact_bits", "qzeros": "exact_bits", "scales": "tolerance", "g_idx": "exact_bits"}


def test_bool_and_uint8_tensors(tmp_path):
    flags = torch.tensor([True, False] * 5)
    u = torch.tensor([0, 1, 2, 254, 255], dtype=torch.uint8)
    tf, tu = flags.clone(), u.clone()
    tf[[0, 3, 4, 9]] = ~tf[[0, 3, 4, 9]]
    tu[[1, 4]] = torch.tensor([2, 0], dtype=torch.uint8)
    b, t = _pair(tmp_path, {"mask": flags, "codes": u}, {"mask": tf, "codes": tu})
    for tol in (0.0, 1e-5, 1.0):
        r = diff_checkpoints(b, t, tol=tol)
        assert (r.total_params, r.changed_params, r.skipped) == (15, 6, [])
    assert {x.name: x.changed for x in r.tensors} == {"mask": 4, "codes": 2}


# ------------------------------------------------------------------ diff: fp8

@pytest.mark.parametrize("dtype, step", [(torch.float8_e4m3fn, 0.125), (torch.float8_e5m2, 0.25)])
def test_fp8_tolerance_on_the_upcast(tmp_path, dtype, step):
    """fp8 takes the tolerance rule: one step at 1.0 (0.125 for e4m3, 0.25 for e5m2) is a change
    at the paper's τ and absorbed by a τ above the step; ±0 is |Δ| = 0; NaN is always changed."""
    base = torch.ones(4, 8).to(dtype)
    base.view(torch.uint8)[1, 0] = 0x00  # +0
    tuned = base.view(torch.uint8).clone()
    tuned.view(dtype)[0, :3] = torch.tensor([1.0 + step] * 3).to(dtype)
    tuned[1, 0] = 0x80  # -0
    tuned[2, 0] = 0x7F  # NaN in both formats
    b, t = _pair(tmp_path, {UP: base}, {UP: tuned.view(dtype)})
    r = diff_checkpoints(b, t, tol=PAPER_TOL)
    assert (r.total_params, r.changed_params) == (32, 4)
    (row,) = r.to_json()["tensors"]
    assert row["compare"] == "tolerance" and row["dtype"] == str(dtype).removeprefix("torch.")
    assert row["nonfinite"] == 1 and row["max_abs_delta"] == step
    assert diff_checkpoints(b, t, tol=0).changed_params == 4  # the ±0 element is unchanged at τ = 0
    assert diff_checkpoints(b, t, tol=step).changed_params == 1  # only the NaN
    sweep = {s["tolerance"]: s["unchanged"] for s in r.sweep([0.0, 1e-5, 0.1, 1.0])}
    assert sweep == {0.0: 28, 1e-5: 28, 0.1: 28 + (3 if step < 0.1 else 0), 1.0: 31}


# ------------------------------------------------------------------ diff: skipped, empty, nothing

def test_complex_and_mismatched_storage_are_skipped_with_the_reason(tmp_path):
    up = torch.zeros(2, 2)
    b, t = _pair(tmp_path, {"z": torch.zeros(3, dtype=torch.complex64), "w": torch.zeros(4, dtype=torch.int8), UP: up},
                 {"z": torch.ones(3, dtype=torch.complex64), "w": torch.zeros(4).bfloat16(), UP: up + 1})
    r = diff_checkpoints(b, t, tol=1e-5)
    assert (r.total_params, r.changed_params) == (4, 4)
    reasons = {s["name"]: s["reason"] for s in r.skipped}
    assert reasons["z"].startswith("complex64: complex tensors are not compared")
    assert reasons["w"].startswith("dtype int8 vs bfloat16: not compared")


def test_only_complex_is_nothing_to_compare(tmp_path, capsys):
    b, t = _pair(tmp_path, {"z": torch.zeros(3, dtype=torch.complex64)}, {"z": torch.ones(3, dtype=torch.complex64)})
    with pytest.raises(SubnetscopeError, match=r"^nothing to compare: .*1 skipped \(first: z: complex64"):
        diff_checkpoints(b, t)
    out = tmp_path / "d.json"
    assert main(["diff", b, t, "--json", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "nothing to compare", "complex64")
    assert not out.exists()


def test_all_zero_size_is_nothing_to_compare(tmp_path, capsys):
    sd = {Q: torch.zeros(0, 8), "model.norm.weight": torch.zeros(0), "ids": torch.zeros(0, dtype=torch.int64)}
    b, t = _pair(tmp_path, sd, sd)
    with pytest.raises(SubnetscopeError,
                       match=r"^nothing to compare: .* of 3 aligned tensor\(s\), 3 with no elements$"):
        diff_checkpoints(b, t)
    assert main(["diff", b, t, "--json", str(tmp_path / "d.json"), "--quiet"]) == 2
    _one_error_line(capsys, "nothing to compare")


def test_zero_size_tensors_count_zero(tmp_path):
    """Empty tensors next to real ones: 0 elements everywhere, no division by zero (sweep,
    aggregates, the unweighted layer mean, rank fraction, JSON)."""
    up = torch.zeros(4, 4)
    t_up = up.clone()
    t_up[0, :2] = 1.0
    b, t = _pair(tmp_path, {Q: torch.zeros(0, 8), UP: up, "model.norm.weight": torch.zeros(0)},
                 {Q: torch.zeros(0, 8), UP: t_up, "model.norm.weight": torch.zeros(0)})
    r = diff_checkpoints(b, t, tol=1e-5, rank=True)
    d = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert (d["total_params"], d["changed_params"]) == (16, 2)
    rows = {x["name"]: x for x in d["tensors"]}
    assert rows[Q]["numel"] == 0 and rows[Q]["update_sparsity"] is None
    assert rows[Q]["rank"] == 0 and rows[Q]["rank_fraction"] is None and rows[UP]["rank"] == 1
    (layer0,) = d["layers"]
    assert layer0["update_sparsity_unweighted"] == 1 - 2 / 16  # the empty q does not count as a tensor mean
    kinds = {k["kind"]: k for k in d["kinds"]}
    assert kinds["q"]["numel"] == 0 and kinds["q"]["update_sparsity"] is None
    assert kinds["q"]["update_sparsity_unweighted"] is None
    assert d["tolerance_sweep"][0]["unchanged"] == 14


def test_rank_of_a_non_finite_update_is_left_out(tmp_path):
    g = torch.Generator().manual_seed(3)
    up, q = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    tq = q.clone()
    tq[0, 0] = float("nan")
    b, t = _pair(tmp_path, {UP: up, Q: q}, {UP: up + 0.5, Q: tq})
    ranks = {x.name: x.rank for x in diff_checkpoints(b, t, rank=True).tensors}
    assert ranks == {UP: 1, Q: None}


# ------------------------------------------------------------------ diff: device

def test_device_is_checked_before_reading(tmp_path, capsys):
    missing = str(tmp_path / "nothing-here")  # never opened: the device fails first
    with pytest.raises(SubnetscopeError, match=r"^unknown device 'bogus' \(cpu or cuda\)$"):
        diff_checkpoints(missing, missing, device="bogus")
    with pytest.raises(SubnetscopeError, match=r"^unknown device 'mps' \(cpu or cuda\)$"):
        diff_checkpoints(missing, missing, device="mps")
    if torch.cuda.is_available():
        with pytest.raises(SubnetscopeError, match=r"^--device cuda:99: this machine has \d+ CUDA device"):
            diff_checkpoints(missing, missing, device="cuda:99")
    else:
        with pytest.raises(SubnetscopeError, match=r"^--device cuda: CUDA is not available on this machine$"):
            diff_checkpoints(missing, missing, device="cuda")
    b, t = _pair(tmp_path, *_int8_pair())
    out = tmp_path / "d.json"
    assert main(["diff", b, t, "--device", "bogus", "--json", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "unknown device 'bogus' (cpu or cuda)")
    assert not out.exists()


# ------------------------------------------------------------------ overlap

def _runs(tmp_path, base: torch.Tensor, changes: dict[str, list[int]], delta) -> tuple[str, dict]:
    paths = {"base": _save(tmp_path / "base.safetensors", {UP: base})}
    for run, idx in changes.items():
        t = base.clone().reshape(-1)
        t[idx] = delta(t[idx])
        paths[run] = _save(tmp_path / f"{run}.safetensors", {UP: t.reshape(base.shape)})
    return paths["base"], paths


def test_overlap_with_a_run_that_changed_nothing(tmp_path):
    base, p = _runs(tmp_path, torch.ones(10, 10), {"A": [1, 2, 3], "B": [], "C": []}, lambda x: x + 0.5)
    r = overlap(base, [p["A"], p["B"], p["C"]], tol=1e-5)
    d = json.loads(json.dumps(r.to_json(), allow_nan=False))
    ab, ac, bc = d["pairs"]
    assert (ab["changed_a"], ab["changed_b"], ab["intersection"]) == (3, 0, 0)
    assert ab["o1"] == 0.0 and ab["o2"] is None and ab["jaccard"] == 0.0 and ab["o2_matched"] is None
    assert ab["note"] == "run 1 changed nothing at τ = 1e-05: o2 = |I_a ∩ I_b| / |I_b| is undefined"
    assert ab["sparsity_b"] == 1.0 and ab["o1_random"] == 0.0
    assert bc["o1"] is None and bc["o2"] is None and bc["jaccard"] is None and bc["jaccard_random"] is None
    assert bc["note"].startswith("neither run 1 nor run 2 changed anything")
    assert d["consensus"] == [97, 3, 0, 0]


def test_overlap_of_int8_runs_by_exact_bits(tmp_path):
    """int8 runs: changed iff the codes differ (τ = 1 changes nothing); the tensor is one stratum,
    so the magnitude-matched baseline equals the random one."""
    base, p = _runs(tmp_path, torch.arange(100, dtype=torch.int8).reshape(10, 10),
                    {"A": list(range(0, 10)), "B": list(range(5, 15))}, lambda x: x + 1)
    r = overlap(base, [p["A"], p["B"]], tol=1.0)
    (pair,) = r.pairs()
    assert (pair["changed_a"], pair["changed_b"], pair["intersection"], pair["o1"]) == (10, 10, 5, 0.5)
    assert pair["o1_matched"] == pytest.approx(0.1) and pair["o1_random"] == pytest.approx(0.1)
    assert r.to_json()["by_compare"] == {"tolerance": {"numel": 0}, "exact_bits": {"numel": 100}}


def test_overlap_nothing_to_compare(tmp_path, capsys):
    z = {"z": torch.zeros(2, dtype=torch.complex64)}
    paths = [_save(tmp_path / f"{n}.safetensors", z) for n in ("base", "a", "b")]
    with pytest.raises(SubnetscopeError, match=r"^nothing to compare: .*first skipped: z: complex64"):
        overlap(paths[0], paths[1:])
    assert main(["overlap", *paths, "--json", str(tmp_path / "o.json"), "--quiet"]) == 2
    _one_error_line(capsys, "nothing to compare")


def test_overlap_group_without_elements(tmp_path):
    layer1 = "model.layers.1.mlp.up_proj.weight"
    sd = {UP: torch.ones(4, 4), layer1: torch.zeros(0, 4)}
    paths = {"base": _save(tmp_path / "base.safetensors", sd)}
    for run, i in (("a", 0), ("b", 1)):
        t = {k: v.clone() for k, v in sd.items()}
        t[UP][i, i] += 1
        paths[run] = _save(tmp_path / f"{run}.safetensors", t)
    d = overlap(paths["base"], [paths["a"], paths["b"]]).to_json()
    layers = {L["layer"]: L for L in d["layers"]}
    (empty,) = layers[1]["pairs"]
    assert layers[1]["numel"] == 0 and empty["o1"] is None and empty["sparsity_a"] is None
    assert empty["note"] == "no elements compared in this group: every ratio is undefined"
    assert layers[0]["pairs"][0]["o1"] == 0.0


def test_cli_overlap_with_a_run_that_changed_nothing(tmp_path, capsys):
    base, p = _runs(tmp_path, torch.ones(10, 10), {"A": [1, 2, 3], "B": []}, lambda x: x + 0.5)
    out = tmp_path / "o.json"
    assert main(["overlap", base, p["A"], p["B"], "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["pairs"][0]["o2"] is None
    assert "undefined" in capsys.readouterr().out


# ------------------------------------------------------------------ selectors and importance

def _llama_dir(path: Path, edit=None) -> Path:
    model = tiny_llama()
    model.save_pretrained(path)
    if edit is not None:
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        edit(sd)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_predictive_power_when_nothing_or_everything_changed(llama_dir):
    from analysis.importance.scores import compute_scores
    from analysis.checkpoints.models import load_model
    from analysis.importance.evaluation import predictive_power

    model, _ = load_model(llama_dir, device="cpu")
    scores = compute_scores(model, "magnitude")
    nothing = {}
    diff_checkpoints(llama_dir, llama_dir, on_mask=nothing.__setitem__)  # a fine-tune that changed nothing
    p = predictive_power(scores, nothing)
    assert (p.k, p.precision_at_k, p.auroc, p.base_rate) == (0, None, None, 0.0)
    assert p.note == "the fine-tune changed no element in scope: precision@k and AUROC are undefined"
    d = json.loads(json.dumps(p.to_dict(), allow_nan=False))
    assert d["auroc"] is None and d["note"] == p.note
    everything = {k: torch.ones_like(v) for k, v in nothing.items()}
    p = predictive_power(scores, everything)
    assert (p.k, p.precision_at_k, p.auroc) == (p.n, 1.0, None) and "AUROC is undefined" in p.note


def test_cli_evaluate_selectors_against_a_fine_tune_that_changed_nothing(demo, tmp_path):
    out = tmp_path / "e.json"
    assert main(["evaluate-selectors", str(demo / "sft"), "--selectors", "magnitude", "--against-diff",
                 str(demo / "sft"), str(demo / "sft"), "--density", "0.05", "--json", str(out), "--quiet"]) == 0
    (p,) = json.loads(out.read_text())["prediction"]
    assert p["auroc"] is None and p["k"] == 0


def test_importance_needs_float_parameters():
    from analysis.importance.scores import ImportanceError, compute_scores

    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ImportanceError, match=r"^importance needs float weights .*: "
                                              r"model\.layers\.0\.self_attn\.q_proj\.weight is int8; "):
        compute_scores(model, "magnitude")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_importance_of_a_quantized_checkpoint_is_one_line(tmp_path, capsys, dtype):
    """load_model upcasts int8 / fp8 weights to float32 silently; the stored dtype still says no."""
    def quantize(sd):
        sd[Q] = (sd[Q] * 100).round().to(dtype)

    d = _llama_dir(tmp_path / "quantized", quantize)
    name = str(dtype).removeprefix("torch.")
    out = tmp_path / "i.json"
    assert main(["importance", str(d), "--selector", "magnitude", "--device", "cpu", "--json", str(out),
                 "--quiet"]) == 2
    _one_error_line(capsys, "importance needs float weights", f"{Q} is stored as {name}")
    assert not out.exists()


def test_importance_allows_integer_buffers(tmp_path):
    """Integer buffers (GPT-2's stored attention mask, BERT's position ids) are not weights."""
    from analysis.importance.scores import compute_scores
    from analysis.checkpoints.models import load_model

    model = tiny_gpt2()
    d = tmp_path / "gpt2"
    model.save_pretrained(d)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()  # as old GPT-2 files
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(d, device="cpu")
    assert compute_scores(model, "magnitude").granularity == "element"


# ------------------------------------------------------------------ one definition, undefined in plots

def test_paper_tolerance_is_defined_once():
    hits = [str(p.relative_to(ROOT)) for d in ("analysis", "app_pages", "ui", "kernels", "bench")
            for p in (ROOT / d).rglob("*.py") if re.search(r"^\s*PAPER_TOL\s*=", p.read_text(), re.M)]
    assert hits == ["analysis/definitions.py"]


def test_plots_show_undefined_ratios():
    from ui import plots

    pair = {"a": 0, "b": 1, "o1": None, "o2": 0.0, "o1_random": 0.1, "o2_random": 0.0, "o1_matched": None,
            "o2_matched": 0.0}
    fig = plots.overlap_matrix([pair], ["A", "B"])
    assert fig.data[0].text[0][1].startswith("undefined<br>rand 0.10<br>matched undefined")
    roc = plots.roc_curves({"magnitude": {"fpr": [0, 1], "tpr": [0, 1], "auroc": None}})
    assert roc.data[0].name == "magnitude (AUROC undefined)"
