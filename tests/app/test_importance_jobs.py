"""The Importance page on a model above the inline limit: nothing is scored inside the rerun; the
scores, the comparison and the prediction come from background CLI jobs (`importance`,
`evaluate-selectors`), and their numbers are the ones the page computes inline."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from analysis.jobs import JobDir
from conftest import ROOT
from plotly_data import traces


def _page(demo) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / "importance.py"), default_timeout=300)
    at.session_state["base_ref"] = str(demo / "base")
    at.session_state["tuned_refs"] = [str(demo / "rl-seed1")]
    return at


def _wait_jobs(home, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    for d in (home / "jobs").iterdir():
        while JobDir(d).state().status == "running":
            assert time.time() < deadline, d
            time.sleep(0.3)
        assert JobDir(d).state().status == "done", JobDir(d).state().error


def _click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception


def test_large_model_is_scored_by_jobs(demo, tmp_path, monkeypatch):
    """The jobs run in-process (the injectable launcher: the same job directories, params files and
    results as a run-job process writes; tests/analysis/test_jobs.py starts real ones)."""
    monkeypatch.setenv("SUBNETSCOPE_JOBS_IN_PROCESS", "1")
    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "100000000")  # the reference: every panel inline
    inline = _page(demo)
    inline.run()
    assert not inline.exception and not inline.error
    expected_selected = inline.metric[0].value
    expected_auroc = dict(zip(*(traces(inline.get("plotly_chart")[-2].proto.spec)[0][k] for k in ("x", "y"))))

    home = tmp_path / "home"  # a fresh jobs folder; the demo family (and its parents) as before
    home.mkdir()
    (home / "demo").symlink_to(demo)
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(home))
    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "1000")  # the demo's 184,512 parameters are "large"
    at = _page(home / "demo")  # the paths the demo family has under this home (its manifest's parents)
    at.run()
    assert not at.exception, at.exception
    assert not at.metric and not at.get("plotly_chart")  # nothing scored in the rerun
    assert not (home / "jobs").exists()  # nor started before the user asks
    _click(at, "Run score magnitude in the background")
    _wait_jobs(home)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.metric[0].value == expected_selected  # the job's mask: the same top-k as inline
    assert any("background job" in c.value for c in at.caption)
    _click(at, "Run evaluate 2 selectors in the background")  # the comparison with a second selector
    _click(at, "Run evaluate 7 selectors in the background")  # the prediction panel
    _wait_jobs(home)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(list((home / "jobs").iterdir())) == 3
    auroc = dict(zip(*(traces(at.get("plotly_chart")[-2].proto.spec)[0][k] for k in ("x", "y"))))
    assert auroc.keys() == expected_auroc.keys()
    for k in auroc:
        assert auroc[k] == pytest.approx(expected_auroc[k], abs=1e-9), k
    assert "Best predictor" in at.success[0].value
