"""Families (docs/design.md §14): each checkpoint's parent read from its files in the documented
order, the user's corrections kept, cycles broken, and short names that tell members apart."""

import json
import shutil
from pathlib import Path

import pytest

from analysis.cli import main
from analysis.families.lineage import (Family, FamilyError, declared_parent, load_corrections, load_names,
                                       normalize_ref, set_parent, short_names)


def _ckpt(d: Path, **config) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return d


def _card(d: Path, yaml: str) -> None:
    (d / "README.md").write_text(f"---\n{yaml}\n---\n# a model\n")


def test_each_source_names_the_parent_in_order(tmp_path):
    base = _ckpt(tmp_path / "base")
    sft = _ckpt(tmp_path / "arith" / "sft", _name_or_path=str(base))  # config names the base
    grpo = _ckpt(tmp_path / "arith" / "grpo-lr1e-5", _name_or_path=str(base))
    _card(grpo, "base_model: ../sft\nlicense: mit")  # the card (relative to the folder) beats config.json
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(sft)}))
    _card(adapter, f"base_model: {base}")  # the adapter's own field beats its card
    members = [base, sft, grpo, adapter]

    got = {Path(m).name: declared_parent(str(m), members) for m in members}
    assert got["base"].ref is None
    assert (got["sft"].ref, got["sft"].source) == (str(base), "config")
    assert (got["grpo-lr1e-5"].ref, got["grpo-lr1e-5"].source) == (str(sft), "model card")
    assert (got["adapter"].ref, got["adapter"].source) == (str(sft), "adapter")
    assert got["adapter"].file == str(adapter / "adapter_config.json")


def test_a_run_directory_names_its_start_checkpoint_first(tmp_path):
    start = _ckpt(tmp_path / "start")
    run = tmp_path / "runs" / "r1"
    _ckpt(run / "model", _name_or_path=str(tmp_path / "elsewhere"))
    (run / ".subnetscope-run").write_text("")
    (run / "config.json").write_text(json.dumps({"checkpoint": str(start), "steps": 3}))
    _card(run / "model", "base_model: org/other")
    for ref in (run / "model", run):
        p = declared_parent(str(ref))
        assert (p.ref, p.source) == (str(start), "run"), ref


def test_config_name_or_path_counts_only_for_another_member(tmp_path):
    a = _ckpt(tmp_path / "a")
    b = _ckpt(tmp_path / "b", _name_or_path=str(a))
    itself = _ckpt(tmp_path / "c")
    (itself / "config.json").write_text(json.dumps({"_name_or_path": str(itself)}))
    hub_copy = _ckpt(tmp_path / "d", _name_or_path="HuggingFaceTB/SmolLM2-135M")
    assert declared_parent(str(b), [a, b]).ref == str(a)
    assert declared_parent(str(b), [b]).ref is None  # a not in the family
    assert declared_parent(str(b)).ref == str(a)  # outside a family (inspect): another local checkpoint
    assert declared_parent(str(itself), [itself, a]).ref is None
    assert declared_parent(str(hub_copy), [hub_copy]).ref is None  # the hub model it was copied from
    assert declared_parent(str(hub_copy), [hub_copy, "HuggingFaceTB/SmolLM2-135M"]).ref == "HuggingFaceTB/SmolLM2-135M"


def test_model_card_forms(tmp_path):
    d = _ckpt(tmp_path / "m")
    _card(d, "base_model:\n- meta-llama/Llama-3.1-8B\n- other/model")
    assert declared_parent(str(d)).ref == "meta-llama/Llama-3.1-8B"  # a list: its first entry
    _card(d, "base_model: [unclosed")  # malformed YAML names no parent, and raises nothing
    assert declared_parent(str(d)).ref is None
    _card(d, "base_model: 12")
    assert declared_parent(str(d)).ref is None
    (d / "README.md").write_text("# no front matter\nbase_model: x/y\n")
    assert declared_parent(str(d)).ref is None


def test_demo_manifest_and_its_trajectory(demo):
    assert declared_parent(str(demo / "rl-seed1")).ref == str(demo / "sft")
    assert declared_parent(str(demo / "sft")).ref == str(demo / "base")
    assert declared_parent(str(demo / "base")).ref is None
    assert declared_parent(str(demo / "rl-seed1-steps" / "step-20")).ref == str(demo / "sft")


