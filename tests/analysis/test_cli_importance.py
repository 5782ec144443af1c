"""CLI contracts of `selectors`, `importance` and `evaluate-selectors` on the demo family."""

from __future__ import annotations

import json

import pytest

from analysis.__main__ import main
from analysis.sparsity.masks import count, load_mask
from analysis.importance.selectors import SELECTORS


def test_selectors_lists_registry(capsys):
    assert main(["selectors"]) == 0
    out = capsys.readouterr().out
    for name, e in SELECTORS.items():
        assert name in out and e.paper in out


def test_importance_json_and_mask(demo, tmp_path):
    out, mask = tmp_path / "w.json", tmp_path / "w.safetensors"
    assert main(["importance", str(demo / "sft"), "--selector", "wanda", "--samples", "8", "--density", "0.05",
                 "--mask-out", str(mask), "--json", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert (d["selector"], d["granularity"], d["scope"]) == ("wanda", "element", "blocks")
    assert d["seq_len"] == 32  # --seq-len not given: 64, cut to the demo model's 32 positions
    assert [r["layer"] for r in d["layers"]] == [0, 1, 2, 3]
    assert {r["kind"] for r in d["kinds"]} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert len(d["heads"]["mean"]) == 4 and len(d["heads"]["mean"][0]) == 4  # [layers, query heads]
    scope_n = sum(r["numel"] for r in d["kinds"])
    k, _ = count(load_mask(mask))
    assert k == round(0.05 * scope_n) == d["mask"]["selected"]


def test_importance_layer_selector(demo, tmp_path):
    out = tmp_path / "b.json"
    assert main(["importance", str(demo / "base"), "--selector", "block_influence", "--samples", "8",
                 "--json", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["granularity"] == "layer" and len(d["layers"]) == 4


def test_importance_bad_input(demo, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["importance", str(demo / "sft"), "--selector", "nope", "--json", str(out)]) == 2
    assert "unknown selector 'nope'" in capsys.readouterr().err
    assert main(["importance", str(demo / "sft"), "--selector", "wanda", "--data", str(tmp_path / "none.jsonl"),
                 "--json", str(out), "--quiet"]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["importance", str(demo / "sft"), "--selector", "magnitude", "--mask-out", "m", "--json",
                 str(out)]) == 2
    assert not out.exists()


def test_evaluate_selectors_contract(demo, tmp_path):
    out = tmp_path / "e.json"
    assert main(["evaluate-selectors", str(demo / "sft"), "--selectors", "magnitude,random,taylor",
                 "--against-diff", str(demo / "sft"), str(demo / "rl-seed1"), "--density", "0.05",
                 "--samples", "8", "--stability", "--json", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["agreement"]["names"] == ["magnitude", "random", "taylor"]
    rho = d["agreement"]["spearman"]
    assert rho[0][0] == 1.0 and abs(rho[0][1]) < 0.05  # random is uncorrelated with magnitude
    preds = {p["selector"]: p for p in d["prediction"]}
    assert preds["random"]["auroc"] == pytest.approx(0.5, abs=0.02)
    assert preds["magnitude"]["k"] == preds["taylor"]["k"] > 0
    assert set(d["stability"]) == {"taylor"} and 0 <= d["stability"]["taylor"] <= 1


def test_importance_granularity_and_scores_out(demo, tmp_path):
    from safetensors import safe_open

    out, raw, m = tmp_path / "t.json", tmp_path / "t.safetensors", tmp_path / "m.safetensors"
    assert main(["importance", str(demo / "sft"), "--selector", "taylor", "--granularity", "head", "--samples", "8",
                 "--density", "0.25", "--mask-out", str(m), "--scores-out", str(raw), "--json", str(out),
                 "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["granularity"] == "head" and len(d["heads"]) == 4 and len(d["heads"][0]) == 4
    # structured: 25% of the 16 query heads, whole heads (all 16 q rows of a head, or none)
    mask = load_mask(m)
    heads = 0
    for L in range(4):
        rows = mask[f"model.layers.{L}.self_attn.q_proj.weight"].reshape(4, 16, -1)
        per_head = rows.flatten(1).sum(1)
        assert all(int(c) in (0, 16 * 64) for c in per_head)
        heads += int((per_head > 0).sum())
    assert heads == 4
    with safe_open(str(raw), "pt") as f:
        assert list(f.keys()) == ["head"] and tuple(f.get_tensor("head").shape) == (4, 4)
        assert f.metadata()["selector"] == "taylor"


def test_options_are_typed_and_flags_are_not_options(llama_dir, tmp_path, capsys):
    """--option values reach the selector as the types it declares (the JSON says so); what a flag
    sets (--granularity, --seed) is given by the flag, and every such flag exists."""
    from analysis.cli import build_parser
    from analysis.specs.importance import FLAGS

    out = tmp_path / "p.json"
    for text, value in (("3", 3), ("0.5", 0.5)):
        assert main(["importance", str(llama_dir), "--selector", "principal", "--option", f"k={text}",
                     "--json", str(out), "--quiet"]) == 0
        got = json.loads(out.read_text())["options"]["k"]
        assert got == value and type(got) is type(value)
    assert main(["importance", str(llama_dir), "--selector", "random", "--granularity", "row", "--seed", "4",
                 "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["granularity"] == "row"
    args = vars(build_parser().parse_args(["importance", "x", "--selector", "random", "--json", "o"]))
    assert set(FLAGS) <= set(args)
    capsys.readouterr()
    assert main(["selectors"]) == 0
    listing = capsys.readouterr().out
    assert "--granularity …  element | row" in listing and "--option granularity" not in listing
    assert "--option active_layers=INT" in listing and "--option normalize=true|false" in listing
    assert "--option k=INT|NUMBER" in listing
