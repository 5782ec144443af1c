"""AppTest of the Behaviour page on the demo family: the per-token KL of the first RL run against its
parent (SFT) as the behaviour API gives it, a sweep's recovered gains as the patch API gives them,
and a bad subset an st.error."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from analysis.specs import get_spec
from analysis.specs.behaviour import BehaviourParams
from analysis.specs.patch import PatchParams
from conftest import ROOT
from plotly_data import traces


def _fresh_home(demo, tmp_path, monkeypatch):
    """A home of its own (no job of an earlier run is found done) holding the demo family by a link."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "demo").symlink_to(demo)
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(home))
    monkeypatch.setenv("SUBNETSCOPE_JOBS_IN_PROCESS", "1")
    return home / "demo"


def test_behaviour_page_on_the_demo(demo, tmp_path, monkeypatch):
    demo = _fresh_home(demo, tmp_path, monkeypatch)
    at = AppTest.from_file(str(ROOT / "app_pages" / "behaviour.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="beh_tune").value == str(demo / "sft")  # the first fine-tune, against the base
    at.selectbox(key="beh_tune").set_value(str(demo / "rl-seed1")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "demo/sft" in " ".join(c.value for c in at.caption)  # compared with its parent, not the base
    want = get_spec("behaviour").run(BehaviourParams(str(demo / "sft"), str(demo / "rl-seed1"), prompts="demo"), None)
    assert at.metric[0].value == f"{want['kl_mean']:.3g} nats"
    assert at.metric[2].value == "256"
    sweep = get_spec("patch").run(PatchParams(str(demo / "sft"), str(demo / "rl-seed1"), eval=("demo",),
                                              sweep="layers"), None)
    charts = at.get("plotly_chart")
    bars = traces(charts[-1].proto.spec)
    alone = [r["recovered"] for r in sweep["rows"] if r["group"] == "alone"]
    assert bars[0]["y"] == pytest.approx(alone)
    assert json.loads(charts[-1].proto.spec)["layout"]["title"]["text"].startswith("Recovered gain")
    at.text_input(key="beh_subset").set_value("layers:9").run()
    assert not at.exception
    at.button(key="start_beh_save").click().run()  # the job runs (here, in the page's process) and fails in one line
    assert not at.exception
    assert any("block 9 does not exist" in e.value for e in at.error), [e.value for e in at.error]
    at.text_input(key="beh_subset").set_value("kinds:attn").run()
    at.button(key="start_beh_save").click().run()  # "Save this hybrid": the parent with the attention update
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Saved" in m.value for m in at.success)
    from analysis.families.lineage import declared_parent
    from analysis.behaviour.patch import Pair

    saved = next((demo.parent / "hybrids").iterdir())
    assert declared_parent(str(saved), [str(demo / "sft"), str(saved)]).ref == str(demo / "sft")  # a child of it
    import torch

    pair, source = Pair.open(str(saved), str(demo / "rl-seed1")), Pair.open(str(demo / "sft"), str(demo / "rl-seed1"))
    for key, (n, _) in pair.names.items():  # attention from the tune, the rest the parent's, bit for bit
        want = source.theta(key)[1 if pair.kind[key] in ("q", "k", "v", "o") else 0]
        assert torch.equal(want, pair.base.tensor(n)), key


def test_importance_page_asks_whether_importance_finds_what_matters(demo, tmp_path, monkeypatch):
    """Importance → "Does importance find what matters?": two jobs on a click each; the selectors' top-k
    curve beside random and the per-layer Spearman table are what the patch API gives for the same pair."""
    demo = _fresh_home(demo, tmp_path, monkeypatch)
    at = AppTest.from_file(str(ROOT / "app_pages" / "importance.py"), default_timeout=600)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.multiselect[-1].set_value(["magnitude", "random"]).run()  # the prediction's selectors: magnitude (+ random)
    for key in ("start_imp_matters_density", "start_imp_matters_layers"):
        at.button(key=key).click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    sft, rl = str(demo / "sft"), str(demo / "rl-seed1")
    want = get_spec("patch").run(PatchParams(sft, rl, eval=("kl:demo",), sweep="layers", selector=("magnitude",),
                                             attribute=True), None)
    table = at.dataframe[-1].value
    assert list(table["selector"]) == ["Magnitude |W|", "weight IG (estimated)"]
    assert list(table.iloc[:, 1]) == pytest.approx([r["spearman"] for r in want["layer_agreement"]])
    curve = [c for c in at.get("plotly_chart")
             if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Recovered gain of each selector")]
    names = [t["name"] for t in traces(curve[0].proto.spec)]
    assert names == ["magnitude", "random"]
