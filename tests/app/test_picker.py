"""The sidebar picker: every change sticks (alternating removals, base changes, clear all), the
choice is mirrored into the URL and read back by a new session, a stale path in a link is dropped
with a warning, and a path typed with a trailing slash is one entry."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from conftest import ROOT


def _app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)


def _listed(v) -> list:
    return [] if v is None else [v] if isinstance(v, str) else list(v)


def _state(at):
    return at.selectbox(key="picker_base").value, at.multiselect(key="picker_tuned").value


def test_every_change_sticks(demo):
    d = {n: str(demo / n) for n in ("base", "sft", "rl-seed1", "rl-seed2")}
    at = _app().run()
    assert not at.exception, at.exception
    assert _state(at) == (d["base"], [d["sft"], d["rl-seed1"], d["rl-seed2"]])
    steps = [
        ("unselect", d["rl-seed2"], (d["base"], [d["sft"], d["rl-seed1"]])),
        ("unselect", d["rl-seed1"], (d["base"], [d["sft"]])),  # the second change: it used to come back
        ("base", d["sft"], (d["sft"], [d["sft"]])),
        ("base", d["rl-seed1"], (d["rl-seed1"], [d["sft"]])),
        ("select", d["rl-seed2"], (d["rl-seed1"], [d["sft"], d["rl-seed2"]])),
        ("unselect", d["sft"], (d["rl-seed1"], [d["rl-seed2"]])),
        ("unselect", d["rl-seed2"], (d["rl-seed1"], [])),  # cleared in one go
        ("base", d["base"], (d["base"], [])),
    ]
    for action, value, want in steps:
        ms, sb = at.multiselect(key="picker_tuned"), at.selectbox(key="picker_base")
        {"unselect": ms.unselect, "select": ms.select, "base": sb.select}[action](value)
        at.run()
        assert not at.exception, at.exception
        assert _state(at) == want, (action, value)
        assert (at.session_state["base_ref"], at.session_state["tuned_refs"]) == want
        assert _listed(at.query_params.get("base")) == [want[0]] and _listed(at.query_params.get("tuned")) == want[1]


def test_a_link_restores_the_choice_and_drops_stale_paths(demo, tmp_path):
    at = _app()
    at.query_params["base"] = str(demo / "sft") + "/"  # a trailing slash: the same checkpoint
    at.query_params["tuned"] = [str(demo / "rl-seed2"), str(tmp_path / "gone")]
    at.run()
    assert not at.exception, at.exception
    assert _state(at) == (str(demo / "sft"), [str(demo / "rl-seed2")])
    assert any("gone: no such path; dropped from the link" in w.value for w in at.sidebar.warning)
    options = at.selectbox(key="picker_base").options
    # the demo's SFT once, not again with the slash (a machine with the SmolLM2 family built offers its sft too)
    assert len([o for o in options if "sft" in o and "smollm2" not in o]) == 1


def test_page_choices_round_trip_through_the_url(demo):
    """τ and the selector are written to the URL and read back by a new session (a reload or a
    shared link); a value that does not apply is dropped with a warning naming it."""
    page = str(ROOT / "app_pages" / "importance.py")
    at = AppTest.from_file(page, default_timeout=300)
    at.session_state["base_ref"], at.session_state["tuned_refs"] = str(demo / "base"), [str(demo / "rl-seed1")]
    at.run()
    at.selectbox(key="imp_selector").select("smallest_magnitude").run()
    at.number_input(key="imp_density").set_value(0.2).run()
    assert not at.exception, at.exception
    assert _listed(at.query_params["selector"]) == ["smallest_magnitude"]
    assert _listed(at.query_params["density"]) == ["0.2"]
    again = AppTest.from_file(page, default_timeout=300)
    again.session_state["base_ref"], again.session_state["tuned_refs"] = str(demo / "base"), [str(demo / "rl-seed1")]
    again.query_params.update(selector="smallest_magnitude", density="0.2")
    again.run()
    assert again.selectbox(key="imp_selector").value == "smallest_magnitude"
    assert again.number_input(key="imp_density").value == 0.2
    stale = AppTest.from_file(str(ROOT / "app_pages" / "update_sparsity.py"), default_timeout=300)
    stale.session_state["base_ref"], stale.session_state["tuned_refs"] = str(demo / "sft"), [str(demo / "rl-seed1")]
    stale.query_params.update(tol="abc", focus="/nowhere")
    stale.run()
    assert not stale.exception, stale.exception
    warnings = " ".join(w.value for w in stale.warning)
    assert "tol=abc" in warnings and "focus=/nowhere" in warnings
    assert stale.select_slider(key="sparsity_tol").value == 1e-5


def test_back_and_forward_restore_the_view(demo):
    """Each choice is a history entry (Streamlit pushes the URL); the back button reruns the page with
    the earlier entry's query string, and the page shows that entry — τ, the selector, the checkpoints —
    instead of writing the newer choice back over it."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("app_pages/update_sparsity.py").run()
    first = dict(at.query_params)
    assert at.select_slider(key="sparsity_tol").value == 1e-5
    at.select_slider(key="sparsity_tol").set_value(1e-3).run()
    at.multiselect(key="picker_tuned").unselect(str(demo / "rl-seed2")).run()
    assert _listed(at.query_params["tol"]) == ["0.001"]
    assert str(demo / "rl-seed2") not in _listed(at.query_params["tuned"])
    at.query_params.clear()  # back: the browser's URL is the first entry's again, and the page reruns
    at.query_params.update(first)
    at.run()
    assert not at.exception, at.exception
    assert at.select_slider(key="sparsity_tol").value == 1e-5
    assert str(demo / "rl-seed2") in at.multiselect(key="picker_tuned").value
    assert _listed(at.query_params["tol"]) == _listed(first["tol"])  # not overwritten by the newer choice
    assert len(at.metric) == 3