def test_corrections_come_first_and_are_kept(tmp_path):
    a, b, c = (_ckpt(tmp_path / n) for n in "abc")
    _card(c, f"base_model: {b}")
    set_parent(str(c) + "/", str(a))  # one spelling per checkpoint
    assert load_corrections() == {str(c): str(a)}
    fam = Family.of([a, b, c])
    assert fam.parent(str(c)) == str(a) and fam.source(str(c)).source == "user"
    set_parent(str(b), None)  # "no parent" is kept too
    assert Family.of([b]).parent(str(b)) is None and Family.of([b]).source(str(b)).source == "user"
    set_parent(str(c), None, forget=True)
    assert Family.of([a, b, c]).parent(str(c)) == str(b)
    with pytest.raises(FamilyError, match="its own parent"):
        set_parent(str(a), str(a))


def test_a_cycle_is_broken(tmp_path):
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    _card(a, f"base_model: {b}")
    _card(b, f"base_model: {a}")
    fam = Family.of([a, b])
    assert [fam.parent(str(a)), fam.parent(str(b))].count(None) == 1
    assert len(fam.tree()) == 2


def test_tree_and_common_parent(tmp_path):
    base = _ckpt(tmp_path / "base")
    sft = _ckpt(tmp_path / "sft")
    _card(sft, f"base_model: {base}")
    r1, r2 = _ckpt(tmp_path / "r1"), _ckpt(tmp_path / "r2")
    for r in (r1, r2):
        _card(r, f"base_model: {sft}")
    fam = Family.of([r1, r2, sft])  # base is not chosen: it is still sft's parent, the tree's root
    assert fam.tree() == [(0, str(base)), (1, str(sft)), (2, str(r1)), (2, str(r2))]
    assert fam.common_parent([r1, r2]) == str(sft) and fam.common_parent([r1, sft]) is None
    assert fam.children(str(sft)) == [str(r1), str(r2)]


def test_short_names():
    refs = ["/home/u/runs/arith/grpo-lr1e-5", "/home/u/runs/code/grpo-lr1e-5", "/home/u/runs/arith/sft",
            "HuggingFaceTB/SmolLM2-135M", "/home/u/base"]
    assert short_names(refs) == {"/home/u/runs/arith/grpo-lr1e-5": "arith/grpo-lr1e-5",
                                 "/home/u/runs/code/grpo-lr1e-5": "code/grpo-lr1e-5",
                                 "/home/u/runs/arith/sft": "sft", "HuggingFaceTB/SmolLM2-135M":
                                 "HuggingFaceTB/SmolLM2-135M", "/home/u/base": "base"}
    # a given label wins where it is unique; a label two refs share is not used
    assert short_names(["/a/x", "/b/x"], {"/a/x": "mine"}) == {"/a/x": "mine", "/b/x": "x"}
    assert short_names(["/a/x", "/b/x"], {"/a/x": "y", "/b/x": "y"}) == {"/a/x": "a/x", "/b/x": "b/x"}
    # a short name never equals another member's label
    assert short_names(["/r/sft", "/q/p"], {"/q/p": "sft"}) == {"/r/sft": "r/sft", "/q/p": "sft"}


def test_normalize_ref(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert normalize_ref("m/") == str(tmp_path / "m") == normalize_ref(str(tmp_path / "x" / ".." / "m"))
    assert normalize_ref("org/name") == "org/name" and normalize_ref("") is None and normalize_ref(None) is None


def test_inspect_reports_the_parent(tmp_path, demo):
    copy = tmp_path / "mine" / "tuned"
    shutil.copytree(demo / "sft", copy)
    _card(copy, f"base_model: {demo / 'base'}")
    out = tmp_path / "i.json"
    assert main(["inspect", str(copy), "--json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())
    assert (got["parent"], got["parent_source"], got["parent_file"]) == (str(demo / "base"), "model card",
                                                                         str(copy / "README.md"))
    assert main(["inspect", str(demo / "base"), "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["parent"] is None


def test_bad_names_and_an_unwritable_family_file_are_one_line(tmp_path, monkeypatch):
    from analysis.families import lineage
    from analysis.families.lineage import set_name

    a = _ckpt(tmp_path / "a")
    for bad in ("x\ny", "x" * 81, "\x1b[31m"):
        with pytest.raises(FamilyError, match="up to 80 printable characters"):
            set_name(str(a), bad)
    set_name(str(a), " mine ")
    assert load_names() == {str(a): "mine"}
    set_name(str(a), "")  # blank: back to the computed name
    assert load_names() == {}
    blocked = tmp_path / "a-file"  # a home that cannot hold family.json (a file where its folder should be)
    blocked.write_text("")
    monkeypatch.setattr(lineage, "family_file", lambda: blocked / "family.json")
    with pytest.raises(FamilyError, match=r"family\.json: cannot keep the family") as e:
        set_parent(str(a), None)
    assert "\n" not in str(e.value)
