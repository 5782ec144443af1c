"""AppTest of the Importance page on the demo family: scores, mask, comparison and the
"does it predict the update?" panel against the diff sft -> rl-seed1."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from analysis.sparsity.diff import diff_checkpoints
from analysis.importance.scores import compute_scores
from analysis.checkpoints.models import load_model
from analysis.importance.evaluation import predictive_power
from conftest import ROOT
from plotly_data import traces


def test_the_prediction_of_seven_selectors_is_a_job_on_the_demo(demo):
    """Its cost (the model once per data-free selector and per calibration sample of the others: 131
    passes of 184,512 parameters) is above the inline limit: a button, nothing computed in the rerun;
    the comparison of two selectors (33 passes) is computed inline."""
    at = AppTest.from_file(str(ROOT / "app_pages" / "importance.py"), default_timeout=300)
    at.session_state["base_ref"] = str(demo / "base")
    at.session_state["tuned_refs"] = [str(demo / "rl-seed1")]
    at.run()
    assert not at.exception and not at.error
    assert any(b.label == "Run evaluate 7 selectors in the background" for b in at.button)
    assert not at.success and [m.label for m in at.metric][1] == "Spearman ρ"


def test_importance_page_on_demo(demo, monkeypatch):
    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "100000000")  # every panel inline
    at = AppTest.from_file(str(ROOT / "app_pages" / "importance.py"), default_timeout=300)
    at.session_state["base_ref"] = str(demo / "base")
    at.session_state["tuned_refs"] = [str(demo / "rl-seed1")]
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    # the scored model defaults to the fine-tune's parent... which is not selected here: the base
    assert at.selectbox[0].value == str(demo / "base")
    # 5% of the blocks scope selected, exactly
    blocks = sum(p.numel() for n, p in load_model(demo / "base", device="cpu")[0].named_parameters()
                 if ".layers." in n and p.dim() == 2)
    assert at.metric[0].value == f"{round(0.05 * blocks):,}"
    # the prediction panel: magnitude's AUROC equals the backend's on the same diff
    changed = {}
    diff_checkpoints(demo / "sft", demo / "rl-seed1", tol=1e-5, on_mask=changed.__setitem__)
    model, _ = load_model(demo / "base", device="cpu")
    expected = predictive_power(compute_scores(model, "magnitude"), changed).auroc
    bars = traces(at.get("plotly_chart")[-2].proto.spec)
    auroc = dict(zip(bars[0]["x"], bars[0]["y"]))
    assert auroc["magnitude"] == pytest.approx(expected)
    assert "Best predictor" in at.success[0].value
    # the score histogram draws a strided sample, and its title says so with both counts
    hist = next(c for c in at.get("plotly_chart") if "Score distribution" in c.proto.spec)
    fig = json.loads(hist.proto.spec)
    shown = len(traces(fig)[0]["x"])
    assert shown == len(range(0, blocks, blocks // 50_000)) < blocks
    assert fig["layout"]["title"]["text"] == (f"Score distribution (a strided sample of {shown:,} of the {blocks:,} "
                                              f"elements in scope)")


def test_prediction_panel_when_the_fine_tune_changed_nothing(demo, tmp_path, monkeypatch):
    """AUROC is undefined with no changed element: the page says why instead of crashing."""
    import shutil

    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "100000000")
    same = tmp_path / "sft-copy"
    shutil.copytree(demo / "sft", same)
    at = AppTest.from_file(str(ROOT / "app_pages" / "importance.py"), default_timeout=300)
    at.session_state["base_ref"] = str(demo / "sft")
    at.session_state["tuned_refs"] = [str(same)]
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    notes = [i.value for i in at.info]
    assert any("changed no element in scope: precision@k and AUROC are undefined" in n for n in notes), notes
    assert not at.success
