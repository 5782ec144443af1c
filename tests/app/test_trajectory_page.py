"""AppTest of the Trajectory page on the demo's RL run saved every 10 steps."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from analysis.families.demo import trajectory_dirs
from analysis.sparsity.trajectory import trajectory
from conftest import ROOT
from plotly_data import traces


def _steps(at):
    return next(t for t in at.text_input if t.label == "Steps (optional)")


def test_trajectory_page_on_the_demo_run(demo):
    at = AppTest.from_file(str(ROOT / "app_pages" / "trajectory.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    cks = trajectory_dirs(demo)
    # the run is one folder of step-N directories, sorted by step; its base the first one's parent (the manifest)
    assert at.text_input(key="trajectory_run").value == str(demo / "rl-seed1-steps")
    assert at.text_input(key="trajectory_base").value == str(demo / "sft")
    assert "5 checkpoints: step-10, step-20, step-30, step-40, step-50 — from demo/sft" in [c.value for c in at.caption]
    expected = trajectory(demo / "sft", cks).to_json()
    lines = traces(at.get("plotly_chart")[0].proto.spec)
    assert lines[0]["x"] == [10, 20, 30, 40, 50]
    assert lines[0]["y"] == [c["vs_base"]["update_sparsity"] for c in expected["checkpoints"]]
    assert lines[1]["y"] == [c["vs_previous"]["update_sparsity"] for c in expected["checkpoints"]]
    assert at.metric[3].value == f"{expected['first_changed_histogram']['never']:,}"
    table = at.dataframe[0].value
    assert list(table["ever changed"]) == [c["cumulative_changed"] for c in expected["checkpoints"]]


def test_bad_steps_and_missing_checkpoint_are_errors(demo, tmp_path):
    at = AppTest.from_file(str(ROOT / "app_pages" / "trajectory.py"), default_timeout=300)
    at.run()
    _steps(at).set_value("10,x").run()
    assert not at.exception and at.error and "whole numbers" in at.error[0].value
    _steps(at).set_value("").run()
    at.text_area(key="trajectory_list").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception and at.error and "nowhere" in at.error[0].value
    at.text_area(key="trajectory_list").set_value("").run()
    at.text_input(key="trajectory_run").set_value(str(tmp_path)).run()  # a folder without step-N checkpoints
    assert not at.exception and at.error and "no step-N or checkpoint-N folder" in at.error[0].value


def test_a_run_folder_and_its_parent_from_the_link(demo, tmp_path):
    """A folder of checkpoint-N copies (out of name order on disk: 5, 40, 100) is sorted by step; the
    base comes from the first one's model card; the URL keeps both across a reload."""
    import shutil

    run = tmp_path / "out"
    for step in (100, 5, 40):
        shutil.copytree(demo / "sft", run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "README.md").write_text(f"---\nbase_model: {demo / 'base'}\n---\n")
    at = AppTest.from_file(str(ROOT / "app_pages" / "trajectory.py"), default_timeout=300)
    at.query_params["run"] = str(run)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.text_input(key="trajectory_base").value == str(demo / "base")
    assert traces(at.get("plotly_chart")[0].proto.spec)[0]["x"] == [5, 40, 100]
    assert at.query_params["from"] in (str(demo / "base"), [str(demo / "base")])
    assert at.query_params["run"] in (str(run), [str(run)])


def test_slider_reaggregates_and_sets_on_request(demo, monkeypatch):
    """Moving τ answers the sparsity lines and the layer heatmap from the one pass (no second
    trajectory), equal to a fresh trajectory at that τ; the set counts say their τ until the
    button measures them at the new one."""
    import analysis.sparsity.trajectory as tr

    calls = []
    real = tr.trajectory

    def counted(*a, **k):
        calls.append(k.get("tol"))
        return real(*a, **k)

    monkeypatch.setattr(tr, "trajectory", counted)
    import streamlit as st

    st.cache_data.clear()  # the page caches its passes by the files' fingerprints: count from scratch
    at = AppTest.from_file(str(ROOT / "app_pages" / "trajectory.py"), default_timeout=300)
    at.run()
    assert calls == [1e-5]
    at.select_slider(key="trajectory_tol").set_value(1e-3).run()
    assert not at.exception and not at.error, at.exception
    assert calls == [1e-5]  # no second pass
    cks = trajectory_dirs(demo)
    want = real(demo / "sft", cks, tol=1e-3).to_json()
    lines = traces(at.get("plotly_chart")[0].proto.spec)
    assert lines[0]["y"] == [c["vs_base"]["update_sparsity"] for c in want["checkpoints"]]
    assert lines[1]["y"] == [c["vs_previous"]["update_sparsity"] for c in want["checkpoints"]]
    heat = traces(at.get("plotly_chart")[3].proto.spec)[0]
    assert heat["z"] == [r["update_sparsity"] for r in want["layers"]]
    table = at.dataframe[0].value
    assert "ever changed (τ = 1e-5)" in table.columns
    next(b for b in at.button if b.label == "Sets at τ = 1e-3").click().run()
    assert calls == [1e-5, 1e-3]
    table = at.dataframe[0].value
    assert list(table["ever changed"]) == [c["cumulative_changed"] for c in want["checkpoints"]]


def test_checkpoints_out_of_training_order_are_an_error_not_renumbered(tmp_path, monkeypatch):
    """step-30, step-10, step-20 is one st.error naming the order found."""
    import re

    from conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    for n in (10, 20, 30):
        tiny_llama().save_pretrained(tmp_path / f"step-{n}")
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))  # no demo run as the default
    at = AppTest.from_file(str(ROOT / "app_pages" / "trajectory.py"), default_timeout=120)
    at.run()
    at.text_input(key="trajectory_base").set_value(str(tmp_path / "base"))
    at.text_area(key="trajectory_list").set_value("\n".join(str(tmp_path / f"step-{n}") for n in (30, 10, 20))).run()
    assert not at.exception, at.exception
    [e] = [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]
    assert e == "checkpoints not in training order: their names give steps 30, 10, 20; list them as 10, 20, 30"
    assert not at.get("plotly_chart")
