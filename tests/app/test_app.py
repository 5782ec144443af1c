"""AppTest of the whole app: navigation, the sidebar picker on the demo family, recent paths."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from analysis.checkpoints import open_checkpoint
from analysis.families.demo import build_demo, default_demo_dir, demo_is_current
from conftest import ROOT, tiny_llama


def test_app_opens_on_demo_family():
    d = default_demo_dir()
    if not demo_is_current(d):
        build_demo(d, progress=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert at.selectbox[0].label == "Base" and at.selectbox[0].value == str(d / "base")
    assert at.multiselect[0].value == [str(d / n) for n in ("sft", "rl-seed1", "rl-seed2")]
    totals = [m.value for m in at.metric if m.label == "Total parameters"]
    assert totals[0] == f"{open_checkpoint(d / 'base').total_params:,}"


def test_opened_path_is_remembered(tmp_path, monkeypatch):
    """A path typed in the picker (the page sees it in the selection) joins the recent list, and
    a new session offers it. (AppTest cannot type a new option; the browser test does.)"""
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))  # no demo here: empty picker
    a = tmp_path / "mine"
    tiny_llama().save_pretrained(a)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert at.selectbox[0].value is None and at.selectbox[0].options == []
    assert "Choose a base checkpoint" in at.info[0].value
    page = AppTest.from_file(str(ROOT / "app_pages" / "checkpoints.py"), default_timeout=120)
    page.session_state["base_ref"] = str(a)
    page.session_state["tuned_refs"] = []
    page.run()
    assert [m.value for m in page.metric if m.label == "Total parameters"] == ["68,160"]
    assert json.loads((tmp_path / "recent.json").read_text()) == [str(a)]  # conftest keeps it in tmp_path
    at2 = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert at2.selectbox[0].options == ["mine"]  # offered by its short name (the path's last part)


def test_recent_list_drops_vanished_paths(tmp_path):
    import ui.state

    keep = tmp_path / "still-here"
    keep.mkdir()
    (tmp_path / "recent.json").write_text(json.dumps([str(tmp_path / "gone"), str(keep), "acme/tiny-llama"]))
    assert ui.state.recent_refs() == [str(keep), "acme/tiny-llama"]
