"""The family in the app: the sidebar tree (parents read from the files), a correction kept in
family.json and in the URL, short names on the pages, and the hand-offs to the fine-tune form."""

from __future__ import annotations

import shutil

import pytest
from streamlit.testing.v1 import AppTest

from analysis.families.lineage import load_corrections, load_names
from conftest import ROOT


@pytest.fixture
def copies(demo, tmp_path):
    """The demo copied into folders of its own, without a manifest: arith/sft names its parent by a model
    card, arith/grpo-lr1e-5 and code/grpo-lr1e-5 by their model cards too (one relative)."""
    d = tmp_path / "mine"
    shutil.copytree(demo / "base", d / "base")
    shutil.copytree(demo / "sft", d / "arith" / "sft")
    (d / "arith" / "sft" / "README.md").write_text(f"---\nbase_model: {d / 'base'}\n---\n")
    for run, seed in (("arith", "rl-seed1"), ("code", "rl-seed2")):
        shutil.copytree(demo / seed, d / run / "grpo-lr1e-5")
        (d / run / "grpo-lr1e-5" / "README.md").write_text("---\nbase_model: ../../arith/sft\n---\n")
    return {"base": str(d / "base"), "sft": str(d / "arith" / "sft"), "g1": str(d / "arith" / "grpo-lr1e-5"),
            "g2": str(d / "code" / "grpo-lr1e-5")}


def _app(c, tuned=("sft", "g1", "g2")) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state["base_ref"] = c["base"]
    at.session_state["tuned_refs"] = [c[t] for t in tuned]
    return at


def _tree(at) -> list[str]:
    return [m.value for m in at.sidebar.markdown if "`" in m.value]


def test_the_sidebar_draws_the_family_from_model_cards(copies):
    at = _app(copies).run()
    assert not at.exception, at.exception
    assert _tree(at) == ["`base`", "\u200b\u2003↳ `sft`", "\u200b\u2003\u2003↳ `arith/grpo-lr1e-5`",
                         "\u200b\u2003\u2003↳ `code/grpo-lr1e-5`"]
    # the full path and where the parent was read, in the tooltip
    g1 = next(m for m in at.sidebar.markdown if "arith/grpo" in m.value)
    assert g1.help.startswith(copies["g1"] + " — parent from the model card: ")


def test_a_corrected_parent_is_kept_in_family_json_and_the_url(copies):
    at = _app(copies).run()
    at.selectbox(key="family_child").set_value(copies["g2"]).run()
    at.selectbox(key=f"family_parent_{copies['g2']}").set_value(copies["base"]).run()
    next(b for b in at.sidebar.button if b.label == "Keep the parent").click().run()
    assert not at.exception, at.exception
    assert load_corrections() == {copies["g2"]: copies["base"]}
    parent = at.query_params["parent"]
    assert (parent if isinstance(parent, list) else [parent]) == [f"{copies['g2']}::{copies['base']}"]
    assert "\u200b\u2003↳ `code/grpo-lr1e-5`" in _tree(at)  # now under base
    # a new browser with the link, and no family.json: the same family
    from analysis.families import lineage

    lineage.family_file().unlink()
    again = _app(copies)
    again.query_params["parent"] = f"{copies['g2']}::{copies['base']}"
    again.run()
    assert _tree(again) == _tree(at)
    # renamed once, shown by that name
    at.text_input(key=f"family_name_{copies['g2']}").set_value("grpo-on-code").run()
    next(b for b in at.sidebar.button if b.label == "Keep the name").click().run()
    assert load_names() == {copies["g2"]: "grpo-on-code"} and "\u200b\u2003↳ `grpo-on-code`" in _tree(at)


def test_update_sparsity_compares_each_copy_with_its_parent_after_a_reload(copies, demo):
    """The RL copies against their SFT parent (read from the cards): the demo's own RL diff, not the
    base's, with short names — and the same in a new session from the URL alone."""
    from analysis.sparsity.diff import diff_checkpoints

    want = diff_checkpoints(demo / "sft", demo / "rl-seed1", tol=1e-5).update_sparsity
    at = _app(copies)
    at.switch_page("app_pages/update_sparsity.py").run()
    assert not at.exception, at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["sft → arith/grpo-lr1e-5"] == f"{want:.2%}"
    assert set(labels) == {"base → sft", "sft → arith/grpo-lr1e-5", "sft → code/grpo-lr1e-5"}
    fresh = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    fresh.query_params.update(base=copies["base"], tuned=[copies["sft"], copies["g1"], copies["g2"]])
    fresh.switch_page("app_pages/update_sparsity.py").run()
    assert {m.label: m.value for m in fresh.metric} == labels


def test_train_this_mask_opens_the_form_filled_in(demo):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("app_pages/importance.py").run()
    at.selectbox(key="imp_selector").set_value("wanda").run()
    at.number_input(key="imp_density").set_value(0.02).run()
    next(b for b in at.button if b.label == "Train this mask").click().run()
    assert not at.exception, at.exception
    assert any("Filled in from Importance" in i.value for i in at.info)
    assert at.radio[0].value == "selector"
    sel = next(s for s in at.selectbox if s.label == "Selector")
    assert sel.value == "wanda"
    assert next(n for n in at.number_input if n.label == "Density").value == pytest.approx(0.02)
    assert next(s for s in at.selectbox if s.label == "Start from").value == str(demo / "sft")


def test_train_the_changed_subnetwork_opens_the_form_filled_in(demo):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("app_pages/update_sparsity.py").run()
    at.selectbox(key="sparsity_focus").set_value(str(demo / "rl-seed2")).run()
    next(b for b in at.button if b.label == "Train the changed subnetwork").click().run()
    assert not at.exception, at.exception
    assert at.radio[0].value == "diff"
    assert next(s for s in at.selectbox if s.label == "Start from").value == str(demo / "sft")
    assert next(s for s in at.selectbox if s.label == "Changed by").value == str(demo / "rl-seed2")
    assert next(s for s in at.selectbox if s.label == "…relative to").value == str(demo / "sft")
